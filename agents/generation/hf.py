"""Sampling with Hugging Face ``model.generate``: :class:`HFBackend`, the default backend.

It implements :class:`agents.generation.interface.GenerationBackend` (see that module for the
log-probability convention every backend follows) and, for models with a plain dynamic KV cache,
continuous batching through :func:`agents.generation.continuous.continuous_generate`.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from agents.generation.continuous import continuous_generate, supports_continuous
from agents.generation.interface import BackendOutput, left_pad, stop_token_ids

__all__ = ["HFBackend"]


# Neutral values for the logits processors a model's generation_config may switch on
# (instruct models ship top-k, top-p, temperature and repetition penalties). transformers fills
# every field left unset (None) in a generate call from the model's generation_config, so each
# processor is switched off here with an explicit neutral value; any of them would make the
# sampling distribution differ from the one the log-probs describe.
_NEUTRAL_SAMPLING = dict(
    top_k=0,
    typical_p=1.0,
    epsilon_cutoff=0.0,
    eta_cutoff=0.0,
    repetition_penalty=1.0,
    encoder_repetition_penalty=1.0,
    no_repeat_ngram_size=0,
    min_new_tokens=0,
    renormalize_logits=False,
    remove_invalid_values=False,
    num_beams=1,
    num_return_sequences=1,
)

# The truncations above that act only when sampling (greedy decoding ignores them).
_SAMPLING_ONLY = ("top_k", "typical_p", "epsilon_cutoff", "eta_cutoff")

# Processors that only a None value disables, which a generate call cannot pass (None means
# "take the model's value"): a model whose generation_config sets one of them is refused.
_UNSUPPORTED_PROCESSORS = (
    "sequence_bias",
    "bad_words_ids",
    "suppress_tokens",
    "begin_suppress_tokens",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "exponential_decay_length_penalty",
    "watermarking_config",
    "top_h",
)


class HFBackend:
    """Sampling with Hugging Face ``model.generate`` (left padding, KV cache).

    Works on CPU and CUDA: inputs go to the model's device. Sampling is seeded by forking the
    torch RNG (CPU and, on CUDA, the model's device) and seeding it, so a seeded call neither
    depends on nor disturbs the caller's global RNG state. Samples for one prompt depend on the
    whole batch (its padding and its position in it), so "same seed, same samples" holds for the
    same batch of prompts.

    Args:
        model: a causal LM (``PreTrainedModel`` with ``generate``).
        tokenizer: its tokenizer; provides the pad and EOS ids.
        stop_ids: token ids that end a completion; default :func:`stop_token_ids`.
    """

    def __init__(self, model, tokenizer, stop_ids: Sequence[int] | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.stop_ids = list(stop_ids) if stop_ids is not None else stop_token_ids(model, tokenizer)
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else self.stop_ids[0]
        config = model.generation_config
        fixed = [name for name in _UNSUPPORTED_PROCESSORS if getattr(config, name, None) is not None]
        if getattr(config, "guidance_scale", None) not in (None, 1, 1.0):
            fixed.append("guidance_scale")
        if fixed:
            raise ValueError(
                f"model.generation_config sets {fixed}, which would bias sampling away from the "
                "reported log-probs; set them to None on model.generation_config first"
            )
        # min_p has no "off" value other than None; 0.0 keeps every token.
        self._min_p = {"min_p": 0.0} if getattr(config, "min_p", None) is not None else {}

    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]],
        *,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 256,
        seed: int | None = None,
    ) -> list[BackendOutput]:
        """Sample one completion per prompt; see :meth:`GenerationBackend.generate`."""
        _check_sampling_args(prompt_ids, temperature, top_p, max_new_tokens)
        if not prompt_ids:
            return []
        device = self.model.device
        input_ids, attention_mask = left_pad(prompt_ids, self.pad_id, device)
        greedy = temperature == 0
        # Greedy decoding still gets neutral values, so that a model's sampling defaults do not
        # trigger warnings about unused settings; top-k and the other truncations that only act
        # when sampling are left out then (transformers warns about any value it would ignore).
        sampling = {"temperature": 1.0 if greedy else float(temperature), "top_p": 1.0 if greedy else float(top_p)}
        neutral = {k: v for k, v in _NEUTRAL_SAMPLING.items() if not (greedy and k in _SAMPLING_ONLY)}
        with _eval_mode(self.model), torch.no_grad(), _seeded(seed, device):
            out = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                do_sample=not greedy,
                max_new_tokens=int(max_new_tokens),
                eos_token_id=self.stop_ids,
                pad_token_id=self.pad_id,
                return_dict_in_generate=True,
                output_logits=True,
                **neutral,
                **self._min_p,
                **sampling,
            )
        new_tokens = out.sequences[:, input_ids.shape[1] :]
        # logits: one (batch, vocab) tensor per generated position, raw (before temperature).
        # One position at a time: stacking them first would hold several copies of a
        # (batch, new tokens, vocab) tensor, gigabytes for a 49k vocabulary.
        scale = 1.0 if greedy else float(temperature)
        token_logprobs = torch.stack([
            torch.log_softmax(step.float() / scale, dim=-1).gather(-1, new_tokens[:, t : t + 1]).squeeze(-1)
            for t, step in enumerate(out.logits)
        ], dim=1)
        del out
        return [
            _trim(new_tokens[i].tolist(), token_logprobs[i].tolist(), self.stop_ids)
            for i in range(new_tokens.shape[0])
        ]

    def generate_continuous(
        self,
        prompt_ids: Sequence[Sequence[int]],
        next_prompt,
        *,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 256,
        seed: int | Sequence[int] | None = None,
        max_batch: int | None = None,
        prefixes: Sequence[Sequence[int]] = (),
    ) -> dict[str, int]:
        """Continuous batching (see :mod:`agents.generation.continuous`): each slot starts with
        ``prompt_ids[slot]``; when its completion ends, ``next_prompt(slot, output)`` returns
        the slot's next prompt or ``None``. ``seed`` is one seed for the run or one per slot
        (then a slot's samples do not depend on the other slots). ``prefixes`` are token prefixes shared by many
        prompts, prefilled once. Returns the work counts of
        :func:`agents.generation.continuous.continuous_generate` (forward calls, prefill calls and tokens).

        Raises:
            NotImplementedError: the model's KV cache cannot be merged (sliding-window or
                encoder-decoder models); use :meth:`generate` then.
        """
        _check_sampling_args(prompt_ids, temperature, top_p, max_new_tokens)
        if not self.supports_continuous:
            raise NotImplementedError(f"{type(self.model).__name__} has a KV cache continuous batching cannot merge")
        with _eval_mode(self.model):
            return continuous_generate(
                self.model, prompt_ids, next_prompt, stop_ids=self.stop_ids, pad_id=self.pad_id,
                temperature=float(temperature), top_p=float(top_p), max_new_tokens=int(max_new_tokens),
                seed=seed, max_batch=max_batch, prefixes=prefixes,
            )

    @functools.cached_property
    def supports_continuous(self) -> bool:
        """Whether :meth:`generate_continuous` works with this model."""
        return supports_continuous(self.model)


def _trim(ids: list[int], logprobs: list[float], stop_ids: Sequence[int]) -> BackendOutput:
    """Cut a generated row after its first stop token (generate pads finished rows)."""
    for position, token in enumerate(ids):
        if token in stop_ids:
            return ids[: position + 1], logprobs[: position + 1], "stop"
    return ids, logprobs, "length"


def _check_sampling_args(prompt_ids, temperature: float, top_p: float, max_new_tokens: int) -> None:
    """Reject arguments that ``generate`` would misread or fail on deep inside."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if int(max_new_tokens) < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    for i, prompt in enumerate(prompt_ids):
        if len(prompt) == 0:
            raise ValueError(f"prompt {i} is empty")


@contextmanager
def _eval_mode(model) -> Iterator[None]:
    """Run the block with ``model`` in eval mode, then restore its training flag."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextmanager
def _seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Run the block on a forked torch RNG seeded with ``seed``; do nothing when it is None.

    Forking (CPU, plus the model's CUDA device) keeps the caller's global RNG state untouched.
    """
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield

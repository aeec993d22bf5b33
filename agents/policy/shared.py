"""The shared-parameter policy: one causal LM plays the fact extractor and the memory manager.

An observation from ``MemSession-v0`` is ``{"role": 0|1, "text": str}``. The policy wraps the
text in the chat template, with the role's system prompt (:mod:`agents.policy.prompts`) as the system
turn and the text as the user turn, and samples the assistant turn: the action string.

Log-probabilities. ``Generation.logprobs`` and :meth:`SharedPolicy.logprobs_of` both report,
for every completion token, ``log_softmax(logits / T)[token]`` with the model's raw logits and
the sampling temperature ``T`` (``T = 1`` for greedy decoding, ``temperature=0``); top-p
truncation is not part of it. GRPO/PPO ratios must therefore call ``logprobs_of`` with the same
temperature the rollouts were sampled at (the paper uses 1.0, where this is simply the model's
log-probability). In float32 the two agree to about 1e-5; the tests hold them to 1e-4.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from agents.generation.hf import HFBackend
from agents.generation.interface import GenerationBackend, left_pad, stop_token_ids
from agents.policy.chat import encode_chat
from agents.policy.precision import resolve_dtype
from agents.policy.prompts import PROMPT_STYLES, ROLES, role_index, system_prompt

__all__ = ["Generation", "SharedPolicy"]


@dataclass
class Generation:
    """One sampled action with everything a policy-gradient update needs.

    Attributes:
        role: 0 (extractor) or 1 (manager).
        prompt_ids: the rendered prompt (chat template, system prompt, generation prompt).
        completion_ids: sampled tokens, ending with the stop token when ``finish_reason`` is
            ``"stop"``.
        logprobs: one float per completion token, ``log_softmax(logits / T)[token]``.
        text: the completion decoded without special tokens: the action for ``env.step``.
        finish_reason: ``"stop"`` (a stop token was sampled) or ``"length"`` (cut at
            ``max_new_tokens``).
    """

    role: int
    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float] = field(repr=False)
    text: str
    finish_reason: str


class SharedPolicy:
    """One causal LM and tokenizer with two role prompts (shared parameters).

    Args:
        model: a Hugging Face causal LM.
        tokenizer: its tokenizer; it must have a chat template.
        prompt_style: ``"compact"`` (one-line prompts, for the tiny model) or ``"full"``
            (paper-style instructions, for instruct LLMs).
        backend: the sampler; default :class:`~agents.generation.hf.HFBackend` on ``model``.

    Attributes:
        share_role_prefixes: whether :meth:`generate_continuous` prefills each role's prompt
            prefix once and shares it (default ``True``; ``False`` prefills every prompt whole,
            which ``benchmarks/rollout_perf.py`` uses to measure what sharing saves).
    """

    def __init__(
        self,
        model,
        tokenizer,
        prompt_style: str = "compact",
        backend: GenerationBackend | None = None,
    ):
        if prompt_style not in PROMPT_STYLES:
            raise ValueError(f"unknown prompt_style {prompt_style!r}; expected one of {PROMPT_STYLES}")
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat template; SharedPolicy renders roles with it")
        self.model = model
        self.tokenizer = tokenizer
        self.prompt_style = prompt_style
        self.backend = backend if backend is not None else HFBackend(model, tokenizer)
        self.stop_ids = stop_token_ids(model, tokenizer)
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else self.stop_ids[0]
        self.share_role_prefixes = True

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str | None = None,
        prompt_style: str = "compact",
    ) -> SharedPolicy:
        """Load a policy from a local ``save_pretrained`` directory (never downloads).

        Args:
            path: directory holding the model (``config.json`` + weights) and the tokenizer.
            device: where to put the model.
            dtype: weight dtype: a ``torch.dtype``, ``"float32"``, ``"bfloat16"`` or ``"auto"``
                (bfloat16 on CPUs with bfloat16 instructions, else float32; the checkpoint's
                own dtype on accelerators; see :mod:`agents.policy.precision`). ``None`` means
                float32 on CPU and the checkpoint's own dtype on accelerators. The trainers keep
                float32 master weights for bfloat16 and float16 models (:mod:`agents.rl.optim`).
            prompt_style: see :class:`SharedPolicy`.

        Raises:
            FileNotFoundError: ``path`` is not a directory or holds no ``config.json``.
            ValueError: an unknown dtype, or bfloat16 on a CPU without bfloat16 instructions.
        """
        from transformers import AutoModelForCausalLM, AutoTokenizer

        directory = Path(path).expanduser()
        if not directory.is_dir():
            raise FileNotFoundError(
                f"policy directory {str(directory)!r} does not exist; SharedPolicy.from_pretrained "
                "loads local save_pretrained directories only and never downloads"
            )
        if not (directory / "config.json").is_file():
            raise FileNotFoundError(
                f"{str(directory)!r} has no config.json; expected a model saved with save_pretrained"
            )
        device = torch.device(device)
        dtype = resolve_dtype(dtype, device)
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True, dtype=dtype)
        return cls(model.to(device), tokenizer, prompt_style=prompt_style)

    def sync_backend(self) -> bool:
        """Give the backend the model's current weights, where it keeps its own copy (vLLM);
        the trainers call this after every update (through ``RolloutEngine.weights_changed``).
        Returns whether there was anything to sync: the HF backends run ``self.model`` itself."""
        load = getattr(self.backend, "load_weights", None)
        if load is None:
            return False
        load(self.model.state_dict().items())
        return True

    # ----------------------------------------------------------------- prompts and SFT examples

    def messages(self, role: int | str, text: str, completion: str | None = None) -> list[dict]:
        """Chat messages for one observation: system prompt, user text, optional assistant reply."""
        if not isinstance(text, str):
            raise TypeError(f"observation text must be a str, got {type(text).__name__}")
        messages = [
            {"role": "system", "content": system_prompt(role, self.prompt_style)},
            {"role": "user", "content": text},
        ]
        if completion is not None:
            messages.append({"role": "assistant", "content": completion})
        return messages

    def render(self, role: int | str, text: str) -> list[int]:
        """Prompt token ids: the chat template with the role's system prompt and the generation
        prompt appended. Control-token strings inside ``text`` are encoded as plain text, so an
        observation cannot forge turn markers."""
        return self._apply_template(self.messages(role, text), add_generation_prompt=True)

    def training_example(self, role: int | str, text: str, completion: str) -> tuple[list[int], list[int]]:
        """Token ids and a 0/1 mask of the trainable tokens for supervised fine-tuning.

        The ids are the rendered prompt (exactly :meth:`render`'s ids) followed by the assistant
        turn; the mask is 1 on the assistant content up to and including its first stop token
        (the tokens the policy itself produces, see :meth:`generate`) and 0 elsewhere. For the
        tiny model's template this equals the ``{% generation %}`` mask that
        ``apply_chat_template(..., return_assistant_tokens_mask=True)`` returns; it is computed
        from the prompt prefix instead because transformers cannot combine that mask with the
        escaping of control tokens in the observation text.

        Raises:
            ValueError: the template renders the prompt differently once the reply is added
                (the prompt is not a prefix), so the example would not match generation.
        """
        prompt = self.render(role, text)
        ids = self._apply_template(self.messages(role, text, completion))
        if ids[: len(prompt)] != prompt:
            raise ValueError(
                "the chat template does not render the prompt as a prefix of the full conversation; "
                "SFT examples would not match what the policy generates"
            )
        reply = _up_to_first(ids[len(prompt) :], self.stop_ids)
        mask = [0] * len(prompt) + reply + [0] * (len(ids) - len(prompt) - len(reply))
        return ids, mask

    def _apply_template(self, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
        """Token ids of ``messages`` with control-token strings in their contents escaped."""
        return encode_chat(self.tokenizer, messages, add_generation_prompt=add_generation_prompt)

    # --------------------------------------------------------------------------- sampling

    def generate(
        self,
        observations: Sequence[Mapping],
        *,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 256,
        seed: int | None = None,
    ) -> list[Generation]:
        """Sample one action per observation in a single batched backend call.

        Args:
            observations: env observations ``{"role": 0|1, "text": str}``.
            temperature: sampling temperature; 0 decodes greedily.
            top_p: nucleus sampling threshold.
            max_new_tokens: most tokens per action, stop token included.
            seed: same seed and same batch give the same samples; ``None`` uses the global RNG.
        """
        encoded = [self._encode(i, obs) for i, obs in enumerate(observations)]
        outputs = self.backend.generate(
            [prompt for _, prompt in encoded], temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed
        )
        return [self._generation(role, prompt, output) for (role, prompt), output in zip(encoded, outputs)]

    @property
    def supports_continuous(self) -> bool:
        """Whether the backend can run :meth:`generate_continuous`."""
        return bool(getattr(self.backend, "supports_continuous", False))

    def generate_continuous(
        self,
        observations: Sequence[Mapping],
        on_generation: Callable[[int, Generation], Mapping | None],
        *,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 256,
        seed: int | Sequence[int] | None = None,
        max_batch: int | None = None,
    ) -> dict[str, int]:
        """Sample actions with continuous batching: slot ``i`` starts from ``observations[i]``;
        whenever one of its actions is complete, ``on_generation(i, generation)`` returns the
        slot's next observation (``None``: the slot is done). Rows never wait for each other.

        Same sampling settings and log-prob convention as :meth:`generate`; ``seed`` may also
        be one seed per slot (each slot then samples from its own stream); ``max_batch`` caps
        the rows decoded at once (default: one per slot; slots beyond it queue for a row).
        Each role's prompt prefix (:attr:`role_prefixes`) is prefilled once per call and
        shared by every prompt of that role, unless :attr:`share_role_prefixes` is off. Returns the backend's work counts
        (``forward_calls``, ``prefill_calls``, ``prefill_tokens``, ``prefix_tokens``,
        ``takeovers``).
        """
        current = [self._encode(i, obs) for i, obs in enumerate(observations)]  # (role, prompt) per slot

        def follow(slot: int, output) -> list[int] | None:
            obs = on_generation(slot, self._generation(*current[slot], output))
            if obs is None:
                return None
            current[slot] = self._encode(slot, obs)
            return current[slot][1]

        return self.backend.generate_continuous(
            [prompt for _, prompt in current], follow,
            temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed, max_batch=max_batch,
            prefixes=self.role_prefixes if self.share_role_prefixes else (),
        )

    @functools.cached_property
    def role_prefixes(self) -> tuple[list[int], ...]:
        """The token ids every prompt of a role starts with, one list per role.

        Found as the common start of two renderings of the role with different texts: the chat
        markers and the system prompt, up to where the observation text begins. The continuous
        backend computes their keys and values once instead of once per prompt.
        """
        prefixes = []
        for role in range(len(ROLES)):
            a, b = self.render(role, "a"), self.render(role, "b")
            n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            prefixes.append(a[:n])
        return tuple(prefixes)

    def _encode(self, i: int, obs: Mapping) -> tuple[int, list[int]]:
        """Role index and rendered prompt of one observation (checked)."""
        if not isinstance(obs, Mapping) or "role" not in obs or "text" not in obs:
            raise ValueError(f"observation {i} must be a mapping with 'role' and 'text', got {obs!r}")
        role = role_index(obs["role"])
        return role, self.render(role, obs["text"])

    def _generation(self, role: int, prompt: list[int], output) -> Generation:
        ids, logprobs, finish = output
        return Generation(
            role=role,
            prompt_ids=list(prompt),
            completion_ids=list(ids),
            logprobs=list(logprobs),
            text=self.tokenizer.decode(ids, skip_special_tokens=True),
            finish_reason=finish,
        )

    def logprobs_of(
        self,
        prompt_ids_list: Sequence[Sequence[int]],
        completion_ids_list: Sequence[Sequence[int]],
        temperature: float = 1.0,
    ) -> list[torch.Tensor]:
        """Per-token log-probs of given completions under the current weights, with gradients.

        Computes the same quantity as ``Generation.logprobs`` (``log_softmax(logits / T)``;
        ``temperature=0`` means ``T = 1``) in one forward pass over the batch. Rows are left
        padded exactly as during generation and only the last ``max(len(completion)) + 1``
        positions are projected to the vocabulary, so memory stays small for large vocabularies.

        Returns:
            One float32 tensor of shape ``(len(completion),)`` per row, on the model's device.
        """
        if len(prompt_ids_list) != len(completion_ids_list):
            raise ValueError("prompt_ids_list and completion_ids_list differ in length")
        if not prompt_ids_list:
            return []
        if any(len(p) == 0 for p in prompt_ids_list):
            raise ValueError("every prompt needs at least one token")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        sequences = [list(p) + list(c) for p, c in zip(prompt_ids_list, completion_ids_list)]
        input_ids, attention_mask = left_pad(sequences, self.pad_id, self.model.device)
        # Positions count real tokens only, as generate() computes them for left padding.
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        keep = max(len(c) for c in completion_ids_list) + 1
        logits = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            logits_to_keep=keep,
            use_cache=False,
        ).logits.float()
        logprobs = torch.log_softmax(logits / (temperature if temperature > 0 else 1.0), dim=-1)
        # Column k of the kept logits predicts token (width - keep + k + 1); a completion of
        # length n occupies the last n tokens, so its predictions are columns keep-n-1 .. keep-2.
        rows = []
        for row, completion in enumerate(completion_ids_list):
            n = len(completion)
            targets = input_ids[row, input_ids.shape[1] - n :]
            picked = logprobs[row, keep - n - 1 : keep - 1].gather(-1, targets.unsqueeze(-1))
            rows.append(picked.squeeze(-1))
        return rows

    def __repr__(self) -> str:
        name = type(self.model).__name__
        return f"SharedPolicy({name}, prompt_style={self.prompt_style!r}, roles={ROLES})"


def _up_to_first(ids: Sequence[int], stop_ids: Sequence[int]) -> list[int]:
    """A mask of ones over ``ids`` up to and including the first stop token."""
    for position, token in enumerate(ids):
        if token in stop_ids:
            return [1] * (position + 1)
    return [1] * len(ids)

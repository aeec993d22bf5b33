"""Generation backends: the narrow interface between the policy and whatever samples tokens.

A backend turns a batch of prompts (token ids) into completions (token ids), the log-probability
of every sampled token, and why each completion stopped. The trainer never sees more than that,
so vLLM engines or remote workers can replace :class:`HFBackend` later without touching it.

Log-probability convention (every backend must follow it, and ``SharedPolicy.logprobs_of``
computes the same quantity with gradients):

    logprob[t] = log_softmax(logits[t] / T)[token[t]]

where ``logits`` are the model's raw next-token logits and ``T`` the sampling temperature
(``T = 1`` when decoding greedily, ``temperature == 0``). Top-p truncation is *not* applied:
the value is the log-probability under the temperature-scaled model, as TRL's GRPO trainer
computes it, so that PPO/GRPO ratios between sampling time and training time compare like with
like. Completions include the stop token when one was produced, together with its log-prob,
so the policy is also trained on when to stop.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

__all__ = ["GenerationBackend", "BackendOutput", "WORK_COUNTS", "stop_token_ids", "left_pad"]

WORK_COUNTS = ("forward_calls", "prefill_calls", "prefill_tokens", "prefix_tokens", "takeovers")
"""The work counts a continuous-batching backend returns: model forwards, of which prompt
prefills, the prompt tokens they ran, those taken from shared prefixes instead, and prompts
that took over a finished row in place (:func:`agents.generation.continuous.continuous_generate`)."""

BackendOutput = tuple[list[int], list[float], str]
"""One completion: ``(completion_ids, logprobs, finish_reason)``; finish_reason is
``"stop"`` (a stop token was generated, it is the last id) or ``"length"``."""


@runtime_checkable
class GenerationBackend(Protocol):
    """Anything that samples completions for a batch of tokenized prompts."""

    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]],
        *,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        seed: int | None,
    ) -> list[BackendOutput]:
        """Sample one completion per prompt.

        Args:
            prompt_ids: the prompts, already rendered and tokenized.
            temperature: sampling temperature; ``0`` means greedy decoding.
            top_p: nucleus sampling threshold in ``(0, 1]``.
            max_new_tokens: most tokens generated per prompt (stop token included).
            seed: with the same seed and the same batch, the same samples; ``None`` draws from
                the backend's own random state.

        Returns:
            One ``(completion_ids, logprobs, finish_reason)`` per prompt, in order, with the
            log-probs defined in this module's docstring.
        """
        ...


def stop_token_ids(model, tokenizer) -> list[int]:
    """Token ids that end a turn: the tokenizer's EOS plus the model's generation EOS ids.

    Instruct models often stop on an end-of-turn token that differs from the tokenizer's EOS
    (Qwen2.5 lists both ``<|im_end|>`` and ``<|endoftext|>`` in its generation config).
    """
    ids: list[int] = []
    candidates = [tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)]
    for candidate in candidates:
        for token_id in candidate if isinstance(candidate, (list, tuple)) else [candidate]:
            if token_id is not None and token_id not in ids:
                ids.append(int(token_id))
    if not ids:
        raise ValueError("neither the tokenizer nor the model's generation config defines an EOS token")
    return ids


def left_pad(
    sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists into ``(input_ids, attention_mask)`` long tensors."""
    import torch  # here, so that the interface itself imports without torch

    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if len(seq):
            input_ids[row, width - len(seq) :] = torch.as_tensor(list(seq), dtype=torch.long)
            attention_mask[row, width - len(seq) :] = 1
    return input_ids.to(device), attention_mask.to(device)

"""One policy update from a batch of generated turns (shared by GRPO and LoGo-GRPO).

Each :class:`~agents.generation.rollout.TurnRecord` with an advantage is one row of the loss. For every
epoch the rows are shuffled (seeded), split into micro-batches that fit in memory, and their
gradients accumulated into one optimizer step, so ``epochs`` = optimizer steps per batch (the
paper's "2 epochs per batch"). Rows with zero advantage carry no policy gradient; they are
skipped to save compute (which also drops their small KL and entropy terms).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = ["UpdateConfig", "policy_update", "pad_rows"]


@dataclass
class UpdateConfig:
    """Optimisation settings (paper defaults; presets override lr for the tiny model)."""

    lr: float = 2e-6
    """AdamW learning rate (constant)."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Global gradient-norm clip."""
    epochs: int = 2
    """Optimizer steps per batch (each over all rows)."""
    micro_batch: int = 16
    """Rows per forward/backward pass (gradient accumulation)."""
    gradient_checkpointing: bool = False
    """Recompute each layer's activations in the backward pass instead of keeping them: the same
    gradients for much less memory (SmolLM2, 8 rows of 1,584 tokens: 14.5 -> 5.8 GiB peak)."""
    clip_eps: float = 0.2
    """PPO clip range."""
    dual_clip: float | None = 3.0
    """Dual-clip constant for negative advantages (None: off)."""
    logratio_cap: float = 3.0
    """Cap on the (mean) log-ratio before exponentiation."""
    entropy_coef: float = 0.001
    """Entropy bonus coefficient."""
    kl_coef: float = 0.001
    """k3 KL coefficient to the frozen reference policy (0: no reference needed)."""
    loss: str = "turn"
    """``"turn"``: the paper's turn-level ratio; ``"token"``: per-token PPO ratio."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts (log-probs are taken at the same temperature)."""
    old_logprobs: str = "sampler"
    """The ``old`` log-probs of the PPO ratio. ``"sampler"``: those the backend reported at
    sampling time (exact for the HF backend, which runs the trainer's own model). ``"trainer"``:
    recomputed with the trainer's model before the first epoch, for a sampler whose numbers
    differ from the trainer's (vLLM: other kernels, maybe another dtype). Then the first epoch's
    ratio is exactly 1, and the sampler/trainer mismatch is corrected by a truncated importance
    weight per turn, ``min(exp(mean_t(trainer - sampler)), tis_cap)``, that scales the
    advantage (the turn-level analogue of the truncated importance sampling TRL and verl apply
    to vLLM rollouts). The update reports the gap (``sampler/*``)."""
    tis_cap: float = 2.0
    """Upper bound of the truncated importance weight (``old_logprobs="trainer"`` only)."""


def pad_rows(values: Sequence[Sequence[float]], device) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Right-pad ragged rows into ``[B, T]`` float tensors: ``(values, mask)``."""
    import torch

    width = max((len(v) for v in values), default=0)
    out = torch.zeros(len(values), width, device=device)
    mask = torch.zeros(len(values), width, device=device)
    for i, v in enumerate(values):
        if len(v):
            out[i, : len(v)] = torch.as_tensor(v, dtype=torch.float32, device=device) if not hasattr(v, "shape") else v
            mask[i, : len(v)] = 1.0
    return out, mask


def enable_checkpointing(model) -> None:
    """Turn on activation (gradient) checkpointing of a transformers model; it acts in training
    mode only, so generation is unchanged. Newer transformers call it activation checkpointing."""
    if any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules()):
        return  # already on
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()


def policy_update(policy, optimizer, rows, cfg: UpdateConfig, *, ref_policy=None, seed: int = 0) -> dict[str, float]:
    """Run ``cfg.epochs`` optimizer steps of the clipped surrogate on ``rows``.

    Args:
        policy: :class:`agents.policy.SharedPolicy` being trained.
        optimizer: a torch optimizer over ``policy.model``'s parameters.
        rows: turns with ``prompt_ids``, ``completion_ids``, ``logprobs`` (sampling time) and
            ``advantage``.
        ref_policy: frozen reference for the k3 KL (used when ``cfg.kl_coef > 0``).

    Returns:
        Means of the loss statistics over micro-batches, plus ``rows`` and ``grad_norm``.
    """
    import torch

    from agents.rl.loss import token_level_loss, turn_level_loss

    loss_fn = turn_level_loss if cfg.loss == "turn" else token_level_loss
    rows = [r for r in rows if r.advantage != 0.0 and len(r.completion_ids) > 0]
    if not rows:
        return {"rows": 0.0}
    model = policy.model
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    model.train()
    device = model.device
    rng = np.random.default_rng(seed)
    totals: dict[str, list[float]] = {}
    if cfg.old_logprobs not in ("sampler", "trainer"):
        raise ValueError(f"old_logprobs must be 'sampler' or 'trainer', got {cfg.old_logprobs!r}")
    old_rows = [list(r.logprobs) for r in rows]
    weights = [1.0] * len(rows)
    if cfg.old_logprobs == "trainer":
        old_rows, weights, gap = _trainer_logprobs(policy, rows, cfg)
        totals.update({k: [v] for k, v in gap.items()})
    for epoch in range(cfg.epochs):
        order = rng.permutation(len(rows))
        optimizer.zero_grad(set_to_none=True)
        for start in range(0, len(rows), cfg.micro_batch):
            batch = [rows[i] for i in order[start : start + cfg.micro_batch]]
            prompts = [r.prompt_ids for r in batch]
            completions = [r.completion_ids for r in batch]
            new = policy.logprobs_of(prompts, completions, temperature=cfg.temperature)
            logp, mask = pad_rows(new, device)
            old, _ = pad_rows([old_rows[i] for i in order[start : start + cfg.micro_batch]], device)
            ref = None
            if ref_policy is not None and cfg.kl_coef > 0:
                with torch.no_grad():
                    ref, _ = pad_rows(ref_policy.logprobs_of(prompts, completions, temperature=cfg.temperature), device)
            adv = torch.tensor(
                [rows[i].advantage * weights[i] for i in order[start : start + cfg.micro_batch]], dtype=torch.float32, device=device
            )
            loss, stats = loss_fn(
                logp, old, adv, mask,
                clip_eps=cfg.clip_eps, dual_clip=cfg.dual_clip, logratio_cap=cfg.logratio_cap,
                ref_logprobs=ref, kl_coef=cfg.kl_coef if ref is not None else 0.0,
            )
            if cfg.entropy_coef > 0:
                # Only sampled tokens' log-probs are at hand (no full-vocabulary logits, which
                # would not fit for large models). The score-function surrogate
                # S = mean(-stopgrad(log pi(a)) * log pi(a)) has grad S = an unbiased estimate
                # of grad H, since grad H = -E[log pi(a) * grad log pi(a)].
                ent = (-(logp.detach()) * logp * mask).sum() / mask.sum().clamp(min=1)
                loss = loss - cfg.entropy_coef * ent
                stats["entropy"] = float(-(logp.detach() * mask).sum() / mask.sum().clamp(min=1))
            (loss * len(batch) / len(rows)).backward()
            for k, v in stats.items():
                totals.setdefault(k, []).append(float(v))
            totals.setdefault("loss", []).append(float(loss.detach()))
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        totals.setdefault("grad_norm", []).append(float(norm))
        optimizer.step()
    model.eval()
    out = {k: float(np.mean(v)) for k, v in totals.items()}
    out["rows"] = float(len(rows))
    return out


def _trainer_logprobs(policy, rows, cfg: UpdateConfig) -> tuple[list[list[float]], list[float], dict[str, float]]:
    """The rows' log-probs under the trainer's model (no gradients), the truncated importance
    weight of each row, and the sampler/trainer gap: mean and max absolute difference per
    token, and the mean and max turn-level ratio ``exp(mean_t(trainer - sampler))``."""
    import torch

    model = policy.model
    was_training = model.training
    model.eval()
    trainer: list[list[float]] = []
    try:
        with torch.no_grad():
            for start in range(0, len(rows), cfg.micro_batch):
                batch = rows[start : start + cfg.micro_batch]
                out = policy.logprobs_of([r.prompt_ids for r in batch], [r.completion_ids for r in batch], temperature=cfg.temperature)
                trainer += [[float(x) for x in lp] for lp in out]
    finally:
        model.train(was_training)
    diffs = [np.asarray(t) - np.asarray(r.logprobs, dtype=float) for t, r in zip(trainer, rows)]
    ratios = np.exp([float(d.mean()) for d in diffs])
    weights = [float(min(w, cfg.tis_cap)) for w in ratios]
    flat = np.abs(np.concatenate(diffs))
    gap = {
        "sampler/logprob_abs_diff_mean": float(flat.mean()), "sampler/logprob_abs_diff_max": float(flat.max()),
        "sampler/ratio_mean": float(ratios.mean()), "sampler/ratio_max": float(ratios.max()),
        "sampler/truncated_share": float(np.mean(ratios > cfg.tis_cap)),
    }
    return trainer, weights, gap

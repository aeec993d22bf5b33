"""The policy loss: a PPO-style clipped surrogate with a turn-level ratio (paper, section 4).

Tensors are shaped ``[B, T]``: one row is one turn (one generated action: the facts JSON of an
extractor step or the operations JSON of a manager step), ``mask`` marks the generated tokens
of that turn (prompt and padding are False), ``advantages`` is ``[B]``: one advantage per turn,
broadcast to all its tokens.

Turn-level ratio (what the paper trains with). With ``l_t = logp_t - old_logp_t`` and
``|y|`` the number of generated tokens of the turn::

    r     = exp(clamp(mean_{t in y} l_t, -cap, cap))          # one ratio per turn
    s     = min(r * A, clip(r, 1 - eps, 1 + eps) * A)          # PPO clipped surrogate
    s     = max(s, c * A)          if A < 0                    # dual clip (Ye et al., 2020)
    L_pg  = -mean_{turns} s

The mean log-ratio is the log of the geometric mean of the per-token ratios, so a long turn is
not clipped just because it is long. The dual clip bounds the objective from below by ``c * A``
for negative advantages: once ``r > c`` a bad turn that became much more likely no longer
produces an unbounded push (its gradient is 0). Capping the log-ratio at ``cap`` keeps ``exp``
finite for stale samples.

Regularisers, both masked means over all generated tokens of the batch::

    KL_k3 = mean_t [exp(ref_t - logp_t) - (ref_t - logp_t) - 1]    # k3 estimator, >= 0
    H     = mean_t entropy_t
    L     = L_pg + kl_coef * KL_k3 - entropy_coef * H

:func:`token_level_loss` is the standard per-token PPO loss with the same options, for
comparison: every token has its own (capped) ratio and the surrogate is averaged over all
generated tokens of the batch.

Positions outside ``mask`` never touch the loss or its gradient, even if they hold ``nan`` or
``inf`` (they are replaced with 0 by ``torch.where`` before any arithmetic). Turns with no
generated token are left out of the turn mean.

Paper settings: ``clip_eps=0.2, dual_clip=3.0, logratio_cap=3.0, kl_coef=0.001,
entropy_coef=0.001``.
"""

from __future__ import annotations

import torch

__all__ = ["turn_level_loss", "token_level_loss", "token_entropy"]


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax over the last dimension: ``H = logsumexp(z) - sum_v p_v z_v``.

    ``[..., V] -> [...]``. Computed in at least float32 (bfloat16 logits are upcast).
    """
    z = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    log_norm = torch.logsumexp(z, dim=-1)
    return log_norm - (torch.softmax(z, dim=-1) * z).sum(dim=-1)


def turn_level_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_eps: float = 0.2,
    dual_clip: float | None = 3.0,
    logratio_cap: float = 3.0,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped surrogate with one ratio per turn: ``r = exp(clamp(mean_t l_t, -cap, cap))``.

    See the module docstring for the formulas. ``dual_clip=None`` disables the dual clip.
    Returns ``(loss, stats)``: a scalar tensor to call ``backward`` on, and floats for logging
    (see :func:`_stats`; ratio and clip statistics are per turn here).
    """
    return _clipped_policy_loss(
        True, logprobs, old_logprobs, advantages, mask, clip_eps=clip_eps, dual_clip=dual_clip,
        logratio_cap=logratio_cap, ref_logprobs=ref_logprobs, kl_coef=kl_coef, entropy=entropy,
        entropy_coef=entropy_coef,
    )


def token_level_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_eps: float = 0.2,
    dual_clip: float | None = 3.0,
    logratio_cap: float = 3.0,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Standard per-token PPO: ``r_t = exp(clamp(logp_t - old_logp_t, -cap, cap))``.

    The clipped (and dual-clipped) surrogate of every generated token uses its turn's
    advantage; ``L_pg = -mean over all generated tokens of the batch``. Regularisers and
    stats as in :func:`turn_level_loss` (ratio and clip statistics are per token here).
    """
    return _clipped_policy_loss(
        False, logprobs, old_logprobs, advantages, mask, clip_eps=clip_eps, dual_clip=dual_clip,
        logratio_cap=logratio_cap, ref_logprobs=ref_logprobs, kl_coef=kl_coef, entropy=entropy,
        entropy_coef=entropy_coef,
    )


def _clipped_policy_loss(
    per_turn: bool,
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_eps: float,
    dual_clip: float | None,
    logratio_cap: float,
    ref_logprobs: torch.Tensor | None,
    kl_coef: float,
    entropy: torch.Tensor | None,
    entropy_coef: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Both losses; they differ only in the unit that owns a ratio (a turn or a token)."""
    mask, advantages = _check_inputs(logprobs, old_logprobs, advantages, mask, clip_eps, dual_clip, logratio_cap)
    token_logratio = torch.where(mask, logprobs - old_logprobs.detach(), 0.0)  # l_t, 0 off-mask

    if per_turn:  # one unit per turn: the mean log-ratio over its generated tokens
        valid = mask.any(dim=1)  # turns with at least one generated token
        logratio = token_logratio.sum(dim=1) / mask.sum(dim=1).clamp(min=1)
        unit_advantages = advantages
    else:  # one unit per generated token, carrying its turn's advantage
        valid = mask
        logratio = token_logratio
        unit_advantages = advantages[:, None].expand_as(logratio)
    ratio = torch.exp(logratio.clamp(-logratio_cap, logratio_cap))

    objective = _clipped_objective(ratio, unit_advantages, clip_eps, dual_clip)
    pg_loss = -_masked_mean(objective, valid)
    loss = pg_loss
    stats = {"pg_loss": pg_loss.item()}

    if kl_coef != 0.0 and ref_logprobs is None:
        raise ValueError("kl_coef != 0 needs ref_logprobs")
    if ref_logprobs is not None:  # k3 estimator of KL(policy || reference), per token
        _check_same_shape("ref_logprobs", ref_logprobs, logprobs)
        log_ref_ratio = torch.where(mask, ref_logprobs.detach() - logprobs, 0.0)
        kl = _masked_mean(torch.exp(log_ref_ratio) - log_ref_ratio - 1.0, mask)
        loss = loss + kl_coef * kl
        stats["kl_ref"] = kl.item()

    if entropy_coef != 0.0 and entropy is None:
        raise ValueError("entropy_coef != 0 needs entropy (per token; see token_entropy)")
    if entropy is not None:  # entropy bonus: subtracted from the loss
        _check_same_shape("entropy", entropy, logprobs)
        mean_entropy = _masked_mean(entropy, mask)
        loss = loss - entropy_coef * mean_entropy
        stats["entropy"] = mean_entropy.item()

    stats["loss"] = loss.item()
    stats.update(_stats(ratio, logratio, unit_advantages, valid, clip_eps, dual_clip, logratio_cap))
    stats["approx_kl"] = _approx_kl(token_logratio, mask)
    return loss, stats


def _clipped_objective(
    ratio: torch.Tensor, adv: torch.Tensor, clip_eps: float, dual_clip: float | None
) -> torch.Tensor:
    """``min(r A, clip(r, 1-eps, 1+eps) A)``, then ``max(., c A)`` where ``A < 0``."""
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * adv
    objective = torch.minimum(unclipped, clipped)
    if dual_clip is not None:
        objective = torch.where(adv < 0, torch.maximum(objective, dual_clip * adv), objective)
    return objective


@torch.no_grad()
def _stats(
    ratio: torch.Tensor,
    logratio: torch.Tensor,
    adv: torch.Tensor,
    valid: torch.Tensor,
    clip_eps: float,
    dual_clip: float | None,
    logratio_cap: float,
) -> dict[str, float]:
    """Ratio and clipping statistics over the ``valid`` units (turns or tokens).

    ``clip_frac``: the PPO clip binds (gradient cut): ``r > 1+eps`` with ``A > 0`` or
    ``r < 1-eps`` with ``A < 0``. ``dual_clip_frac``: ``A < 0`` and ``r > c``.
    ``logratio_capped_frac``: ``|log r| > cap`` before the cap.
    """
    r, a, lr = ratio[valid], adv[valid], logratio[valid]
    clipped = ((r > 1 + clip_eps) & (a > 0)) | ((r < 1 - clip_eps) & (a < 0))
    dual = (a < 0) & (r > dual_clip) if dual_clip is not None else torch.zeros_like(clipped)
    return {
        "ratio_mean": r.mean().item(),
        "ratio_min": r.min().item(),
        "ratio_max": r.max().item(),
        "clip_frac": clipped.float().mean().item(),
        "dual_clip_frac": dual.float().mean().item(),
        "logratio_capped_frac": (lr.abs() > logratio_cap).float().mean().item(),
        "advantage_mean": a.mean().item(),
    }


@torch.no_grad()
def _approx_kl(token_logratio: torch.Tensor, mask: torch.Tensor) -> float:
    """k3 estimate of KL(old || new) per token: ``mean(exp(l) - 1 - l)``, ``l = logp - old``."""
    lr = token_logratio[mask]
    return (torch.exp(lr) - 1.0 - lr).mean().item()


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` where ``mask``; off-mask values (even nan) never reach the result."""
    return torch.where(mask, values, 0.0).sum() / mask.sum()


def _check_same_shape(name: str, t: torch.Tensor, like: torch.Tensor) -> None:
    if t.shape != like.shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(like.shape)}")


def _check_inputs(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
    dual_clip: float | None,
    logratio_cap: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate shapes and settings; return ``mask`` as bool and ``advantages`` as ``[B]``
    in the dtype and device of ``logprobs``. Advantages, old and reference log-probs are
    detached: only ``logprobs`` and ``entropy`` carry gradient."""
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [B, T], got shape {tuple(logprobs.shape)}")
    _check_same_shape("old_logprobs", old_logprobs, logprobs)
    _check_same_shape("mask", mask, logprobs)
    advantages = torch.as_tensor(advantages, dtype=logprobs.dtype, device=logprobs.device).detach()
    if advantages.shape != logprobs.shape[:1]:
        raise ValueError(f"advantages must be [B] = [{logprobs.shape[0]}], got {tuple(advantages.shape)}")
    if not 0 < clip_eps < 1:
        raise ValueError(f"clip_eps must be in (0, 1), got {clip_eps}")
    if dual_clip is not None and dual_clip <= 1:
        raise ValueError(f"dual_clip must be > 1 (or None to disable), got {dual_clip}")
    if logratio_cap <= 0:
        raise ValueError(f"logratio_cap must be > 0, got {logratio_cap}")
    mask = mask.bool()
    if not mask.any():
        raise ValueError("mask selects no generated token")
    return mask, advantages

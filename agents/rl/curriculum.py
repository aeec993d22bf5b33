"""The horizon curriculum (Memory-R2, section 5) and greedy validation.

Training grows the horizon: the first 8 sessions, then 16, then 32 (10, 5 and 5 update steps in
the paper). Training directly at 32 collapses (the bank empties). After each stage the policy is
validated on held-out conversations; the best validation checkpoint of a stage becomes both the
starting policy and the frozen KL reference of the next stage. Optimizer state is not carried.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from agents.generation.rollout import RolloutEngine, Start

__all__ = ["Stage", "default_stages", "parse_stages", "validate"]


@dataclass(frozen=True)
class Stage:
    """One curriculum stage: train on the first ``horizon`` sessions for ``steps`` updates."""

    horizon: int
    steps: int


def default_stages() -> tuple[Stage, ...]:
    """The paper's schedule: 8 -> 16 -> 32 sessions with 10, 5 and 5 steps."""
    return (Stage(8, 10), Stage(16, 5), Stage(32, 5))


def parse_stages(text: str) -> tuple[Stage, ...]:
    """Parse ``"8:10,16:5,32:5"`` (horizon:steps, comma-separated)."""
    stages = []
    for part in text.split(","):
        try:
            h, s = part.split(":")
            stage = Stage(int(h), int(s))
        except ValueError:
            raise ValueError(f"bad stage {part!r}: expected HORIZON:STEPS, e.g. '8:10,16:5,32:5'") from None
        if stage.horizon < 1 or stage.steps < 0:
            raise ValueError(f"bad stage {part!r}: horizon must be >= 1 and steps >= 0")
        stages.append(stage)
    if not stages:
        raise ValueError("no stages given")
    return tuple(stages)


def validate(
    policy, env_fn: Callable, tasks: Sequence[int], *, max_new_tokens: int, max_questions: int | None = None, seed: int = 0,
    max_batch: int | None = None, per_task: bool = False,
) -> dict[str, Any]:
    """Greedy rollouts of ``policy`` on held-out ``tasks``; the final memory answers every
    question valid at the end of the horizon (``final`` mode). ``max_batch`` caps the rows
    decoded at once (see :class:`agents.generation.rollout.RolloutEngine`).

    Returns mean ``f1``, ``bleu1``, ``penalty``, ``reward`` (f1 - penalty), ``memory_size``,
    ``m_fail``, the share of actions that failed to parse, the share cut at ``max_new_tokens``
    (``truncated_rate``; such an action almost always fails to parse), and generated tokens; with
    ``per_task``, also ``f1_per_task`` (one mean F1 per task, in order) for confidence intervals
    over conversations.
    """
    engine = RolloutEngine(policy, env_fn, temperature=0.0, max_new_tokens=max_new_tokens, save_states=False, max_batch=max_batch)
    episodes = engine.run([Start(options={"task": int(t)}) for t in tasks], seed=seed)
    scorer = env_fn().unwrapped
    f1, bleu, pen, size, mfail = [], [], [], [], []
    turns = [t for ep in episodes for t in ep.turns]
    for ep in episodes:
        scorer.restore_state(ep.final_state)
        qa = scorer.score_questions(scorer.questions_for(mode="final", max_questions=max_questions))
        f1.append(float(np.mean([q["f1"] for q in qa])) if qa else 0.0)
        bleu.append(float(np.mean([q["bleu1"] for q in qa])) if qa else 0.0)
        pen.append(scorer.bloat_penalty())
        size.append(len(ep.final_state.bank))
        held = ep.final_state.bank.source_ids()
        evidence = [d for q in qa for d in q["evidence"]]
        if evidence:
            mfail.append(sum(d not in held for d in evidence) / len(evidence))
    result: dict[str, Any] = {
        "f1": float(np.mean(f1)),
        "bleu1": float(np.mean(bleu)),
        "penalty": float(np.mean(pen)),
        "reward": float(np.mean(f1) - np.mean(pen)),
        "memory_size": float(np.mean(size)),
        "m_fail": float(np.mean(mfail)) if mfail else 0.0,
        "parse_error_rate": float(np.mean([t.parse_error is not None for t in turns])) if turns else 0.0,
        "truncated_rate": float(np.mean([t.finish_reason == "length" for t in turns])) if turns else 0.0,
        "generated_tokens": float(engine.timing["generated_tokens"]),
    }
    if per_task:
        result["f1_per_task"] = f1
    return result

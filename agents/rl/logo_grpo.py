"""LoGo-GRPO: local and global groups for fair credit assignment (Memory-R2, section 4).

The problem with plain GRPO here: once rollouts write different memories, session ``k`` of
rollout A and session ``k`` of rollout B no longer start from the same memory, so comparing
their rewards mixes the quality of session ``k``'s operations with the luck of what earlier
sessions left behind. LoGo-GRPO keeps GRPO's trajectory-level (global) groups and adds local
groups whose members all start from the very same saved memory state.

One iteration, in the order of the paper:

1. **Global groups.** ``n`` rollouts of the whole horizon per conversation, each from an empty
   memory. The final memory answers up to 64 questions (the same subset for every rollout);
   each question's F1 is credited to the sessions holding its evidence; session ``k`` of
   rollout ``i`` gets the mean F1 of its questions minus the final bloat penalty. Advantages
   are normalised within the ``n`` rollouts of the same session and role.
2. **Rerollouts.** For each session ``k``, with probability ``p_local`` (0.5), pick ONE of the
   ``n`` rollouts at random, restore its environment state from just before session ``k``, and
   rerun session ``k`` ``m`` (4) times, sampling at the training temperature (the reference
   code decodes greedily here, which makes the reruns identical; ``rerollout_temperature``
   makes that a setting).
3. **Local groups.** Score each rerun right after session ``k`` on up to 16 questions
   answerable by then, minus the bloat penalty of that memory, and normalise within the ``m``
   reruns. Every member starts from the identical snapshot; the source rollout is not a member.

Global and local rows go into one batch and one loss; ``local_weight`` (default 1, the paper's)
scales the local advantages. Groups never mix roles.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from agents.generation.rollout import EpisodeRecord, Start, TurnRecord
from agents.rl.advantages import make_group_id
from agents.rl.grpo import GRPO, GRPOConfig, assign_advantages

__all__ = ["LoGoConfig", "LoGoGRPO", "Rerollout", "local_reward"]


@dataclass
class LoGoConfig(GRPOConfig):
    """GRPO settings plus the local part."""

    p_local: float = 0.5
    """Probability that a session gets a local group."""
    m_reruns: int = 4
    """Reruns per local group."""
    local_max_questions: int | None = 16
    """Questions answerable after the session that score each rerun (the paper's 16; ``None``:
    all of them). The cap makes the local reward a small sample of what the memory answers:
    against the true advantage, the uncapped reward orders reruns more often correctly than the
    capped one, at no extra env steps (``benchmarks/credit_fidelity.py``, docs/results.md)."""
    local_weight: float = 1.0
    """Scale of the local advantages in the shared loss."""
    rerollout_temperature: float | None = None
    """Sampling temperature of the reruns (``None``: the training temperature)."""


@dataclass(frozen=True)
class Rerollout:
    """One planned local group: rerun ``session`` of ``conv_id`` from ``source``'s saved state."""

    conv_id: str
    session: int
    source_rollout: int
    state: Any


def local_reward(scorer, state, session: int, max_questions: int | None) -> tuple[float, float]:
    """The local reward of a rerun that ended in ``state`` after ``session``: the mean F1 of up
    to ``max_questions`` questions answerable by then (``cumulative`` mode), minus the bloat
    penalty of that memory. Returns ``(reward, f1)``."""
    scorer.restore_state(state)
    qa = scorer.score_questions(scorer.questions_for(session=session, mode="cumulative", max_questions=max_questions))
    f1 = float(np.mean([q["f1"] for q in qa])) if qa else 0.0
    return f1 - scorer.bloat_penalty(session=session), f1


class LoGoGRPO(GRPO):
    """The LoGo-GRPO trainer (see the module docstring for the method)."""

    name = "logo-grpo"
    config: LoGoConfig

    def collect(self, tasks: Sequence[int], seed: int) -> tuple[list[TurnRecord], dict[str, float]]:
        # 1. Global groups: whole-horizon rollouts, final-memory rewards credited to sessions.
        episodes = self.global_rollouts(tasks, seed)
        global_rows, metrics = self.global_rows(episodes)

        # 2. Rerollouts: rerun chosen sessions m times from one rollout's saved state.
        plan = self.plan_rerollouts(episodes)
        reruns = self.rerun(plan, seed)

        # 3. Local groups: score each rerun right after its session, normalise within the m reruns.
        local_rows, local_metrics = self.local_rows(plan, reruns)
        metrics.update(local_metrics)
        return global_rows + local_rows, metrics

    def plan_rerollouts(self, episodes: Sequence[EpisodeRecord]) -> list[Rerollout]:
        """For each (conversation, session), with probability ``p_local``, one random source rollout."""
        by_conv: dict[str, list[EpisodeRecord]] = {}
        for ep in episodes:
            by_conv.setdefault(ep.conv_id, []).append(ep)
        plan = []
        for conv_id, group in by_conv.items():
            for k in sorted(group[0].states):
                if self.rng.random() < self.config.p_local:
                    source = group[int(self.rng.integers(len(group)))]
                    if k in source.states:
                        plan.append(Rerollout(conv_id, k, source.rollout_id, source.states[k]))
        return plan

    def rerun(self, plan: Sequence[Rerollout], seed: int) -> list[list[EpisodeRecord]]:
        """Run every planned session ``m`` times, all local groups in one lockstep batch."""
        if not plan:
            return []
        m = self.config.m_reruns
        starts = [Start(options={"state": p.state}, max_sessions=1, rollout_id=j) for p in plan for j in range(m)]
        temperature = self.config.rerollout_temperature
        records = self.engine.run(starts, seed=seed + 7_919, temperature=self.config.update.temperature if temperature is None else temperature)
        return [records[i * m : (i + 1) * m] for i in range(len(plan))]

    def local_rows(self, plan: Sequence[Rerollout], reruns: Sequence[Sequence[EpisodeRecord]]) -> tuple[list[TurnRecord], dict[str, float]]:
        unit_reward, unit_group, f1s = {}, {}, []
        rows: list[TurnRecord] = []
        for p, group in zip(plan, reruns):
            for ep in group:
                reward, f1 = local_reward(self.scorer, ep.final_state, p.session, self.config.local_max_questions)
                f1s.append(f1)
                for t in ep.turns:
                    key = (t.episode_id, t.session, t.role)
                    unit_reward[key] = reward
                    unit_group[key] = make_group_id("local", t.role, p.conv_id, p.session, p.source_rollout)
                rows.extend(ep.turns)
        stats = assign_advantages(rows, unit_reward, unit_group, self.config.scale_by_std)
        if self.config.local_weight != 1.0:
            for t in rows:
                t.advantage *= self.config.local_weight
        return rows, {
            # groups as the advantages see them (one per rerun session and role), as global/groups
            "local/groups": stats["groups"],
            "local/planned": float(len(plan)),
            "local/rows": float(len(rows)),
            "local/f1": float(np.mean(f1s)) if f1s else 0.0,
            "local/zero_variance_groups": stats["zero_variance_groups"],
        }

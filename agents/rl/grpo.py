"""Plain GRPO for the memory agent: the baseline LoGo-GRPO is compared against.

For each training conversation, ``n`` rollouts run the whole horizon from an empty memory. Their
FINAL memory answers the horizon's questions (the same seeded subset of at most
``max_questions`` for every rollout). Credit (``credit="session"``, the paper's): each question's
F1 goes to the sessions that hold its evidence, and session ``k`` of rollout ``i`` gets the mean
F1 of its questions minus the final bloat penalty (only the penalty if no question's evidence
lies in session ``k``). ``credit="trajectory"`` gives every session the rollout's mean F1 minus
the penalty instead. Advantages are normalised within the ``n`` rollouts of the same
(conversation, session, role) and broadcast to every turn the rollout generated there.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from agents.generation.rollout import EpisodeRecord, RolloutEngine, Start, TurnRecord
from agents.rl.advantages import assert_roles_not_mixed, group_advantages, make_group_id
from agents.rl.update import UpdateConfig, policy_update

__all__ = ["GRPOConfig", "GRPO", "final_session_rewards", "session_credit", "assign_advantages"]


@dataclass
class GRPOConfig:
    """Settings shared by GRPO and LoGo-GRPO (paper values; presets scale them down)."""

    n_rollouts: int = 16
    """Rollouts of the whole horizon per conversation (the global group size)."""
    tasks_per_step: int = 1
    """Training conversations per update step."""
    max_questions: int = 64
    """Questions the final memory answers per rollout (a seeded subset, same for all rollouts)."""
    credit: str = "session"
    """``"session"``: each question's F1 goes to its evidence sessions; ``"trajectory"``: one reward."""
    scale_by_std: bool = True
    """Divide by the group std (GRPO) or only centre (Dr. GRPO)."""
    top_p: float = 1.0
    """Nucleus sampling for rollouts."""
    max_new_tokens: int = 128
    """Most tokens per generated action."""
    update: UpdateConfig = field(default_factory=UpdateConfig)
    """Optimisation settings (lr, epochs, clip, KL, entropy, loss variant, temperature)."""


def final_session_rewards(scorer, episode: EpisodeRecord, max_questions: int | None, credit: str) -> tuple[dict[int, float], dict[str, Any]]:
    """Score the episode's final memory and turn it into one reward per session.

    ``scorer`` is an unwrapped ``MemSessionEnv`` of the same task settings, used only for its
    public scoring methods on the restored final state.
    """
    return session_credit(scorer, episode.final_state, episode.sessions, max_questions, credit)


def session_credit(scorer, final_state, sessions, max_questions: int | None, credit: str) -> tuple[dict[int, float], dict[str, Any]]:
    """:func:`final_session_rewards` for a final environment state and the sessions to credit
    (``benchmarks/credit_fidelity.py`` scores rollouts it played itself this way)."""
    scorer.restore_state(final_state)
    questions = scorer.questions_for(mode="final", max_questions=max_questions)
    qa = scorer.score_questions(questions)
    penalty = scorer.bloat_penalty()
    mean_f1 = float(np.mean([q["f1"] for q in qa])) if qa else 0.0
    rewards = {}
    for k in sessions:
        if credit == "trajectory":
            rewards[k] = mean_f1 - penalty
        else:
            mine = [q["f1"] for q in qa if k in q["evidence_sessions"]]
            rewards[k] = (float(np.mean(mine)) if mine else 0.0) - penalty
    return rewards, {"f1": mean_f1, "penalty": penalty, "questions": len(qa), "memory_size": len(final_state.bank)}


def assign_advantages(turns: Sequence[TurnRecord], unit_reward: dict, unit_group: dict, scale_by_std: bool) -> dict[str, float]:
    """Normalise rewards within groups of *units* and broadcast them to the units' turns.

    A unit is ``(episode_id, session, role)``: one rollout's turns of one role in one session,
    which share one reward. Normalising units (not turns) keeps a rollout that happened to take
    more turns from weighing more in its group's mean.
    """
    units = list(unit_reward)
    if not units:
        return {"groups": 0.0, "zero_variance_groups": 0.0}
    groups = [unit_group[u] for u in units]
    assert_roles_not_mixed(groups, [u[2] for u in units])
    adv = group_advantages([unit_reward[u] for u in units], groups, scale_by_std=scale_by_std)
    by_unit = dict(zip(units, adv.advantages))
    for t in turns:
        key = (t.episode_id, t.session, t.role)
        if key in by_unit:
            t.advantage = float(by_unit[key])
            t.group_id = unit_group[key]
    return {"groups": float(adv.num_groups), "zero_variance_groups": float(adv.num_zero_variance_groups)}


class GRPO:
    """The GRPO trainer: global groups only.

    Args:
        policy: the :class:`agents.policy.SharedPolicy` to train.
        engine: a :class:`agents.generation.rollout.RolloutEngine` over the training environments.
        scorer: an unwrapped env with the same settings, used to score final memories.
        config: :class:`GRPOConfig`.
        ref_policy: frozen KL reference (``None``: no KL term).
    """

    name = "grpo"

    def __init__(self, policy, engine: RolloutEngine, scorer, config: GRPOConfig, ref_policy=None, seed: int = 0):
        from agents.rl.optim import adamw

        self.policy = policy
        self.engine = engine
        self.scorer = scorer
        self.config = config
        self.ref_policy = ref_policy
        self.rng = np.random.default_rng(seed)
        self.seed = seed
        self.optimizer = adamw(policy.model.parameters(), lr=config.update.lr, weight_decay=config.update.weight_decay)
        self.generated_tokens = 0

    # -- the global part -------------------------------------------------------------------

    def global_rollouts(self, tasks: Sequence[int], seed: int) -> list[EpisodeRecord]:
        """``n`` rollouts of the whole horizon per task, all in one lockstep batch."""
        starts = [Start(options={"task": int(t)}, rollout_id=r) for t in tasks for r in range(self.config.n_rollouts)]
        return self.engine.run(starts, seed=seed, temperature=self.config.update.temperature)

    def global_rows(self, episodes: Sequence[EpisodeRecord]) -> tuple[list[TurnRecord], dict[str, float]]:
        """Score final memories, credit sessions, and normalise within (task, session, role)."""
        unit_reward, unit_group, finals = {}, {}, []
        for ep in episodes:
            rewards, final = final_session_rewards(self.scorer, ep, self.config.max_questions, self.config.credit)
            finals.append(final)
            for t in ep.turns:
                key = (t.episode_id, t.session, t.role)
                unit_reward[key] = rewards[t.session]
                unit_group[key] = make_group_id("global", t.role, ep.conv_id, t.session)
        rows = [t for ep in episodes for t in ep.turns]
        stats = assign_advantages(rows, unit_reward, unit_group, self.config.scale_by_std)
        metrics = {
            "global/f1": float(np.mean([f["f1"] for f in finals])),
            "global/penalty": float(np.mean([f["penalty"] for f in finals])),
            "global/memory_size": float(np.mean([f["memory_size"] for f in finals])),
            "global/zero_variance_groups": stats["zero_variance_groups"],
            "global/groups": stats["groups"],
            "global/rows": float(len(rows)),
            "parse_error_rate": float(np.mean([t.parse_error is not None for t in rows])) if rows else 0.0,
        }
        return rows, metrics

    # -- one iteration -----------------------------------------------------------------------

    def collect(self, tasks: Sequence[int], seed: int) -> tuple[list[TurnRecord], dict[str, float]]:
        episodes = self.global_rollouts(tasks, seed)
        return self.global_rows(episodes)

    def step(self, tasks: Sequence[int], step: int) -> dict[str, float]:
        """Collect rollouts for ``tasks``, compute advantages, and update the policy."""
        start = time.perf_counter()
        before = self.engine.timing["generated_tokens"]
        seed = self.seed * 100_003 + step
        rows, metrics = self.collect(tasks, seed)
        rollout_s = time.perf_counter() - start
        update = policy_update(self.policy, self.optimizer, rows, self.config.update, ref_policy=self.ref_policy, seed=seed)
        self.engine.weights_changed()  # rollout workers, if any, must sample from the new weights
        self.generated_tokens += self.engine.timing["generated_tokens"] - before
        metrics.update({f"update/{k}": v for k, v in update.items()})
        metrics["generated_tokens"] = float(self.generated_tokens)
        metrics["time/rollout_s"] = rollout_s
        metrics["time/step_s"] = time.perf_counter() - start
        return metrics

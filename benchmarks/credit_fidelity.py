"""Credit fidelity: how close is each estimator's credit to the true advantage?

The paper's claim is about a mechanism: once rollouts write different memories, comparing their
session rewards mixes the quality of a session's operations with the luck of the memory earlier
sessions left. Our env restores any saved state, so the truth can be measured. For the
operations ``a`` a policy wrote in session ``k`` from memory state ``s``:

* ``Q(s, a)``: the mean return of ``K`` independent continuations from the state after ``(s, a)``;
* ``V(s)``: the mean return of ``K`` continuations from ``s`` that sample session ``k`` afresh;
* ``A(s, a) = Q(s, a) - V(s)``: the credit an ideal estimator would give.

The return is the task's objective: the reward of the episode's last step in ``final`` mode, the
final memory's F1 on every question of the horizon minus the bloat penalty. Each estimator is
scored on the samples it would really produce in training, with the trainers' own reward code:

* ``grpo-session``: GRPO's global groups, session credit (today's default): the ``n`` rollouts'
  session ``k`` rewards from their final memories, normalised over the group;
* ``grpo-trajectory``: the same groups, every session credited with the whole return;
* ``logo-local``: LoGo-GRPO's local groups: ``m`` reruns of session ``k`` from one rollout's saved
  state, each scored right after the session on up to 16 questions answerable by then
  (``--local-max-questions``; the ``small`` preset uses 8);
* ``logo-trained``: LoGo-GRPO as trained: the global groups, plus a local group for a share
  ``p_local`` of sessions, in one batch;
* ``mc-k1``, ``mc-k2``, ``mc-k4``: Monte-Carlo rerollouts in VinePPO's manner: each rerun of the
  local group is credited with the mean return of its own ``K_est`` continuations (never the ones
  the ground truth uses), normalised over the group.

Candidate local signals of our own, on the same reruns:

* ``logo-local-all``: the local reward on every question answerable after session ``k``, not a
  subset of 16 (the cap makes the reward of a long horizon a noisy sample; no extra env steps);
* ``logo-lookahead``: one continuation of each rerun for ``lookahead`` (2) more sessions, then
  the local reward after session ``k + lookahead``: it sees what an UPDATE or DELETE does to
  questions asked a little later, at a fixed cost instead of the rest of the horizon;
* ``logo-trained-all``: LoGo-GRPO as trained with ``logo-local-all``'s local groups
  (``LoGoConfig(local_max_questions=None)``).

Metrics, per estimator, with 95% bootstrap CIs over tasks:

* ``pair_acc``: pairwise sign accuracy. Over pairs of samples of one group whose true gap exceeds
  its standard error, the share where the estimate orders them as the truth does (a tie in the
  estimate counts 1/2: random is 50%);
* ``sign_acc``: the share of samples whose advantage has the sign of the true one (where
  ``|A|`` exceeds its standard error; 0 counts 1/2). This is what the policy gradient sees;
* ``spearman``: rank correlation with the truth within a group (0 for a group without signal);
* ``luck_r2``: the share of the estimate's variance within a group explained by ``V(s)``, the
  luck of the memory the sample started from (0 by construction where a group shares ``s``);
* ``signal``: the share of groups whose estimates are not all equal;
* ``batch_r``: the correlation of estimate and truth over every sample of a task's batch (the
  alignment of the advantage-weighted gradient with the one the true advantages would give, if
  each sample's gradient were of the same size and independent of the others);
* ``steps``, ``tokens``: env steps and generated tokens an estimate costs.

Usage::

    python benchmarks/credit_fidelity.py --out runs/fidelity                  # the full table
    python benchmarks/credit_fidelity.py --out runs/fidelity --report         # table of what is done
    python benchmarks/credit_fidelity.py --out /tmp/f --horizons 8 --noise 0.3 --tasks 3   # a quick look
    python benchmarks/credit_fidelity.py --out runs/fid-llm --horizons 4 --tasks 8 \
        --checkpoint warm=runs/ws --checkpoint rl=runs/small-logo-grpo-s0/final   # LLM policies

Each task's record is written to ``OUT/<cell>/task-<i>.json`` as soon as it is measured; a killed
run continues where it stopped, and the same seed gives the same records and table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

ESTIMATORS = (
    "grpo-session", "grpo-trajectory", "logo-local", "logo-trained", "mc-k1", "mc-k2", "mc-k4",
    "logo-local-all", "logo-lookahead", "logo-trained-all",
)
MC_K = {"mc-k1": 1, "mc-k2": 2, "mc-k4": 4}


class FidelityError(ValueError):
    """A setting the benchmark cannot run with; raised before any rollout."""


def derive_seed(*parts: int) -> int:
    """An unrelated 63-bit seed for every distinct tuple of integers."""
    return int(np.random.SeedSequence([int(p) % 2**63 for p in parts]).generate_state(1, np.uint64)[0] >> 1)


# ------------------------------------------------------------------------------ policies


class SessionAgentPolicy:
    """A policy made of one agent per session (``for_session(seed)`` returns an object with
    ``act(observation, info) -> str``), played one env step at a time by :func:`play`."""

    restorable = True
    name = "session-agents"

    def for_session(self, seed: int):
        raise NotImplementedError

    def tokens(self, action: str) -> int:
        return 0

    def play_many(self, env, jobs: Sequence["Job"]) -> list["Play"]:
        return [play(env, self, j.start, j.seed, max_sessions=j.max_sessions, record=j.record) for j in jobs]


class ScriptedPolicy(SessionAgentPolicy):
    """The noisy teacher with its seed redrawn for every session it plays: a stochastic policy
    whose sessions differ from rollout to rollout, at mistake rate ``noise``."""

    def __init__(self, noise: float):
        from agents.baselines import NoisyTeacher

        self.noise = float(noise)
        self._teacher = NoisyTeacher
        self.name = f"noisy-teacher-{noise:g}"

    def for_session(self, seed: int):
        """The agent that plays one session (``act(observation, info) -> str``)."""
        return self._teacher(self.noise, seed=seed)


class LLMPolicy:
    """A checkpoint sampled by the project's rollout engine: every batch of plays is one
    :meth:`agents.generation.rollout.RolloutEngine.run` call, each play seeded by its own key,
    so a play does not depend on the others in its batch."""

    restorable = True

    def __init__(self, path, env_fn, *, temperature: float = 1.0, max_new_tokens: int | None = None, dtype: str | None = None,
                 max_batch: int | None = None, device: str = "cpu", sampler: dict | None = None):
        import json as _json

        from agents.generation.rollout import RolloutEngine
        from agents.policy import SharedPolicy

        path = Path(path)
        recorded = {}
        for name in ("trainer_state.json", "sft_report.json"):  # how it was trained: prompt style, token limit
            if (path / name).is_file():
                recorded = _json.loads((path / name).read_text())
                break
        style = recorded.get("prompt_style") or recorded.get("model", {}).get("prompt_style") or "compact"
        self.max_new_tokens = int(max_new_tokens or recorded.get("max_new_tokens") or 256)
        self.policy = SharedPolicy.from_pretrained(path, device=device, dtype=dtype, prompt_style=style)
        if sampler is not None and sampler["choice"] != "hf":
            # One vLLM engine for the whole run (one per process), given each checkpoint's weights.
            if sampler.get("backend") is None:
                from agents.policy.backends import choose_backend

                sampler["backend"] = choose_backend(self.policy, sampler["choice"], path, device=device)
            if sampler["backend"] is not self.policy.backend and hasattr(sampler["backend"], "load_weights"):
                self.policy.backend = sampler["backend"]
                self.policy.sync_backend()
        self.engine = RolloutEngine(self.policy, env_fn, temperature=temperature, max_new_tokens=self.max_new_tokens,
                                    max_batch=max_batch, progress=False)
        self.name = f"checkpoint:{path}"

    def play_many(self, env, jobs: Sequence["Job"]) -> list["Play"]:
        from agents.generation.rollout import Start

        if not jobs:
            return []
        starts = [Start(options={"task": j.start} if isinstance(j.start, int) else {"state": j.start}, max_sessions=j.max_sessions) for j in jobs]
        records = self.engine.run(starts, seed=0, keys=[j.seed for j in jobs])
        plays = []
        for job, rec in zip(jobs, records):
            steps: dict[int, int] = {}
            for t in rec.turns:
                steps[t.session] = steps.get(t.session, 0) + 1
            plays.append(Play(
                starts=dict(rec.states) if job.record else {}, end=rec.final_state,
                ret=rec.total_reward if rec.done else None, steps=len(rec.turns), tokens=rec.generated_tokens, session_steps=steps,
            ))
        return plays


@dataclass(frozen=True)
class Job:
    """One play for :meth:`play_many`: from ``start`` (a task index or a saved state), seeded."""

    start: Any
    seed: int
    max_sessions: int | None = None
    record: bool = False


@dataclass
class Play:
    """What :func:`play` returns."""

    starts: dict[int, Any]
    """Session -> the env state saved just before it (when recorded)."""
    end: Any
    """The env state where the play stopped."""
    ret: float | None
    """The episode's return if it ended (the last step's reward in ``final`` mode), else None."""
    steps: int = 0
    tokens: int = 0
    session_steps: dict[int, int] = field(default_factory=dict)


def play(env, policy, start, seed: int, *, max_sessions: int | None = None, record: bool = False) -> Play:
    """Play from ``start`` (a task index, or a saved state) until the episode ends or
    ``max_sessions`` sessions have ended. Each session is played by ``policy.for_session`` with a
    seed derived from ``seed`` and the session number, so a continuation is fixed by its seed."""
    obs, info = env.reset(options={"task": start}) if isinstance(start, int) else env.restore_state(start)
    session = info["session"]
    agent = policy.for_session(derive_seed(seed, session))
    out = Play(starts={session: env.save_state()} if record else {}, end=None, ret=None)
    ended, ret = 0, 0.0
    while True:
        action = agent.act(obs, info)
        out.tokens += policy.tokens(action)
        obs, reward, terminated, truncated, info = env.step(action)
        out.steps += 1
        out.session_steps[session] = out.session_steps.get(session, 0) + 1
        ret += reward
        if terminated or truncated:
            out.ret = float(ret) if terminated else None
            break
        if "session_end" in info:
            ended += 1
            if max_sessions is not None and ended >= max_sessions:
                break
            session = info["session"]
            agent = policy.for_session(derive_seed(seed, session))
            if record:
                out.starts[session] = env.save_state()
    out.end = env.save_state()
    return out


@dataclass
class Estimate:
    """A Monte-Carlo value: the returns of independent continuations, their mean and its SE."""

    returns: list[float]
    steps: int = 0
    tokens: int = 0

    @property
    def mean(self) -> float:
        return float(np.mean(self.returns))

    @property
    def se(self) -> float:
        r = np.asarray(self.returns, dtype=float)
        if len(r) < 2 or np.ptp(r) == 0:
            return 0.0  # a known value (a terminal state) has no error, not a rounding residue
        return float(r.std(ddof=1) / math.sqrt(len(r)))


def monte_carlo(env, policy, state, k: int, seed: int, *, terminal_return: float | None = None) -> Estimate:
    """The returns of ``k`` continuations from ``state`` (seeds derived from ``seed``). A terminal
    state has one return, known exactly: ``terminal_return``, with standard error 0."""
    return monte_carlo_many(env, policy, [(state, k, seed, terminal_return)])[0]


def monte_carlo_many(env, policy, specs: Sequence[tuple[Any, int, int, float | None]]) -> list[Estimate]:
    """:func:`monte_carlo` for many ``(state, k, seed, terminal_return)`` at once: all their
    continuations go to the policy as one batch."""
    jobs = [Job(state, derive_seed(seed, c)) for state, k, seed, terminal in specs if terminal is None for c in range(k)]
    plays = iter(policy.play_many(env, jobs))
    out = []
    for state, k, seed, terminal in specs:
        if terminal is not None:
            out.append(Estimate([terminal] * k))
            continue
        est = Estimate([])
        for _ in range(k):
            p = next(plays)
            if p.ret is None:
                raise FidelityError("a continuation did not reach the end of the episode (truncated?)")
            est.returns.append(p.ret)
            est.steps += p.steps
            est.tokens += p.tokens
        out.append(est)
    return out


# ------------------------------------------------------------------------------ one task


@dataclass(frozen=True)
class Settings:
    horizon: int
    n: int = 8
    """Global rollouts per task (the GRPO group)."""
    m: int = 4
    """Reruns per local group."""
    k_truth: int = 16
    """Continuations per ground-truth Q and V."""
    k_mc: int = 4
    """Continuations per rerun for the Monte-Carlo estimators (K_est up to this)."""
    sessions_per_task: int = 2
    """Sessions measured per task: one drawn from each of this many equal parts of the horizon."""
    max_questions: int = 64
    """Questions the final memory answers for the global reward (the paper's 64)."""
    local_max_questions: int = 16
    """Questions that score a rerun (the paper's 16)."""
    p_local: float = 0.5
    """Share of sessions with a local group in ``logo-trained``."""
    lookahead: int = 2
    """Sessions each rerun is continued for ``logo-lookahead``."""


def sample_sessions(horizon: int, count: int, rng: np.random.Generator) -> list[int]:
    """One session drawn uniformly from each of ``count`` equal parts of 1..horizon."""
    count = min(count, horizon)
    edges = np.linspace(1, horizon + 1, count + 1)
    return sorted({int(rng.integers(int(round(lo)), int(round(hi)))) for lo, hi in zip(edges[:-1], edges[1:])})


def measure_task(env, policy, task: int, settings: Settings, seed: int) -> dict:
    """Everything the estimators and the ground truth need for one task, as plain JSON data.

    The plays go to ``policy.play_many`` in three batches per measured session (the truth for
    the global rollouts and the reruns; then the reruns' truth and Monte-Carlo continuations;
    then the look-aheads), so an LLM policy samples them in large batches."""
    from agents.rl.grpo import session_credit
    from agents.rl.logo_grpo import local_reward

    s = settings
    rng = np.random.default_rng(derive_seed(seed, task, 0))
    glob = policy.play_many(env, [Job(task, derive_seed(seed, task, 1, i), record=True) for i in range(s.n)])
    if any(g.ret is None for g in glob):
        raise FidelityError("a global rollout did not reach the end of the episode")
    sessions = sorted(glob[0].starts)
    credit = {
        c: [session_credit(env, g.end, sessions, s.max_questions, c)[0] for g in glob] for c in ("session", "trajectory")
    }
    record: dict[str, Any] = {
        "task": task, "horizon": s.horizon, "policy": policy.name,
        "global_steps": sum(g.steps for g in glob), "global_tokens": sum(g.tokens for g in glob),
        "estimates_global": s.n * len(sessions), "returns": [g.ret for g in glob], "sessions": [],
    }
    for k in sample_sessions(len(sessions), s.sessions_per_task, rng):
        last = k == sessions[-1]
        row: dict[str, Any] = {"k": k, "local_in_training": bool(rng.random() < s.p_local)}
        source = int(rng.integers(s.n))
        # 1. V(s) and Q(s, a) of every global rollout at session k, and the m reruns of session k
        specs = [(g.starts[k], s.k_truth, derive_seed(seed, task, 2, i, k), None) for i, g in enumerate(glob)]
        specs += [(g.end if last else g.starts[k + 1], s.k_truth, derive_seed(seed, task, 3, i, k), g.ret if last else None)
                  for i, g in enumerate(glob)]
        truth = monte_carlo_many(env, policy, specs)
        v, q = truth[: s.n], truth[s.n :]
        reruns = policy.play_many(env, [Job(glob[source].starts[k], derive_seed(seed, task, 4, k, j), max_sessions=1) for j in range(s.m)])
        row["global"] = {
            "r_session": [credit["session"][i][k] for i in range(s.n)],
            "r_trajectory": [credit["trajectory"][i][k] for i in range(s.n)],
            "Q": [e.mean for e in q], "Q_se": [e.se for e in q], "V": [e.mean for e in v], "V_se": [e.se for e in v],
        }
        # 2. each rerun's true Q, and its own Monte-Carlo continuations (never the truth's)
        specs = [(r.end, s.k_truth, derive_seed(seed, task, 5, k, j), r.ret) for j, r in enumerate(reruns)]
        specs += [(r.end, s.k_mc, derive_seed(seed, task, 6, k, j), r.ret) for j, r in enumerate(reruns)]
        both = monte_carlo_many(env, policy, specs)
        rq, mc = both[: s.m], both[s.m :]
        # 3. the look-ahead signal: one continuation of each rerun for a few sessions
        ahead = min(s.lookahead, sessions[-1] - k)
        conts = policy.play_many(env, [Job(r.end, derive_seed(seed, task, 8, k, j), max_sessions=ahead) for j, r in enumerate(reruns)]) if ahead else []
        r_local = [local_reward(env, r.end, k, s.local_max_questions)[0] for r in reruns]
        look = [(local_reward(env, c.end, k + ahead, s.local_max_questions)[0], c.steps, c.tokens) for c in conts] or [
            (r, 0, 0) for r in r_local  # the last session: nothing ahead, the local reward itself
        ]
        row["local"] = {
            "source": source,
            "r_local": r_local,
            "r_local_all": [local_reward(env, r.end, k, None)[0] for r in reruns],
            "r_lookahead": [x[0] for x in look], "lookahead_steps": [x[1] for x in look], "lookahead_tokens": [x[2] for x in look],
            "Q": [e.mean for e in rq], "Q_se": [e.se for e in rq],
            "V": row["global"]["V"][source], "V_se": row["global"]["V_se"][source],
            "steps": [r.steps for r in reruns], "tokens": [r.tokens for r in reruns],
            "mc": [e.returns for e in mc],
            # continuation cost per continuation (every continuation of a rerun has the same length)
            "mc_steps": [e.steps / max(1, len(e.returns)) for e in mc], "mc_tokens": [e.tokens / max(1, len(e.returns)) for e in mc],
        }
        record["sessions"].append(row)
    return record


# ------------------------------------------------------------------------------ estimators


@dataclass
class Group:
    """One group of samples as an estimator would normalise them."""

    est: np.ndarray
    """The estimator's advantages (after its group normalisation)."""
    true: np.ndarray
    """``Q - V`` of each sample."""
    true_se: np.ndarray
    """Standard error of each ``Q - V``."""
    q_se: np.ndarray
    """Standard error of each ``Q`` (the gap of two samples from one state has no V error)."""
    v: np.ndarray
    """``V(s)`` of each sample's start state."""
    shared_state: bool
    """Every member starts from the same state (a local group)."""


def _normalise(values: Sequence[float]) -> np.ndarray:
    from agents.rl.advantages import group_advantages

    return group_advantages(list(values), [0] * len(values)).advantages


def _global_group(row: dict, key: str) -> Group:
    g = row["global"]
    q_se, v_se = np.asarray(g["Q_se"]), np.asarray(g["V_se"])
    return Group(
        est=_normalise(g[key]), true=np.asarray(g["Q"]) - np.asarray(g["V"]), true_se=np.sqrt(q_se**2 + v_se**2),
        q_se=q_se, v=np.asarray(g["V"]), shared_state=False,
    )


def _local_group(row: dict, rewards: Sequence[float]) -> Group:
    loc = row["local"]
    q_se = np.asarray(loc["Q_se"])
    m = len(q_se)
    return Group(
        est=_normalise(rewards), true=np.asarray(loc["Q"]) - loc["V"], true_se=np.sqrt(q_se**2 + loc["V_se"] ** 2),
        q_se=q_se, v=np.full(m, loc["V"]), shared_state=True,
    )


def estimator_groups(record: dict, estimator: str) -> list[Group]:
    """The groups ``estimator`` forms on one task's record."""
    groups = []
    for row in record["sessions"]:
        if estimator == "grpo-session":
            groups.append(_global_group(row, "r_session"))
        elif estimator == "grpo-trajectory":
            groups.append(_global_group(row, "r_trajectory"))
        elif estimator == "logo-local":
            groups.append(_local_group(row, row["local"]["r_local"]))
        elif estimator in ("logo-trained", "logo-trained-all"):
            groups.append(_global_group(row, "r_session"))
            if row["local_in_training"]:
                groups.append(_local_group(row, row["local"]["r_local" if estimator == "logo-trained" else "r_local_all"]))
        elif estimator == "logo-local-all":
            groups.append(_local_group(row, row["local"]["r_local_all"]))
        elif estimator == "logo-lookahead":
            groups.append(_local_group(row, row["local"]["r_lookahead"]))
        elif estimator in MC_K:
            groups.append(_local_group(row, [float(np.mean(r[: MC_K[estimator]])) for r in row["local"]["mc"]]))
        else:
            raise FidelityError(f"unknown estimator {estimator!r}; known: {', '.join(ESTIMATORS)}")
    return groups


def estimator_cost(record: dict, estimator: str, settings: Settings) -> tuple[float, float]:
    """(env steps, generated tokens) per estimate, as training would pay them."""
    per_global = (record["global_steps"] / record["estimates_global"], record["global_tokens"] / record["estimates_global"])
    rows = record["sessions"]
    rerun = (np.mean([x for r in rows for x in r["local"]["steps"]]), np.mean([x for r in rows for x in r["local"]["tokens"]]))
    if estimator in ("grpo-session", "grpo-trajectory"):
        return per_global
    if estimator in ("logo-local", "logo-local-all"):
        return float(rerun[0]), float(rerun[1])
    if estimator == "logo-lookahead":
        ahead = (np.mean([x for r in rows for x in r["local"]["lookahead_steps"]]), np.mean([x for r in rows for x in r["local"]["lookahead_tokens"]]))
        return float(rerun[0] + ahead[0]), float(rerun[1] + ahead[1])
    if estimator in ("logo-trained", "logo-trained-all"):
        # n rollouts of every session, and m reruns for a share p_local of the sessions
        n, m, p = settings.n, settings.m, settings.p_local
        return tuple(float((n * g + p * m * r) / (n + p * m)) for g, r in zip(per_global, rerun))  # type: ignore[return-value]
    k = MC_K[estimator]
    cont = (np.mean([x for r in rows for x in r["local"]["mc_steps"]]), np.mean([x for r in rows for x in r["local"]["mc_tokens"]]))
    return float(rerun[0] + k * cont[0]), float(rerun[1] + k * cont[1])


# ------------------------------------------------------------------------------ metrics


def pair_accuracy(group: Group) -> tuple[float, int]:
    """(correct, counted) over the pairs of ``group`` whose true gap exceeds its standard error;
    a tie in the estimate counts 1/2."""
    correct, counted = 0.0, 0
    n = len(group.est)
    for a in range(n):
        for b in range(a + 1, n):
            gap = group.true[a] - group.true[b]
            se = math.hypot(group.q_se[a], group.q_se[b]) if group.shared_state else math.hypot(group.true_se[a], group.true_se[b])
            if abs(gap) <= se or gap == 0:
                continue
            counted += 1
            d = group.est[a] - group.est[b]
            correct += 0.5 if d == 0 else float(np.sign(d) == np.sign(gap))
    return correct, counted


def sign_accuracy(group: Group) -> tuple[float, int]:
    """(correct, counted) over the samples whose ``|A|`` exceeds its standard error."""
    mask = (np.abs(group.true) > group.true_se) & (group.true != 0)
    est, true = group.est[mask], group.true[mask]
    correct = float(np.sum(np.where(est == 0, 0.5, (np.sign(est) == np.sign(true)).astype(float))))
    return correct, int(mask.sum())


def spearman(group: Group) -> float | None:
    """Rank correlation of estimate and truth (0 if the estimate is constant; ``None`` if the
    truth is, or the group has fewer than 3 members)."""
    if len(group.est) < 3 or np.ptp(group.true) == 0:
        return None
    if np.ptp(group.est) == 0:
        return 0.0
    return float(np.corrcoef(_ranks(group.est), _ranks(group.true))[0, 1])


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties given their average rank (as Spearman's rho needs)."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(1, len(x) + 1)
    for value in np.unique(x):
        tied = x == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def luck_share(groups: Sequence[Group]) -> float | None:
    """R^2 of the estimates on ``V(s)`` centred within each group: the share of an estimator's
    variance that the memory's luck explains (``None`` without variance to explain)."""
    est = np.concatenate([g.est for g in groups]) if groups else np.zeros(0)
    dv = np.concatenate([g.v - g.v.mean() for g in groups]) if groups else np.zeros(0)
    if len(est) < 3 or np.ptp(est) == 0:
        return None
    if np.ptp(dv) == 0:
        return 0.0
    return float(np.corrcoef(est, dv)[0, 1] ** 2)


def batch_correlation(groups: Sequence[Group]) -> float | None:
    """Pearson correlation of estimates and true advantages over all samples of ``groups``
    (0 when the estimates are all equal; ``None`` when the truth is)."""
    est = np.concatenate([g.est for g in groups]) if groups else np.zeros(0)
    true = np.concatenate([g.true for g in groups]) if groups else np.zeros(0)
    if len(est) < 3 or np.ptp(true) == 0:
        return None
    if np.ptp(est) == 0:
        return 0.0
    return float(np.corrcoef(est, true)[0, 1])


def task_metrics(record: dict, estimator: str, settings: Settings) -> dict[str, Any]:
    """Per-task sufficient statistics of every metric (ratios are pooled over tasks later)."""
    groups = estimator_groups(record, estimator)
    pc, pn = map(sum, zip(*(pair_accuracy(g) for g in groups))) if groups else (0.0, 0)
    sc, sn = map(sum, zip(*(sign_accuracy(g) for g in groups))) if groups else (0.0, 0)
    rhos = [r for r in (spearman(g) for g in groups) if r is not None]
    steps, tokens = estimator_cost(record, estimator, settings)
    return {
        "pair_correct": pc, "pair_counted": pn, "sign_correct": sc, "sign_counted": sn,
        "spearman": float(np.mean(rhos)) if rhos else None, "luck_r2": luck_share(groups),
        "signal": float(np.mean([np.ptp(g.est) > 0 for g in groups])) if groups else None,
        "batch_r": batch_correlation(groups), "steps": steps, "tokens": tokens,
    }


def _bootstrap(per_task: Sequence[dict], stat: Callable[[Sequence[dict]], float], resamples: int, seed: int) -> tuple[float, float, float]:
    value = stat(per_task)
    rng = np.random.default_rng(seed)
    n = len(per_task)
    draws = [stat([per_task[i] for i in rng.integers(0, n, n)]) for _ in range(resamples)]
    draws = [d for d in draws if not math.isnan(d)]
    if not draws:
        return value, math.nan, math.nan
    return value, float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))


def _ratio(num: str, den: str) -> Callable[[Sequence[dict]], float]:
    def stat(rows):
        d = sum(r[den] for r in rows)
        return sum(r[num] for r in rows) / d if d else math.nan
    return stat


def _mean(key: str) -> Callable[[Sequence[dict]], float]:
    def stat(rows):
        vals = [r[key] for r in rows if r[key] is not None]
        return float(np.mean(vals)) if vals else math.nan
    return stat


def summarise(records: Sequence[dict], estimators: Sequence[str], settings: Settings, *, resamples: int = 2000, seed: int = 0) -> dict[str, dict]:
    """Every metric of every estimator over ``records`` (one per task), with 95% bootstrap CIs
    over tasks: ``{estimator: {metric: [value, lo, hi]}, ...}`` plus ``pairs`` counted."""
    out = {}
    for est in estimators:
        per_task = [task_metrics(r, est, settings) for r in records]
        row = {
            "pair_acc": _bootstrap(per_task, _ratio("pair_correct", "pair_counted"), resamples, seed),
            "sign_acc": _bootstrap(per_task, _ratio("sign_correct", "sign_counted"), resamples, seed),
            "spearman": _bootstrap(per_task, _mean("spearman"), resamples, seed),
            "luck_r2": _bootstrap(per_task, _mean("luck_r2"), resamples, seed),
            "signal": _bootstrap(per_task, _mean("signal"), resamples, seed),
            "batch_r": _bootstrap(per_task, _mean("batch_r"), resamples, seed),
            "steps": _mean("steps")(per_task), "tokens": _mean("tokens")(per_task),
            "pairs": int(sum(t["pair_counted"] for t in per_task)), "tasks": len(per_task),
        }
        out[est] = row
    return out


# ------------------------------------------------------------------------------ the runner


def check_settings(settings: Settings, estimators: Sequence[str], policy, env) -> None:
    """Every bad setting is an error here, before any rollout runs."""
    unknown = [e for e in estimators if e not in ESTIMATORS]
    if unknown:
        raise FidelityError(f"unknown estimator(s) {', '.join(map(repr, unknown))}; known: {', '.join(ESTIMATORS)}")
    if settings.k_truth < 2:
        raise FidelityError(f"K (--k-truth) must be at least 2 to give a standard error, got {settings.k_truth}")
    if settings.n < 2 or settings.m < 2:
        raise FidelityError(f"groups need at least 2 members: n={settings.n}, m={settings.m}")
    k_est = max((MC_K[e] for e in estimators if e in MC_K), default=0)
    if settings.k_mc < k_est:
        raise FidelityError(f"--k-mc {settings.k_mc} is below the K_est ({k_est}) of the Monte-Carlo estimators asked for")
    if settings.horizon < 1:
        raise FidelityError(f"horizon must be at least 1, got {settings.horizon}")
    if not getattr(policy, "restorable", False):
        raise FidelityError(
            f"policy {getattr(policy, 'name', policy)!r} cannot be restored mid-episode: the benchmark replays sessions from "
            "saved env states, so the policy must act from the observation alone (set restorable = True if it does)"
        )
    base = env.unwrapped
    if not (hasattr(base, "save_state") and hasattr(base, "restore_state")):
        raise FidelityError("the environment has no save_state/restore_state")


def make_env(horizon: int, task_seeds: Sequence[int]):
    """The ``small`` preset's environment (2 slices per session, 6-8 turns) at ``horizon``, in
    ``final`` mode with every question scored at the end: the return is the task's objective."""
    from agents.presets import PRESETS, make_env_fn

    return make_env_fn(PRESETS["small"], horizon, list(task_seeds))()


def check_horizon(env, horizon: int, tasks: int) -> None:
    base = env.unwrapped
    for t in range(tasks):
        base.reset(options={"task": t})
        have = len(base.save_state().conversation.sessions)
        if have < horizon:
            raise FidelityError(f"task {t} has {have} sessions, fewer than the horizon {horizon}")


def cell_name(horizon: int, policy: float | str) -> str:
    """``h<H>-noise<p>`` for the noisy teacher at mistake rate ``p``, ``h<H>-<label>`` for a checkpoint."""
    return f"h{horizon}-noise{policy:g}" if isinstance(policy, float) else f"h{horizon}-{policy}"


def task_seeds_for(seed: int, tasks: int) -> list[int]:
    """The synthetic tasks of every cell: the same conversations at every horizon and policy."""
    return [derive_seed(seed, 7, t) % 2**31 for t in range(tasks)]


def make_policy(key: float | str, horizon: int, tasks: int, seed: int, llm: dict):
    """The scripted policy at noise ``key``, or the checkpoint ``llm["checkpoints"][key]``."""
    if isinstance(key, float):
        return ScriptedPolicy(key)
    seeds = task_seeds_for(seed, tasks)
    return LLMPolicy(llm["checkpoints"][key], lambda: make_env(horizon, seeds), temperature=llm["temperature"],
                     max_new_tokens=llm["max_new_tokens"], dtype=llm["dtype"], max_batch=llm["max_batch"], sampler=llm.get("sampler"))


def run_cell(out: Path, horizon: int, key: float | str, tasks: int, settings: Settings, seed: int, progress: bool = True,
             llm: dict | None = None) -> list[dict]:
    """Measure (or load) every task of one cell; each task's record is written when done."""
    from tqdm.auto import tqdm

    cell = out / cell_name(horizon, key)
    cell.mkdir(parents=True, exist_ok=True)
    env = make_env(horizon, task_seeds_for(seed, tasks))
    base = env.unwrapped
    records = []
    if isinstance(key, float):
        stamp = {**asdict(settings), "noise": key, "seed": seed}
    else:
        stamp = {**asdict(settings), "checkpoint": str(llm["checkpoints"][key]), "seed": seed,
                 **{k: llm[k] for k in ("temperature", "max_new_tokens", "dtype")},
                 **({"backend": llm["sampler"]["choice"]} if llm.get("sampler", {}).get("choice", "hf") != "hf" else {})}
    policy = None  # built on first need: a finished cell loads no model
    for t in tqdm(range(tasks), desc=cell.name, disable=not progress):
        path = cell / f"task-{t}.json"
        if path.exists():
            rec = json.loads(path.read_text())
            if rec.get("settings") != stamp:
                raise FidelityError(f"{path} was measured with other settings ({rec.get('settings')}); use another --out")
            records.append(rec)
            continue
        policy = policy or make_policy(key, horizon, tasks, seed, llm or {})
        t0 = time.perf_counter()
        rec = measure_task(base, policy, t, settings, derive_seed(seed, horizon, int(key * 1000)) if isinstance(key, float) else derive_seed(seed, horizon))
        rec["settings"] = stamp
        rec["wall_s"] = time.perf_counter() - t0
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(rec))
        os.replace(tmp, path)  # a killed run never leaves half a record
        records.append(rec)
    return records


def format_table(summary: dict[str, dict[str, dict]]) -> str:
    """A markdown table: one row per cell and estimator."""
    def ci(x):
        v, lo, hi = x
        return "-" if math.isnan(v) else f"{v:.3f} [{lo:.3f}, {hi:.3f}]"

    lines = [
        "| cell | estimator | pairwise sign acc. | sign acc. | Spearman | batch r | luck R^2 | groups with signal | steps / estimate | pairs |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for cell, rows in summary.items():
        for est, r in rows.items():
            lines.append(
                f"| {cell} | {est} | {ci(r['pair_acc'])} | {ci(r['sign_acc'])} | {ci(r['spearman'])} | {ci(r['batch_r'])} | {ci(r['luck_r2'])} | "
                f"{ci(r['signal'])} | {r['steps']:.1f} | {r['pairs']} |"
            )
    return "\n".join(lines)


def plot(summary: dict[str, dict[str, dict]], out: Path) -> list[Path]:
    """Pairwise sign accuracy per estimator against the horizon (one panel per noise level) and
    against the cost per estimate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = {}
    for name, rows in summary.items():
        h, noise = name.split("-noise")
        cells[(int(h[1:]), float(noise))] = rows
    noises = sorted({n for _, n in cells})
    horizons = sorted({h for h, _ in cells})
    fig, axes = plt.subplots(1, len(noises), figsize=(4.2 * len(noises), 3.6), sharey=True, squeeze=False)
    for ax, noise in zip(axes[0], noises):
        for e, est in enumerate(ESTIMATORS):
            pts = [(h, cells[(h, noise)][est]["pair_acc"]) for h in horizons if (h, noise) in cells and est in cells[(h, noise)]]
            if pts:
                xs = [p[0] * 1.03 ** (e - len(ESTIMATORS) / 2) for p in pts]  # side by side, so the CIs stay readable
                ys = [p[1][0] for p in pts]
                err = [[p[1][0] - p[1][1] for p in pts], [p[1][2] - p[1][0] for p in pts]]
                ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=est)
        ax.axhline(0.5, color="grey", lw=0.8, ls=":")
        ax.set_xscale("log", base=2)
        ax.set_xticks(horizons, [str(h) for h in horizons])
        ax.set_title(f"noise {noise:g}")
        ax.set_xlabel("horizon (sessions)")
    axes[0][0].set_ylabel("pairwise sign accuracy")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    paths = [out / "fidelity_horizon.png"]
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for est in ESTIMATORS:
        pts = [(r[est]["steps"], r[est]["pair_acc"][0]) for r in cells.values() if est in r and not math.isnan(r[est]["pair_acc"][0])]
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=est, s=18)
    ax.set_xscale("log")
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("env steps per estimate")
    ax.set_ylabel("pairwise sign accuracy")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "fidelity_cost.png")
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="directory of the per-task records and the table")
    p.add_argument("--horizons", type=int, nargs="+", default=[8, 16, 32])
    p.add_argument("--noise", type=float, nargs="+", default=[0.1, 0.3, 0.5], help="mistake rates of the noisy teacher")
    p.add_argument("--tasks", type=int, default=30, help="tasks per cell")
    p.add_argument("--n", type=int, default=8, help="global rollouts per task")
    p.add_argument("--m", type=int, default=4, help="reruns per local group")
    p.add_argument("--k-truth", type=int, default=16, help="continuations per ground-truth Q and V (K)")
    p.add_argument("--k-mc", type=int, default=4, help="continuations per rerun for the mc-k* estimators")
    p.add_argument("--sessions-per-task", type=int, default=2, help="sessions measured per task (one from each equal part of the horizon)")
    p.add_argument("--lookahead", type=int, default=2, help="sessions each rerun is continued for logo-lookahead")
    p.add_argument("--local-max-questions", type=int, default=16, help="questions that score a rerun for logo-local (the paper's 16; the small preset's 8)")
    p.add_argument("--max-questions", type=int, default=64, help="questions the final memory answers for GRPO's reward (the paper's 64)")
    p.add_argument("--estimators", nargs="+", default=list(ESTIMATORS), help=f"any of {', '.join(ESTIMATORS)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--checkpoint", action="append", default=[], metavar="LABEL=DIR",
        help="measure this checkpoint (an LLM policy, sampled by the rollout engine) instead of the noisy teacher; repeatable",
    )
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of --checkpoint policies")
    p.add_argument("--max-new-tokens", type=int, default=None, help="token limit of --checkpoint policies (default: as trained)")
    p.add_argument("--dtype", default=None, help="dtype of --checkpoint policies (auto, float32, bfloat16)")
    p.add_argument("--rollout-batch", type=int, default=None, help="most rows decoded at once by --checkpoint policies")
    p.add_argument("--backend", choices=("hf", "vllm"), default="hf",
                   help="sampler of --checkpoint policies (vllm: one in-process engine for the run; part of each record's settings)")
    p.add_argument("--report", action="store_true", help="only summarise the records on disk")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    llm = {"checkpoints": {}, "temperature": args.temperature, "max_new_tokens": args.max_new_tokens, "dtype": args.dtype,
           "max_batch": args.rollout_batch, "sampler": {"choice": args.backend, "backend": None}}
    try:
        for item in args.checkpoint:
            label, sep, path = item.partition("=")
            if not sep or not label or not path:
                raise FidelityError(f"--checkpoint {item!r}: expected LABEL=DIR")
            if not (Path(path) / "config.json").is_file():
                raise FidelityError(f"--checkpoint {item!r}: {path} is not a checkpoint directory (no config.json)")
            llm["checkpoints"][label] = path
        keys: list[float | str] = list(llm["checkpoints"]) or [float(x) for x in args.noise]
        if any(isinstance(x, float) and not 0 <= x <= 1 for x in keys):
            raise FidelityError(f"noise levels must lie in [0, 1], got {args.noise}")
        if args.tasks < 2:
            raise FidelityError(f"--tasks must be at least 2 for a confidence interval, got {args.tasks}")
        cells = []
        for h in args.horizons:
            settings = Settings(horizon=h, n=args.n, m=args.m, k_truth=args.k_truth, k_mc=args.k_mc,
                                sessions_per_task=args.sessions_per_task, lookahead=args.lookahead,
                                local_max_questions=args.local_max_questions, max_questions=args.max_questions)
            env = make_env(h, task_seeds_for(args.seed, args.tasks))
            check_settings(settings, args.estimators, LLMPolicy if llm["checkpoints"] else ScriptedPolicy(0.0), env)
            check_horizon(env, h, args.tasks)
            cells += [(h, key, settings) for key in keys]
    except FidelityError as err:
        raise SystemExit(f"credit_fidelity: {err}") from err

    summary: dict[str, dict] = {}
    for h, key, settings in cells:
        if args.report:
            cell = args.out / cell_name(h, key)
            records = [json.loads(f.read_text()) for f in sorted(cell.glob("task-*.json"), key=lambda f: int(f.stem.split("-")[1]))] if cell.is_dir() else []
            if len(records) < 2:
                continue
        else:
            try:
                records = run_cell(args.out, h, key, args.tasks, settings, args.seed, progress=not args.no_progress, llm=llm)
            except FidelityError as err:
                raise SystemExit(f"credit_fidelity: {err}") from err
        summary[cell_name(h, key)] = summarise(records, args.estimators, settings, seed=args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.json").write_text(json.dumps(summary, indent=1))
    table = format_table(summary)
    (args.out / "table.md").write_text(table + "\n")
    print(table)
    if any("-noise" in name for name in summary):
        for path in plot({n: r for n, r in summary.items() if "-noise" in n}, args.out):
            print(f"plot: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The batched rollout engine.

Many environments run at once and share the model. By default (continuous batching, when the
policy's backend supports it) every environment owns a row of one running batch: the moment its
action is complete the environment steps, and its next prompt (extractor or manager) joins the
batch while the other rows keep decoding, so no row waits for a longer one. The lockstep mode
(``continuous=False``, and any backend with only ``generate``) collects the pending observation
of every active environment, makes ONE generation call for all of them, and steps each
environment with its completion. Every generated turn is recorded with the ids a trainer needs:
prompt and completion token ids, the sampling-time log-probs, the role, the session, the
episode and rollout ids. Group ids are left to the trainer, since GRPO and LoGo-GRPO differ
only in the groups they build.

An episode can start from a saved environment state and stop after a number of sessions: this is
how LoGo-GRPO reruns one session from the very same memory.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import gymnasium as gym
import numpy as np

from agents.generation.interface import WORK_COUNTS

__all__ = ["TurnRecord", "EpisodeRecord", "Start", "RolloutEngine", "rollout_seed"]


@dataclass
class TurnRecord:
    """One generated turn (one row of the policy loss)."""

    episode_id: int
    rollout_id: int
    conv_id: str
    session: int
    role: int
    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str
    parse_error: str | None = None
    group_id: Any = None
    advantage: float = 0.0


@dataclass
class EpisodeRecord:
    """Everything one rollout produced.

    ``session_rewards[k]`` is the env reward at the end of session ``k``; ``session_info[k]`` the
    env's info there (``qa``, ``f1``, ``penalty``, ``m_fail``). ``states[k]`` is the environment
    state saved just before session ``k`` began (when ``save_states`` is on).
    """

    episode_id: int
    rollout_id: int
    conv_id: str
    turns: list[TurnRecord] = field(default_factory=list)
    session_rewards: dict[int, float] = field(default_factory=dict)
    session_info: dict[int, dict] = field(default_factory=dict)
    states: dict[int, Any] = field(default_factory=dict)
    final_state: Any = None
    done: bool = False
    stats: dict[str, int] = field(default_factory=dict)

    @property
    def sessions(self) -> list[int]:
        return sorted({t.session for t in self.turns} | set(self.session_rewards))

    @property
    def total_reward(self) -> float:
        return float(sum(self.session_rewards.values()))

    @property
    def generated_tokens(self) -> int:
        return sum(len(t.completion_ids) for t in self.turns)


@dataclass(frozen=True)
class Start:
    """How to start one rollout: ``reset(seed=seed, options=options)``; ``max_sessions`` stops
    it after that many session ends (``None``: run to the end of the episode)."""

    seed: int | None = None
    options: dict | None = None
    max_sessions: int | None = None
    rollout_id: int = 0


def rollout_seed(seed: int, key: int) -> int:
    """The sampling seed of rollout ``key`` in a run seeded with ``seed`` (distinct pairs give
    unrelated streams)."""
    return int(np.random.SeedSequence([int(seed) % 2**63, int(key) % 2**63]).generate_state(1, np.uint64)[0] >> 1)


class RolloutEngine:
    """Steps many environments in lockstep with one batched generation call per step.

    Args:
        policy: an object with ``generate(observations, temperature=, top_p=, max_new_tokens=,
            seed=) -> list[Generation]`` (:class:`agents.policy.SharedPolicy`).
        env_fn: builds one environment (for example ``lambda: gym.make("MemSession-v0", ...)``).
            The engine keeps a pool and reuses environments across calls.
        temperature, top_p, max_new_tokens: sampling settings.
        save_states: save the env state before every session (needed for rerollouts).
        continuous: ``True``: continuous batching (the policy's ``generate_continuous``: an env
            steps as soon as its own action is complete, and its next prompt joins the running
            batch); ``False``: lockstep, one ``generate`` call per step over all pending
            prompts; ``None`` (default): continuous when the policy supports it.
        max_batch: most prompts the model runs at once (``None``, the default: every active
            environment). Continuous mode decodes at most this many rows, and prompts queue
            for a free row in arrival order (every environment's first action, then each next
            action behind those already waiting, so all episodes advance together);
            lockstep mode splits each step into calls of at most this many prompts. It bounds
            the memory of the KV cache when there are many rollouts (LoGo-GRPO's local groups).
            In continuous mode every rollout samples from its own random stream (see
            :meth:`run`), so ``max_batch`` does not change what is sampled (up to float
            rounding); in lockstep mode one stream serves each call, so results are
            reproducible for a given ``max_batch``.

    ``timing`` accumulates ``generate_s`` (sampling), ``env_s`` (env steps and bookkeeping),
    ``calls`` (generation calls), ``forward_calls``, ``prefill_calls``, ``prefill_tokens``,
    ``prefix_tokens`` (model forwards, of which prompt prefills, the prompt tokens they ran and
    those taken from the shared role prefixes instead), ``takeovers`` (prompts that took over a
    finished row in place; these five in continuous mode only) and ``generated_tokens`` over
    the engine's life.
    """

    def __init__(
        self,
        policy,
        env_fn: Callable[[], gym.Env],
        *,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 96,
        save_states: bool = True,
        progress: bool = False,
        continuous: bool | None = None,
        max_batch: int | None = None,
    ):
        if max_batch is not None and max_batch < 1:
            raise ValueError(f"max_batch must be at least 1 (or None for no limit), got {max_batch}")
        self.policy = policy
        self.env_fn = env_fn
        self.temperature = temperature
        self.top_p = top_p
        self.max_new_tokens = max_new_tokens
        self.save_states = save_states
        self.progress = progress
        self._pool: list[gym.Env] = []
        self._next_episode_id = 0
        self.continuous = continuous
        self.max_batch = max_batch
        self.timing = {"generate_s": 0.0, "env_s": 0.0, "calls": 0, **dict.fromkeys(WORK_COUNTS, 0), "generated_tokens": 0}

    def weights_changed(self) -> None:
        """Called by the trainers after every update. The policy runs in this process; a backend
        with its own copy of the weights (vLLM) gets the new ones here, in memory
        (``policy.sync_backend``). :class:`agents.generation.distributed.RayRolloutEngine`
        broadcasts them to its workers instead."""
        sync = getattr(self.policy, "sync_backend", None)
        if sync is not None:
            sync()

    def _use_continuous(self) -> bool:
        supported = bool(getattr(self.policy, "supports_continuous", False))
        if self.continuous and not supported:
            raise ValueError("continuous=True, but the policy's backend cannot batch continuously")
        return supported if self.continuous is None else self.continuous

    def _envs(self, n: int) -> list[gym.Env]:
        while len(self._pool) < n:
            self._pool.append(self.env_fn())
        return self._pool[:n]

    def run(
        self,
        starts: Sequence[Start],
        seed: int | None = 0,
        temperature: float | None = None,
        keys: Sequence[int] | None = None,
    ) -> list[EpisodeRecord]:
        """Run one rollout per ``Start``, all at once; returns records in the same order.

        The same starts and ``seed`` give the same records. In continuous mode each rollout
        samples from its own stream, seeded by ``(seed, key)``, where ``keys[i]`` (default:
        ``i``) names rollout ``i``; a rollout's samples then depend only on its own start, seed
        and key, not on which other rollouts run beside it (up to float rounding of the
        batched forward pass). This is what lets a caller split one call into several, on
        several workers, and get the same records: give each part the keys its starts had
        in the whole. Lockstep mode seeds each generation call as a whole.
        """
        if keys is not None and len(keys) != len(starts):
            raise ValueError(f"{len(keys)} keys for {len(starts)} starts")
        keys = list(range(len(starts))) if keys is None else [int(k) for k in keys]
        temperature = self.temperature if temperature is None else temperature
        envs = self._envs(len(starts))
        records: list[EpisodeRecord] = []
        obs: list[dict | None] = []
        infos: list[dict] = []
        sessions_left: list[int | None] = []
        t0 = time.perf_counter()
        for env, start in zip(envs, starts):
            o, info = env.reset(seed=start.seed, options=start.options)
            rec = EpisodeRecord(self._next_episode_id, start.rollout_id, info["conv_id"])
            self._next_episode_id += 1
            if self.save_states:
                rec.states[info["session"]] = env.unwrapped.save_state()
            records.append(rec)
            obs.append(o)
            infos.append(info)
            sessions_left.append(start.max_sessions)
        self.timing["env_s"] += time.perf_counter() - t0

        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(desc="rollout", unit="turn", leave=False)

        def advance(i: int, gen) -> dict | None:
            """Step env ``i`` with one generation and record it; the next observation or None."""
            t0 = time.perf_counter()
            env, rec, info = envs[i], records[i], infos[i]
            session = info["session"]
            o2, reward, terminated, truncated, info2 = env.step(gen.text)
            self.timing["generated_tokens"] += len(gen.completion_ids)
            rec.turns.append(
                TurnRecord(
                    episode_id=rec.episode_id,
                    rollout_id=rec.rollout_id,
                    conv_id=rec.conv_id,
                    session=session,
                    role=int(obs[i]["role"]),
                    prompt_ids=list(gen.prompt_ids),
                    completion_ids=list(gen.completion_ids),
                    logprobs=[float(x) for x in gen.logprobs],
                    text=gen.text,
                    finish_reason=gen.finish_reason,
                    parse_error=info2.get("parse_error"),
                )
            )
            ended = "session_end" in info2
            if ended:
                k = info2["session_end"]
                rec.session_rewards[k] = rec.session_rewards.get(k, 0.0) + float(reward)
                rec.session_info[k] = {key: info2[key] for key in ("qa", "f1", "penalty", "m_fail", "num_questions") if key in info2}
                rec.session_info[k]["memory_size"] = info2["memory_size"]
                if sessions_left[i] is not None:
                    sessions_left[i] -= 1
            stop = terminated or truncated or (sessions_left[i] is not None and sessions_left[i] <= 0)
            if ended and not stop and self.save_states:
                rec.states[info2["session"]] = env.unwrapped.save_state()
            if stop:
                rec.done = bool(terminated or truncated)
                rec.final_state = env.unwrapped.save_state()
                rec.stats = dict(info2.get("stats", {}))
                obs[i] = None
            else:
                obs[i], infos[i] = o2, info2
            self.timing["env_s"] += time.perf_counter() - t0
            if bar is not None:
                bar.update(1)
            return obs[i]

        sample = dict(temperature=temperature, top_p=self.top_p, max_new_tokens=self.max_new_tokens)
        if self._use_continuous():
            t0 = time.perf_counter()
            env_before = self.timing["env_s"]
            counts = self.policy.generate_continuous(
                list(obs), advance, seed=None if seed is None else [rollout_seed(seed, k) for k in keys],
                max_batch=self.max_batch, **sample,
            )
            for key, value in counts.items():
                self.timing[key] = self.timing.get(key, 0) + value
            self.timing["calls"] += 1
            self.timing["generate_s"] += time.perf_counter() - t0 - (self.timing["env_s"] - env_before)
        else:
            call = 0
            while True:
                active = [i for i, o in enumerate(obs) if o is not None]
                if not active:
                    break
                width = self.max_batch or len(active)
                for chunk in (active[j : j + width] for j in range(0, len(active), width)):
                    t0 = time.perf_counter()
                    gens = self.policy.generate(
                        [obs[i] for i in chunk], seed=None if seed is None else seed * 1_000_003 + call, **sample
                    )
                    self.timing["generate_s"] += time.perf_counter() - t0
                    self.timing["calls"] += 1
                    call += 1
                    for i, gen in zip(chunk, gens):
                        advance(i, gen)
        if bar is not None:
            bar.close()
        return records

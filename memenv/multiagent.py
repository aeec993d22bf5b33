"""PettingZoo views of ``MemSession-v0``: the extractor and the manager as two agents.

``MemSession-v0`` already alternates two roles: the observation's ``role`` says whether the
extractor (0) or the manager (1) acts next. This module exposes the same task to multi-agent
libraries with two named agents, ``extractor_0`` and ``manager_0``:

* :func:`env` / :data:`raw_env`: a PettingZoo **AEC** env. The acting agent (``agent_selection``)
  is the one whose role the underlying observation names, so turns do not strictly alternate:
  a slice from which the extractor writes no facts goes straight to the next slice, and the
  extractor acts again.
* :func:`parallel_env`: a PettingZoo **parallel** env. Every live agent submits an action each
  step; only the active agent's action is executed, the idle agent's is accepted and ignored,
  and every ``info`` names the active agent under ``"active_agent"``.

Both wrap one :class:`~memenv.env.MemSessionEnv` built from the same keyword arguments as
``gym.make("MemSession-v0", ...)``, so tasks, parsing and rewards are the ones of the
single-agent env.

Observations
    An agent whose role the underlying observation names sees that observation
    (``{"role": r, "text": ...}``); the other agent sees ``{"role": <its role>, "text": ""}``.

Rewards (a cooperative team reward)
    The reward of every step, a session-end score included, goes to **both** agents: extractor
    and manager build one memory together, and the reader scores that memory, not either role.
    Each agent's episode return therefore equals the single-agent env's episode return. The
    one exception is the ``format_penalty`` (default 0) of an action that could not be parsed:
    it goes only to the agent that wrote it.

Episode end
    When the underlying env terminates, every agent is terminated. ``max_cycles`` (default
    ``None``: no limit) truncates every agent after that many actions (underlying env steps).

Snapshots
    ``save_state()`` returns an immutable, picklable :class:`AECState` (or
    :class:`ParallelState`) holding the :class:`~memenv.env.EnvState` plus the PettingZoo
    bookkeeping: agent selection, live agents, rewards, cumulative rewards, terminations,
    truncations and infos. ``restore_state(state)`` (or ``reset(options={"state": state})``)
    continues from it; replaying the same actions reproduces everything exactly. A plain
    ``EnvState`` from the single-agent env is accepted too and starts fresh bookkeeping.

Wrappers
    :func:`env` applies PettingZoo's ``OrderEnforcingWrapper`` (errors for stepping before
    ``reset``). ``AssertOutOfBoundsWrapper`` and ``ClipOutOfBoundsWrapper`` are not applied: they
    are meant for Box/Discrete actions, and the text env promises to accept *any* string (longer
    ones are cut, malformed ones become parse errors), which an out-of-bounds assertion would
    break.

Registry
    Recent PettingZoo releases (1.27 included) have a registry (``pettingzoo.make``); older ones do
    not. Importing this module registers ``"memenv/MemSession-v0"`` in both the
    AEC and the parallel registry when the installed PettingZoo has one (``REGISTERED`` says
    whether it did)::

        import pettingzoo, memenv.multiagent
        aec = pettingzoo.make("aec", "memenv/MemSession-v0", horizon=2)
        par = pettingzoo.make("parallel", "memenv/MemSession-v0", horizon=2)

PettingZoo is an optional extra (``pip install 'memory-r2[multiagent]'``); ``import memenv``
never imports it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

try:
    import pettingzoo
    from pettingzoo import AECEnv, ParallelEnv
    from pettingzoo.utils.wrappers import OrderEnforcingWrapper
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "memenv.multiagent needs PettingZoo; install it with: pip install 'memory-r2[multiagent]'"
    ) from exc

from memenv.env import ROLES, EnvState, MemSessionEnv

__all__ = [
    "AGENTS",
    "AECState",
    "ParallelState",
    "MemSessionAECEnv",
    "MemSessionParallelEnv",
    "agent_for_role",
    "env",
    "raw_env",
    "parallel_env",
    "ENV_ID",
    "REGISTERED",
]

#: The PettingZoo registry id of both views.
ENV_ID = "memenv/MemSession-v0"
#: Agent names, indexed by role (``memenv.ROLES``).
AGENTS = tuple(f"{role}_0" for role in ROLES)


def agent_for_role(role: int) -> str:
    """The agent name of a role: 0 -> ``"extractor_0"``, 1 -> ``"manager_0"``."""
    return AGENTS[int(role)]


def _role_of(agent: str) -> int:
    try:
        return AGENTS.index(agent)
    except ValueError:
        raise ValueError(f"unknown agent {agent!r}; agents are {list(AGENTS)}") from None


def _unwrap(env: Any) -> MemSessionEnv:
    base = getattr(env, "unwrapped", env)
    if not isinstance(base, MemSessionEnv):
        raise TypeError(f"env must be a MemSessionEnv (or a Gymnasium wrapper of one), got {type(env).__name__}")
    return base


def _split_reward(base: MemSessionEnv, reward: float, info: dict) -> tuple[float, float]:
    """Return ``(team_reward, actor_reward)``: the format penalty stays with the actor."""
    if info.get("parse_error") is not None and base.format_penalty:
        return reward + base.format_penalty, reward
    return reward, reward


def _restore_env(base: MemSessionEnv, state: EnvState, seed: int | None) -> tuple[dict, dict]:
    """Restore ``state``; with a ``seed``, through ``reset`` so the env is seeded first, as
    ``reset(seed=s, options={"state": ...})`` does in the single-agent env."""
    if seed is None:
        return base.restore_state(state)
    return base.reset(seed=seed, options={"state": state})


def _agent_info(info: dict, active: str | None) -> dict:
    """A private copy of ``info`` for one agent, naming the agent that acts next."""
    out = copy.deepcopy(info)
    out["active_agent"] = active
    return out


# ---------------------------------------------------------------------------------------------
# Snapshots
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AECState:
    """A snapshot of :class:`MemSessionAECEnv`: the env state plus the PettingZoo bookkeeping.

    Mappings are stored as tuples of ``(agent, value)`` pairs and infos as private deep copies,
    so later steps never change a saved state. Picklable.
    """

    env_state: EnvState
    agents: tuple[str, ...]
    agent_selection: str
    rewards: tuple[tuple[str, float], ...]
    cumulative_rewards: tuple[tuple[str, float], ...]
    terminations: tuple[tuple[str, bool], ...]
    truncations: tuple[tuple[str, bool], ...]
    infos: tuple[tuple[str, dict], ...]
    skip_agent_selection: str | None = None


@dataclass(frozen=True)
class ParallelState:
    """A snapshot of :class:`MemSessionParallelEnv`: the env state and the live agents."""

    env_state: EnvState
    agents: tuple[str, ...]


# ---------------------------------------------------------------------------------------------
# AEC
# ---------------------------------------------------------------------------------------------


class MemSessionAECEnv(AECEnv):
    """``MemSession-v0`` as a PettingZoo AEC env with agents ``extractor_0`` and ``manager_0``.

    Args:
        env: an existing :class:`~memenv.env.MemSessionEnv` (or a Gymnasium wrapper of one) to
            drive; if omitted, one is built from ``**env_kwargs``.
        max_cycles: truncate every agent after this many actions; ``None`` for no limit.
        render_mode: ``None`` or ``"ansi"``.
        **env_kwargs: ``MemSessionEnv`` arguments (``horizon``, ``conversations``, ``reader``...).

    With ``single_agent=True`` the underlying env has no extractor step, and the only agent is
    ``manager_0``.
    """

    metadata = {"name": "memsession_v0", "render_modes": ["ansi"], "is_parallelizable": False}

    def __init__(self, env: MemSessionEnv | None = None, *, max_cycles: int | None = None, render_mode: str | None = None, **env_kwargs: Any):
        super().__init__()
        if env is None:
            env = MemSessionEnv(render_mode=render_mode, **env_kwargs)
        elif env_kwargs:
            raise TypeError(f"pass either env or MemSessionEnv arguments, not both (got {sorted(env_kwargs)})")
        self.env = _unwrap(env)
        self.render_mode = self.env.render_mode
        if max_cycles is not None and max_cycles < 1:
            raise ValueError(f"max_cycles must be None or >= 1, got {max_cycles}")
        self.max_cycles = max_cycles
        self.possible_agents = [AGENTS[1]] if self.env.single_agent else list(AGENTS)
        # One space object per agent, the same object on every call (PettingZoo seeds them per agent).
        self.observation_spaces = {a: copy.deepcopy(self.env.observation_space) for a in self.possible_agents}
        self.action_spaces = {a: copy.deepcopy(self.env.action_space) for a in self.possible_agents}
        self._obs: dict | None = None

    # -- spaces ------------------------------------------------------------------------------

    def observation_space(self, agent: str):
        return self.observation_spaces[agent]

    def action_space(self, agent: str):
        return self.action_spaces[agent]

    # -- core API ----------------------------------------------------------------------------

    def reset(self, seed: int | None = None, options: dict | None = None) -> None:
        """Start an episode. ``options`` are those of ``MemSessionEnv.reset`` (``task``,
        ``conversation``, ``state``); ``{"state": AECState}`` restores a multi-agent snapshot."""
        options = dict(options or {})
        if "state" in options:
            self._restore(options["state"], seed)
            return
        obs, info = self.env.reset(seed=seed, options=options)
        self._fresh_bookkeeping(obs, info, done=False)

    def observe(self, agent: str) -> dict:
        """The env observation if it names ``agent``'s role, else ``{"role": role, "text": ""}``."""
        role = _role_of(agent)
        if self._obs is not None and int(self._obs["role"]) == role:
            return {"role": role, "text": self._obs["text"]}
        return {"role": role, "text": ""}

    def step(self, action: Any) -> None:
        """Execute ``action`` for ``agent_selection`` (``None`` for a terminated agent)."""
        agent = self.agent_selection
        if self.terminations[agent] or self.truncations[agent]:
            self._was_dead_step(action)
            return
        self._cumulative_rewards[agent] = 0.0
        obs, reward, terminated, truncated, info = self.env.step(action)
        self._obs = obs
        team, actor = _split_reward(self.env, reward, info)
        truncated = bool(truncated or self._out_of_cycles(info, terminated))
        active = None if (terminated or truncated) else agent_for_role(obs["role"])
        for a in self.agents:
            self.rewards[a] = actor if a == agent else team
            self.terminations[a] = bool(terminated)
            self.truncations[a] = truncated and not terminated
            self.infos[a] = _agent_info(info, active)
        if active is not None:
            self.agent_selection = active
        self._accumulate_rewards()

    def render(self):
        """The underlying env's ``"ansi"`` rendering (``None`` without a render mode)."""
        return self.env.render()

    def close(self) -> None:
        self.env.close()

    # -- snapshots ---------------------------------------------------------------------------

    def save_state(self) -> AECState:
        """Return the complete episode state, PettingZoo bookkeeping included (immutable, picklable)."""
        if self._obs is None:
            raise RuntimeError("call reset() before save_state()")
        return AECState(
            env_state=self.env.save_state(),
            agents=tuple(self.agents),
            agent_selection=self.agent_selection,
            rewards=tuple(self.rewards.items()),
            cumulative_rewards=tuple(self._cumulative_rewards.items()),
            terminations=tuple(self.terminations.items()),
            truncations=tuple(self.truncations.items()),
            infos=tuple((a, copy.deepcopy(i)) for a, i in self.infos.items()),
            skip_agent_selection=getattr(self, "_skip_agent_selection", None),
        )

    def restore_state(self, state: AECState | EnvState) -> None:
        """Continue from a snapshot (like ``reset``, returns nothing: call ``last()``).

        An :class:`AECState` restores the bookkeeping exactly; a single-agent
        :class:`~memenv.env.EnvState` starts fresh bookkeeping at that env state.
        """
        self._restore(state, None)

    # -- internals ---------------------------------------------------------------------------

    def _restore(self, state: AECState | EnvState, seed: int | None) -> None:
        if isinstance(state, EnvState):
            obs, info = _restore_env(self.env, state, seed)
            self._fresh_bookkeeping(obs, info, done=state.done)
            return
        if not isinstance(state, AECState):
            raise TypeError(f"expected an AECState or EnvState, got {type(state).__name__}")
        obs, _ = _restore_env(self.env, state.env_state, seed)
        self._obs = obs
        self.agents = list(state.agents)
        self.agent_selection = state.agent_selection
        self.rewards = dict(state.rewards)
        self._cumulative_rewards = dict(state.cumulative_rewards)
        self.terminations = dict(state.terminations)
        self.truncations = dict(state.truncations)
        self.infos = {a: copy.deepcopy(i) for a, i in state.infos}
        self._skip_agent_selection = state.skip_agent_selection

    def _fresh_bookkeeping(self, obs: dict, info: dict, done: bool) -> None:
        self._obs = obs
        self.agents = list(self.possible_agents)
        active = None if done else agent_for_role(obs["role"])
        self.agent_selection = active or self.agents[0]
        self.rewards = {a: 0.0 for a in self.agents}
        self._cumulative_rewards = {a: 0.0 for a in self.agents}
        self.terminations = {a: done for a in self.agents}
        self.truncations = {a: False for a in self.agents}
        self.infos = {a: _agent_info(info, active) for a in self.agents}
        self._skip_agent_selection = None

    def _out_of_cycles(self, info: dict, terminated: bool) -> bool:
        if self.max_cycles is None or terminated:
            return False
        return info["stats"]["steps"] >= self.max_cycles


#: PettingZoo's conventional name for the unwrapped AEC class.
raw_env = MemSessionAECEnv


class _OrderEnforcing(OrderEnforcingWrapper):
    """PettingZoo's ``OrderEnforcingWrapper``, aware that ``restore_state`` starts an episode too."""

    def restore_state(self, state: AECState | EnvState) -> None:
        self._has_reset = True
        self._has_updated = True
        self.env.restore_state(state)

    def __str__(self) -> str:
        return str(self.env)


def env(**kwargs: Any) -> AECEnv:
    """The AEC env wrapped with PettingZoo's order-enforcing wrapper (the standard entry point).

    ``save_state``/``restore_state`` work on the wrapped env; ``env.unwrapped`` is the
    :class:`MemSessionAECEnv`.
    """
    return _OrderEnforcing(MemSessionAECEnv(**kwargs))


# ---------------------------------------------------------------------------------------------
# Parallel
# ---------------------------------------------------------------------------------------------


class MemSessionParallelEnv(ParallelEnv):
    """``MemSession-v0`` as a PettingZoo parallel env.

    ``step(actions)`` needs an action for the active agent (the one ``info["active_agent"]``
    names); the idle agent's action is accepted and ignored, and may be left out. Arguments are
    those of :class:`MemSessionAECEnv`.
    """

    metadata = {"name": "memsession_v0", "render_modes": ["ansi"]}

    def __init__(self, env: MemSessionEnv | None = None, *, max_cycles: int | None = None, render_mode: str | None = None, **env_kwargs: Any):
        if env is None:
            env = MemSessionEnv(render_mode=render_mode, **env_kwargs)
        elif env_kwargs:
            raise TypeError(f"pass either env or MemSessionEnv arguments, not both (got {sorted(env_kwargs)})")
        self.env = _unwrap(env)
        self.render_mode = self.env.render_mode
        if max_cycles is not None and max_cycles < 1:
            raise ValueError(f"max_cycles must be None or >= 1, got {max_cycles}")
        self.max_cycles = max_cycles
        self.possible_agents = [AGENTS[1]] if self.env.single_agent else list(AGENTS)
        self.agents: list[str] = []
        self.observation_spaces = {a: copy.deepcopy(self.env.observation_space) for a in self.possible_agents}
        self.action_spaces = {a: copy.deepcopy(self.env.action_space) for a in self.possible_agents}
        self._obs: dict | None = None

    def observation_space(self, agent: str):
        return self.observation_spaces[agent]

    def action_space(self, agent: str):
        return self.action_spaces[agent]

    @property
    def active_agent(self) -> str | None:
        """The agent whose action the next ``step`` executes (``None`` once the episode is over)."""
        if not self.agents or self._obs is None:
            return None
        return agent_for_role(self._obs["role"])

    def reset(self, seed: int | None = None, options: dict | None = None) -> tuple[dict, dict]:
        """Start an episode; ``options`` as for :meth:`MemSessionAECEnv.reset`
        (``{"state": ParallelState}`` restores a snapshot)."""
        options = dict(options or {})
        if "state" in options:
            return self._restore(options["state"], seed)
        obs, info = self.env.reset(seed=seed, options=options)
        self.agents = list(self.possible_agents)
        self._obs = obs
        return self._observations(), self._infos(info, self.active_agent, self.agents)

    def step(self, actions: dict) -> tuple[dict, dict, dict, dict, dict]:
        """Execute the active agent's action; the others are ignored."""
        if not self.agents:
            raise RuntimeError("no live agents: the episode has ended, call reset()")
        unknown = set(actions) - set(self.possible_agents)
        if unknown:
            raise ValueError(f"unknown agents in actions: {sorted(unknown)}; agents are {self.possible_agents}")
        active = self.active_agent
        if active not in actions:
            raise ValueError(f"actions has no entry for the active agent {active!r} (see info['active_agent'])")
        obs, reward, terminated, truncated, info = self.env.step(actions[active])
        self._obs = obs
        team, actor = _split_reward(self.env, reward, info)
        truncated = bool(truncated) or (
            not terminated and self.max_cycles is not None and info["stats"]["steps"] >= self.max_cycles
        )
        live = list(self.agents)
        rewards = {a: actor if a == active else team for a in live}
        terminations = {a: bool(terminated) for a in live}
        truncations = {a: truncated and not terminated for a in live}
        if terminated or truncated:
            self.agents = []
        observations = {a: self._observe(a) for a in live}
        return observations, rewards, terminations, truncations, self._infos(info, self.active_agent, live)

    def render(self):
        """The underlying env's ``"ansi"`` rendering (``None`` without a render mode)."""
        return self.env.render()

    def close(self) -> None:
        self.env.close()

    def save_state(self) -> ParallelState:
        """Return the complete episode state (immutable, picklable)."""
        if self._obs is None:
            raise RuntimeError("call reset() before save_state()")
        return ParallelState(env_state=self.env.save_state(), agents=tuple(self.agents))

    def restore_state(self, state: ParallelState | EnvState) -> tuple[dict, dict]:
        """Continue from a snapshot; returns ``(observations, infos)`` like ``reset``.

        Once the episode is over (no live agents) both dicts hold every possible agent.
        """
        return self._restore(state, None)

    # -- internals ---------------------------------------------------------------------------

    def _restore(self, state: ParallelState | EnvState, seed: int | None) -> tuple[dict, dict]:
        if isinstance(state, EnvState):
            state = ParallelState(state, () if state.done else tuple(self.possible_agents))
        if not isinstance(state, ParallelState):
            raise TypeError(f"expected a ParallelState or EnvState, got {type(state).__name__}")
        obs, info = _restore_env(self.env, state.env_state, seed)
        self._obs = obs
        self.agents = list(state.agents)
        shown = self.agents or self.possible_agents
        return {a: self._observe(a) for a in shown}, self._infos(info, self.active_agent, shown)

    def _observe(self, agent: str) -> dict:
        role = _role_of(agent)
        if self._obs is not None and int(self._obs["role"]) == role:
            return {"role": role, "text": self._obs["text"]}
        return {"role": role, "text": ""}

    def _observations(self) -> dict:
        return {a: self._observe(a) for a in self.agents}

    @staticmethod
    def _infos(info: dict, active: str | None, agents) -> dict:
        return {a: _agent_info(info, active) for a in agents}


def parallel_env(**kwargs: Any) -> MemSessionParallelEnv:
    """The parallel view (see :class:`MemSessionParallelEnv`)."""
    return MemSessionParallelEnv(**kwargs)


# ---------------------------------------------------------------------------------------------
# Registration (recent PettingZoo releases have a registry; older ones do not)
# ---------------------------------------------------------------------------------------------


def _register() -> bool:
    register = getattr(pettingzoo, "register", None)
    aec_registry = getattr(pettingzoo, "aec_registry", None)
    parallel_registry = getattr(pettingzoo, "parallel_registry", None)
    if register is None or aec_registry is None or parallel_registry is None:
        return False
    if ENV_ID not in aec_registry:
        register("aec", ENV_ID, entry_point="memenv.multiagent:env")
    if ENV_ID not in parallel_registry:
        register("parallel", ENV_ID, entry_point="memenv.multiagent:parallel_env")
    return True


#: Whether the installed PettingZoo has a registry and the envs were registered in it.
REGISTERED = _register()

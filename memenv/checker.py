"""``check_env``: a shipped checker for ``MemSession-v0`` and envs built like it.

Gymnasium's own checker tests the API; it cannot know what a snapshot is, and its one-step
determinism test never reaches the memory. :func:`check_env` runs Gymnasium's checker and then
the promises this library makes on top:

1. **Gymnasium API**: ``gymnasium.utils.env_checker.check_env`` on ``env.unwrapped``.
2. **Determinism**: the same seed and the same actions give the same trajectory (observations,
   rewards, terminated/truncated flags and infos), twice.
3. **Snapshots**: ``save_state()`` in mid-episode; step on with *other* actions (the memory
   changes); ``restore_state(state)`` must give back the observation seen when saving, and
   replaying the original actions must reproduce the original trajectory exactly. The same holds
   for a pickled and unpickled copy of the state restored after a ``reset`` to another task, and
   for ``reset(options={"state": state})``. A saved state must not change when the env steps on.
4. **Bad actions**: from an extractor step and a manager step, noise strings from
   ``action_space.sample()``, huge strings, deeply nested brackets, text that is not JSON and
   JSON of the wrong shape never raise; text that holds no JSON sets ``info["parse_error"]``
   and writes nothing to memory; the returned observation stays in the observation space and
   the reward is a finite float. Non-string actions (``None``, numbers, bytes, dicts) either
   step like any other action or raise ``TypeError``/``ValueError``.

Actions come from a seeded mix of noise and well-formed actions written from the observation
(facts from the dialogue lines; ADD, UPDATE, DELETE and NOOP on the memories shown), so the
memory bank really changes during the checks.

Every failure raises ``AssertionError`` with a message that names the check, the step and the
first field that differs::

    import gymnasium as gym, memenv
    memenv.check_env(gym.make("MemSession-v0", horizon=2))
"""

from __future__ import annotations

import json
import math
import pickle
import re
from dataclasses import dataclass
from typing import Any, Callable

import gymnasium as gym
import numpy as np

__all__ = ["check_env"]

_TURN_LINE = re.compile(r"^\[([^\]]*)\]\s*([^:\n]+):\s?(.*)$")
_SPEAKER_LINE = re.compile(r"^([^:\[\]\n]+):\s?(.*)$")
_MEMORY_LINE = re.compile(r"^(\d+) \[")

#: Strings that hold no JSON object at all: each must set ``info["parse_error"]``.
_NOT_JSON = ("", "hello", "{", "}{", "null", "42", "I think the answer is yes.", "\x00\udcff\U0001f600 ")


def check_env(env: gym.Env, *, seed: int = 0, steps: int = 24, gymnasium_checks: bool = True) -> None:
    """Check a ``MemSession``-style env; raise ``AssertionError`` on the first broken promise.

    Args:
        env: the env, wrapped or not (``gym.make`` output is fine); the checks run on
            ``env.unwrapped``, which must have ``save_state()`` and ``restore_state(state)``.
        seed: the reset seed of the checked episodes (the next seed is used as "another task").
        steps: the most actions taken per trajectory; episodes that end sooner are used whole.
        gymnasium_checks: also run Gymnasium's ``check_env`` (recommended).

    The env is reset several times; its episode state afterwards is unspecified.
    """
    base = env.unwrapped
    for name in ("save_state", "restore_state"):
        _require(callable(getattr(base, name, None)), f"the env has no {name}() method")
    _require(steps >= 2, f"steps must be >= 2, got {steps}")
    if gymnasium_checks:
        _gymnasium_check(base)
    trajectory = _check_determinism(base, seed, steps)
    _check_snapshots(base, seed, trajectory)
    _check_bad_actions(base, seed, trajectory)


# ---------------------------------------------------------------------------------------------
# The checks
# ---------------------------------------------------------------------------------------------


def _gymnasium_check(base: gym.Env) -> None:
    from gymnasium.utils.env_checker import check_env as gymnasium_check_env

    try:
        gymnasium_check_env(base)
    except Exception as exc:  # report any failure, not just assertions, as a failed check
        raise AssertionError(f"check_env: Gymnasium's env checker failed: {type(exc).__name__}: {exc}") from exc


@dataclass
class _Trajectory:
    """A recorded episode prefix: the reset result, the actions and every step's result."""

    reset: tuple | None
    actions: list
    transitions: list


def _check_determinism(base: gym.Env, seed: int, steps: int) -> _Trajectory:
    policy = _Policy(base, seed)
    first = _run(base, seed, steps, policy.act, "the first seeded episode")
    again = _run(base, seed, steps, _replay(first.actions), "the second seeded episode")
    _same(first.reset, again.reset, f"reset(seed={seed}) twice gave different results")
    _same_transitions(first, again, 0, f"same seed ({seed}) and same actions, different trajectories")
    return first


def _check_snapshots(base: gym.Env, seed: int, ref: _Trajectory) -> None:
    n = len(ref.transitions)
    if n < 2:
        return  # an episode of one step has no mid-episode state to save
    k = max(1, n // 3)
    obs_k, info_k = ref.transitions[k - 1][0], ref.transitions[k - 1][4]
    replay = ref.actions[k:]

    # Reach step k, save, and check the snapshot pickles.
    _run(base, seed, k, _replay(ref.actions[:k]), "the episode before saving")
    state = _call(base.save_state, "save_state()")
    try:
        blob = pickle.dumps(state)
        unpickled = pickle.loads(blob)
    except Exception as exc:
        raise AssertionError(f"check_env: the snapshot from save_state() does not pickle: {type(exc).__name__}: {exc}") from exc

    # Step on with other actions, so that the live state moves away from the snapshot.
    other = _Policy(base, seed + 7919, noise=0.1)
    _continue(base, len(replay) + 2, other.act, obs_k, info_k, "the steps after saving")
    _require(pickle.dumps(state) == blob, "the saved state changed when the env stepped on: save_state() must return an immutable value that shares nothing mutable with the env")

    # 1. restore_state on the live env.
    restored = _call(lambda: base.restore_state(state), "restore_state(state)")
    _check_restored(restored, obs_k, "restore_state(state)")
    _same_continuation(base, replay, ref, k, "after restore_state(state)")

    # 2. an unpickled copy, restored after a reset to another task.
    base.reset(seed=seed + 1)
    restored = _call(lambda: base.restore_state(unpickled), "restore_state(unpickled state)")
    _check_restored(restored, obs_k, "restore_state(unpickled copy) after reset(seed + 1)")
    _same_continuation(base, replay, ref, k, "after restoring an unpickled copy of the state in a reset env")

    # 3. reset(options={"state": ...}).
    restored = _call(lambda: base.reset(seed=seed + 2, options={"state": state}), 'reset(options={"state": state})')
    _check_restored(restored, obs_k, 'reset(options={"state": state})')
    _same_continuation(base, replay, ref, k, 'after reset(options={"state": state})')


def _check_bad_actions(base: gym.Env, seed: int, ref: _Trajectory) -> None:
    starts = _role_starts(base, seed, ref)
    space = base.action_space
    space.seed(seed)
    bad_strings: list[tuple[str, str, bool]] = [(f"noise #{i} from action_space.sample()", space.sample(), False) for i in range(4)]
    bad_strings += [(f"not JSON: {s[:20]!r}", s, True) for s in _NOT_JSON]
    bad_strings += [
        ("a huge string of 1,000,000 characters", "x" * 1_000_000, True),
        ("a huge unterminated JSON list", '{"facts": [' + '{"fact": "a"}, ' * 50_000, False),
        ("100,000 nested brackets", "[" * 100_000 + "]" * 100_000, False),
        ("a huge valid-looking operation", json.dumps({"operations": [{"op": "ADD", "text": "y" * 200_000, "speaker": "A"}]}), False),
        ("JSON of the wrong shape", '{"facts": "not a list", "operations": 3}', False),
        ("a list of numbers", "[1, 2, 3]", False),
    ]
    wrong_types: list[tuple[str, Any]] = [
        ("None", None), ("an int", 123), ("a float", 4.5), ("bytes", b'{"facts": []}'),
        ("a dict", {"facts": []}), ("a list", ["a"]), ("an object()", object()),
    ]
    for role_name, (state, obs0, info0) in starts.items():
        for label, action, must_flag in bad_strings:
            base.restore_state(state)
            where = f"a bad action at the first {role_name} step ({label})"
            result = _call(lambda: base.step(action), f"step() on {where}")
            _check_step_result(base, result, info0, where, must_flag)
            if not (result[2] or result[3]):  # the env must still step normally afterwards
                _call(lambda: base.step('{"facts": [], "operations": []}'), f"the step after {where}")
        for label, action in wrong_types:
            base.restore_state(state)
            where = f"a wrong-type action at the first {role_name} step ({label})"
            try:
                result = base.step(action)
            except (TypeError, ValueError):
                continue  # a clear, specific error is an accepted answer to a non-string
            except Exception as exc:
                raise AssertionError(f"check_env: step() raised {type(exc).__name__} on {where}; expected a parse error in info or a TypeError/ValueError: {exc}") from exc
            _check_step_result(base, result, info0, where, must_flag=False)


# ---------------------------------------------------------------------------------------------
# Running episodes
# ---------------------------------------------------------------------------------------------


class _Policy:
    """A seeded mix of noise and well-formed actions, written from the observation text."""

    def __init__(self, base: gym.Env, seed: int, noise: float = 0.25):
        self.rng = np.random.default_rng([seed, 0x5EED])
        self.space = base.action_space
        self.space.seed(seed)
        self.noise = noise

    def act(self, obs: Any, info: dict) -> Any:
        if self.rng.random() < self.noise:
            return self.space.sample()
        text = obs.get("text", "") if isinstance(obs, dict) else ""
        role = int(obs.get("role", 0)) if isinstance(obs, dict) else 0
        return self._facts(text) if role == 0 else self._operations(text)

    def _facts(self, text: str) -> str:
        facts = []
        for line in text.splitlines():
            m = _TURN_LINE.match(line)
            if m and self.rng.random() < 0.8:
                facts.append({"speaker": m.group(2).strip(), "dia_id": m.group(1), "fact": m.group(3).strip()})
        return json.dumps({"facts": facts})

    def _operations(self, text: str) -> str:
        facts, memories, section = [], [], None
        for line in text.splitlines():
            if line in ("facts:", "turns:", "memories:"):
                section = line
                continue
            if section == "memories:":
                m = _MEMORY_LINE.match(line)
                if m:
                    memories.append(int(m.group(1)))
            elif section is not None:
                m = _TURN_LINE.match(line)
                if m:
                    facts.append((m.group(1), m.group(2).strip(), m.group(3).strip()))
                elif (m := _SPEAKER_LINE.match(line)):
                    facts.append(("", m.group(1).strip(), m.group(2).strip()))
        ops = []
        for dia_id, speaker, fact in facts:
            u = self.rng.random()
            if memories and u < 0.25:
                ops.append({"op": "UPDATE", "id": int(self.rng.choice(memories)), "text": fact, "dia_id": dia_id})
            elif memories and u < 0.35:
                ops.append({"op": "DELETE", "id": int(self.rng.choice(memories))})
            elif memories and u < 0.45:
                ops.append({"op": "NOOP", "id": int(self.rng.choice(memories))})
            else:
                ops.append({"op": "ADD", "text": fact, "speaker": speaker, "dia_id": dia_id})
        return json.dumps({"operations": ops})


def _replay(actions: list) -> Callable[[Any, dict], Any]:
    it = iter(actions)
    return lambda obs, info: next(it)


def _run(base: gym.Env, seed: int, steps: int, act: Callable, what: str) -> _Trajectory:
    """Reset with ``seed`` and take up to ``steps`` actions (fewer if the episode ends)."""
    reset = _call(lambda: base.reset(seed=seed), f"reset(seed={seed}) in {what}")
    _require(isinstance(reset, tuple) and len(reset) == 2, f"reset() must return (obs, info), got {type(reset).__name__}")
    obs, info = reset
    actions, transitions = _continue(base, steps, act, obs, info, what)
    return _Trajectory(reset, actions, transitions)


def _continue(base: gym.Env, steps: int, act: Callable, obs: Any, info: dict, what: str) -> tuple[list, list]:
    actions, transitions = [], []
    for t in range(steps):
        action = act(obs, info)
        result = _call(lambda: base.step(action), f"step {t + 1} of {what}")
        actions.append(action)
        transitions.append(result)
        obs, _, terminated, truncated, info = result
        if terminated or truncated:
            break
    return actions, transitions


def _same_continuation(base: gym.Env, replay: list, ref: _Trajectory, k: int, when: str) -> None:
    got = []
    for action in replay:
        result = _call(lambda: base.step(action), f"step() {when}")
        got.append(result)
        if result[2] or result[3]:
            break
    _same_transitions(ref, _Trajectory(None, replay, got), k, f"replaying the same actions {when} did not reproduce the original trajectory")


def _role_starts(base: gym.Env, seed: int, ref: _Trajectory) -> dict:
    """Snapshots of one extractor step and one manager step of the reference episode."""
    starts: dict[str, tuple] = {}
    obs, info = base.reset(seed=seed)
    for t in range(len(ref.transitions) + 1):
        role = "manager" if int(obs["role"]) == 1 else "extractor"
        if role not in starts:
            starts[role] = (base.save_state(), obs, info)
        if len(starts) == 2 or t == len(ref.transitions):
            break
        obs, _, terminated, truncated, info = base.step(ref.actions[t])
        if terminated or truncated:
            break
    return starts


# ---------------------------------------------------------------------------------------------
# Comparing and asserting
# ---------------------------------------------------------------------------------------------


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise AssertionError(f"check_env: {message}")


def _call(fn: Callable[[], Any], what: str) -> Any:
    try:
        return fn()
    except AssertionError:
        raise
    except Exception as exc:
        raise AssertionError(f"check_env: {what} raised {type(exc).__name__}: {exc}") from exc


def _check_restored(restored: Any, obs_saved: Any, what: str) -> None:
    _require(isinstance(restored, tuple) and len(restored) == 2, f"{what} must return (obs, info), got {type(restored).__name__}")
    diff = _difference(obs_saved, restored[0])
    _require(diff is None, f"{what} did not give back the observation seen when the state was saved: {_describe('obs', diff)}")


def _check_step_result(base: gym.Env, result: Any, info_before: dict, where: str, must_flag: bool) -> None:
    _require(isinstance(result, tuple) and len(result) == 5, f"step() on {where} must return a 5-tuple")
    obs, reward, terminated, truncated, info = result
    _require(base.observation_space.contains(obs), f"step() on {where} returned an observation outside the observation space")
    _require(isinstance(reward, (float, int, np.floating)) and math.isfinite(float(reward)), f"step() on {where} returned the reward {reward!r}; expected a finite float")
    _require(isinstance(terminated, bool) and isinstance(truncated, bool), f"step() on {where} must return bool terminated/truncated flags")
    _require(isinstance(info, dict), f"step() on {where} must return an info dict")
    if must_flag:
        _require(bool(info.get("parse_error")), f"step() on {where} did not set info['parse_error']")
        before, after = info_before.get("memory_size"), info.get("memory_size")
        _require(before == after, f"step() on {where} changed the memory ({before} -> {after} entries); an unparsable action must execute nothing")


def _same(a: Any, b: Any, message: str) -> None:
    diff = _difference(a, b)
    _require(diff is None, f"{message}: {_describe('', diff)}")


_FIELDS = ("obs", "reward", "terminated", "truncated", "info")


def _same_transitions(ref: _Trajectory, got: _Trajectory, offset: int, message: str) -> None:
    expected = ref.transitions[offset : offset + len(got.transitions)]
    _require(len(got.transitions) == len(expected), f"{message}: the episode ended after {len(got.transitions)} steps instead of {len(expected)}")
    for t, (a, b) in enumerate(zip(expected, got.transitions)):
        for name, x, y in zip(_FIELDS, a, b):
            diff = _difference(x, y)
            _require(diff is None, f"{message}: step {offset + t + 1}, {_describe(name, diff)}")


_Diff = tuple[str, Any, Any]


def _difference(a: Any, b: Any, path: str = "") -> _Diff | None:
    """The first difference between two nested values as ``(path, a_part, b_part)``, or ``None``."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return (path, f"keys {sorted(map(str, a.keys() - b.keys()))}", f"keys {sorted(map(str, b.keys() - a.keys()))}")
        for key in a:
            diff = _difference(a[key], b[key], f"{path}[{key!r}]")
            if diff is not None:
                return diff
        return None
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return (path, f"length {len(a)}", f"length {len(b)}")
        for i, (x, y) in enumerate(zip(a, b)):
            diff = _difference(x, y, f"{path}[{i}]")
            if diff is not None:
                return diff
        return None
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        same = isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.shape == b.shape and np.array_equal(a, b)
        return None if same else (path, a, b)
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return None
    numbers = isinstance(a, (int, float, np.number)) and isinstance(b, (int, float, np.number))
    if type(a) is not type(b) and not numbers:
        return (path, a, b)
    return None if a == b else (path, a, b)


def _describe(name: str, diff: _Diff | None) -> str:
    if diff is None:
        return f"{name} (no difference)"
    path, a, b = diff
    if isinstance(a, str) and isinstance(b, str) and not a.startswith(("keys ", "length ")):
        i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        lo = max(0, i - 30)
        return f"{name}{path} differs at character {i}: ...{a[lo:i + 40]!r} != ...{b[lo:i + 40]!r}"
    return f"{name}{path}: {_short(a)} != {_short(b)}"


def _short(value: Any) -> str:
    text = value if isinstance(value, str) and value.startswith(("keys ", "length ")) else repr(value)
    return text if len(text) <= 100 else text[:97] + "..."

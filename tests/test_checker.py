"""memenv.checker.check_env passes on MemSession-v0 and catches deliberately broken envs."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import gymnasium as gym
import pytest

import memenv  # noqa: F401
from memenv.checker import check_env
from memenv.env import MemSessionEnv
from memenv.readers import Reader
from memenv.types import Conversation, QAItem, Session, Turn

H = 2
# Envs built without gym.make have no spec, so Gymnasium cannot re-make them for render checks.
pytestmark = pytest.mark.filterwarnings("ignore:.*Not able to test alternative render modes")


# ---------------------------------------------------------------------------------------------
# The real env passes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [{}, {"single_agent": True}, {"reward_mode": "final", "max_questions": 2}])
def test_memsession_passes(kwargs):
    check_env(gym.make("MemSession-v0", horizon=H, **kwargs), seed=1, steps=16)


class FirstWordReader(Reader):
    """A tiny reader: the first word of the memory that shares most words with the question."""

    name = "first-word"

    def answer(self, question, bank):
        words = set(question.lower().split())
        best = max(bank, key=lambda e: len(words & set(e.content.lower().split())), default=None)
        return best.content.split()[0] if best else ""


def tiny_conversation() -> Conversation:
    turns1 = (
        Turn("Ann", "D1:1", "I live in Oslo."),
        Turn("Bob", "D1:2", "I have a cat called Tom."),
        Turn("Ann", "D1:3", "My job is teaching."),
    )
    turns2 = (
        Turn("Ann", "D2:1", "I moved to Rome last week."),
        Turn("Bob", "D2:2", "Tom the cat is fine."),
    )
    questions = (
        QAItem("q1", "Where does Ann live?", "Oslo", ("D1:1",), "current_value", 1, valid_until=1),
        QAItem("q2", "Where does Ann live?", "Rome", ("D2:1",), "current_value", 2),
        QAItem("q3", "What is the name of Bob's cat?", "Tom", ("D1:2",), "current_value", 1),
    )
    sessions = (Session(1, "1 May 2023", turns1), Session(2, "9 May 2023", turns2))
    return Conversation("tiny", ("Ann", "Bob"), sessions, questions, source="test")


def test_passes_with_own_conversation_and_reader():
    env = MemSessionEnv(conversations=[tiny_conversation()], reader=FirstWordReader(), horizon=2, slices_per_session=2)
    check_env(env, seed=0, steps=12)


# ---------------------------------------------------------------------------------------------
# Broken envs are caught
# ---------------------------------------------------------------------------------------------


class ForgetsMemoryOnRestore(MemSessionEnv):
    """restore_state keeps the live memory bank instead of the saved one."""

    def restore_state(self, state):
        if self._state is not None:
            state = replace(state, bank=self._state.bank)
        return super().restore_state(state)


class RaisesOnHugeText(MemSessionEnv):
    """Refuses long actions instead of cutting them."""

    def step(self, action):
        if isinstance(action, str) and len(action) > 100_000:
            raise ValueError("action too long")
        return super().step(action)


class CrashesOnNonJson(MemSessionEnv):
    """Parses actions with json.loads: any noise crashes it (Gymnasium's checker sees it first)."""

    def step(self, action):
        json.loads(action)
        return super().step(action)


class NonDeterministic(MemSessionEnv):
    """Adds unseeded noise to the reward."""

    def step(self, action):
        obs, reward, terminated, truncated, info = super().step(action)
        return obs, reward + random.random(), terminated, truncated, info


class UnpicklableSnapshot(MemSessionEnv):
    """Returns a snapshot holding a lambda."""

    def save_state(self):
        return (super().save_state(), lambda: None)

    def restore_state(self, state):
        return super().restore_state(state[0] if isinstance(state, tuple) else state)


class SnapshotSharesAList(MemSessionEnv):
    """Returns a snapshot holding a list the env keeps appending to."""

    def reset(self, *, seed=None, options=None):
        self._log = []
        options = dict(options or {})
        if isinstance(options.get("state"), dict):
            options["state"] = options["state"]["env"]
        return super().reset(seed=seed, options=options)

    def step(self, action):
        self._log.append(action)
        return super().step(action)

    def save_state(self):
        return {"env": super().save_state(), "log": self._log}

    def restore_state(self, state):
        return super().restore_state(state["env"])


class SilentOnGarbage(MemSessionEnv):
    """Treats unparsable text as an empty action without reporting a parse error."""

    def step(self, action):
        obs, reward, terminated, truncated, info = super().step(action)
        info["parse_error"] = None
        return obs, reward, terminated, truncated, info


@pytest.mark.parametrize(
    "cls, gymnasium_checks, message",
    [
        (ForgetsMemoryOnRestore, True, "did not reproduce the original trajectory|did not give back the observation"),
        (RaisesOnHugeText, True, r"huge string.*raised ValueError: action too long"),
        (CrashesOnNonJson, True, "Gymnasium's env checker failed: JSONDecodeError"),
        (CrashesOnNonJson, False, "raised JSONDecodeError"),
        (NonDeterministic, True, "Gymnasium's env checker failed"),
        (NonDeterministic, False, r"same seed \(0\) and same actions, different trajectories: step \d+, reward"),
        (UnpicklableSnapshot, True, "does not pickle"),
        (SnapshotSharesAList, True, "the saved state changed when the env stepped on"),
        (SilentOnGarbage, True, r"did not set info\['parse_error'\]"),
    ],
)
def test_broken_env_is_caught(cls, gymnasium_checks, message):
    with pytest.raises(AssertionError, match=message):
        check_env(cls(horizon=H), seed=0, steps=16, gymnasium_checks=gymnasium_checks)


def test_env_without_snapshots_is_rejected():
    class NoSnapshots(gym.Env):
        observation_space = gym.spaces.Discrete(2)
        action_space = gym.spaces.Discrete(2)

    with pytest.raises(AssertionError, match="no save_state"):
        check_env(NoSnapshots())


def test_reexported_from_memenv_when_wired():
    # The lead adds `from memenv.checker import check_env` to memenv/__init__.py.
    if hasattr(memenv, "check_env"):
        assert memenv.check_env is check_env

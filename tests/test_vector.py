"""MemSession-v0 in Gymnasium vector envs, and the runnable examples of docs/third_party.md."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import data_equivalence

import memenv  # noqa: F401
from agents.baselines import OracleAgent
from memenv.env import EnvState

H = 2
N = 2
ROOT = Path(__file__).resolve().parent.parent


def unbatch_info(info: dict, i: int) -> dict:
    """The info of sub-env ``i`` from a vector env's batched info (``_key`` masks say who has ``key``)."""
    out = {}
    for key, value in info.items():
        if key.startswith("_") or not info.get("_" + key, np.ones(N, bool))[i]:
            continue
        out[key] = unbatch_info(value, i) if isinstance(value, dict) else value[i]
    return out


def obs_at(obs: dict, i: int) -> dict:
    return {"role": int(obs["role"][i]), "text": obs["text"][i]}


def play_vector(envs, seed: int) -> list[float]:
    """Step every sub-env to the end of its first episode with the oracle; return the returns."""
    agent = OracleAgent()
    obs, info = envs.reset(seed=seed)
    returns, finished = [0.0] * N, [False] * N
    while not all(finished):
        # A finished sub-env is reset by the next step (Gymnasium's next-step autoreset): its action is ignored.
        actions = ["" if finished[i] else agent.act(obs_at(obs, i), unbatch_info(info, i)) for i in range(N)]
        obs, rewards, terminated, truncated, info = envs.step(actions)
        for i in range(N):
            if not finished[i]:
                returns[i] += float(rewards[i])
                finished[i] = bool(terminated[i] or truncated[i])
    return returns


def play_single(seed: int) -> float:
    env = gym.make("MemSession-v0", horizon=H)
    obs, info = env.reset(seed=seed)
    agent, total = OracleAgent(), 0.0
    while True:
        obs, reward, terminated, _, info = env.step(agent.act(obs, info))
        total += reward
        if terminated:
            return total


@pytest.fixture(scope="module")
def async_envs():
    envs = gym.make_vec("MemSession-v0", num_envs=N, vectorization_mode="async", horizon=H)
    yield envs
    envs.close()


@pytest.fixture(scope="module")
def sync_envs():
    envs = gym.make_vec("MemSession-v0", num_envs=N, vectorization_mode="sync", horizon=H)
    yield envs
    envs.close()


# ---------------------------------------------------------------------------------------------
# Stepping to the end
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_vector_env_steps_to_the_end_with_the_single_env_returns(mode, sync_envs, async_envs):
    envs = sync_envs if mode == "sync" else async_envs
    returns = play_vector(envs, seed=10)
    assert returns == pytest.approx([play_single(10), play_single(11)])  # seed s -> s, s + 1
    assert all(r > 0 for r in returns)


def test_async_observations_match_sync(sync_envs, async_envs):
    a_obs, _ = async_envs.reset(seed=3)
    s_obs, _ = sync_envs.reset(seed=3)
    assert all(s_obs["text"]), "the sync vector env must show dialogue text"
    assert data_equivalence(tuple(a_obs["text"]), tuple(s_obs["text"])), (
        "AsyncVectorEnv (shared memory) returned different texts than SyncVectorEnv: "
        "UnicodeText's read_from_shared_memory must return a live view (memenv/spaces.py)"
    )
    actions = ['{"facts": []}'] * N
    a_step, s_step = async_envs.step(actions), sync_envs.step(actions)
    assert data_equivalence(tuple(a_step[0]["text"]), tuple(s_step[0]["text"]))


def test_async_without_shared_memory():
    envs = gym.make_vec(
        "MemSession-v0", num_envs=N, vectorization_mode="async", vector_kwargs={"shared_memory": False}, horizon=H
    )
    try:
        obs, _ = envs.reset(seed=3)
        assert all(obs["text"])
    finally:
        envs.close()


# ---------------------------------------------------------------------------------------------
# Reaching the snapshot methods
# ---------------------------------------------------------------------------------------------


def test_single_env_snapshots_through_unwrapped_and_get_wrapper_attr():
    env = gym.make("MemSession-v0", horizon=H)
    obs, info = env.reset(seed=0)
    obs, *_ = env.step(OracleAgent().act(obs, info))
    state = env.unwrapped.save_state()
    assert env.get_wrapper_attr("save_state")() == state
    env.reset(seed=1)
    restored, _ = env.get_wrapper_attr("restore_state")(state)
    assert restored == obs
    restored, _ = env.reset(options={"state": state})
    assert restored == obs


def test_sync_vector_env_snapshots(sync_envs):
    envs = sync_envs
    obs, _ = envs.reset(seed=20)
    assert envs.envs[0].unwrapped.save_state() == envs.envs[0].get_wrapper_attr("save_state")()
    states = envs.call("save_state")
    assert len(states) == N and all(isinstance(s, EnvState) for s in states)
    # A GRPO group: every sub-env restarts from the same memory state.
    results = envs.call("restore_state", states[1])
    assert all(r[0] == obs_at(obs, 1) for r in results)
    out = envs.step(['{"facts": [{"speaker": "x", "fact": "y"}]}'] * N)
    assert out[0]["text"][0] == out[0]["text"][1]
    # Per sub-env: reach the sub-env directly.
    envs.envs[0].unwrapped.restore_state(states[0])
    assert envs.envs[0].unwrapped.save_state().conversation == states[0].conversation


def test_async_vector_env_snapshots(async_envs):
    envs = async_envs
    envs.reset(seed=30)
    states = envs.call("save_state")  # pickled through the worker pipes
    assert len(states) == N and states[0].conversation != states[1].conversation
    # Every sub-env from one state, through reset (which also clears pending autoresets).
    envs.reset(options={"state": states[1]})
    after = envs.call("save_state")
    assert all(s.conversation == states[1].conversation for s in after)
    # One sub-env from its own state: reset with a mask.
    envs.reset(options={"state": states[0], "reset_mask": np.array([True, False])})
    after = envs.call("save_state")
    assert after[0].conversation == states[0].conversation
    assert after[1].conversation == states[1].conversation
    # call() reaches restore_state through the wrappers too.
    results = envs.call("restore_state", states[0])
    assert all(r[0]["text"] == results[0][0]["text"] for r in results)


# ---------------------------------------------------------------------------------------------
# docs/third_party.md: every python example runs
# ---------------------------------------------------------------------------------------------

_DOC = ROOT / "docs" / "third_party.md"
_BLOCKS = re.findall(r"```python\n(.*?)```", _DOC.read_text(encoding="utf-8"), re.S) if _DOC.exists() else []


@pytest.mark.parametrize("index", range(len(_BLOCKS)))
def test_third_party_doc_example_runs(index):
    code = _BLOCKS[index]
    for module in re.findall(r"^# needs: (\S+)", code, re.M):
        pytest.importorskip(module)
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)

"""The PettingZoo views of MemSession-v0 (memenv.multiagent)."""

from __future__ import annotations

import pickle
import subprocess
import sys

import gymnasium as gym
import pytest

pettingzoo = pytest.importorskip("pettingzoo")

from gymnasium.utils.env_checker import data_equivalence  # noqa: E402
from pettingzoo.test import api_test, parallel_api_test, seed_test  # noqa: E402
from pettingzoo.test.seed_test import parallel_seed_test  # noqa: E402

import memenv  # noqa: E402, F401
from agents.baselines import OracleAgent  # noqa: E402
from memenv import multiagent as ma  # noqa: E402

H = 2  # sessions per episode: keeps every test short
EXTRACTOR, MANAGER = ma.AGENTS


def play_aec(env, agent=None, limit=10_000):
    """Play an AEC env to the end; return [(agent, obs, cumulative reward, term, trunc, info)]."""
    agent = agent or OracleAgent()
    log = []
    for name in env.agent_iter(limit):
        obs, reward, term, trunc, info = env.last()
        log.append((name, obs, reward, term, trunc, info))
        env.step(None if term or trunc else agent.act(obs, info))
    return log


# ---------------------------------------------------------------------------------------------
# PettingZoo's own tests
# ---------------------------------------------------------------------------------------------


# PettingZoo recommends Box/Discrete spaces and numpy observations; text envs warn by design.
_TEXT_SPACE_WARNINGS = [
    "ignore:Observation is not a NumPy array",
    "ignore:Observation space for each agent probably should be",
    "ignore:Action space for each agent probably should be",
]


@pytest.mark.parametrize("single_agent", [False, True])
@pytest.mark.filterwarnings(*_TEXT_SPACE_WARNINGS)
def test_pettingzoo_api_tests_pass(single_agent):
    api_test(ma.env(horizon=H, single_agent=single_agent), num_cycles=200)
    parallel_api_test(ma.parallel_env(horizon=H, single_agent=single_agent), num_cycles=200)


def test_pettingzoo_seed_tests_pass():
    seed_test(lambda: ma.env(horizon=H), num_cycles=100)
    parallel_seed_test(lambda: ma.parallel_env(horizon=H), num_cycles=100)


def test_optional_dependency_is_not_imported_by_memenv():
    code = "import sys, memenv, memenv.checker; assert 'pettingzoo' not in sys.modules, 'pettingzoo imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.skipif(not hasattr(pettingzoo, "aec_registry"), reason="this PettingZoo has no registry")
def test_registered_in_pettingzoo_registry():
    assert ma.REGISTERED
    aec = pettingzoo.make("aec", ma.ENV_ID, horizon=H)
    par = pettingzoo.make("parallel", ma.ENV_ID, horizon=H)
    assert isinstance(aec.unwrapped, ma.MemSessionAECEnv)
    assert isinstance(par, ma.MemSessionParallelEnv)
    aec.reset(seed=0)
    assert aec.agent_selection == EXTRACTOR


# ---------------------------------------------------------------------------------------------
# AEC semantics
# ---------------------------------------------------------------------------------------------


def test_acting_agent_follows_the_role_and_rewards_match_the_single_agent_env():
    env = ma.env(horizon=H)
    env.reset(seed=3)
    log = play_aec(env)

    single = gym.make("MemSession-v0", horizon=H)
    obs, info = single.reset(seed=3)
    agent, roles, episode_return = OracleAgent(), [], 0.0
    while True:
        roles.append(ma.agent_for_role(obs["role"]))
        obs, reward, terminated, _, info = single.step(agent.act(obs, info))
        episode_return += reward
        if terminated:
            break

    live = [entry for entry in log if not (entry[3] or entry[4])]
    assert [entry[0] for entry in live] == roles
    assert {EXTRACTOR, MANAGER} <= set(roles)
    # The team reward: each agent's rewards sum to the single-agent episode return.
    totals = {EXTRACTOR: 0.0, MANAGER: 0.0}
    for name, _, reward, *_ in log:
        totals[name] += reward
    assert episode_return > 0
    assert totals[EXTRACTOR] == pytest.approx(episode_return)
    assert totals[MANAGER] == pytest.approx(episode_return)
    # Both agents see the end, with the final scores in their info.
    finals = [entry for entry in log if entry[3]]
    assert {entry[0] for entry in finals} == {EXTRACTOR, MANAGER}
    assert all(entry[5]["qa"] and entry[5]["active_agent"] is None for entry in finals)


def test_idle_agent_sees_an_empty_text_with_its_own_role():
    env = ma.env(horizon=H)
    env.reset(seed=0)
    assert env.agent_selection == EXTRACTOR
    assert env.observe(EXTRACTOR)["text"]
    assert env.observe(MANAGER) == {"role": 1, "text": ""}
    _, _, _, _, info = env.last()
    assert info["active_agent"] == EXTRACTOR
    env.step(OracleAgent().act(env.observe(EXTRACTOR), info))
    assert env.agent_selection == MANAGER  # the oracle found facts in the first slice
    assert "facts:" in env.observe(MANAGER)["text"].splitlines()
    assert env.observe(EXTRACTOR) == {"role": 0, "text": ""}


def test_format_penalty_goes_only_to_the_agent_that_wrote_the_bad_action():
    env = ma.raw_env(horizon=H, format_penalty=0.5)
    env.reset(seed=0)
    env.step("this is not JSON")
    assert env.rewards[EXTRACTOR] == pytest.approx(-0.5 + env.rewards[MANAGER])
    assert env.infos[EXTRACTOR]["parse_error"]


def test_max_cycles_truncates_every_agent():
    env = ma.env(horizon=H, max_cycles=3)
    env.reset(seed=0)
    log = play_aec(env)
    assert sum(1 for entry in log if not (entry[3] or entry[4])) == 3
    assert all(entry[4] and not entry[3] for entry in log[3:])
    assert not env.agents


def test_wrapping_an_existing_env_and_bad_arguments():
    base = gym.make("MemSession-v0", horizon=H)
    env = ma.raw_env(env=base)
    assert env.env is base.unwrapped
    with pytest.raises(TypeError, match="not both"):
        ma.raw_env(env=base, horizon=3)
    with pytest.raises(ValueError, match="max_cycles"):
        ma.raw_env(horizon=H, max_cycles=0)


# ---------------------------------------------------------------------------------------------
# Snapshots
# ---------------------------------------------------------------------------------------------


def _take(env, n, agent):
    for _ in range(n):
        obs, _, term, trunc, info = env.last()
        env.step(None if term or trunc else agent.act(obs, info))


def test_aec_snapshot_restores_selection_and_cumulative_rewards_exactly():
    agent = OracleAgent()
    env = ma.env(horizon=H)
    env.reset(seed=5)
    _take(env, 4, agent)
    state = env.save_state()
    assert isinstance(state, ma.AECState)
    assert state.agent_selection == env.agent_selection
    blob = pickle.dumps(state)
    reference = play_aec(env, agent)
    assert any(entry[2] for entry in reference)  # some reward was carried across the snapshot

    env.restore_state(state)
    assert data_equivalence(play_aec(env, agent), reference)

    env.reset(seed=99)
    env.restore_state(pickle.loads(blob))
    assert data_equivalence(play_aec(env, agent), reference)

    env.reset(options={"state": state})
    assert data_equivalence(play_aec(env, agent), reference)

    fresh = ma.env(horizon=H)  # restoring starts an episode, even before any reset
    fresh.restore_state(state)
    assert data_equivalence(play_aec(fresh, agent), reference)
    assert pickle.dumps(state) == blob  # the saved state never changed


def test_aec_restores_a_single_agent_env_state():
    single = gym.make("MemSession-v0", horizon=H)
    obs, info = single.reset(seed=2)
    single.step(OracleAgent().act(obs, info))
    state = single.unwrapped.save_state()
    env = ma.env(horizon=H)
    env.restore_state(state)
    obs, reward, term, trunc, info = env.last()
    assert env.agent_selection == ma.agent_for_role(single.unwrapped.save_state().role)
    assert obs["text"] and reward == 0 and not term
    with pytest.raises(TypeError, match="AECState"):
        env.unwrapped.restore_state("nope")


# ---------------------------------------------------------------------------------------------
# Parallel view
# ---------------------------------------------------------------------------------------------


def play_parallel(env, idle_action="IGNORED", agent=None):
    agent = agent or OracleAgent()
    log = []
    obs, infos = env.reset(seed=4)
    while env.agents:
        active = infos[env.agents[0]]["active_agent"]
        actions = {active: agent.act(obs[active], infos[active])}
        if idle_action is not None:
            actions.update({a: idle_action for a in env.agents if a != active})
        obs, rewards, terms, truncs, infos = env.step(actions)
        log.append((active, obs, rewards, terms, truncs, infos))
    return log


def test_parallel_idle_action_is_ignored_and_info_names_the_active_agent():
    with_noise = play_parallel(ma.parallel_env(horizon=H), idle_action="{garbage")
    without = play_parallel(ma.parallel_env(horizon=H), idle_action=None)
    assert data_equivalence(with_noise, without)
    actives = [entry[0] for entry in with_noise]
    assert {EXTRACTOR, MANAGER} <= set(actives)
    for (_, _, _, _, _, infos), nxt in zip(with_noise, actives[1:]):
        assert all(info["active_agent"] == nxt for info in infos.values())
    _, _, rewards, terms, _, infos = with_noise[-1]
    assert all(terms.values()) and set(rewards) == {EXTRACTOR, MANAGER}
    totals = {a: sum(entry[2].get(a, 0.0) for entry in with_noise) for a in (EXTRACTOR, MANAGER)}
    assert totals[EXTRACTOR] == pytest.approx(totals[MANAGER])


def test_parallel_rejects_missing_or_unknown_agents():
    env = ma.parallel_env(horizon=H)
    obs, infos = env.reset(seed=0)
    with pytest.raises(ValueError, match="active agent 'extractor_0'"):
        env.step({MANAGER: "{}"})
    with pytest.raises(ValueError, match="unknown agents"):
        env.step({EXTRACTOR: "{}", "player_7": "{}"})


def test_parallel_snapshot_round_trip():
    agent = OracleAgent()
    env = ma.parallel_env(horizon=H)
    obs, infos = env.reset(seed=6)
    for _ in range(3):
        active = env.active_agent
        obs, _, _, _, infos = env.step({active: agent.act(obs[active], infos[active])})
    state = env.save_state()
    blob = pickle.dumps(state)

    def finish(obs, infos):
        out = []
        while env.agents:
            active = env.active_agent
            obs, rewards, terms, truncs, infos = env.step({active: agent.act(obs[active], infos[active])})
            out.append((obs, rewards, terms, truncs, infos))
        return out

    reference = finish(obs, infos)
    obs2, infos2 = env.restore_state(state)
    assert data_equivalence(obs2, obs)
    assert data_equivalence(finish(obs2, infos2), reference)
    obs3, infos3 = env.reset(seed=1, options={"state": pickle.loads(blob)})
    assert data_equivalence(finish(obs3, infos3), reference)

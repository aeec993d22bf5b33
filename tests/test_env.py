import pickle

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env
from hypothesis import HealthCheck, given, settings, strategies as st

import memenv
from agents.baselines import AddOnlyAgent, NoisyTeacher, NoMemoryAgent, OracleAgent, StoreTurnsAgent
from agents.commands.evaluate import play_episode, summarize
from memenv.env import MemSessionEnv
from memenv.types import Conversation, QAItem, Session, Turn


def _equal(a, b):
    """Deep equality of observations and infos (plain dicts, lists, strings and floats)."""
    return a == b


# Keys of `info` that describe the step just taken rather than the state reached.
_STEP_KEYS = {"acted_role", "parse_error", "problems", "qa", "session_end", "f1", "penalty", "m_fail", "num_questions"}


def _state_view(obs_info):
    obs, info = obs_info
    return obs, {k: v for k, v in info.items() if k not in _STEP_KEYS}


def test_registered_and_make_works():
    env = gym.make("MemSession-v0", horizon=2)
    obs, info = env.reset(seed=0)
    assert obs["role"] == 0 and obs["text"].startswith("date:")
    env2 = gym.make("memenv:MemSession-v0", horizon=2)
    assert env2.reset(seed=0)[0] == obs


def test_gymnasium_check_env_passes_on_raw_env():
    check_env(MemSessionEnv(horizon=2), skip_render_check=False)


def test_same_seed_same_task_and_observation_different_seed_differs():
    env = MemSessionEnv(horizon=3)
    a = env.reset(seed=5)
    b = env.reset(seed=5)
    c = env.reset(seed=6)
    assert a[0] == b[0] and a[1]["conv_id"] == b[1]["conv_id"]
    assert a[1]["conv_id"] != c[1]["conv_id"]


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_vector_envs_step_to_the_end(mode):
    envs = gym.make_vec("MemSession-v0", num_envs=2, vectorization_mode=mode, horizon=2)
    obs, infos = envs.reset(seed=[1, 2])
    agent = NoMemoryAgent()
    ended = np.zeros(2, dtype=bool)
    for _ in range(200):
        actions = tuple(agent.act({"role": int(r), "text": t}, {}) for r, t in zip(obs["role"], obs["text"]))
        obs, rew, term, trunc, infos = envs.step(actions)
        assert rew.shape == (2,)
        ended |= term
        if ended.all():
            break
    assert ended.all()
    envs.close()


def test_action_space_noise_never_raises_and_episode_ends():
    env = MemSessionEnv(horizon=2)
    env.action_space.seed(0)
    obs, info = env.reset(seed=0)
    done, steps = False, 0
    while not done:
        obs, r, term, trunc, info = env.step(env.action_space.sample())
        assert isinstance(info["problems"], list)
        done = term
        steps += 1
    assert steps > 0 and info["memory_size"] == 0


def test_strange_actions_are_tolerated():
    env = MemSessionEnv(horizon=2)
    env.reset(seed=0)
    for action in ["", "\x00" * 10, "{" * 10000, '{"facts": [{"speaker": "Nobody", "fact": "x"}]}', "😀" * 100, "[]"]:
        obs, r, term, trunc, info = env.step(action)
        assert isinstance(info["problems"], list)
        if term:
            break


def _oracle_actions(env, seed, n):
    """Drive `n` steps with the noisy teacher and return the action strings."""
    agent = NoisyTeacher(noise=0.3, seed=seed)
    obs, info = env.reset(seed=seed)
    actions = []
    for _ in range(n):
        a = agent.act(obs, info)
        actions.append(a)
        obs, r, term, trunc, info = env.step(a)
        if term:
            break
    return actions


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), prefix=st.integers(0, 25), data=st.data())
def test_save_random_steps_restore_replay_is_identical(seed, prefix, data):
    env = MemSessionEnv(horizon=3, max_questions=4)
    teacher = NoisyTeacher(noise=0.3, seed=seed)
    obs, info = env.reset(seed=seed)
    for _ in range(prefix):
        obs, r, term, trunc, info = env.step(teacher.act(obs, info))
        if term:
            obs, info = env.reset(seed=seed)
            break
    state = env.save_state()
    first = (obs, info)
    # the continuation mixes teacher actions and noise
    actions = []
    trace = []
    for _ in range(data.draw(st.integers(1, 20))):
        a = teacher.act(obs, info) if data.draw(st.booleans()) else data.draw(st.text(max_size=40))
        actions.append(a)
        step = env.step(a)
        trace.append(step)
        obs, info = step[0], step[4]
        if step[2]:
            break
    # restore (from a pickled copy, as a trainer shipping states to workers would) and replay
    restored = env.restore_state(pickle.loads(pickle.dumps(state)))
    assert _equal(_state_view(restored), _state_view(first))
    for a, expected in zip(actions, trace):
        assert _equal(env.step(a), expected)
    # reset(options={"state": ...}) is the same as restore_state
    assert _equal(_state_view(env.reset(options={"state": state})), _state_view(first))


def test_snapshot_is_immutable_and_shares_the_bank():
    env = MemSessionEnv(horizon=2)
    obs, info = env.reset(seed=0)
    agent = OracleAgent()
    for _ in range(4):
        obs, _, _, _, info = env.step(agent.act(obs, info))
    state = env.save_state()
    size = len(state.bank)
    with pytest.raises(Exception):
        state.pos = 3  # frozen dataclass
    for _ in range(4):
        obs, _, term, _, info = env.step(agent.act(obs, info))
        if term:
            break
    assert len(state.bank) == size  # later steps did not touch the saved bank
    state.bank.check_invariants()


def test_restore_rejects_mismatched_settings_and_garbage():
    env = MemSessionEnv(horizon=2)
    env.reset(seed=0)
    state = env.save_state()
    with pytest.raises(ValueError, match="different settings"):
        MemSessionEnv(horizon=3).restore_state(state)
    with pytest.raises(TypeError):
        env.restore_state({"not": "a state"})


def test_restore_resets_the_rng_stream():
    env = MemSessionEnv(horizon=2)
    env.reset(seed=0)
    state = env.save_state()
    draws = env.np_random.integers(1_000_000, size=3)
    env.restore_state(state)
    assert (env.np_random.integers(1_000_000, size=3) == draws).all()


def test_baselines_order_on_default_tasks():
    env = gym.make("MemSession-v0", horizon=32)
    scores = {}
    for agent in (OracleAgent(), NoMemoryAgent(), AddOnlyAgent(), NoisyTeacher(noise=0.3), StoreTurnsAgent()):
        scores[agent.name] = summarize([play_episode(env, agent, seed=s) for s in range(4)])["f1"]
    assert scores["oracle"] >= 0.9
    assert scores["no-memory"] <= 0.1
    for middle in ("add-only", "noisy-teacher"):
        assert scores["no-memory"] + 0.2 < scores[middle] < scores["oracle"] - 0.1, scores


def _tiny_conversation():
    s1 = Session(1, "1 May 2023", (Turn("Ann", "D1:1", "I live in Oslo."), Turn("Bo", "D1:2", "Nice, I work as a chef.")))
    s2 = Session(2, "9 May 2023", (Turn("Ann", "D2:1", "I moved to Rome."), Turn("Bo", "D2:2", "Cool.")))
    qs = (
        QAItem("t:q0", "Where does Ann live?", "Oslo", ("D1:1",), "current_value", 1, valid_until=1),
        QAItem("t:q1", "What is Bo's job?", "chef", ("D1:2",), "current_value", 1),
        QAItem("t:q2", "Where does Ann live?", "Rome", ("D2:1",), "current_value", 2),
    )
    return Conversation("tiny", ("Ann", "Bo"), (s1, s2), qs)


def _store(env, obs):
    """Extract every turn verbatim (the extractor) and ADD them all (the manager)."""
    agent = StoreTurnsAgent()
    info = {}
    total = 0.0
    while True:
        a = agent.act(obs, info)
        obs, r, term, _, info = env.step(a)
        total += r
        if term:
            return total, info


def test_observation_format_and_reward_modes_on_a_hand_made_conversation():
    conv = _tiny_conversation()
    env = MemSessionEnv(conversations=[conv], horizon=2, slices_per_session=1, bloat_lambda=0.0)
    obs, info = env.reset(seed=0)
    assert obs == {"role": 0, "text": "date: 1 May 2023\n[D1:1] Ann: I live in Oslo.\n[D1:2] Bo: Nice, I work as a chef."}
    obs, r, term, _, info = env.step('{"facts": [{"speaker": "ann", "dia_id": "D1:1", "fact": "Ann lives in Oslo."}, {"speaker": "Bo", "dia_id": "D9:9", "fact": "Bo is a chef."}]}')
    assert obs["role"] == 1
    assert obs["text"] == "date: 1 May 2023\nfacts:\n[D1:1] Ann: Ann lives in Oslo.\nBo: Bo is a chef.\nmemories:"
    assert any("D9:9" in p for p in info["problems"])
    # session mode: the questions new in each session
    assert [q.qid for q in env.questions_for(session=1)] == ["t:q0", "t:q1"]
    assert [q.qid for q in env.questions_for(session=2)] == ["t:q2"]
    # cumulative: everything valid after session 2 (the Oslo answer has gone stale)
    assert [q.qid for q in env.questions_for(session=2, mode="cumulative")] == ["t:q1", "t:q2"]
    assert [q.qid for q in env.questions_for(session=2, mode="final")] == ["t:q1", "t:q2"]


def test_final_mode_rewards_only_at_the_end():
    env = MemSessionEnv(conversations=[_tiny_conversation()], horizon=2, slices_per_session=1, reward_mode="final")
    obs, info = env.reset(seed=0)
    rewards, ends = [], []
    agent = StoreTurnsAgent()
    while True:
        obs, r, term, _, info = env.step(agent.act(obs, info))
        rewards.append(r)
        if "session_end" in info and not term:
            ends.append(info["session_end"])
            assert "qa" not in info
        if term:
            break
    assert all(r == 0 for r in rewards[:-1])
    assert ends == [1]  # session ends are still announced, without scoring
    assert {q["qid"] for q in info["qa"]} == {"t:q1", "t:q2"}


def test_bloat_penalty_matches_the_formula():
    env = MemSessionEnv(conversations=[_tiny_conversation()], horizon=2, slices_per_session=1)
    env.reset(seed=0)
    bank = memenv.MemoryBank()
    bank, _ = bank.add("Ann", " ".join(["word"] * 20))
    # W after session 1 = 4 + 6 = 10 words of dialogue; M = 20
    assert env.bloat_penalty(bank, session=1) == pytest.approx(0.3 * (20 - 0.7 * 10) / 10)
    small, _ = memenv.MemoryBank().add("Ann", "word")
    assert env.bloat_penalty(small, session=1) == 0.0


def test_max_questions_subset_is_the_same_for_every_rollout():
    env_a = MemSessionEnv(horizon=8, reward_mode="cumulative", max_questions=5)
    env_b = MemSessionEnv(horizon=8, reward_mode="cumulative", max_questions=5)
    env_a.reset(seed=3)
    env_b.reset(seed=3)
    qa = [q.qid for q in env_a.questions_for(session=8)]
    assert len(qa) == 5 and qa == [q.qid for q in env_b.questions_for(session=8)]
    assert len(env_a.questions_for(session=8, max_questions=None)) > 5


def test_single_agent_mode_has_no_extractor_steps():
    env = MemSessionEnv(horizon=2, single_agent=True)
    obs, info = env.reset(seed=0)
    agent = OracleAgent()
    steps = 0
    while True:
        assert obs["role"] == 1 and "turns:" in obs["text"]
        obs, r, term, _, info = env.step(agent.act(obs, info))
        steps += 1
        if term:
            break
    assert info["memory_size"] > 0


def test_score_questions_is_public_and_reports_each_question():
    env = MemSessionEnv(conversations=[_tiny_conversation()], horizon=2, slices_per_session=1)
    env.reset(seed=0)
    total, info = _store(env, env.reset(seed=0)[0])
    rec = env.score_questions(env.questions_for(session=2, mode="cumulative"))
    assert {"qid", "prediction", "f1", "bleu1", "evidence_sessions"} <= set(rec[0])
    assert rec[1]["evidence_sessions"] == [2]
    assert info["m_fail"] == 0.0  # store-turns keeps every evidence turn


def test_step_before_reset_and_after_end_raise_clear_errors():
    env = MemSessionEnv(horizon=1)
    with pytest.raises(RuntimeError, match="reset"):
        env.step("{}")
    env.reset(seed=0)
    while not env.step('{"facts": []}')[2]:
        pass
    with pytest.raises(RuntimeError, match="ended"):
        env.step("{}")


def test_bad_constructor_arguments():
    with pytest.raises(ValueError):
        MemSessionEnv(horizon=0)
    with pytest.raises(ValueError):
        MemSessionEnv(reward_mode="weekly")
    with pytest.raises(ValueError):
        MemSessionEnv(conversations=[])
    with pytest.raises(IndexError):
        MemSessionEnv(conversations=[_tiny_conversation()]).reset(options={"task": 3})


def test_multi_line_turns_render_on_one_line():
    s1 = Session(1, "1 May 2023", (Turn("Ann", "D1:1", "\nI live\nin Oslo."), Turn("Bo", "D1:2", "ok")))
    conv = Conversation("ml", ("Ann", "Bo"), (s1,), ())
    obs, _ = MemSessionEnv(conversations=[conv], horizon=1, slices_per_session=1).reset(seed=0)
    assert obs["text"].splitlines()[1:] == ["[D1:1] Ann: I live in Oslo.", "[D1:2] Bo: ok"]

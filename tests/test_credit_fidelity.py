"""benchmarks/credit_fidelity.py: the ground truth, the metrics, determinism and bad input."""

from __future__ import annotations

import json
import math

import gymnasium as gym
import numpy as np
import pytest


@pytest.fixture(scope="module")
def fid(load_script):
    return load_script("benchmarks/credit_fidelity.py")


# ------------------------------------------------------------------------ a toy task with a known answer


class CoinEnv(gym.Env):
    """``horizon`` sessions of one step each; the action "1" or "0" is a coin the agent keeps.
    The only reward comes at the end: the share of ones. With a policy that plays "1" with
    probability ``p``, from session ``k`` (1-based) with ``c`` ones kept so far:
    ``V = (c + p (H - k + 1)) / H``, ``Q(a) = (c + a + p (H - k)) / H`` and ``A = (a - p) / H``."""

    def __init__(self, horizon: int):
        self.horizon = horizon
        self.observation_space = gym.spaces.Discrete(horizon + 1)
        self.action_space = gym.spaces.Text(1)
        self._state = (1, 0)  # (session, ones)

    def _info(self, extra=None):
        return {"session": self._state[0], **(extra or {})}

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self._state = (1, 0)
        return 0, self._info()

    def step(self, action):
        k, ones = self._state
        ones += action == "1"
        done = k == self.horizon
        self._state = (k if done else k + 1, ones)
        return ones, (ones / self.horizon if done else 0.0), done, False, self._info({"session_end": k})

    def save_state(self):
        return self._state

    def restore_state(self, state):
        self._state = state
        return state[1], self._info()


@pytest.fixture(scope="module")
def CoinPolicy(fid):
    class CoinPolicy(fid.SessionAgentPolicy):
        """Plays "1" with probability ``p`` in each session."""

        name = "coin"

        def __init__(self, p):
            self.p = p

        def for_session(self, seed):
            rng = np.random.default_rng(seed)
            p = self.p

            class Agent:
                def act(self, obs, info):
                    return "1" if rng.random() < p else "0"

            return Agent()

        def tokens(self, action):
            return len(action)

    return CoinPolicy


def test_the_ground_truth_matches_the_closed_form_on_a_toy_task(fid, CoinPolicy):
    H, p, K = 6, 0.3, 400
    env, policy = CoinEnv(H), CoinPolicy(p)
    for k, ones in ((1, 0), (3, 1), (5, 4), (6, 2)):
        state = (k, ones)
        v = fid.monte_carlo(env, policy, state, K, seed=k)
        assert v.steps == K * (H - k + 1) and v.tokens == v.steps
        expect_v = (ones + p * (H - k + 1)) / H
        assert abs(v.mean - expect_v) < 4 * v.se + 1e-9, (k, v.mean, expect_v)
        # the standard error is the binomial one: sqrt(p (1 - p) (H - k + 1) / K) / H
        assert v.se == pytest.approx(math.sqrt(p * (1 - p) * (H - k + 1) / K) / H, rel=0.25)
        for a in (0, 1):
            if k < H:
                after = (k + 1, ones + a)
                q = fid.monte_carlo(env, policy, after, K, seed=100 + k)
            else:
                q = fid.monte_carlo(env, policy, None, K, seed=0, terminal_return=(ones + a) / H)
                assert q.se == 0 and q.steps == 0
            expect_q = (ones + a + p * (H - k)) / H
            assert abs(q.mean - expect_q) < 4 * q.se + 1e-9
            advantage = q.mean - v.mean
            assert abs(advantage - (a - p) / H) < 4 * math.hypot(q.se, v.se) + 1e-9


def test_a_deterministic_policy_has_its_exact_value(fid, CoinPolicy):
    env = CoinEnv(5)
    for p, ones in ((1.0, 5), (0.0, 0)):
        v = fid.monte_carlo(env, CoinPolicy(p), (1, 0), 3, seed=0)
        assert v.returns == [ones / 5] * 3 and v.se == 0


def test_play_records_session_starts_and_replays_by_seed(fid, CoinPolicy):
    env, policy = CoinEnv(4), CoinPolicy(0.5)
    a = fid.play(env, policy, 0, seed=9, record=True)
    assert sorted(a.starts) == [1, 2, 3, 4] and a.ret is not None and a.steps == 4
    b = fid.play(env, policy, a.starts[3], seed=9)  # the same seed replays the same sessions
    assert b.ret == a.ret and b.steps == 2
    one = fid.play(env, policy, a.starts[2], seed=9, max_sessions=1)
    assert one.ret is None and one.end == a.starts[3]


# ------------------------------------------------------------------------ metrics on hand-made groups


def group(fid, est, true, se=0.1, v=None, shared=False):
    n = len(est)
    se = np.full(n, se, dtype=float)
    return fid.Group(est=np.asarray(est, float), true=np.asarray(true, float), true_se=se, q_se=se,
                     v=np.zeros(n) if v is None else np.asarray(v, float), shared_state=shared)


def test_pairwise_sign_accuracy_counts_only_pairs_the_truth_separates(fid):
    # true gaps: (0,1) 1.0, (0,2) 0.1 (below its SE of 0.1*sqrt(2)), (1,2) -0.9
    g = group(fid, est=[1.0, 0.0, 0.5], true=[1.0, 0.0, 0.9])
    # (0,1): est says 0 > 1, truth too: right. (1,2): est 1 < 2, truth 1 < 2: right.
    assert fid.pair_accuracy(g) == (2.0, 2)
    g = group(fid, est=[0.0, 1.0, 1.0], true=[1.0, 0.0, 0.9])
    assert fid.pair_accuracy(g) == (0.5, 2)  # (0,1) wrong, (1,2) a tie in the estimate: 1/2
    # pairs from one state: the gap's SE leaves the shared V out
    g = fid.Group(est=np.array([1.0, 0.0]), true=np.array([0.3, 0.0]), true_se=np.array([1.0, 1.0]),
                  q_se=np.array([0.1, 0.1]), v=np.zeros(2), shared_state=True)
    assert fid.pair_accuracy(g) == (1.0, 1)
    g.shared_state = False
    assert fid.pair_accuracy(g) == (0.0, 0)


def test_sign_accuracy_spearman_and_luck_share_on_hand_computed_values(fid):
    g = group(fid, est=[1.0, -1.0, 0.0, 2.0], true=[0.5, 0.5, -0.5, 0.05])
    assert fid.sign_accuracy(g) == (1.5, 3)  # right, wrong, tie (1/2); the last is within its SE
    assert fid.spearman(group(fid, est=[1, 2, 3, 4], true=[10, 20, 30, 40])) == pytest.approx(1.0)
    assert fid.spearman(group(fid, est=[4, 3, 2, 1], true=[10, 20, 30, 40])) == pytest.approx(-1.0)
    # ranks with a tie: est ranks (1, 2.5, 2.5, 4) against (1, 2, 3, 4): rho = 4.5 / sqrt(4.5 * 5)
    assert fid.spearman(group(fid, est=[1, 2, 2, 3], true=[1, 2, 3, 4])) == pytest.approx(4.5 / math.sqrt(4.5 * 5))
    assert fid.spearman(group(fid, est=[1, 1, 1], true=[1, 2, 3])) == 0.0  # no signal
    assert fid.spearman(group(fid, est=[1, 2, 3], true=[1, 1, 1])) is None
    assert fid.spearman(group(fid, est=[1, 2], true=[1, 2])) is None
    # estimates that are the luck exactly, plus a group with shared V (no luck to explain)
    lucky = group(fid, est=[1.0, -1.0, 0.0], true=[0, 0, 0], v=[0.7, 0.5, 0.6])
    assert fid.luck_share([lucky]) == pytest.approx(1.0)
    shared = group(fid, est=[1.0, -1.0, 0.0], true=[0, 0, 0], v=[0.6, 0.6, 0.6], shared=True)
    assert fid.luck_share([shared]) == 0.0
    assert fid.luck_share([group(fid, est=[0, 0, 0], true=[1, 2, 3])]) is None
    # the batch correlation pools every sample of the task's groups
    a, b = group(fid, est=[1, -1], true=[2, 0]), group(fid, est=[0, 0], true=[1, 1])
    assert fid.batch_correlation([a, b]) == pytest.approx(np.corrcoef([1, -1, 0, 0], [2, 0, 1, 1])[0, 1])
    assert fid.batch_correlation([b, group(fid, est=[0, 0], true=[3, 1])]) == 0.0
    assert fid.batch_correlation([group(fid, est=[1, 2, 3], true=[1, 1, 1])]) is None


def test_pooled_ratios_and_their_bootstrap(fid):
    rows = [{"c": 3, "n": 4}, {"c": 1, "n": 4}]
    assert fid._ratio("c", "n")(rows) == 0.5  # pooled over tasks, not a mean of per-task ratios
    value, lo, hi = fid._bootstrap(rows, fid._ratio("c", "n"), resamples=200, seed=0)
    assert value == 0.5 and 0.25 <= lo <= value <= hi <= 0.75


# ------------------------------------------------------------------------ the benchmark end to end


ARGS = ["--horizons", "3", "--noise", "0.3", "--tasks", "2", "--n", "3", "--m", "2", "--k-truth", "2", "--k-mc", "2",
        "--sessions-per-task", "2", "--estimators", "grpo-session", "logo-local", "logo-trained", "mc-k1", "mc-k2",
        "logo-local-all", "logo-lookahead", "logo-trained-all", "--no-progress"]


def test_the_same_seed_gives_the_same_table_and_a_killed_run_resumes(fid, tmp_path, capsys):
    assert fid.main(["--out", str(tmp_path / "a"), *ARGS]) == 0
    assert fid.main(["--out", str(tmp_path / "b"), *ARGS]) == 0
    a = json.loads((tmp_path / "a" / "table.json").read_text())
    b = json.loads((tmp_path / "b" / "table.json").read_text())
    assert a == b and set(a["h3-noise0.3"]) == {"grpo-session", "logo-local", "logo-trained", "mc-k1", "mc-k2", "logo-local-all", "logo-lookahead", "logo-trained-all"}
    row = a["h3-noise0.3"]["grpo-session"]
    assert row["tasks"] == 2 and 0 <= row["signal"][0] <= 1 and row["steps"] > 0
    assert (tmp_path / "a" / "fidelity_horizon.png").stat().st_size > 0
    # a record lost to a kill is measured again, identically; the others are read back
    rec = tmp_path / "a" / "h3-noise0.3" / "task-1.json"
    before = json.loads(rec.read_text())
    rec.unlink()
    assert fid.main(["--out", str(tmp_path / "a"), *ARGS]) == 0
    after = json.loads(rec.read_text())
    before.pop("wall_s"), after.pop("wall_s")
    assert after["settings"]["k_truth"] == 2 and after["settings"]["noise"] == 0.3
    assert after == before
    assert json.loads((tmp_path / "a" / "table.json").read_text()) == a
    # records of other settings are never mixed into a table
    with pytest.raises(SystemExit, match="measured with other settings"):
        fid.main(["--out", str(tmp_path / "a"), *ARGS, "--k-truth", "3"])
    # --report summarises what is on disk without running anything
    assert fid.main(["--out", str(tmp_path / "b"), *ARGS, "--report"]) == 0
    assert json.loads((tmp_path / "b" / "table.json").read_text()) == a
    assert "| h3-noise0.3 | grpo-session |" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--k-truth", "1"], "K .* at least 2"),
    (["--horizons", "5"], "task 0 has 3 sessions, fewer than the horizon 5"),
    (["--estimators", "grpo", "mc-k9"], "unknown estimator.*'grpo', 'mc-k9'"),
    (["--k-mc", "1", "--estimators", "mc-k2"], "--k-mc 1 is below"),
    (["--noise", "1.5"], "noise levels must lie in"),
])
def test_bad_settings_fail_before_any_rollout(fid, tmp_path, monkeypatch, extra, message):
    from memenv.data.synthetic import SyntheticConfig, generate_conversation

    monkeypatch.setattr(fid, "measure_task", lambda *a, **k: pytest.fail("a rollout ran"))
    # tasks of 3 sessions: a horizon of 5 reaches past them
    short = [generate_conversation(s, SyntheticConfig(num_sessions=3)) for s in (1, 2)]
    monkeypatch.setattr(fid, "make_env", lambda h, seeds: gym.make("MemSession-v0", horizon=h, conversations=short, reward_mode="final"))
    base = ["--horizons", "3", "--tasks", "2", "--no-progress"]
    with pytest.raises(SystemExit, match=message):
        fid.main(["--out", str(tmp_path / "x"), *base, *extra])
    assert not (tmp_path / "x").exists()


def test_a_policy_that_cannot_be_restored_is_refused(fid):
    class Stateful:
        name = "recurrent"

    env = fid.make_env(2, [1, 2])
    with pytest.raises(fid.FidelityError, match="cannot be restored mid-episode"):
        fid.check_settings(fid.Settings(horizon=2), ["grpo-session"], Stateful(), env)


def test_a_checkpoint_is_measured_through_the_rollout_engine_reproducibly(fid, tmp_path):
    """``--checkpoint LABEL=DIR``: an LLM policy (here the untrained tiny model) plays every
    continuation through the rollout engine, each seeded by its own key; tokens are counted and
    the same seed gives the same records."""
    pytest.importorskip("torch")
    from agents.policy.tiny import build_tiny_model

    build_tiny_model(tmp_path / "tiny", seed=0)
    args = ["--checkpoint", f"tiny={tmp_path / 'tiny'}", "--horizons", "2", "--tasks", "2", "--n", "2", "--m", "2",
            "--k-truth", "2", "--k-mc", "1", "--sessions-per-task", "1", "--estimators", "grpo-session", "logo-local", "mc-k1",
            "--max-new-tokens", "24", "--no-progress"]
    assert fid.main(["--out", str(tmp_path / "a"), *args]) == 0
    assert fid.main(["--out", str(tmp_path / "b"), *args]) == 0
    a = json.loads((tmp_path / "a" / "h2-tiny" / "task-0.json").read_text())
    b = json.loads((tmp_path / "b" / "h2-tiny" / "task-0.json").read_text())
    a.pop("wall_s"), b.pop("wall_s")
    assert a == b
    assert a["policy"].startswith("checkpoint:") and a["global_tokens"] > 0 and a["settings"]["max_new_tokens"] == 24
    table = json.loads((tmp_path / "a" / "table.json").read_text())
    assert table["h2-tiny"]["grpo-session"]["tokens"] > 0


def test_a_checkpoint_argument_must_name_a_checkpoint(fid, tmp_path):
    with pytest.raises(SystemExit, match="expected LABEL=DIR"):
        fid.main(["--out", str(tmp_path / "x"), "--checkpoint", "nolabel"])
    with pytest.raises(SystemExit, match="is not a checkpoint directory"):
        fid.main(["--out", str(tmp_path / "x"), "--checkpoint", f"a={tmp_path}"])

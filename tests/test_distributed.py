"""Rollouts on Ray actors give the in-process results, and survive a worker that dies or hangs."""

from __future__ import annotations

import os
import sys
import time

import gymnasium as gym
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import memenv  # noqa: F401  (registers MemSession-v0)
from agents.generation.distributed import shard_bounds
from agents.generation.rollout import RolloutEngine, Start
from memenv.data.synthetic import SyntheticConfig


@given(st.integers(0, 200), st.integers(1, 16))
def test_shards_cover_every_start_once_in_order_and_balanced(n, parts):
    bounds = shard_bounds(n, parts)
    assert [i for lo, hi in bounds for i in range(lo, hi)] == list(range(n))
    assert len(bounds) == min(parts, n)
    if bounds:
        sizes = [hi - lo for lo, hi in bounds]
        assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    from agents.policy.tiny import build_tiny_model

    corpus = ['{"facts": [{"speaker": "Ann", "dia_id": "D1:1", "fact": "Ann likes tea."}]}', '{"operations": []}'] * 40
    return build_tiny_model(tmp_path_factory.mktemp("tiny"), corpus, seed=0, hidden_size=64, num_layers=2)


def _policy(path):
    from agents.policy import SharedPolicy

    return SharedPolicy.from_pretrained(path)


class EnvFactory:
    """Training envs; with ``fault`` set, the first env step taken while the file ``marker``
    exists removes it and then kills its process (``"die"``) or stalls (``"hang"``)."""

    def __init__(self, marker: str | None = None, fault: str | None = None):
        self.marker, self.fault = marker, fault

    def __call__(self):
        config = SyntheticConfig(num_sessions=2, turns_per_session=(3, 4))
        env = gym.make("MemSession-v0", horizon=2, task_seeds=[5, 6], synthetic_config=config, slices_per_session=2,
                       reward_mode="final")
        return _Faulty(env, self.marker, self.fault) if self.fault else env


class _Faulty(gym.Wrapper):
    def __init__(self, env, marker, fault):
        super().__init__(env)
        self.marker, self.fault = marker, fault

    def step(self, action):
        if os.path.exists(self.marker):
            try:
                os.remove(self.marker)
            except FileNotFoundError:  # another worker took it first
                return self.env.step(action)
            if self.fault == "die":
                os._exit(1)
            time.sleep(600)
        return self.env.step(action)


def _starts():
    return [Start(options={"task": t}, rollout_id=r) for t in (0, 1) for r in range(3)]


def test_a_call_split_by_keys_gives_the_records_of_the_whole_call(tiny_path):
    """The property distributed rollouts rest on: each rollout samples from its own stream, so
    running a call's starts in two parts (with the keys they had in the whole) changes nothing."""
    policy = _policy(tiny_path)
    whole = RolloutEngine(policy, EnvFactory(), temperature=1.0, max_new_tokens=24).run(_starts(), seed=11)
    engine = RolloutEngine(policy, EnvFactory(), temperature=1.0, max_new_tokens=24)
    parts = engine.run(_starts()[:2], seed=11, keys=[0, 1]) + engine.run(_starts()[2:], seed=11, keys=[2, 3, 4, 5])
    assert [[t.completion_ids for t in r.turns] for r in parts] == [[t.completion_ids for t in r.turns] for r in whole]
    for a, b in zip(parts, whole):
        for ta, tb in zip(a.turns, b.turns):
            np.testing.assert_allclose(ta.logprobs, tb.logprobs, atol=1e-4)
    # ... while other keys sample something else: the keys matter.
    other = RolloutEngine(policy, EnvFactory(), temperature=1.0, max_new_tokens=24).run(_starts(), seed=11, keys=range(10, 16))
    assert [t.completion_ids for r in other for t in r.turns] != [t.completion_ids for r in whole for t in r.turns]


@pytest.fixture(scope="module")
def local_ray():
    # Ray is an optional extra (pip install -e ".[ray]"): without it only these tests skip,
    # the ones above and below that do not start Ray still run.
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # this test module is not importable by workers
    yield ray
    ray.shutdown()


def _token_rewards(scorer, episode, max_questions, credit):
    """The real session rewards plus a stand-in that depends on the sampled tokens: a random
    tiny model never writes valid JSON, so the real rewards are all 0, every advantage is 0 and
    nothing would be updated (and nothing broadcast)."""
    from agents.rl import grpo

    rewards, final = grpo.final_session_rewards.__wrapped__(scorer, episode, max_questions, credit)
    for k in rewards:
        rewards[k] += sum(sum(t.completion_ids) for t in episode.turns if t.session == k) % 101 / 101
    return rewards, final


def _train(policy, env_fn, engine, steps=2):
    from agents.rl import grpo
    from agents.rl.logo_grpo import LoGoConfig, LoGoGRPO
    from agents.rl.update import UpdateConfig

    cfg = LoGoConfig(n_rollouts=3, tasks_per_step=2, max_questions=8, max_new_tokens=24, p_local=1.0, m_reruns=2,
                     update=UpdateConfig(lr=1e-3, epochs=1, micro_batch=16, kl_coef=0.0, temperature=1.0))
    trainer = LoGoGRPO(policy, engine, env_fn().unwrapped, cfg, seed=3)
    before = [p.detach().clone() for p in policy.model.parameters()]
    real = grpo.final_session_rewards
    _token_rewards.__wrapped__ = real
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(grpo, "final_session_rewards", _token_rewards)
        metrics = [trainer.step([0, 1], step) for step in range(steps)]
    assert any(not torch.equal(a, b) for a, b in zip(before, policy.model.parameters()))  # it did learn something
    return metrics


def _comparable(metrics):
    return {k: v for k, v in metrics.items() if not k.startswith("time/")}


def _assert_same_run(got, want):
    assert [sorted(m) for m in got] == [sorted(m) for m in want]
    for g, w in zip(got, want):
        for key, value in _comparable(w).items():
            # Token counts, group counts and F1 are exact; losses and log-prob statistics agree
            # to float rounding (batched matmuls of other shapes sum in another order).
            assert g[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key


@pytest.fixture(scope="module")
def in_process(tiny_path):
    policy = _policy(tiny_path)
    engine = RolloutEngine(policy, EnvFactory(), temperature=1.0, max_new_tokens=24)
    return _train(policy, EnvFactory(), engine)


@pytest.mark.parametrize("workers", [1, 2])
def test_workers_give_the_in_process_rollouts_and_metrics(local_ray, tiny_path, in_process, workers):
    from agents.generation.distributed import WorkerPool

    policy = _policy(tiny_path)
    with WorkerPool(policy, workers) as pool:
        engine = pool.engine(policy, EnvFactory(), temperature=1.0, max_new_tokens=24)
        got = _train(policy, EnvFactory(), engine)
        assert engine.timing["broadcasts"] == 2  # once per update (and once at the start), not per task
        assert engine.timing["redone_shards"] == 0
        assert pool.threads == 2 // workers
    _assert_same_run(got, in_process)
    assert got[-1]["update/rows"] > 0 and got[-1]["generated_tokens"] > 0


@pytest.mark.parametrize("fault", ["die", "hang"])
def test_a_lost_worker_is_replaced_and_its_share_redone(local_ray, tiny_path, in_process, tmp_path, fault, caplog):
    from agents.generation.distributed import WorkerPool

    marker = tmp_path / "fault"
    policy = _policy(tiny_path)
    with WorkerPool(policy, 2, timeout_s=10 if fault == "hang" else 600) as pool:
        engine = pool.engine(policy, EnvFactory(str(marker), fault), temperature=1.0, max_new_tokens=24)
        marker.touch()  # the first env step on a worker after this kills (or stalls) that worker
        with caplog.at_level("WARNING", logger="memr2.workers"):
            got = _train(policy, EnvFactory(), engine)
        assert not marker.exists()
        assert engine.timing["redone_shards"] == 1 and pool.replaced == 1
    words = "died during its shard" if fault == "die" else "did not answer within 10 s"
    assert any(words in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]
    _assert_same_run(got, in_process)  # nothing lost, nothing counted twice


def test_more_workers_than_the_cluster_can_place_is_a_clear_error_not_a_hang(local_ray, tiny_path):
    from agents.generation.distributed import WorkerPool

    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="2 rollout workers of 2 CPUs each need 4 CPUs, but the Ray cluster has 2"):
        WorkerPool(_policy(tiny_path), 2, threads_per_worker=2)
    assert time.perf_counter() - t0 < 60
    assert local_ray.is_initialized()  # a cluster the pool did not start is left running


def test_an_unreachable_cluster_is_a_clear_error_at_once():
    from agents.generation.distributed import RayUnavailableError, probe_address

    t0 = time.perf_counter()
    with pytest.raises(RayUnavailableError, match="cannot reach a Ray cluster at '127.0.0.1:9'.*ray start --head"):
        probe_address("127.0.0.1:9", timeout_s=2)
    assert time.perf_counter() - t0 < 10
    with pytest.raises(RayUnavailableError, match="host:port"):
        probe_address("nonsense")


def test_only_the_distributed_modules_import_ray():
    """Ray is an optional extra: nothing but the rollout workers and the sweep command may import it."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "agents"
    allowed = {root / "generation" / "distributed.py", root / "commands" / "sweep.py"}
    offenders = []
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n == "ray" or n.startswith("ray.") for n in names) and path not in allowed:
                offenders.append(str(path.relative_to(root)))
    assert not offenders

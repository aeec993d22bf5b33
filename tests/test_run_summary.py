"""benchmarks/run_summary.py: budget and learning signal of finished training runs."""

import json
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def run_summary(load_script):
    return load_script("benchmarks/run_summary.py")


def test_one_row_per_run_with_tokens_and_zero_variance_shares(run_summary, tmp_path):
    run = tmp_path / "grpo-s1"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"algo": "grpo", "seed": 1, "stages": [{"horizon": 2, "steps": 8}]}))
    (run / "metrics.jsonl").write_text(
        '{"step": 1, "generated_tokens": 1200, "time/step_s": 10.0, "global/groups": 4, "global/zero_variance_groups": 1}\n'
        '{"step": 1, "val/f1": 0.7}\n')
    lines = run_summary.summary_rows([run])
    assert lines[2] == "| grpo-s1 | grpo | 1 | 2:8 | 1 | 1,200 | 25% / n/a | 10 | 0.700 |"
    assert len({line.count("|") for line in lines}) == 1  # header, separator and rows agree


def test_a_directory_that_is_not_a_run_is_named(run_summary, tmp_path):
    with pytest.raises(SystemExit, match="not a memr2 train run directory"):
        run_summary.summary_rows([tmp_path])

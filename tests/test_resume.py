"""A training run killed between logging a step and checkpointing it, then resumed, ends
exactly where the uninterrupted run ends: same metrics, validation, test and weights. This is
what lets `memr2 sweep` continue a killed run from its checkpoint instead of starting over."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from agents.presets import PRESETS, task_seeds
from agents.rl.curriculum import Stage

TIMING = ("time", "elapsed_s")


class Killed(Exception):
    pass


def _records(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING and not k.startswith("time/")} for line in lines]


@pytest.fixture(scope="module")
def preset_and_start(tmp_path_factory):
    from agents.commands.sft import warm_start

    # Two steps in the first stage (the kill falls inside a stage, with optimizer state to keep).
    preset = replace(PRESETS["smoke"], stages=(Stage(2, 2), Stage(3, 1)), sft_steps=30)
    start = tmp_path_factory.mktemp("resume") / "warm"
    seeds = task_seeds(0, preset)
    warm_start(start, preset, seed=0, task_seeds=seeds["sft"], eval_seeds=seeds["val"], progress=False)
    return preset, start


def test_a_run_killed_before_its_checkpoint_resumes_to_the_uninterrupted_run(preset_and_start, tmp_path, monkeypatch):
    import torch

    import agents.commands.checkpoint as checkpoint_module
    from agents.commands.train import train

    preset, start = preset_and_start
    whole = train(preset, out=tmp_path / "whole", model_path=start, progress=False)

    real_save = checkpoint_module.save_checkpoint

    def killed_at_step_2(path, *args, **kwargs):
        if Path(path).name == "checkpoint-2":
            raise Killed  # step 2 is logged, its checkpoint never written
        return real_save(path, *args, **kwargs)

    run = tmp_path / "killed"
    monkeypatch.setattr(checkpoint_module, "save_checkpoint", killed_at_step_2)
    with pytest.raises(Killed):
        train(preset, out=run, model_path=start, progress=False)
    monkeypatch.setattr(checkpoint_module, "save_checkpoint", real_save)
    assert [r["step"] for r in _records(run) if "update/rows" in r] == [1, 2]

    resumed = train(preset, out=run, model_path=start, progress=False, resume=True)

    assert _records(run) == _records(tmp_path / "whole")  # step 2 logged once, with the same numbers
    assert resumed["validation"] == whole["validation"] and resumed["test"] == whole["test"]
    assert resumed["generated_tokens"] == whole["generated_tokens"]
    from safetensors.torch import load_file

    for name in ("final", "stage0-best"):
        got, want = load_file(run / name / "model.safetensors"), load_file(tmp_path / "whole" / name / "model.safetensors")
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got), name

"""``--set KEY=VALUE``: any preset setting from the command line (``agents.presets.override_preset``)."""

from __future__ import annotations

from dataclasses import fields

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agents.presets import PRESETS, TrainPreset, override_preset
from agents.rl.curriculum import Stage


def test_overrides_take_each_fields_type():
    small = PRESETS["small"]
    got = override_preset(small, [
        "sft_steps=2", "lr=1e-5", "sft_lr=1", "gradient_checkpointing=False", "dtype=float32",
        "rollout_batch=None", "turns_per_session=(4, 6)", "stages=2:1,4:2", "prompt_style='full'",
    ])
    assert got.sft_steps == 2 and got.lr == 1e-5 and got.sft_lr == 1.0 and isinstance(got.sft_lr, float)
    assert got.gradient_checkpointing is False and got.dtype == "float32" and got.rollout_batch is None
    assert got.turns_per_session == (4, 6) and got.stages == (Stage(2, 1), Stage(4, 2)) and got.prompt_style == "full"
    # everything else is the preset's own
    untouched = {"sft_steps", "lr", "sft_lr", "gradient_checkpointing", "dtype", "rollout_batch", "turns_per_session", "stages", "prompt_style"}
    assert all(getattr(got, f.name) == getattr(small, f.name) for f in fields(TrainPreset) if f.name not in untouched)
    assert override_preset(small, []) == small


@pytest.mark.parametrize("item, message", [
    ("sft_stepz=2", "unknown setting 'sft_stepz'"),
    ("sft_steps", "expected KEY=VALUE"),
    ("=3", "expected KEY=VALUE"),
    ("sft_steps=2.5", "sft_steps must be of type int"),
    ("lr=fast", "lr must be of type float"),
    ("gradient_checkpointing=1", "gradient_checkpointing must be of type bool"),
    ("sft_steps=None", "sft_steps must be of type int"),
    ("sft_horizon=abc", "sft_horizon must be of type None or int"),
    ("dtype=3", "dtype must be of type None or str"),
    ("turns_per_session='6'", "turns_per_session must be of type None or int or tuple"),
    ("stages=8-10", "bad stage"),
])
def test_bad_overrides_name_what_is_wrong(item, message):
    with pytest.raises(ValueError, match=message):
        override_preset(PRESETS["small"], [item])


def test_the_command_line_refuses_a_bad_override_before_any_work(tmp_path):
    from agents.cli import main

    with pytest.raises(SystemExit, match="memr2 train: --set 'n_vall=1': unknown setting"):
        main(["train", "--preset", "smoke", "--set", "n_vall=1", "--out", str(tmp_path / "run"), "--no-progress"])
    with pytest.raises(SystemExit, match="memr2 sft: --set 'sft_steps=x': sft_steps must be of type int"):
        main(["sft", "--preset", "smoke", "--set", "sft_steps=x", "--out", str(tmp_path / "warm"), "--no-progress"])
    assert not (tmp_path / "run").exists() and not (tmp_path / "warm").exists()


@given(name=st.sampled_from(sorted(PRESETS)), steps=st.integers(0, 10_000), lr=st.floats(1e-9, 1.0), batch=st.integers(1, 512))
def test_an_override_round_trips_its_value(name, steps, lr, batch):
    got = override_preset(PRESETS[name], [f"sft_steps={steps}", f"lr={lr!r}", f"micro_batch={batch}"])
    assert (got.sft_steps, got.lr, got.micro_batch) == (steps, lr, batch)

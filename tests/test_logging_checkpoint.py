"""Metrics logging and plotting; atomic checkpoints, resume and RNG round trips."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch

from agents.commands.checkpoint import (
    atomic_write_dir,
    checkpoint_path,
    latest_checkpoint,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from agents.commands.logging import MetricsLogger, plot_curves, read_metrics, summarize_training

# ---------------------------------------------------------------- logging


def test_jsonl_lines_are_flushed_and_appended(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        logger.log(1, {"loss": 0.5, "eval": {"f1": np.float32(0.25)}, "n": np.int64(3), "t": torch.tensor(2.0)})
        # readable before close: every write is flushed
        first = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
        assert first["step"] == 1 and first["loss"] == 0.5 and first["eval/f1"] == 0.25
        assert first["n"] == 3 and first["t"] == 2.0 and first["time"] > 0 and first["elapsed_s"] >= 0
        logger.log(2, {"loss": float("nan"), "note": "text", "hist": np.arange(3)})
        assert not logger.tensorboard_enabled and "disabled" in logger.tensorboard_status
    with pytest.raises(ValueError, match="closed"):
        logger.log(3, {"loss": 1.0})
    logger.close()  # twice is fine

    with MetricsLogger(tmp_path, tensorboard=False) as logger:  # a resumed run appends
        logger.log(3, {"loss": 0.1})
    with MetricsLogger(tmp_path, tensorboard=False, clock=lambda: 100.0) as logger:
        logger.log(4, {"loss": 0.05})  # a run's own clock: elapsed_s carries on from its earlier attempts
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[3]["elapsed_s"] == 100.0 and records[2]["elapsed_s"] < 100.0
    assert np.isnan(records[1]["loss"]) and records[1]["hist"] == [0, 1, 2]


def test_bad_metrics_raise(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        with pytest.raises(ValueError, match="reserved"):
            logger.log(1, {"step": 3})
        with pytest.raises(TypeError, match="'obj'"):
            logger.log(1, {"obj": object()})
        with pytest.raises(TypeError, match="step"):
            logger.log(1.5, {"loss": 1.0})


def test_tensorboard_mirror(tmp_path):
    pytest.importorskip("tensorboard")
    with MetricsLogger(tmp_path) as logger:
        assert logger.tensorboard_enabled and logger.tensorboard_status == "on"
        logger.log(1, {"loss": 0.5, "note": "not a scalar"})
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_tensorboard_missing_is_recorded(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with MetricsLogger(tmp_path) as logger:
        logger.log(1, {"loss": 0.5})
        assert not logger.tensorboard_enabled and "tensorboard" in logger.tensorboard_status
    assert read_metrics(tmp_path / "metrics.jsonl")[0]["loss"] == 0.5


def test_plot_curves_with_partial_and_missing_keys(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        for step in range(5):
            metrics = {"loss": 1.0 / (step + 1)}
            if step % 2 == 0:
                metrics["eval/f1"] = 0.1 * step  # only on some steps
            logger.log(step, metrics)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 0.1')  # a run killed mid-write
    with pytest.warns(UserWarning, match="malformed"):
        keys = ["loss", "eval/f1", "absent"]
        out = plot_curves(tmp_path / "metrics.jsonl", tmp_path / "plots" / "curves.png", keys=keys)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.warns(UserWarning):
        out = plot_curves(tmp_path / "metrics.jsonl", tmp_path / "all.png")  # every numeric key
    assert out.stat().st_size > 0
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert plot_curves(empty, tmp_path / "empty.png").stat().st_size > 0


# ---------------------------------------------------------------- checkpoints


def _tiny_model(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, vocab_size=100,
    )
    return LlamaForCausalLM(config)


def _assert_same_weights(a, b):
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(p, q, msg=name)


def test_round_trip_model_optimizer_trainer_state_and_rng(tmp_path):
    model = _tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss.backward()
    optimizer.step()
    state = {"step": 7, "stage": 1, "horizon": 16, "best_f1": 0.42, "history": [0.1, 0.2]}

    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    path = save_checkpoint(checkpoint_path(tmp_path, 7), model, None, state, optimizer)
    expected = (random.random(), np.random.rand(3).tolist(), torch.rand(3))
    assert (path / "model.safetensors").is_file() and path.name == "checkpoint-7"

    random.seed(99), np.random.seed(99), torch.manual_seed(99)  # move the RNGs on
    ckpt = load_checkpoint(path, restore_rng=True)
    assert (random.random(), np.random.rand(3).tolist()) == expected[:2]
    torch.testing.assert_close(torch.rand(3), expected[2])

    assert ckpt["trainer_state"] == state and ckpt["tokenizer"] is None
    _assert_same_weights(ckpt["model"], model)
    fresh = torch.optim.AdamW(ckpt["model"].parameters(), lr=1e-3)
    fresh.load_state_dict(ckpt["optimizer"])
    torch.testing.assert_close(fresh.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])

    # restoring explicitly later gives the same stream again
    restore_rng_state(ckpt["rng_state"])
    assert random.random() == expected[0]


def test_exception_mid_write_leaves_previous_checkpoint_loadable(tmp_path):
    path = tmp_path / "checkpoint-1"
    good = _tiny_model(seed=0)
    save_checkpoint(path, good, None, {"step": 1})

    class Exploding:
        """A model whose save writes part of its files, then fails (disk full, kill, bug)."""

        def save_pretrained(self, d):
            (d / "model.safetensors").write_bytes(b"half a file")
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, Exploding(), None, {"step": 2})
    with pytest.raises(TypeError, match="JSON"):  # checked before anything is written
        save_checkpoint(path, good, None, {"step": object()})

    ckpt = load_checkpoint(path)
    assert ckpt["trainer_state"] == {"step": 1}
    _assert_same_weights(ckpt["model"], good)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]  # no temp dirs left


def test_failed_or_killed_swap_is_recovered(tmp_path, monkeypatch):
    import os

    final = tmp_path / "checkpoint-3"
    with atomic_write_dir(final) as d:
        (d / "trainer_state.json").write_text('{"step": 3}')

    # the second rename (new dir -> final name) fails: the old dir is put back at once
    real_replace = os.replace

    def fail_on_temp_dir(src, dst):
        if ".tmp-" in str(src):
            raise OSError("rename failed")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", fail_on_temp_dir)
    with pytest.raises(OSError, match="rename failed"):
        with atomic_write_dir(final) as d:
            (d / "trainer_state.json").write_text('{"step": 4}')
    monkeypatch.setattr(os, "replace", real_replace)
    assert json.loads((final / "trainer_state.json").read_text()) == {"step": 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3"]

    # a kill between the renames leaves the old dir under its hidden name: readers put it back
    os.replace(final, tmp_path / ".checkpoint-3.old-0badc0de")
    assert latest_checkpoint(tmp_path) == final
    os.replace(final, tmp_path / ".checkpoint-3.old-0badc0de")
    assert load_checkpoint(final, load_model=False)["trainer_state"] == {"step": 3}


def test_replacing_a_checkpoint_and_latest(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    assert latest_checkpoint(tmp_path / "missing") is None
    for step in (2, 10, 9):
        with atomic_write_dir(checkpoint_path(tmp_path, step)) as d:
            (d / "trainer_state.json").write_text(json.dumps({"step": step}))
    (tmp_path / "checkpoint-50").mkdir()  # incomplete: no trainer state
    (tmp_path / ".checkpoint-60.tmp-deadbeef").mkdir()  # a hard kill's leftovers
    (tmp_path / "best").mkdir()
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-10"

    with atomic_write_dir(tmp_path / "checkpoint-10") as d:  # replace in place
        (d / "trainer_state.json").write_text('{"step": 10, "again": true}')
    assert load_checkpoint(tmp_path / "checkpoint-10", load_model=False)["trainer_state"]["again"]
    assert not list(tmp_path.glob(".checkpoint-10.*"))
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        load_checkpoint(tmp_path / "checkpoint-50")


def test_summarize_training_counts_the_budget_and_the_groups_without_signal(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        logger.log(1, {"generated_tokens": 100, "time/step_s": 2.0, "global/groups": 4, "global/zero_variance_groups": 1,
                       "local/groups": 2, "local/zero_variance_groups": 0})
        logger.log(2, {"generated_tokens": 250, "time/step_s": 4.0, "global/groups": 4, "global/zero_variance_groups": 2,
                       "local/groups": 2, "local/zero_variance_groups": 2})
        logger.log(2, {"val/f1": 0.5})
    s = summarize_training(read_metrics(tmp_path / "metrics.jsonl"))
    assert s["updates"] == 2 and s["generated_tokens"] == 250 and s["step_s"] == [2.0, 4.0]
    assert s["zero_var_global"] == 3 / 8 and s["zero_var_local"] == 2 / 4 and s["validation"] == [(2, 0.5)]
    empty = summarize_training([])  # a run killed before its first update
    assert empty["updates"] == 0 and math.isnan(empty["zero_var_global"]) and math.isnan(empty["zero_var_local"])

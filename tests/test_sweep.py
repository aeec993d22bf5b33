"""`memr2 sweep`: spec checking, grid expansion, the table's maths, and resuming a killed sweep."""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agents.commands import sweep
from agents.commands.sweep import SpecError, f1_at, mean_ci, parse_spec, t_quantile_975

ROOT = Path(__file__).resolve().parents[1]


def _spec(**tables):
    base = {"sweep": {"preset": "smoke"}, "axes": {"algo": ["logo-grpo", "grpo"], "seed": [0, 1]}}
    base.update(tables)
    return base


# ----------------------------------------------------------------------------- the grid

AXIS_VALUES = {
    "seed": st.lists(st.integers(0, 10_000), min_size=1, max_size=4, unique=True),
    "algo": st.lists(st.sampled_from(sweep.ALGOS), min_size=1, max_size=2, unique=True),
    "curriculum": st.lists(st.booleans(), min_size=1, max_size=2, unique=True),
    "n_rollouts": st.lists(st.integers(1, 64), min_size=1, max_size=3, unique=True),
    "temperature": st.lists(st.sampled_from([0.5, 0.7, 1.0, 1.3]), min_size=1, max_size=3, unique=True),
    "turns_per_session": st.lists(st.sampled_from([4, 6, [6, 8], [2, 3]]), min_size=1, max_size=3, unique_by=str),
}


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted(AXIS_VALUES)), st.just(None), min_size=0, max_size=4).flatmap(
    lambda keys: st.fixed_dictionaries({k: AXIS_VALUES[k] for k in keys})))
def test_the_grid_is_every_combination_once_with_unique_names(axes):
    spec = parse_spec({"sweep": {"preset": "smoke"}, "settings": {"sft_steps": 3}, "axes": axes})
    assert len(spec.runs) == math.prod(len(v) for v in axes.values())
    assert len({r.name for r in spec.runs}) == len(spec.runs)
    combos = [tuple(r.values[a] for a in axes) for r in spec.runs]
    assert combos == list(itertools.product(*axes.values()))
    for r in spec.runs:
        assert r.settings == {"sft_steps": 3, **r.values}
        preset, job = sweep.resolve(spec, r)
        assert preset.sft_steps == 3
        if "n_rollouts" in axes:
            assert preset.n_rollouts == r.values["n_rollouts"]
        if r.values.get("curriculum") is False:
            assert len(preset.stages) == 1 and preset.stages[0].horizon == 3  # smoke: 2 -> 3, flattened
        assert job["seed"] == r.values.get("seed", 0)
    # Configurations are the runs without their seed: the table has one row each, over every seed.
    configs = {r.config for r in spec.runs}
    assert len(configs) == len(spec.runs) // len(axes.get("seed", [0]))
    results = {r.name: _fake_result(r, 10 * i, i / len(spec.runs), [(0, 0.0)]) for i, r in enumerate(spec.runs)}
    rows, per_run = sweep.table_rows(spec, results)
    assert len(rows) == len(configs) and len(per_run) == len(spec.runs)
    assert all(row["seeds"] == len(axes.get("seed", [0])) for row in rows)
    table = [line for line in sweep.markdown_table(spec, rows, results) if line.startswith("|")]
    assert len(table) == 2 + len(rows) and len({line.count("|") for line in table}) == 1, table


def test_settings_reach_the_preset_and_the_job():
    spec = parse_spec(_spec(settings={"stages": "4:2,8:1", "turns_per_session": [6, 8], "lr": 1, "device": "cpu"},
                            axes={"curriculum": [True, False], "seed": [3]}))
    curriculum, flat = (sweep.resolve(spec, r) for r in spec.runs)
    assert [(s.horizon, s.steps) for s in curriculum[0].stages] == [(4, 2), (8, 1)]
    assert [(s.horizon, s.steps) for s in flat[0].stages] == [(8, 3)]
    assert curriculum[0].turns_per_session == (6, 8) and curriculum[0].lr == 1.0 and isinstance(curriculum[0].lr, float)
    assert curriculum[1] == {"algo": "logo-grpo", "seed": 3, "model": None, "device": "cpu", "backend": "hf"}
    vllm = parse_spec(_spec(settings={"backend": "vllm"}))
    assert sweep.resolve(vllm, vllm.runs[0])[1]["backend"] == "vllm"  # the rollout sampler, as memr2 train --backend
    # Runs that differ only in RL settings share a warm start; another seed or warm-start setting does not.
    spec = parse_spec(_spec(axes={"algo": ["grpo", "logo-grpo"], "curriculum": [True, False], "lr": [1e-4, 1e-3],
                                  "seed": [0, 1], "sft_steps": [5, 6]}))
    keys = {}
    for r in spec.runs:
        keys.setdefault(sweep.warm_start_key(spec, r), set()).add((r.values["seed"], r.values["sft_steps"]))
    assert len(keys) == 4 and all(len(v) == 1 for v in keys.values())
    model_spec = parse_spec(_spec(settings={"model": "/some/checkpoint"}))
    assert sweep.warm_start_key(model_spec, model_spec.runs[0]) is None


BAD_SPECS = [
    ({"settings": {"n_rollout": 4}}, r"unknown setting 'n_rollout' in \[settings\] \(did you mean 'n_rollouts'\?\)"),
    ({"axes": {"learning_rate": [1e-4], "seed": [0]}}, r"unknown setting 'learning_rate' in \[axes\]"),
    ({"axes": {"algo": [], "seed": [0]}}, r"axis 'algo' is empty"),
    ({"axes": {"algo": ["grpo", "grpo"]}}, r"duplicate run name 'algo-grpo'.*an axis repeats a value"),
    ({"sweep": {"preset": "smoke", "run_name": "run-s{seed}"}}, r"duplicate run name 'run-s0'.*must tell every run apart"),
    ({"axes": {"model": ["a b", "a-b"]}}, r"duplicate run name 'model-a-b'"),
    ({"sweep": {"preset": "smoke", "run_name": "{algo}-{sed}"}}, r"run_name '\{algo\}-\{sed\}' names 'sed', which is not an axis"),
    ({"sweep": {"preset": "huge"}}, r"unknown preset 'huge'"),
    ({"sweep": {"preset": "smoke", "presets": "x"}}, r"unknown key 'presets' in \[sweep\] \(did you mean 'preset'\?\)"),
    ({"setings": {}}, r"unknown table \[setings\] \(did you mean 'settings'\?\)"),
    ({"resources": {"cpus": 0}}, r"\[resources\] cpus must be a number >= 1"),
    ({"resources": {"gpu": 1}}, r"unknown key 'gpu' in \[resources\]"),
    ({"settings": {"n_rollouts": "4"}}, r"n_rollouts = '4': expected an integer"),
    ({"settings": {"seed": True}}, r"seed = True: expected an integer"),
    ({"axes": {"algo": ["ppo"]}}, r"algo = 'ppo': expected one of logo-grpo, grpo"),
    ({"axes": {"algo": "grpo"}}, r"axis 'algo' must be a list"),
    ({"settings": {"stages": "8-10"}}, r"stages = '8-10': bad stage"),
    ({"settings": {"algo": "grpo"}}, r"'algo' is both a fixed setting and an axis"),
    ({"report": {"equal_budget": "yes"}}, r"equal_budget must be true or false"),
    ({"settings": {"backend": "sglang"}}, r"backend = 'sglang': expected one of hf, vllm, auto"),
]


@pytest.mark.parametrize("tables, message", BAD_SPECS, ids=[m[:30] for _, m in BAD_SPECS])
def test_a_bad_spec_is_a_clear_error(tables, message):
    with pytest.raises(SpecError, match=message):
        parse_spec(_spec(**tables), path="spec.toml")


def test_exclude_drops_the_matching_runs_and_none_spells_a_settings_none():
    spec = parse_spec(_spec(axes={"algo": ["logo-grpo", "grpo"], "local_max_questions": [8, "none"], "seed": [0, 1]},
                            exclude=[{"algo": "grpo", "local_max_questions": "none"}]))
    combos = [(r.values["algo"], r.values["local_max_questions"], r.values["seed"]) for r in spec.runs]
    assert combos == [("logo-grpo", 8, 0), ("logo-grpo", 8, 1), ("logo-grpo", "none", 0), ("logo-grpo", "none", 1),
                      ("grpo", 8, 0), ("grpo", 8, 1)]
    presets = {r.name: sweep.resolve(spec, r)[0] for r in spec.runs}
    assert presets["algo-logo-grpo_local_max_questions-none_seed-0"].local_max_questions is None
    assert presets["algo-logo-grpo_local_max_questions-8_seed-0"].local_max_questions == 8
    with pytest.raises(SpecError, match="exclude.*names 'alg', which is not an axis"):
        parse_spec(_spec(exclude=[{"alg": "grpo"}]))
    with pytest.raises(SpecError, match=r"exclude.*seed = 7 is not a value of that axis"):
        parse_spec(_spec(exclude=[{"seed": 7}]))
    with pytest.raises(SpecError, match="exclude.*matches no run"):
        parse_spec(_spec(axes={"algo": ["grpo"], "seed": [0, 1]}, exclude=[{"algo": "grpo", "seed": 0}, {"seed": 0}]))
    with pytest.raises(SpecError, match="must be a list of tables"):
        parse_spec(_spec(exclude={"algo": "grpo"}))
    with pytest.raises(SpecError, match=r"n_rollouts = 'none': expected an integer"):
        parse_spec(_spec(settings={"n_rollouts": "none"}))


def test_the_uncapped_local_reward_spec_is_logo_against_itself_and_grpo():
    spec = sweep.load_spec(ROOT / "benchmarks" / "credit_local_all_small.toml")
    assert spec.preset == "small" and len(spec.runs) == 9
    names = {r.name for r in spec.runs}
    assert names == {f"{a}-q{q}-s{s}" for s in range(3) for a, q in (("logo-grpo", 8), ("logo-grpo", "none"), ("grpo", 8))}
    quick = sweep.load_spec(ROOT / "benchmarks" / "credit_local_all_small.toml", quick=True)
    assert len(quick.runs) == 3


def test_the_quick_variant_replaces_keys_of_its_tables(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text('[sweep]\npreset = "tiny"\n[settings]\nlr = 0.1\nsft_steps = 9\n[axes]\nseed = [0, 1, 2]\n'
                    '[quick.sweep]\npreset = "smoke"\n[quick.settings]\nsft_steps = 2\n[quick.axes]\nseed = [5]\n')
    full, quick = sweep.load_spec(path), sweep.load_spec(path, quick=True)
    assert (full.preset, len(full.runs), full.settings) == ("tiny", 3, {"lr": 0.1, "sft_steps": 9})
    assert (quick.preset, [r.seed for r in quick.runs], quick.settings) == ("smoke", [5], {"lr": 0.1, "sft_steps": 2})
    path.write_text('[axes]\nseed = [0]\n')
    with pytest.raises(SpecError, match=r"--quick needs a \[quick\] table"):
        sweep.load_spec(path, quick=True)
    path.write_text('[axes\nseed = [0]\n')
    with pytest.raises(SpecError, match="not valid TOML"):
        sweep.load_spec(path)


def test_the_credit_assignment_spec_is_the_study():
    spec = sweep.load_spec(ROOT / "benchmarks" / "credit_assignment.toml")
    assert spec.preset == "tiny" and spec.equal_budget and len(spec.runs) == 12
    assert {tuple(r.values) for r in spec.runs} == {("algo", "curriculum", "seed")}
    # The four configurations of a seed share its warm start, as the old script's did.
    assert len({sweep.warm_start_key(spec, r) for r in spec.runs}) == 3
    quick = sweep.load_spec(ROOT / "benchmarks" / "credit_assignment.toml", quick=True)
    assert quick.preset == "smoke" and len(quick.runs) == 8 and quick.cpus == 1


def test_the_smollm2_credit_spec_is_the_same_study_on_the_small_preset():
    spec = sweep.load_spec(ROOT / "benchmarks" / "credit_assignment_small.toml")
    assert spec.preset == "small" and spec.equal_budget and len(spec.runs) == 12
    assert {r.seed for r in spec.runs} == {0, 1, 2} and len({r.config for r in spec.runs}) == 4
    # Every run starts from the one shared warm start, so no run makes its own.
    assert {sweep.warm_start_key(spec, r) for r in spec.runs} == {None}
    assert {r.settings["model"] for r in spec.runs} == {"runs/ws"}
    # Without the curriculum: the curriculum's last horizon only, for fewer steps (equal tokens).
    curriculum, flat = (sweep.resolve(spec, r)[0].stages for r in spec.runs[:4:2])
    assert len(curriculum) > 1 and len(flat) == 1 and flat[0].horizon == curriculum[-1].horizon
    assert flat[0].steps < sum(s.steps for s in curriculum)
    # Seed 0's four runs come first, so a sweep stopped early has whole seeds.
    assert {r.seed for r in spec.runs[:4]} == {0}
    quick = sweep.load_spec(ROOT / "benchmarks" / "credit_assignment_small.toml", quick=True)
    assert quick.preset == "small" and sorted(r.values["algo"] for r in quick.runs) == ["grpo", "logo-grpo"]


# ----------------------------------------------------------------------------- the table's maths


def test_mean_ci_is_the_student_t_interval():
    mean, lo, hi, n = mean_ci([1.0, 2.0, 3.0])
    half = 4.302652729911275 / math.sqrt(3)  # t(0.975, 2) * sd 1 / sqrt(3)
    assert (mean, n) == (2.0, 3)
    assert lo == pytest.approx(2 - half, abs=1e-4) and hi == pytest.approx(2 + half, abs=1e-4)
    mean, lo, hi, n = mean_ci([0.25, float("nan"), 0.75])  # NaN (a missing reading) is dropped
    assert (mean, n) == (0.5, 2) and hi - 0.5 == pytest.approx(12.7062 * 0.25, rel=1e-6)  # sd 0.354 / sqrt 2
    assert math.isnan(mean_ci([0.4])[1]) and mean_ci([0.4])[0] == 0.4
    assert all(math.isnan(x) for x in mean_ci([])[:3]) and mean_ci([])[3] == 0


@given(st.lists(st.floats(-1e3, 1e3), min_size=2, max_size=30), st.floats(-100, 100), st.floats(0.01, 100))
def test_mean_ci_moves_and_scales_with_the_data(xs, shift, scale):
    mean, lo, hi, n = mean_ci(xs)
    assert n == len(xs) and lo <= mean <= hi
    mean2, lo2, hi2, _ = mean_ci([shift + scale * x for x in xs])
    assert mean2 == pytest.approx(shift + scale * mean, rel=1e-9, abs=1e-6)
    assert hi2 - lo2 == pytest.approx(scale * (hi - lo), rel=1e-6, abs=1e-6)


def test_t_quantiles_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in [*range(1, 80), 100, 250, 1000, 10**6]:
        assert t_quantile_975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=1e-4), df
    with pytest.raises(ValueError):
        t_quantile_975(0)


def test_f1_at_reads_the_last_point_within_the_budget():
    curve = [(300, 0.3), (0, 0.1), (100, 0.2)]
    assert f1_at(curve, 0) == 0.1 and f1_at(curve, 99) == 0.1 and f1_at(curve, 100) == 0.2 and f1_at(curve, 10**9) == 0.3
    assert math.isnan(f1_at([(50, 0.5)], 10))


def _fake_result(run, tokens, test_f1, curve):
    return {"test": {"f1": test_f1, "memory_size": 2.0}, "generated_tokens": tokens, "curve": curve, "validation": [],
            "wall_s": 1.0, "step_s": [0.5, 1.5], "zero_var_global": 0.25, "zero_var_local": 0.5}


def test_the_table_groups_seeds_and_compares_at_equal_budget(tmp_path):
    spec = parse_spec(_spec(axes={"algo": ["logo-grpo", "grpo"], "seed": [0, 1]}, report={"equal_budget": True}))
    data = {  # (algo, seed): tokens, test F1, validation curve
        ("logo-grpo", 0): (500, 0.4, [(0, 0.1), (200, 0.3), (500, 0.5)]),
        ("logo-grpo", 1): (400, 0.2, [(0, 0.0), (400, 0.2)]),
        ("grpo", 0): (300, 0.1, [(0, 0.1), (300, 0.2)]),
        ("grpo", 1): (600, 0.3, [(0, 0.0), (300, 0.1), (600, 0.4)]),
    }
    results = {r.name: _fake_result(r, *data[r.values["algo"], r.values["seed"]]) for r in spec.runs}
    assert sweep.budget_f1(spec, results) == {  # budgets: seed 0 -> 300 tokens, seed 1 -> 400
        "algo-logo-grpo_seed-0": 0.3, "algo-logo-grpo_seed-1": 0.2, "algo-grpo_seed-0": 0.2, "algo-grpo_seed-1": 0.1}
    rows, per_run = sweep.table_rows(spec, results)
    assert [r["algo"] for r in rows] == ["logo-grpo", "grpo"] and len(per_run) == 4
    logo = rows[0]
    assert logo["seeds"] == 2 and logo["test_f1_mean"] == pytest.approx(0.3) and logo["budget_f1_mean"] == pytest.approx(0.25)
    assert logo["test_f1_ci_lo"] == pytest.approx(0.3 - 12.7062 * 0.1 / 1, abs=1e-6)  # sd 0.1414.. / sqrt 2 = 0.1
    assert logo["generated_tokens_mean"] == 450 and logo["step_s_mean"] == 1.0
    assert logo["zero_var_global_mean"] == 0.25 and logo["zero_var_local_mean"] == 0.5
    sweep.write_report(spec, tmp_path, results)
    md = (tmp_path / "results.md").read_text()
    assert "| logo-grpo | 2 | 0.300 [-0.971, 1.571] | 0.250 [" in md
    assert "| 450 | 25% / 50% |" in md
    table = [line for line in md.splitlines() if line.startswith("|")]
    assert len({line.count("|") for line in table}) == 1, table  # header, separator and rows agree
    assert (tmp_path / "results.png").stat().st_size > 1000
    # A run still missing is named under the table, and its configuration averages what is there.
    del results["algo-grpo_seed-1"]
    sweep.write_report(spec, tmp_path, results)
    md = (tmp_path / "results.md").read_text()
    assert "1 of 4 runs have not finished: algo-grpo_seed-1" in md and "| grpo | 1 | 0.100 |" in md


def test_paired_differences_pool_conversations_of_the_seeds_both_configurations_finished(tmp_path):
    spec = parse_spec(_spec(axes={"algo": ["logo-grpo", "grpo"], "seed": [0, 1, 2]}))
    per_task = {  # (algo, seed): test F1 per conversation; seed 2's GRPO run predates per-conversation F1
        ("logo-grpo", 0): [0.5, 0.6, 0.7], ("grpo", 0): [0.4, 0.6, 0.5],
        ("logo-grpo", 1): [0.2, 0.3, 0.1], ("grpo", 1): [0.2, 0.1, 0.1],
        ("logo-grpo", 2): [0.9, 0.9, 0.9], ("grpo", 2): None,
    }
    results = {}
    for r in spec.runs:
        f1s = per_task[r.values["algo"], r.seed]
        results[r.name] = _fake_result(r, 100, sum(f1s or [0.3]) / 3, [])
        if f1s is not None:
            results[r.name]["test"]["f1_per_task"] = f1s
    (row,) = sweep.paired_differences(spec, results)
    diffs = [0.1, 0.0, 0.2, 0.0, 0.2, 0.0]  # seeds 0 and 1, conversation by conversation
    assert (row["a"], row["b"], row["seeds"], row["conversations"]) == ("algo=logo-grpo", "algo=grpo", 2, 6)
    assert row["mean"] == pytest.approx(sum(diffs) / 6)
    assert 0.0 <= row["ci_lo"] < row["mean"] < row["ci_hi"] <= 0.2
    assert (row["ci_lo"], row["ci_hi"]) == sweep.bootstrap_ci([a - b for a, b in zip(*(
        [x for s in (0, 1) for x in per_task[algo, s]] for algo in ("logo-grpo", "grpo")))])  # seeded: reproducible
    sweep.write_report(spec, tmp_path, results)
    md = (tmp_path / "results.md").read_text()
    assert f"| algo=logo-grpo | algo=grpo | 2 | 6 | +0.083 [{row['ci_lo']:+.3f}, {row['ci_hi']:+.3f}] |" in md
    assert (tmp_path / "paired.csv").read_text().splitlines()[0] == "a,b,seeds,conversations,mean,ci_lo,ci_hi"
    # Runs without per-conversation F1 give no pairs and no paired table.
    for res in results.values():
        res["test"].pop("f1_per_task", None)
    assert sweep.paired_differences(spec, results) == []
    sweep.write_report(spec, tmp_path / "old", results)
    assert "paired by seed" not in (tmp_path / "old" / "results.md").read_text()


def test_main_effects_pair_each_axis_over_the_others_and_resample_conversations(tmp_path):
    spec = parse_spec(_spec(axes={"curriculum": [True, False], "algo": ["logo-grpo", "grpo"], "seed": [0, 1]}))
    per_task = {  # (curriculum, algo, seed): test F1 of the seed's 2 conversations
        (True, "logo-grpo", 0): [0.5, 0.7], (True, "grpo", 0): [0.4, 0.5],
        (False, "logo-grpo", 0): [0.3, 0.6], (False, "grpo", 0): [0.3, 0.4],
        (True, "logo-grpo", 1): [0.2, 0.2], (True, "grpo", 1): [0.1, 0.4],
        (False, "logo-grpo", 1): [0.6, 0.6], (False, "grpo", 1): None,  # unfinished: seed 1 has one algo pair
    }
    results = {}
    for r in spec.runs:
        f1s = per_task[r.values["curriculum"], r.values["algo"], r.seed]
        if f1s is not None:
            results[r.name] = _fake_result(r, 100, sum(f1s) / 2, [])
            results[r.name]["test"]["f1_per_task"] = f1s
    by_axis = {row["b"]: row for row in sweep.main_effects(spec, results)}
    assert set(by_axis) == {"curriculum=false", "algo=grpo"}
    algo = by_axis["algo=grpo"]
    # A conversation's differences over the curriculum settings are averaged: seed 0 gives
    # mean(0.1, 0.0) and mean(0.2, 0.2); seed 1 only has its curriculum pair, 0.1 and -0.2.
    units = [0.05, 0.2, 0.1, -0.2]
    assert (algo["a"], algo["seeds"], algo["conversations"]) == ("algo=logo-grpo (over curriculum)", 2, 4)
    assert algo["mean"] == pytest.approx(sum(units) / 4)
    assert (algo["ci_lo"], algo["ci_hi"]) == pytest.approx(sweep.bootstrap_ci(units))
    curriculum = by_axis["curriculum=false"]  # seed 1: only logo-grpo has both settings
    assert (curriculum["a"], curriculum["seeds"], curriculum["conversations"]) == ("curriculum=true (over algo)", 2, 4)
    assert curriculum["mean"] == pytest.approx(sum([(0.2 + 0.1) / 2, (0.1 + 0.1) / 2, -0.4, -0.4]) / 4)
    sweep.write_report(spec, tmp_path, results)
    md = (tmp_path / "results.md").read_text()
    assert f"| algo=logo-grpo (over curriculum) | algo=grpo | 2 | 4 | {algo['mean']:+.3f} [" in md
    assert "algo=logo-grpo (over curriculum)" in (tmp_path / "paired.csv").read_text()
    # One axis besides the seed: the per-configuration pairs already are the main effect.
    one_axis = parse_spec(_spec(axes={"algo": ["logo-grpo", "grpo"], "seed": [0, 1]}))
    assert sweep.main_effects(one_axis, {}) == []
    # An [[exclude]] that leaves a pair of values under one setting of the other axis only: that
    # pair is already a configuration pair, so no row claims to pool over the other axis.
    excluded = parse_spec(_spec(axes={"curriculum": [True, False], "algo": ["logo-grpo", "grpo"], "seed": [0, 1]},
                                exclude=[{"algo": "grpo", "curriculum": False}]))
    assert len(excluded.runs) == 6
    assert sweep.main_effects(excluded, results) == []


def _held_out_report(path: Path, *, seed: int, f1s, horizon: int = 3, preset: str = "smoke", agent: str = "warm") -> Path:
    """A benchmarks/held_out.py report with one agent's per-conversation F1."""
    path.write_text(json.dumps({"meta": {"preset": preset, "seed": seed, "horizon": horizon, "episodes": len(f1s)},
                                "rows": {agent: {"f1": sum(f1s) / len(f1s), "f1_per_task": f1s}, "no memory": {"f1": 0.0}}}))
    return path


def test_configurations_are_paired_with_the_warm_start_of_each_seed(tmp_path, capsys):
    """`memr2 sweep --report --against warm=...`: every configuration minus the policy the runs
    started from, evaluated by benchmarks/held_out.py on each seed's test conversations."""
    from agents.cli import main

    spec_path = tmp_path / "spec.toml"
    spec_path.write_text('[sweep]\npreset = "smoke"\n[axes]\nalgo = ["logo-grpo", "grpo"]\nseed = [0, 1]\n')
    spec = sweep.load_spec(spec_path)
    per_task = {("logo-grpo", 0): [0.5, 0.6], ("grpo", 0): [0.4, 0.6], ("logo-grpo", 1): [0.2, 0.3], ("grpo", 1): [0.2, 0.1]}
    out = tmp_path / "out"
    for r in spec.runs:
        res = _fake_result(r, 100, 0.5, [])
        res["test"]["f1_per_task"] = per_task[r.values["algo"], r.seed]
        res.update(name=r.name, preset="smoke", settings=r.settings, equal_budget=False, values=r.values)
        sweep._write_atomic(sweep.result_path(out, r), json.dumps(res).encode())
    warm0 = _held_out_report(tmp_path / "w0.json", seed=0, f1s=[0.4, 0.4])
    warm1 = _held_out_report(tmp_path / "w1.json", seed=1, f1s=[0.2, 0.2])
    assert main(["sweep", str(spec_path), "--out", str(out), "--report", "--against", f"warm={warm0}", "--against", f"warm={warm1}"]) == 0
    rows = {(r["a"], r["b"]): r for r in csv.DictReader(open(out / "paired.csv"))}
    logo = rows["algo=logo-grpo", "warm"]
    assert (logo["seeds"], logo["conversations"]) == ("2", "4")
    assert float(logo["mean"]) == pytest.approx((0.1 + 0.2 + 0.0 + 0.1) / 4)
    assert float(rows["algo=grpo", "warm"]["mean"]) == pytest.approx((0.0 + 0.2 + 0.0 - 0.1) / 4)
    assert "| algo=logo-grpo | warm | 2 | 4 | +0.100" in (out / "results.md").read_text()
    # Only the seeds that have a report count.
    only0 = sweep.baseline_differences(spec, sweep.finished_runs(spec, out), "warm", sweep.load_baseline([warm0], "warm"))
    assert [(r["a"], r["seeds"], r["conversations"]) for r in only0] == [("algo=logo-grpo", 1, 2), ("algo=grpo", 1, 2)]


@pytest.mark.parametrize("report, message", [
    ({"seed": 0, "f1s": [0.4, 0.4], "horizon": 8}, "did not play run .*'s test"),
    ({"seed": 0, "f1s": [0.4, 0.4, 0.4]}, "did not play run .*'s test"),
    ({"seed": 0, "f1s": [0.4, 0.4], "preset": "small"}, "did not play run .*'s test"),
    ({"seed": 0, "f1s": [0.4, 0.4], "agent": "teacher"}, "has no agent 'warm'"),
])
def test_a_report_of_another_test_is_refused(tmp_path, report, message):
    spec = parse_spec(_spec(axes={"algo": ["grpo"], "seed": [0]}))
    results = {r.name: _fake_result(r, 100, 0.5, []) for r in spec.runs}
    for res in results.values():
        res["test"]["f1_per_task"] = [0.5, 0.5]
    path = _held_out_report(tmp_path / "w.json", **report)
    with pytest.raises(SpecError, match=message):
        sweep.baseline_differences(spec, results, "warm", sweep.load_baseline([path], "warm"))


def test_against_needs_report_and_a_readable_file(tmp_path):
    spec = tmp_path / "spec.toml"
    spec.write_text('[sweep]\npreset = "smoke"\n[axes]\nseed = [0]\n')
    (tmp_path / "bad.json").write_text("{not json")
    for args, message in [(["--against", "warm=x.json"], "--against goes with --report"),
                          (["--report", "--against", "warm"], "wants AGENT=HELD_OUT_JSON"),
                          (["--report", "--against", f"warm={tmp_path / 'bad.json'}"], "is not a benchmarks/held_out.py report")]:
        proc = _memr2(spec, "--out", tmp_path / "out", *args)
        assert proc.returncode != 0 and message in proc.stderr, (args, proc.stderr)


# ----------------------------------------------------------------------------- resuming (no Ray)


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs, and it is not an ordinary failure."""


@pytest.fixture
def fake_jobs(monkeypatch):
    """Replace the training job with a cheap deterministic one that records what it ran."""
    calls = {"runs": [], "warm": [], "kill_after": None, "fail": set()}

    def warm(preset, job, threads):
        calls["warm"].append(job["seed"])
        return b"warm-%d" % job["seed"]

    def run(preset, job, out, warm_blob, threads, preset_name, start_point):
        name = Path(out).name
        if calls["kill_after"] is not None and len(calls["runs"]) >= calls["kill_after"]:
            Path(out).mkdir(parents=True)  # a run that was under way: its directory, no result
            raise Killed
        if name in calls["fail"]:
            raise RuntimeError("out of memory")
        calls["runs"].append(name)
        assert warm_blob == b"warm-%d" % job["seed"] and threads == 1
        f1 = zlib.crc32(f"{job['algo']}{job['seed']}".encode()) % 1000 / 1000
        tokens = 100 * (job["seed"] + 1) + len(job["algo"])
        return {"test": {"f1": f1, "memory_size": 1.0}, "generated_tokens": tokens, "curve": [(0, 0.0), (tokens, f1)],
                "validation": [], "wall_s": float(len(calls["runs"])), "step_s": [1.0], "run_dir": out}

    monkeypatch.setattr(sweep, "execute_warm_start", warm)
    monkeypatch.setattr(sweep, "execute_run", run)
    return calls


def _table(out: Path) -> list[dict]:
    rows = list(csv.DictReader(open(out / "results.csv")))
    return [{k: v for k, v in r.items() if k not in sweep.TIME_COLUMNS} for r in rows]


def test_a_killed_sweep_resumes_with_the_unfinished_runs_only(tmp_path, fake_jobs):
    spec = parse_spec(_spec(axes={"algo": ["logo-grpo", "grpo"], "seed": [0, 1]}, report={"equal_budget": True}))
    whole = tmp_path / "whole"
    sweep.run_sweep(spec, whole, local=True, log=lambda s: None)
    assert fake_jobs["warm"] == [0, 1]  # one warm start per seed, shared by both algorithms
    fake_jobs.update(runs=[], warm=[], kill_after=2)
    out = tmp_path / "killed"
    with pytest.raises(Killed):
        sweep.run_sweep(spec, out, local=True, log=lambda s: None)
    first = list(fake_jobs["runs"])
    assert sorted(p.stem for p in (out / "results").glob("*.json")) == sorted(first) and len(first) == 2
    # The table of what finished is written after every run, so a killed sweep leaves it.
    assert "2 of 4 runs have not finished" in (out / "results.md").read_text()
    (out / "results" / ".algo-grpo_seed-0.json.x1.tmp").write_text("{")  # a result write cut short by the kill
    assert len(list((out / "warm_starts").glob("*.tar.gz"))) == 2  # both seeds' warm starts were saved by then

    fake_jobs.update(runs=[], warm=[], kill_after=None)
    sweep.run_sweep(spec, out, local=True, log=lambda s: None)
    assert sorted(fake_jobs["runs"]) == sorted(r.name for r in spec.runs if r.name not in first)
    assert fake_jobs["warm"] == []  # the saved warm starts are reused
    assert _table(out) == _table(whole)
    assert (out / "runs.csv").read_text().count("\n") == 5
    # Nothing left to do: a third call runs nothing and writes the same table.
    fake_jobs.update(runs=[])
    (out / "results.csv").unlink()
    sweep.run_sweep(spec, out, local=True, log=lambda s: None)
    assert fake_jobs["runs"] == [] and _table(out) == _table(whole)


def test_report_writes_the_table_of_the_finished_runs_and_runs_nothing(tmp_path, fake_jobs, capsys):
    from agents.cli import main

    spec_path = tmp_path / "spec.toml"
    spec_path.write_text('[sweep]\npreset = "smoke"\n[axes]\nalgo = ["logo-grpo", "grpo"]\nseed = [0, 1]\n')
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match="no run of .* has finished"):
        main(["sweep", str(spec_path), "--out", str(out), "--report"])
    fake_jobs["kill_after"] = 3
    with pytest.raises(Killed):
        sweep.run_sweep(sweep.load_spec(spec_path), out, local=True, log=lambda s: None)
    (out / "results.md").unlink()
    fake_jobs.update(runs=[], kill_after=None)
    assert main(["sweep", str(spec_path), "--out", str(out), "--report"]) == 0
    assert fake_jobs["runs"] == [] and "3 of 4 runs finished" in capsys.readouterr().out
    md = (out / "results.md").read_text()
    assert "1 of 4 runs have not finished: algo-grpo_seed-1" in md and len(_table(out)) == 2


def test_a_failed_run_is_reported_and_retried_next_time(tmp_path, fake_jobs, capsys):
    spec = parse_spec(_spec())
    fake_jobs["fail"] = {"algo-grpo_seed-1"}
    done = sweep.run_sweep(spec, tmp_path, local=True)
    assert sorted(done) == sorted(r.name for r in spec.runs if r.name != "algo-grpo_seed-1")
    log = capsys.readouterr().out
    assert "run algo-grpo_seed-1 FAILED: RuntimeError: out of memory" in log and "run the same command again" in log
    fake_jobs.update(fail=set(), runs=[])
    assert len(sweep.run_sweep(spec, tmp_path, local=True)) == 4 and fake_jobs["runs"] == ["algo-grpo_seed-1"]


def test_a_directory_holding_other_settings_is_refused(tmp_path, fake_jobs):
    sweep.run_sweep(parse_spec(_spec()), tmp_path, local=True, log=lambda s: None)
    changed = parse_spec(_spec(settings={"lr": 0.5}))
    with pytest.raises(SpecError, match="holds run 'algo-logo-grpo_seed-0' with other settings"):
        sweep.run_sweep(changed, tmp_path, local=True, log=lambda s: None)


class _FakeTrain:
    """Stands in for ``train``: records where and how it was called, writes a metrics file."""

    def __init__(self):
        self.calls = []

    def __call__(self, preset, *, out, algo, model_path, seed, device, progress, preset_name, resume, backend):
        out = Path(out)
        self.calls.append({"out": out, "resume": resume, "backend": backend, "files": sorted(p.name for p in out.iterdir())})
        assert (out / "warm_start" / "config.json").read_text() == "{}"  # the shared warm start, unpacked
        with open(out / "metrics.jsonl", "a") as f:
            f.write('{"time/step_s": 2.0, "global/groups": 4, "global/zero_variance_groups": 1, "local/groups": 0}\n'
                    '{"val/f1": 0.1}\n'
                    '{"time/step_s": 4.0, "global/groups": 4, "global/zero_variance_groups": 2, "local/groups": 0}\n')
        return {"test": {"f1": 0.5, "memory_size": 3.0}, "generated_tokens": 77, "elapsed_s": 12.5,
                "validation": [{"train_generated_tokens": 77, "f1": 0.25}]}


@pytest.fixture
def one_run(tmp_path, monkeypatch):
    """A run of the smoke spec about to execute in ``tmp_path/runs``, with ``train`` faked."""
    import agents.commands.train as train_module

    fake = _FakeTrain()
    monkeypatch.setattr(train_module, "train", fake)
    monkeypatch.setattr(sweep, "_start_f1", lambda *a: 0.125)
    warm = tmp_path / "warm"
    warm.mkdir()
    (warm / "config.json").write_text("{}")
    spec = parse_spec(_spec())
    preset, job = sweep.resolve(spec, spec.runs[0])
    runs = tmp_path / "runs"
    runs.mkdir()
    settings = train_module.run_settings(preset, preset_name="sweep-smoke", algo=job["algo"], seed=job["seed"], model_path=None)

    def execute(start_point=False):
        return sweep.execute_run(preset, job, str(runs / "a"), sweep._pack_dir(warm), 1, "sweep-smoke", start_point)

    def attempt(name, *, config=settings, checkpoint_step=None):
        """A directory a killed attempt left behind."""
        d = runs / f".a.attempt-{name}"
        d.mkdir()
        if config is not None:
            (d / "config.json").write_text(json.dumps(config))
        if checkpoint_step is not None:
            ck = d / "checkpoints" / f"checkpoint-{checkpoint_step}"
            ck.mkdir(parents=True)
            (ck / "trainer_state.json").write_text("{}")
        return d

    return fake, runs, execute, attempt, settings


def test_a_run_trains_in_its_own_attempt_directory_and_lands_at_its_name(one_run):
    """Leftovers of a killed attempt that cannot be resumed never mix with the run that
    replaces it: each attempt has its own directory, renamed when it finishes."""
    fake, runs, execute, attempt, settings = one_run
    (runs / "a").mkdir()
    (runs / "a" / "old.txt").write_text("from a killed sweep")
    attempt("no-checkpoint")
    attempt("other-settings", config={**settings, "lr": 0.5}, checkpoint_step=3)
    (attempt("config-cut-short", config=None, checkpoint_step=3) / "config.json").write_text('{"preset": "sw')
    result = execute()
    [call] = fake.calls
    assert call["out"].name.startswith(".a.attempt-") and call["out"].parent == runs and not call["resume"]
    assert call["backend"] == "hf"  # the spec names none
    assert call["files"] == [".attempt.lock", "warm_start"]  # a fresh directory
    assert sorted(p.name for p in runs.iterdir()) == ["a"]
    assert sorted(p.name for p in (runs / "a").iterdir()) == ["metrics.jsonl", "warm_start"]  # no lock file left
    assert result["step_s"] == [2.0, 4.0] and result["curve"] == [(77, 0.25)] and result["run_dir"] == str(runs / "a")
    assert result["wall_s"] == 12.5 and result["resumed_from"] is None
    # 3 of 8 global groups had equal rewards; GRPO made no local groups, so no share for them.
    assert result["zero_var_global"] == 3 / 8 and math.isnan(result["zero_var_local"])


def test_a_killed_attempt_with_a_checkpoint_is_resumed(one_run):
    """A sweep killed mid-run loses at most the unfinished step: the next attempt continues in
    the killed attempt's directory from its furthest checkpoint (train(resume=True)), keeps its
    starting point's F1 instead of measuring it again, and clears the other leftovers."""
    fake, runs, execute, attempt, settings = one_run
    behind = attempt("behind", checkpoint_step=2)
    ahead = attempt("ahead", checkpoint_step=5)
    (ahead / "start_f1.json").write_text('{"f1": 0.375}')
    (ahead / "metrics.jsonl").write_text('{"time/step_s": 1.0, "global/groups": 4, "global/zero_variance_groups": 0}\n')
    result = execute(start_point=True)
    [call] = fake.calls
    assert call["out"] == ahead and call["resume"]
    assert not behind.exists() and sorted(p.name for p in runs.iterdir()) == ["a"]
    assert result["resumed_from"] == 5
    assert result["curve"] == [(0, 0.375), (77, 0.25)]
    assert result["step_s"] == [1.0, 2.0, 4.0]  # the killed attempt's steps count
    assert json.loads((runs / "a" / "start_f1.json").read_text()) == {"f1": 0.375}


def test_an_attempt_another_process_holds_is_left_alone(one_run, monkeypatch):
    """A worker of a killed sweep may still be writing its attempt: while it holds the lock,
    the new attempt neither resumes nor deletes that directory."""
    import fcntl

    fake, runs, execute, attempt, settings = one_run
    monkeypatch.setattr(sweep, "_STALE_WAIT_S", 0.2)
    live = attempt("live", checkpoint_step=4)
    with open(live / ".attempt.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = execute(start_point=True)
        [call] = fake.calls
        assert call["out"] != live and not call["resume"] and result["resumed_from"] is None
        assert result["curve"][0] == (0, 0.125)  # measured afresh
        assert (live / "checkpoints" / "checkpoint-4" / "trainer_state.json").exists()
    assert sorted(p.name for p in runs.iterdir()) == [".a.attempt-live", "a"]


# ----------------------------------------------------------------------------- the command line


def _memr2(*args, env=None, timeout=180):
    return subprocess.run([sys.executable, "-m", "agents.cli", "sweep", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=ROOT)


def test_bad_input_fails_before_any_run(tmp_path):
    out = tmp_path / "out"
    spec = tmp_path / "spec.toml"
    spec.write_text('[sweep]\npreset = "smoke"\n[axes]\nseed = []\n')
    done = _memr2(spec, "--out", out)
    assert done.returncode != 0 and "axis 'seed' is empty" in done.stderr and not out.exists()
    spec.write_text('[settings]\nsteps = 3\n')
    done = _memr2(spec, "--out", out)
    assert done.returncode != 0 and "unknown setting 'steps'" in done.stderr and not out.exists()
    done = _memr2(tmp_path / "missing.toml", "--out", out)
    assert done.returncode != 0 and "cannot read" in done.stderr
    spec.write_text('[axes]\nalgo = ["grpo", "logo-grpo"]\n')
    done = _memr2(spec, "--out", out, "--dry-run")
    assert done.returncode == 0 and "todo  algo-grpo" in done.stdout and "2 runs, 0 finished" in done.stdout
    assert not out.exists()
    done = _memr2(spec, "--out", out, "--local", "--ray-address", "127.0.0.1:9")
    assert done.returncode != 0 and "--local runs without Ray" in done.stderr and not out.exists()
    # vLLM allows one engine per process, and --local runs every run in this one
    spec.write_text('[settings]\nbackend = "vllm"\n[axes]\nalgo = ["grpo", "logo-grpo"]\n')
    done = _memr2(spec, "--out", out, "--local")
    assert done.returncode != 0 and "2 runs would sample with vLLM (algo-grpo, algo-logo-grpo)" in done.stderr
    assert not out.exists()


def test_local_backend_check_counts_only_the_runs_left_and_auto_only_with_vllm(monkeypatch):
    import importlib.util

    spec = parse_spec(_spec(settings={"backend": "auto"}, axes={"seed": [0, 1]}))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    sweep.check_local_backends(spec, {})  # auto without vLLM: the HF backend, any number of runs
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "vllm" else real(name, *a))
    with pytest.raises(SpecError, match="2 runs would sample with vLLM"):
        sweep.check_local_backends(spec, {})
    sweep.check_local_backends(spec, {spec.runs[0].name: {}})  # one left: one engine
    sweep.check_local_backends(parse_spec(_spec(axes={"seed": [0, 1]})), {})  # hf, the default


def _one_run_spec(tmp_path):
    spec = tmp_path / "spec.toml"
    spec.write_text('[sweep]\npreset = "smoke"\n[axes]\nseed = [0]\n')
    return spec


def test_a_sweep_without_ray_fails_before_any_run(tmp_path):
    spec, out = _one_run_spec(tmp_path), tmp_path / "out"
    blocker = tmp_path / "noray"
    blocker.mkdir()
    (blocker / "ray.py").write_text("raise ModuleNotFoundError('No module named ray (blocked by the test)')\n")
    env = {**os.environ, "PYTHONPATH": f"{blocker}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    for extra in ([], ["--ray-address", "127.0.0.1:9"]):
        done = _memr2(spec, "--out", out, *extra, env=env)
        assert done.returncode != 0 and 'memr2 sweep needs Ray' in done.stderr and 'pip install -e ".[ray]"' in done.stderr
        assert "--local" in done.stderr and not out.exists()


def test_an_unreachable_cluster_fails_before_any_run(tmp_path):
    pytest.importorskip("ray")
    spec, out = _one_run_spec(tmp_path), tmp_path / "out"
    t0 = time.perf_counter()
    done = _memr2(spec, "--out", out, "--ray-address", "127.0.0.1:9")
    assert done.returncode != 0 and "cannot reach a Ray cluster at '127.0.0.1:9'" in done.stderr and not out.exists()
    assert time.perf_counter() - t0 < 60


def test_a_run_too_big_for_the_cluster_fails_before_any_run(tmp_path):
    pytest.importorskip("ray")
    spec = tmp_path / "spec.toml"
    spec.write_text('[sweep]\npreset = "smoke"\n[resources]\ncpus = 512\n[axes]\nseed = [0]\n')
    done = _memr2(spec, "--out", tmp_path / "out")
    assert done.returncode != 0 and "each run asks for 512 CPUs" in done.stderr and not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- the demonstration (Ray, real runs)

DEMO_SPEC = """
# The smoke preset made smaller still: a short warm start, one stage of two steps, one test conversation.
[sweep]
preset = "smoke"
[resources]
cpus = 1
[settings]
sft_steps = 8
sft_probes = 2
sft_tasks = 2
max_new_tokens = 48
stages = "2:2"
n_test = 1
[axes]
algo = ["logo-grpo", "grpo"]
seed = [0, 1]
"""


def _sweep_proc(spec: Path, out: Path) -> subprocess.Popen:
    # Its own session, so that the kill takes the local Ray instance and its workers along.
    return subprocess.Popen([sys.executable, "-m", "agents.cli", "sweep", str(spec), "--out", str(out)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _per_run(out: Path) -> dict:
    rows = {}
    for path in sorted((out / "results").glob("*.json")):
        res = json.loads(path.read_text())
        rows[path.stem] = (res["test"], res["generated_tokens"], res["curve"], res["validation"])
    return rows


@pytest.mark.slow
def test_a_sweep_killed_half_way_resumes_to_the_uninterrupted_table(tmp_path):
    """The issue's demonstration: the smoke preset, 2 algos x 2 seeds, as Ray tasks on a local
    instance; killed (SIGKILL, driver and Ray together) once a run has finished and another has
    checkpointed its first step, then resumed: it runs only the rest, continues the checkpointed
    run from its checkpoint, and ends with the table of a sweep that was never killed."""
    pytest.importorskip("ray")
    spec = tmp_path / "demo.toml"
    spec.write_text(DEMO_SPEC)
    whole = tmp_path / "whole"
    proc = _sweep_proc(spec, whole)
    log = proc.communicate(timeout=1200)[0]
    assert proc.returncode == 0, log

    out = tmp_path / "killed"
    proc = _sweep_proc(spec, out)
    deadline = time.time() + 1200

    def under_way_with_a_checkpoint():
        states = (out / "runs").glob(".*.attempt-*/checkpoints/checkpoint-1/trainer_state.json")
        return {p.parents[2].name.split(".attempt-")[0][1:] for p in states}

    while not (list((out / "results").glob("*.json")) and under_way_with_a_checkpoint()):
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, "no run finished and another checkpointed in 20 minutes"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = sorted(p.stem for p in (out / "results").glob("*.json"))
    checkpointed = under_way_with_a_checkpoint() - set(finished)
    assert 1 <= len(finished) < 4 and checkpointed, (finished, checkpointed)

    proc = _sweep_proc(spec, out)
    log = proc.communicate(timeout=1200)[0]
    assert proc.returncode == 0, log
    assert f"4 runs, {len(finished)} already finished" in log
    for name in finished:
        assert f"] {name}:" not in log  # not run again
    for name in checkpointed:  # continued from its step-1 checkpoint, not started over
        assert json.loads((out / "results" / f"{name}.json").read_text())["resumed_from"] >= 1, name
    assert _per_run(out) == _per_run(whole)
    assert _table(out) == _table(whole)
    assert [r["algo"] for r in _table(out)] == ["logo-grpo", "grpo"] and all(r["seeds"] == "2" for r in _table(out))

"""``memr2 sweep SPEC.toml --out DIR``: a grid of training runs as Ray tasks, and one table.

A spec (TOML) names a preset, fixed settings, and axes; every combination of the axes' values
is one run of ``memr2 train``'s job (:func:`agents.commands.train.train`)::

    [sweep]
    preset = "smoke"                 # the base preset (memr2 train --preset)
    run_name = "{algo}-s{seed}"      # optional; default: every axis, "algo-grpo_seed-0"

    [resources]                      # per run: Ray logical CPUs (= torch threads) and GPUs
    cpus = 1
    gpus = 0

    [settings]                       # every run: TrainPreset fields, algo, seed, curriculum, model, device, backend
    sft_steps = 10

    [axes]                           # one run per combination
    algo = ["logo-grpo", "grpo"]
    seed = [0, 1]

    [[exclude]]                      # optional, repeatable: drop the runs that match every key
    algo = "grpo"
    seed = 1

    [report]
    equal_budget = false             # also read held-out F1 at an equal budget of generated tokens

    [quick.settings]                 # memr2 sweep --quick: these tables replace keys of the ones above
    n_test = 1

A setting whose type allows None (``local_max_questions``, ``rollout_batch``...) takes the string
``"none"`` for it, as TOML has no null.

Each run is a Ray task with the spec's resources (``--local`` runs them one after another in
this process instead, for debugging). Runs that share a warm start (same seed and warm-start
settings; only RL settings, algo and curriculum differ) share one: it is computed once, as
its own task, saved under ``DIR/warm_starts/`` and shipped to the runs through the object
store. A run is finished when ``DIR/results/<name>.json`` exists; the driver writes it
atomically when the run's task returns, so a sweep killed at any point resumes with
``memr2 sweep`` again: finished runs are skipped, and an unfinished one continues from its last
checkpoint (every update step writes one, so at most a step is redone; a run with no
checkpoint yet starts over from its warm start). The table (``DIR/results.md``, ``DIR/results.csv``, per run ``DIR/runs.csv``) gives,
per configuration (the runs that differ only in ``seed``), the mean and 95% CI over seeds;
``DIR/results.png`` plots it. Under it (and in ``DIR/paired.csv``), every two configurations'
test F1 difference paired by seed and test conversation, with a bootstrap CI over
conversations, and (for a grid of two axes or more) each axis's main effect: its values compared
with the other axes pooled. Run directories (checkpoints, metrics) are ``DIR/runs/<name>/``
on the node that ran them (each attempt trains in ``DIR/runs/.<name>.attempt-*``, locked while
it runs, and is renamed when it finishes; resuming needs the killed attempt's directory, so a
run resumes only on a node that shares the sweep directory with the one that ran it).

Every spec error (an unknown setting, an empty axis, a duplicate run name...), a missing Ray
and an unreachable ``--ray-address`` are reported before any run starts.
"""

from __future__ import annotations

import argparse
import csv
import difflib
import io
import itertools
import json
import math
import os
import re
import shutil
import tarfile
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from agents.presets import PRESETS, TrainPreset, without_curriculum
from agents.rl.curriculum import parse_stages

__all__ = [
    "add_arguments", "run", "SpecError", "SweepSpec", "RunSpec", "load_spec", "parse_spec", "run_sweep",
    "mean_ci", "t_quantile_975", "f1_at", "bootstrap_ci", "paired_differences", "main_effects", "write_report", "ALGOS",
]

ALGOS = ("logo-grpo", "grpo")
RUN_SETTINGS = {
    "algo": "trainer: logo-grpo or grpo",
    "seed": "run seed (tasks, sampling, model); the axis the table averages over",
    "curriculum": "false: all steps at the last stage's horizon (memr2 train --no-curriculum)",
    "model": "a local checkpoint or known model name to train as is, without a warm start",
    "device": "torch device (cpu, cuda)",
    "backend": "rollout sampler: hf (default), vllm or auto (memr2 train --backend)",
}
BACKENDS = ("hf", "vllm", "auto")
PRESET_SETTINGS = {f.name: f.type for f in fields(TrainPreset)}
SETTINGS = sorted([*RUN_SETTINGS, *PRESET_SETTINGS])
TABLES = {
    "sweep": {"preset", "run_name"},
    "resources": {"cpus", "gpus"},
    "settings": None,  # checked against SETTINGS
    "axes": None,
    "report": {"equal_budget"},
}
# TrainPreset fields the warm start reads (agents.commands.sft.warm_start, teacher_examples and
# make_env_fn); runs that agree on these, the seed, the device and the model share one.
WARM_START_FIELDS = (
    "dtype", "max_new_tokens", "model", "prompt_style", "sft_batch", "sft_lr", "sft_probes", "sft_steps", "sft_tasks",
    "teacher_noise", "tiny_hidden", "tiny_layers", "tiny_heads", "n_val", "slices_per_session", "turns_per_session",
)


class SpecError(ValueError):
    """A sweep spec that cannot run: the message says what is wrong and where."""


# ----------------------------------------------------------------------------- the spec


@dataclass(frozen=True)
class RunSpec:
    """One run of the grid."""

    name: str
    values: dict[str, Any]
    """The axis values of this run, in axis order."""
    settings: dict[str, Any]
    """Every setting of the run: fixed settings and axis values, as written in the spec."""

    @property
    def seed(self) -> int:
        return int(self.settings.get("seed", 0))

    @property
    def config(self) -> tuple:
        """The configuration: the axis values other than the seed."""
        return tuple((k, _hashable(v)) for k, v in self.values.items() if k != "seed")


@dataclass(frozen=True)
class SweepSpec:
    path: str
    preset: str
    settings: dict[str, Any]
    axes: dict[str, list]
    cpus: float = 1
    gpus: float = 0
    equal_budget: bool = False
    run_name: str | None = None
    runs: list[RunSpec] = field(default_factory=list)

    @property
    def config_axes(self) -> list[str]:
        return [a for a in self.axes if a != "seed"]


def load_spec(path: str | Path, *, quick: bool = False) -> SweepSpec:
    """Read and check a spec file; raises :class:`SpecError` on any problem."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib
        except ImportError as err:
            raise SpecError("reading a sweep spec needs Python 3.11 (tomllib) or pip install tomli") from err
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise SpecError(f"cannot read {path}: {err.strerror}") from err
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise SpecError(f"{path} is not valid TOML: {err}") from err
    return parse_spec(data, path=str(path), quick=quick)


def parse_spec(data: dict[str, Any], *, path: str = "<spec>", quick: bool = False) -> SweepSpec:
    """Check a spec's tables (as :mod:`tomllib` reads them) and expand its grid."""
    data = dict(data)
    variant = data.pop("quick", None)
    if quick:
        if variant is None:
            raise SpecError(f"{path}: --quick needs a [quick] table in the spec")
        if not isinstance(variant, dict):
            raise SpecError(f"{path}: [quick] must be a table")
        for table, over in variant.items():
            if table not in TABLES:
                raise SpecError(f"{path}: unknown table [quick.{table}]; known: {', '.join(TABLES)}")
            if not isinstance(over, dict):
                raise SpecError(f"{path}: [quick.{table}] must be a table")
            data[table] = {**data.get(table, {}), **over}
    exclude = data.pop("exclude", [])
    for table, value in data.items():
        if table not in TABLES:
            raise SpecError(f"{path}: unknown table [{table}]{_suggest(table, list(TABLES))}; known: {', '.join(TABLES)}, quick")
        if not isinstance(value, dict):
            raise SpecError(f"{path}: {table} must be a table ([{table}])")
        allowed = TABLES[table]
        if allowed is not None:
            for key in value:
                if key not in allowed:
                    raise SpecError(f"{path}: unknown key {key!r} in [{table}]{_suggest(key, sorted(allowed))}; known: {', '.join(sorted(allowed))}")

    head = data.get("sweep", {})
    preset = head.get("preset", "tiny")
    if preset not in PRESETS:
        raise SpecError(f"{path}: unknown preset {preset!r} in [sweep]; known: {', '.join(sorted(PRESETS))}")
    run_name = head.get("run_name")
    if run_name is not None and not isinstance(run_name, str):
        raise SpecError(f"{path}: [sweep] run_name must be a string, e.g. \"{{algo}}-s{{seed}}\"")

    res = data.get("resources", {})
    cpus, gpus = res.get("cpus", 1), res.get("gpus", 0)
    for key, value, low in (("cpus", cpus, 1), ("gpus", gpus, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < low:
            raise SpecError(f"{path}: [resources] {key} must be a number >= {low}, got {value!r}")
    equal_budget = data.get("report", {}).get("equal_budget", False)
    if not isinstance(equal_budget, bool):
        raise SpecError(f"{path}: [report] equal_budget must be true or false, got {equal_budget!r}")

    settings = dict(data.get("settings", {}))
    for key, value in settings.items():
        _check_setting(path, "settings", key, value)
    axes: dict[str, list] = {}
    for key, values in data.get("axes", {}).items():
        if not isinstance(values, list):
            raise SpecError(f"{path}: axis {key!r} must be a list of values, e.g. {key} = [...], got {values!r}")
        if not values:
            raise SpecError(f"{path}: axis {key!r} is empty: give it at least one value or remove it")
        if key in settings:
            raise SpecError(f"{path}: {key!r} is both a fixed setting and an axis; keep one")
        for value in values:
            _check_setting(path, "axes", key, value)
        axes[key] = values
    if not isinstance(exclude, list) or not all(isinstance(e, dict) and e for e in exclude):
        raise SpecError(f"{path}: exclude must be a list of tables ([[exclude]] with axis = value lines)")
    for entry in exclude:
        for key, value in entry.items():
            if key not in axes:
                raise SpecError(f"{path}: [[exclude]] names {key!r}, which is not an axis; axes: {', '.join(axes)}")
            if value not in axes[key] and not quick:  # --quick may have cut the value from its axis
                raise SpecError(f"{path}: [[exclude]] {key} = {value!r} is not a value of that axis: {axes[key]!r}")
    spec = SweepSpec(path=path, preset=preset, settings=settings, axes=axes, cpus=cpus, gpus=gpus,
                     equal_budget=equal_budget, run_name=run_name)
    runs = expand(spec)
    for entry in exclude:  # like a CI matrix's exclude: drop the combinations that match every key
        kept = [r for r in runs if any(r.values[k] != v for k, v in entry.items())]
        if len(kept) == len(runs) and not quick:
            raise SpecError(f"{path}: [[exclude]] {entry!r} matches no run")
        runs = kept
    seen: dict[str, RunSpec] = {}
    for r in runs:
        if r.name in seen:
            raise SpecError(
                f"{path}: duplicate run name {r.name!r}: {_describe(seen[r.name].values)} and {_describe(r.values)}"
                + (" (the run_name template must tell every run apart)" if run_name else " (an axis repeats a value)")
            )
        seen[r.name] = r
        try:
            resolve(spec, r)
        except (ValueError, TypeError) as err:
            raise SpecError(f"{path}: run {r.name!r}: {err}") from err
    return replace(spec, runs=runs)


def expand(spec: SweepSpec) -> list[RunSpec]:
    """Every combination of the axes' values (the last axis varies fastest), named."""
    names = list(spec.axes)
    runs = []
    for combo in itertools.product(*(spec.axes[a] for a in names)):
        values = dict(zip(names, combo))
        runs.append(RunSpec(name=_run_name(spec, values), values=values, settings={**spec.settings, **values}))
    return runs


def _run_name(spec: SweepSpec, values: dict[str, Any]) -> str:
    if not values:
        return "run"
    slugs = {k: _slug(v) for k, v in values.items()}
    if spec.run_name is None:
        return "_".join(f"{k}-{v}" for k, v in slugs.items())
    try:
        name = spec.run_name.format(**slugs)
    except (KeyError, IndexError) as err:
        raise SpecError(f"{spec.path}: [sweep] run_name {spec.run_name!r} names {err}, which is not an axis; axes: {', '.join(values)}") from None
    except ValueError as err:
        raise SpecError(f"{spec.path}: [sweep] run_name {spec.run_name!r}: {err}") from None
    if not name or "/" in name or name in {".", ".."}:
        raise SpecError(f"{spec.path}: [sweep] run_name {spec.run_name!r} gives the bad directory name {name!r}")
    return name


def _hashable(value: Any) -> Any:
    return tuple(_hashable(v) for v in value) if isinstance(value, (list, tuple)) else value


def _slug(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "+".join(_slug(v) for v in value)
    return re.sub(r"[^A-Za-z0-9.+=-]+", "-", str(value)).strip("-") or "x"


def _describe(values: dict[str, Any]) -> str:
    return "{" + ", ".join(f"{k}={v!r}" for k, v in values.items()) + "}"


def _suggest(word: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_setting(path: str, table: str, key: str, value: Any) -> None:
    if key not in RUN_SETTINGS and key not in PRESET_SETTINGS:
        raise SpecError(
            f"{path}: unknown setting {key!r} in [{table}]{_suggest(key, SETTINGS)}; known settings: "
            f"{', '.join(RUN_SETTINGS)} and the TrainPreset fields ({', '.join(sorted(PRESET_SETTINGS))})"
        )
    try:
        _convert(key, value)
    except (ValueError, TypeError) as err:
        raise SpecError(f"{path}: [{table}] {key} = {value!r}: {err}") from None


def _convert(key: str, value: Any) -> Any:
    """A spec value as the run uses it (a Stage tuple, a float...); raises on a bad one."""
    def want_int(v):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"expected an integer, got {type(v).__name__}")
        return v

    if key == "algo":
        if value not in ALGOS:
            raise ValueError(f"expected one of {', '.join(ALGOS)}")
        return value
    if key == "seed":
        return want_int(value)
    if key == "curriculum":
        if not isinstance(value, bool):
            raise TypeError("expected true or false")
        return value
    if key == "backend":
        if value not in BACKENDS:
            raise ValueError(f"expected one of {', '.join(BACKENDS)}")
        return value
    if key in ("model", "device"):
        if not isinstance(value, str):
            raise TypeError("expected a string")
        return value
    kind = PRESET_SETTINGS[key]
    if value == "none" and "None" in kind:  # TOML has no null: "none" spells a setting's None
        return None
    if key == "stages":
        if isinstance(value, str):
            return parse_stages(value)
        if isinstance(value, list) and value and all(isinstance(s, list) and len(s) == 2 for s in value):
            return parse_stages(",".join(f"{want_int(h)}:{want_int(s)}" for h, s in value))
        raise TypeError("expected \"HORIZON:STEPS,...\" or [[horizon, steps], ...]")
    if kind == "int | tuple[int, int] | None":  # turns_per_session
        if isinstance(value, list):
            if len(value) != 2:
                raise ValueError("expected an integer or [low, high]")
            return (want_int(value[0]), want_int(value[1]))
        return want_int(value)
    if kind in ("int", "int | None"):
        return want_int(value)
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"expected a number, got {type(value).__name__}")
        return float(value)
    if kind in ("str", "str | None"):
        if not isinstance(value, str):
            raise TypeError(f"expected a string, got {type(value).__name__}")
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise TypeError("expected true or false")
        return value
    raise TypeError(f"settings of type {kind} cannot be given in a spec")  # pragma: no cover - a new field type


def resolve(spec: SweepSpec, run: RunSpec) -> tuple[TrainPreset, dict[str, Any]]:
    """The run's preset and its other train() arguments (algo, seed, model, device)."""
    preset = PRESETS[spec.preset]
    overrides = {k: _convert(k, v) for k, v in run.settings.items() if k in PRESET_SETTINGS}
    preset = replace(preset, **overrides)
    if not run.settings.get("curriculum", True):
        preset = without_curriculum(preset)
    model = run.settings.get("model")
    if model is not None and Path(model).expanduser().exists():  # a directory: absolute, as tasks may run elsewhere
        model = str(Path(model).expanduser().resolve())
    job = {
        "algo": run.settings.get("algo", "logo-grpo"), "seed": run.seed, "model": model,
        "device": run.settings.get("device", "cpu"), "backend": run.settings.get("backend", "hf"),
    }
    return preset, job


def warm_start_key(spec: SweepSpec, run: RunSpec) -> str | None:
    """Runs with the same key start from the same warm start (None: ``model`` given, no warm start)."""
    import hashlib

    preset, job = resolve(spec, run)
    if job["model"] is not None:
        return None
    from agents.commands.sft import sft_horizon

    what = {k: getattr(preset, k) for k in WARM_START_FIELDS}
    what.update(seed=job["seed"], device=job["device"], sft_horizon=sft_horizon(preset))
    digest = hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"s{job['seed']}-{digest}"


# ----------------------------------------------------------------------------- one run (a Ray task)


def _pack_dir(path: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(path, arcname=".")
    return buf.getvalue()


def _unpack_dir(blob: bytes, path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
        if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12 / 3.11.4
            tar.extractall(path, filter="data")
        else:  # pragma: no cover - older Pythons; the archive is one this sweep wrote
            tar.extractall(path)


def _set_threads(threads: int) -> int:
    import torch

    try:  # a task's log goes to the driver's terminal: no progress bars from saving and loading
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is part of the train extra
        pass

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, int(threads)))
    return before


def execute_warm_start(preset: TrainPreset, job: dict[str, Any], threads: int) -> bytes:
    """The warm start ``memr2 train`` would make for this run, as a ``.tar.gz`` of its directory."""
    from agents.commands.sft import warm_start
    from agents.policy.models import resolve_model
    from agents.presets import task_seeds

    before = _set_threads(threads)
    try:
        seeds = task_seeds(job["seed"], preset)
        base = resolve_model(preset.model) if preset.model else None
        with tempfile.TemporaryDirectory(prefix="memr2-warm-") as tmp:
            out = Path(tmp) / "warm_start"
            warm_start(out, preset, seed=job["seed"], task_seeds=seeds["sft"], eval_seeds=seeds["val"], progress=False,
                       model_path=base, device=job["device"])
            return _pack_dir(out)
    finally:
        _set_threads(before)


def execute_run(preset: TrainPreset, job: dict[str, Any], out: str, warm: bytes | None, threads: int,
                preset_name: str, start_point: bool) -> dict[str, Any]:
    """Run one grid point and return what the table needs; its directory ends up at ``out``.

    Each attempt trains in a directory of its own next to ``out`` (``.<name>.attempt-<id>``),
    holds an exclusive lock on it while it runs, and renames it to ``out`` when done. An
    attempt left by a killed sweep is taken over when its lock is free: if it has a complete
    checkpoint and the same settings, the run resumes from that checkpoint (as ``memr2 train
    --resume``, so at most the unfinished step is redone); otherwise it is removed and the run
    starts over. An attempt whose lock is still held (a worker of a killed sweep that has not
    yet noticed the end of its node) is left alone, so no two processes ever write into one
    directory."""
    from agents.commands.logging import read_metrics, summarize_training
    from agents.commands.train import run_settings, train

    final = Path(out)
    final.parent.mkdir(parents=True, exist_ok=True)
    model_path = None
    if job["model"] is not None:
        from agents.policy.models import resolve_model

        model_path = resolve_model(job["model"])
    settings = run_settings(preset, preset_name=preset_name, algo=job["algo"], seed=job["seed"], model_path=model_path)
    out_dir, lock, resumed_from = _claim_attempt(final, settings)
    try:
        if warm is not None and not (out_dir / "warm_start" / "config.json").exists():
            _unpack_dir(warm, out_dir / "warm_start")
        before = _set_threads(threads)
        try:
            start_f1 = None
            if start_point:  # held-out F1 of the starting policy: the curve's point at 0 generated tokens
                saved = out_dir / "start_f1.json"
                if saved.exists():
                    start_f1 = json.loads(saved.read_text())["f1"]
                else:
                    start_f1 = _start_f1(preset, job, out_dir, model_path)
                    _write_atomic(saved, json.dumps({"f1": start_f1}).encode())
            res = train(preset, out=out_dir, algo=job["algo"], model_path=model_path, seed=job["seed"], device=job["device"],
                        progress=False, preset_name=preset_name, resume=resumed_from is not None,
                        backend=job["backend"])
        finally:
            _set_threads(before)
        summary = summarize_training(read_metrics(out_dir / "metrics.jsonl"))
        curve = [] if start_f1 is None else [(0, start_f1)]
        curve += [(v["train_generated_tokens"], v["f1"]) for v in res["validation"]]
        (out_dir / _ATTEMPT_LOCK).unlink(missing_ok=True)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(out_dir, final)
    finally:
        lock.close()
    return {
        "test": res["test"], "generated_tokens": res["generated_tokens"], "curve": curve,
        "validation": res["validation"], "wall_s": res["elapsed_s"], "step_s": summary["step_s"], "run_dir": str(final),
        "zero_var_global": summary["zero_var_global"], "zero_var_local": summary["zero_var_local"],
        "resumed_from": resumed_from,
    }


_ATTEMPT_LOCK = ".attempt.lock"


def _lock(directory: Path, wait_s: float = 0.0):
    """An exclusive ``flock`` on ``directory`` (the open lock file; closing it unlocks), or
    ``None`` if another process still holds it after ``wait_s`` seconds. The lock dies with its
    process, so a killed attempt's directory is free at once."""
    import fcntl

    deadline = time.monotonic() + wait_s
    f = open(directory / _ATTEMPT_LOCK, "a")
    while True:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return f
        except BlockingIOError:
            if time.monotonic() >= deadline:
                f.close()
                return None
            time.sleep(0.5)


_STALE_WAIT_S = 30.0  # how long an earlier attempt's lock may take to free (its worker to die)


def _claim_attempt(final: Path, settings: dict[str, Any]):
    """The locked directory this attempt of run ``final`` trains in, its lock, and the step of
    the checkpoint it resumes from (``None``: a fresh start).

    Of the earlier attempts whose lock frees within ``_STALE_WAIT_S`` seconds, the one with the
    furthest complete checkpoint made with ``settings`` is kept and resumed; the rest are
    removed. Attempts still locked are left alone."""
    import uuid

    from agents.commands.checkpoint import checkpoint_step, latest_checkpoint

    best: tuple[int, Path, Any] | None = None
    for stale in sorted(final.parent.glob(f".{final.name}.attempt-*")):
        lock = _lock(stale, _STALE_WAIT_S)
        if lock is None:
            continue
        last = latest_checkpoint(stale / "checkpoints")
        try:
            same = json.loads((stale / "config.json").read_text()) == settings
        except (OSError, ValueError):  # none yet, or cut short by the kill
            same = False
        if last is not None and same:
            step = checkpoint_step(last)
            if best is None or step > best[0]:
                if best is not None:
                    _discard(best[1], best[2])
                best = (step, stale, lock)
                continue
        _discard(stale, lock)
    if best is not None:
        return best[1], best[2], best[0]
    out_dir = final.parent / f".{final.name}.attempt-{uuid.uuid4().hex[:8]}"
    out_dir.mkdir()
    return out_dir, _lock(out_dir), None


def _discard(directory: Path, lock) -> None:
    shutil.rmtree(directory, ignore_errors=True)
    lock.close()


def _start_f1(preset, job, out_dir: Path, model_path) -> float:
    """Held-out F1 of the policy the run starts from, at its first horizon, as training validates."""
    from agents.commands.sft import warm_start
    from agents.policy import SharedPolicy
    from agents.policy.models import resolve_model
    from agents.presets import make_env_fn, task_seeds
    from agents.rl.curriculum import validate

    seeds = task_seeds(job["seed"], preset)
    start = model_path or out_dir / "warm_start"
    if model_path is None and not (start / "config.json").exists():  # no shared warm start given: make it now
        base = resolve_model(preset.model) if preset.model else None
        warm_start(start, preset, seed=job["seed"], task_seeds=seeds["sft"], eval_seeds=seeds["val"], progress=False,
                   model_path=base, device=job["device"])
    policy = SharedPolicy.from_pretrained(start, device=job["device"], prompt_style=preset.prompt_style, dtype=preset.dtype)
    env_fn = make_env_fn(preset, preset.stages[0].horizon, seeds["val"])
    return validate(policy, env_fn, range(len(seeds["val"])), max_new_tokens=preset.max_new_tokens, max_batch=preset.rollout_batch)["f1"]


# ----------------------------------------------------------------------------- the sweep


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def result_path(out: Path, run: RunSpec) -> Path:
    return Path(out) / "results" / f"{run.name}.json"


def finished_runs(spec: SweepSpec, out: Path) -> dict[str, dict]:
    """The runs of ``spec`` already finished in ``out``. A finished run with other settings
    than the spec gives it is an error (the spec changed under the same directory)."""
    done = {}
    for r in spec.runs:
        path = result_path(out, r)
        if not path.exists():
            continue
        result = json.loads(path.read_text())
        want = {"preset": spec.preset, "settings": _jsonable(r.settings), "equal_budget": spec.equal_budget}
        got = {k: result.get(k) for k in want}
        if got != want:
            raise SpecError(
                f"{path} holds run {r.name!r} with other settings ({got}) than {spec.path} gives it ({want}); "
                "use another --out, or delete that file to run it again"
            )
        done[r.name] = result
    return done


def _jsonable(obj):
    return json.loads(json.dumps(obj))


def check_local_backends(spec: SweepSpec, done: dict[str, dict]) -> None:
    """Raise :class:`SpecError` if ``--local`` would build more than one vLLM engine in this process
    (runs left to do whose ``backend`` is ``vllm``, or ``auto`` with vLLM installed): vLLM keeps one
    engine per process (docs/training.md), and each run builds its own. Under Ray each run gets a
    worker process of its own."""
    import importlib.util

    have_vllm = importlib.util.find_spec("vllm") is not None
    engines = [r.name for r in spec.runs if r.name not in done
               and (r.settings.get("backend", "hf") == "vllm" or (r.settings.get("backend") == "auto" and have_vllm))]
    if len(engines) > 1:
        raise SpecError(f"{spec.path}: --local runs every run in this process, and vLLM allows one engine per process; "
                        f"{len(engines)} runs would sample with vLLM ({', '.join(engines[:3])}{', ...' if len(engines) > 3 else ''}). "
                        "Run them as Ray tasks (drop --local) or with backend = \"hf\"")


def run_sweep(spec: SweepSpec, out: str | Path, *, local: bool = False, ray=None, log: Callable[[str], Any] = print) -> dict[str, dict]:
    """Run every unfinished run of ``spec`` into ``out`` and write the report (again after every
    finished run, so that a sweep stopped early leaves the table of what finished).

    ``local``: one after another in this process; otherwise as Ray tasks (``ray``: the
    initialised Ray module). Returns the results by run name. Failed runs are reported and
    leave no results file, so the next ``memr2 sweep`` runs them again.
    """
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    done = finished_runs(spec, out)
    todo = [r for r in spec.runs if r.name not in done]
    log(f"sweep {spec.path}: {len(spec.runs)} runs, {len(done)} already finished in {out}, {len(todo)} to run"
        + ("" if local else f" as Ray tasks ({spec.cpus:g} CPU, {spec.gpus:g} GPU each)"))
    resolved = {r.name: resolve(spec, r) for r in todo}
    warm_keys = {r.name: warm_start_key(spec, r) for r in todo}
    warm_dir = out / "warm_starts"
    failures: dict[str, str] = {}
    finished_now: list[str] = []

    def finish(r: RunSpec, result: dict) -> None:
        record = {"name": r.name, "preset": spec.preset, "settings": _jsonable(r.settings), "equal_budget": spec.equal_budget,
                  "values": _jsonable(r.values), **result}
        _write_atomic(result_path(out, r), json.dumps(record, indent=2).encode())
        done[r.name] = record
        finished_now.append(r.name)
        log(f"[{len(done)}/{len(spec.runs)}] {r.name}: test F1 {result['test']['f1']:.3f}, "
            f"{result['generated_tokens']:,} tokens, {result['wall_s']:.0f} s")
        write_report(spec, out, done)  # kept current: a sweep stopped early leaves the table so far

    threads = max(1, int(spec.cpus))
    if local:
        warm_blobs: dict[str, bytes] = {}
        for r in todo:
            preset, job = resolved[r.name]
            key = warm_keys[r.name]
            try:
                if key is not None and key not in warm_blobs:
                    path = warm_dir / f"{key}.tar.gz"
                    if not path.exists():
                        log(f"warm start {key} (for {r.name} and the runs that share it)")
                        _write_atomic(path, execute_warm_start(preset, job, threads))
                    warm_blobs[key] = path.read_bytes()
                result = execute_run(preset, job, str(out / "runs" / r.name), warm_blobs.get(key), threads,
                                     f"sweep-{spec.preset}", spec.equal_budget)
            except Exception as err:  # noqa: BLE001 - one failed run does not stop the others
                failures[r.name] = f"{type(err).__name__}: {err}"
                log(f"run {r.name} FAILED: {failures[r.name]}")
                continue
            finish(r, result)
    else:
        options = {"num_cpus": spec.cpus, "num_gpus": spec.gpus, "max_retries": 0}
        warm_task = ray.remote(**options)(execute_warm_start)
        # a fresh worker process per run: a vLLM engine is one per process, and a run's memory goes with it
        run_task = ray.remote(**options, max_calls=1)(execute_run)
        warm_refs: dict[str, Any] = {}
        pending: dict[Any, tuple[str, Any]] = {}
        for r in todo:
            key = warm_keys[r.name]
            if key is not None and key not in warm_refs:
                path = warm_dir / f"{key}.tar.gz"
                if path.exists():
                    warm_refs[key] = ray.put(path.read_bytes())
                else:
                    preset, job = resolved[r.name]
                    warm_refs[key] = warm_task.remote(preset, job, threads)
                    pending[warm_refs[key]] = ("warm", key)
        for r in todo:
            preset, job = resolved[r.name]
            key = warm_keys[r.name]
            ref = run_task.remote(preset, job, str(out / "runs" / r.name), warm_refs.get(key), threads,
                                  f"sweep-{spec.preset}", spec.equal_budget)
            pending[ref] = ("run", r)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            kind, what = pending.pop(ready[0])
            try:
                value = ray.get(ready[0])
            except Exception as err:  # noqa: BLE001 - a failed task fails its run, not the sweep
                if kind == "warm":
                    log(f"warm start {what} FAILED: {err}")
                else:
                    failures[what.name] = f"{type(err).__name__}: {err}"
                    log(f"run {what.name} FAILED: {failures[what.name]}")
                continue
            if kind == "warm":
                _write_atomic(warm_dir / f"{what}.tar.gz", value)
                log(f"warm start {what} done ({len(value) / 2**20:.1f} MiB, saved in {warm_dir})")
            else:
                finish(what, value)
    if not finished_now:  # otherwise the last finished run wrote it
        write_report(spec, out, done)
    if failures:
        log(f"{len(failures)} run(s) failed: {', '.join(failures)}; run the same command again to retry them")
    return done


# ----------------------------------------------------------------------------- the table

# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom.
_T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010, 2.1788, 2.1604,
         2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555,
         2.0518, 2.0484, 2.0452, 2.0423)


def t_quantile_975(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom (a table up to 30,
    then the Cornish-Fisher expansion, within 1e-4 of the exact value)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959963984540054
    return (z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3))


def mean_ci(values: Sequence[float]) -> tuple[float, float, float, int]:
    """Mean and 95% confidence interval (Student's t) over ``values`` (NaNs dropped):
    ``(mean, low, high, n)``; the interval is NaN with fewer than two values."""
    xs = [float(v) for v in values if v == v]
    n = len(xs)
    if n == 0:
        return math.nan, math.nan, math.nan, 0
    mean = math.fsum(xs) / n
    if n == 1:
        return mean, math.nan, math.nan, 1
    sd = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_quantile_975(n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half, n


def bootstrap_ci(values: Sequence[float], *, resamples: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap 95% CI of the mean of ``values`` (seeded: the same values give the
    same interval)."""
    import numpy as np

    values = np.asarray(values, dtype=float)
    if len(values) == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def _config_label(config: tuple) -> str:
    return ", ".join(f"{a}={_cell(v)}" for a, v in config) or "all"


def paired_differences(spec: SweepSpec, results: dict[str, dict]) -> list[dict]:
    """Test F1 of every two configurations, paired by seed and test conversation.

    A seed counts for configurations A and B when both its runs finished with per-conversation
    test F1 (``f1_per_task``; runs of ``memr2 train`` before 2026-12-04 lack it). Both runs of a
    seed play the same test conversations, so each conversation gives one difference A - B; the
    differences of all counted seeds are pooled and their mean gets a percentile-bootstrap 95% CI.
    That CI resamples conversations for the seeds at hand: it is narrower than the table's CI over
    seeds, and it does not cover the spread between training seeds.

    Returns one row per pair (in the order of the configurations):
    ``{"a", "b", "seeds", "conversations", "mean", "ci_lo", "ci_hi"}``.
    """
    per_run = _test_f1_per_task(spec, results)
    rows = []
    for a, b in itertools.combinations(dict.fromkeys(r.config for r in spec.runs), 2):
        seeds = [s for s, c in per_run if c == a and len(per_run.get((s, b), ())) == len(per_run[s, a])]
        diffs = [x - y for s in seeds for x, y in zip(per_run[s, a], per_run[s, b])]
        if diffs:
            rows.append(_difference_row(_config_label(a), _config_label(b), len(seeds), diffs))
    return rows


def main_effects(spec: SweepSpec, results: dict[str, dict]) -> list[dict]:
    """Each axis's values against each other, pooled over the other axes (a factorial grid's main
    effects), in the grid of two axes or more: for ``algo``, every LoGo-GRPO run is paired with the
    GRPO run of the same seed and the same other settings (say ``stages``), by test conversation,
    and a conversation's differences (one per setting of the other axes) are averaged, so the
    bootstrap CI (as in :func:`paired_differences`) resamples conversations, the unit that was
    drawn, not the correlated differences within one. It asks "does this setting help, whatever
    the others are?" with more runs behind each conversation than any one pair of configurations
    has; read it beside the per-configuration pairs, since an effect that flips sign between
    settings averages out here.

    Rows as :func:`paired_differences`' (``conversations`` counts seed-conversation units), with
    ``a`` labelled ``"axis=value (over other, axes)"`` and ``b`` ``"axis=value"``. A pair of
    values that the spec has side by side under one setting of the other axes only (an
    ``[[exclude]]`` removed the rest) gets no row: it would repeat that configuration pair under
    a label that claims pooling.
    """
    axes = spec.config_axes
    if len(axes) < 2:
        return []
    per_run = _test_f1_per_task(spec, results)
    configs = {r.config for r in spec.runs}
    rows = []
    for i, axis in enumerate(axes):
        values = list(dict.fromkeys(dict(r.config)[axis] for r in spec.runs))
        others = ", ".join(a for a in axes if a != axis)
        for va, vb in itertools.combinations(values, 2):
            shared = {c[:i] + c[i + 1:] for c in configs if c[i][1] == va and c[:i] + ((axis, vb),) + c[i + 1:] in configs}
            if len(shared) < 2:
                continue
            per_conversation: dict[tuple[int, int], list[float]] = {}
            for (seed, config), fa in per_run.items():
                if config[i][1] != va:
                    continue
                fb = per_run.get((seed, config[:i] + ((axis, vb),) + config[i + 1:]))  # same seed and other settings
                if fb is not None and len(fb) == len(fa):
                    for j, (x, y) in enumerate(zip(fa, fb)):
                        per_conversation.setdefault((seed, j), []).append(x - y)
            if per_conversation:
                diffs = [sum(d) / len(d) for d in per_conversation.values()]
                seeds = len({seed for seed, _ in per_conversation})
                rows.append(_difference_row(f"{axis}={_cell(va)} (over {others})", f"{axis}={_cell(vb)}", seeds, diffs))
    return rows


def _test_f1_per_task(spec: SweepSpec, results: dict[str, dict]) -> dict[tuple[int, tuple], list[float]]:
    """``(seed, configuration)`` -> per-conversation test F1 of every finished run that recorded
    it, in the order of ``spec.runs`` (the bootstrap CIs depend on the order of the differences)."""
    per_run = {}
    for r in spec.runs:
        per_task = results.get(r.name, {}).get("test", {}).get("f1_per_task")
        if per_task:
            per_run[(r.seed, r.config)] = per_task
    return per_run


def _difference_row(a: str, b: str, seeds: int, diffs: Sequence[float]) -> dict:
    lo, hi = bootstrap_ci(diffs)
    return {"a": a, "b": b, "seeds": seeds, "conversations": len(diffs), "mean": sum(diffs) / len(diffs), "ci_lo": lo, "ci_hi": hi}


def load_baseline(paths: Sequence[str | Path], row: str) -> dict[int, dict]:
    """Per seed, the per-conversation test F1 of agent ``row`` from ``benchmarks/held_out.py``
    reports (``held_out.json``, one per seed, run with ``--seed`` and ``--horizon`` of the
    sweep's test), for :func:`baseline_differences`.

    Raises:
        SpecError: a file that is not such a report, a report without ``row`` or without
            per-conversation F1, or two reports for one seed.
    """
    found: dict[int, dict] = {}
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
            meta, rows = data["meta"], data["rows"]
            seed, horizon = int(meta["seed"]), int(meta["horizon"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise SpecError(f"{path} is not a benchmarks/held_out.py report (held_out.json): {type(err).__name__}: {err}") from err
        if row not in rows:
            raise SpecError(f"{path} has no agent {row!r}; it has {sorted(rows)}")
        per_task = rows[row].get("f1_per_task")
        if not per_task:
            raise SpecError(f"{path}: agent {row!r} has no per-conversation F1 (f1_per_task)")
        if seed in found:
            raise SpecError(f"two reports for seed {seed}: {found[seed]['path']} and {path}")
        found[seed] = {"f1_per_task": per_task, "horizon": horizon, "preset": meta.get("preset"), "path": str(path)}
    return found


def baseline_differences(spec: SweepSpec, results: dict[str, dict], name: str, baseline: dict[int, dict]) -> list[dict]:
    """Test F1 of every configuration minus a reference agent (:func:`load_baseline`, say the
    warm start every run began from) on the same test conversations, paired by seed and
    conversation and pooled over the seeds that have both, with a bootstrap CI as in
    :func:`paired_differences`. Rows as there, with ``b`` = ``name``.

    Raises:
        SpecError: a report that does not play a run's test (another preset, horizon or number
            of conversations).
    """
    per_run = _test_f1_per_task(spec, results)
    per_config: dict[tuple, list[float]] = {}
    seeds: dict[tuple, int] = {}
    for r in spec.runs:
        per_task = per_run.get((r.seed, r.config))
        ref = baseline.get(r.seed)
        if not per_task or ref is None:
            continue
        horizon = resolve(spec, r)[0].stages[-1].horizon
        if (ref["preset"], ref["horizon"], len(ref["f1_per_task"])) != (spec.preset, horizon, len(per_task)):
            raise SpecError(
                f"{ref['path']} (preset {ref['preset']}, horizon {ref['horizon']}, {len(ref['f1_per_task'])} conversations) "
                f"did not play run {r.name}'s test (preset {spec.preset}, horizon {horizon}, {len(per_task)} conversations)"
            )
        per_config.setdefault(r.config, []).extend(a - b for a, b in zip(per_task, ref["f1_per_task"]))
        seeds[r.config] = seeds.get(r.config, 0) + 1
    return [_difference_row(_config_label(config), name, seeds[config], diffs) for config, diffs in per_config.items()]


def f1_at(curve: Sequence[tuple[float, float]], budget: float) -> float:
    """Held-out F1 of the last point of ``curve`` (tokens, F1) at or below ``budget`` tokens
    (NaN when none is)."""
    below = [f for tok, f in sorted(curve) if tok <= budget]
    return below[-1] if below else math.nan


def budget_f1(spec: SweepSpec, results: dict[str, dict]) -> dict[str, float]:
    """Per run: held-out F1 at the smallest final budget of generated tokens among the
    finished runs with its seed (all configurations compared at equal cost)."""
    by_seed: dict[int, list[RunSpec]] = {}
    for r in spec.runs:
        if r.name in results:
            by_seed.setdefault(r.seed, []).append(r)
    out = {}
    for runs in by_seed.values():
        budget = min(results[r.name]["generated_tokens"] for r in runs)
        for r in runs:
            out[r.name] = f1_at([tuple(p) for p in results[r.name]["curve"]], budget)
    return out


TIME_COLUMNS = ("step_s_mean", "wall_s_mean")


def table_rows(spec: SweepSpec, results: dict[str, dict]) -> tuple[list[dict], list[dict]]:
    """Rows per configuration (mean and CI over seeds) and per run."""
    budget = budget_f1(spec, results) if spec.equal_budget else {}
    per_run = []
    for r in spec.runs:
        if r.name not in results:
            continue
        res = results[r.name]
        row = {"run": r.name, **{a: _cell(v) for a, v in r.values.items()}, "seed": r.seed, "test_f1": res["test"]["f1"]}
        if spec.equal_budget:
            row["budget_f1"] = budget[r.name]
        steps = res.get("step_s") or []
        row.update(memory_size=res["test"]["memory_size"], generated_tokens=res["generated_tokens"],
                   zero_var_global=res.get("zero_var_global", math.nan), zero_var_local=res.get("zero_var_local", math.nan),
                   step_s=sum(steps) / len(steps) if steps else math.nan, wall_s=res["wall_s"])
        per_run.append(row)
    configs: dict[tuple, list[dict]] = {}
    for r in spec.runs:
        configs.setdefault(r.config, [])
    for row, r in zip(per_run, [r for r in spec.runs if r.name in results]):
        configs[r.config].append(row)
    rows = []
    for config, members in configs.items():
        row: dict[str, Any] = {a: _cell(v) for a, v in config}
        row["seeds"] = len(members)
        for metric in ("test_f1", "budget_f1") if spec.equal_budget else ("test_f1",):
            mean, lo, hi, _ = mean_ci([m[metric] for m in members])
            row.update({f"{metric}_mean": mean, f"{metric}_ci_lo": lo, f"{metric}_ci_hi": hi})
        for metric in ("memory_size", "generated_tokens", "zero_var_global", "zero_var_local", "step_s", "wall_s"):
            row[f"{metric}_mean"] = mean_ci([m[metric] for m in members])[0]
        rows.append(row)
    return rows, per_run


def _cell(value: Any) -> Any:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return json.dumps(list(value))
    return value


def _fmt(x: float, digits: int = 3) -> str:
    return "n/a" if x != x else f"{x:.{digits}f}"


def _pct(x: float) -> str:
    return "n/a" if x != x else f"{100 * x:.0f}%"


def _ci(row: dict, metric: str) -> str:
    lo, hi = row[f"{metric}_ci_lo"], row[f"{metric}_ci_hi"]
    ci = "" if lo != lo else f" [{lo:.3f}, {hi:.3f}]"
    return _fmt(row[f"{metric}_mean"]) + ci


def write_report(spec: SweepSpec, out: Path, results: dict[str, dict], baselines: dict[str, dict[int, dict]] | None = None) -> None:
    """``results.md``, ``results.csv`` (per configuration), ``runs.csv`` (per run), ``paired.csv``
    (:func:`paired_differences` and :func:`main_effects`, when runs recorded per-conversation F1,
    then :func:`baseline_differences` against each of ``baselines``: name -> :func:`load_baseline`)
    and ``results.png`` under ``out``."""
    out = Path(out)
    rows, per_run = table_rows(spec, results)
    if not per_run:
        return
    paired = paired_differences(spec, results) + main_effects(spec, results)
    for name, baseline in (baselines or {}).items():
        paired += baseline_differences(spec, results, name, baseline)
    for name, data in (("results.csv", rows), ("runs.csv", per_run), ("paired.csv", paired)):
        if not data:
            continue
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(data[0]), lineterminator="\n")
        writer.writeheader()
        for row in data:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        _write_atomic(out / name, buf.getvalue().encode())

    lines = markdown_table(spec, rows, results) + paired_table(paired)
    _write_atomic(out / "results.md", ("\n".join(lines) + "\n").encode())
    _plot(spec, out, rows, per_run, results)


def markdown_table(spec: SweepSpec, rows: list[dict], results: dict[str, dict]) -> list[str]:
    """The lines of ``results.md``: a caption, the table (one row per configuration), notes."""
    axes = spec.config_axes
    seeds = spec.axes.get("seed", [spec.settings.get("seed", 0)])
    head = [*(axes or ["configuration"]), "seeds", "test F1 (95% CI)"]
    if spec.equal_budget:
        head.append("held-out F1 at equal token budget (95% CI)")
    head += ["memory entries", "generated tokens", "zero-variance groups (global / local)", "s / iteration",
             "wall s / run"]
    lines = [
        f"Sweep `{spec.path}`: preset `{spec.preset}`, {len(spec.runs)} runs, seeds {seeds}. Mean over seeds with a 95% "
        "Student-t confidence interval; s / iteration and wall time vary between machines and runs.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(axes or [0]) + "---:|" * (len(head) - len(axes or [0])),
    ]
    for row in rows:
        cells = [str(row[a]) for a in axes] if axes else ["all"]
        cells += [str(row["seeds"]), _ci(row, "test_f1")]
        if spec.equal_budget:
            cells.append(_ci(row, "budget_f1"))
        cells += [_fmt(row["memory_size_mean"], 1), _fmt(row["generated_tokens_mean"], 0),
                  f"{_pct(row['zero_var_global_mean'])} / {_pct(row['zero_var_local_mean'])}", _fmt(row["step_s_mean"], 1),
                  _fmt(row["wall_s_mean"], 0)]
        lines.append("| " + " | ".join(cells) + " |")
    missing = [r.name for r in spec.runs if r.name not in results]
    if missing:
        lines += ["", f"{len(missing)} of {len(spec.runs)} runs have not finished: {', '.join(missing)}."]
    if spec.equal_budget:
        lines += ["", "Equal token budget: each run's validation curve (held-out F1 against generated tokens, the "
                  "starting policy at 0) is read at the smallest final budget among the runs with its seed."]
    return lines


def paired_table(paired: list[dict]) -> list[str]:
    """The lines of ``results.md`` under the main table: :func:`paired_differences`."""
    if not paired:
        return []
    lines = ["", "Test F1 differences, paired by seed and test conversation (A - B; 95% bootstrap CI over the "
             "pooled conversations, which does not cover the spread between training seeds):", "",
             "| A | B | seeds | conversations | A - B (95% CI) |", "|---|---|---:|---:|---:|"]
    for row in paired:
        cell = f"{row['mean']:+.3f} [{row['ci_lo']:+.3f}, {row['ci_hi']:+.3f}]"
        lines.append(f"| {row['a']} | {row['b']} | {row['seeds']} | {row['conversations']} | {cell} |")
    return lines


def _plot(spec: SweepSpec, out: Path, rows: list[dict], per_run: list[dict], results: dict[str, dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes = spec.config_axes
    labels = [", ".join(str(row[a]) for a in axes) or "all" for row in rows]
    curves = any(len(results[r["run"]]["curve"]) > 0 for r in per_run)
    fig, panels = plt.subplots(1, 2 if curves else 1, figsize=(11 if curves else 6, 4.5), squeeze=False)
    ax = panels[0][0]
    for i, row in enumerate(rows):
        mean, lo, hi = row["test_f1_mean"], row["test_f1_ci_lo"], row["test_f1_ci_hi"]
        yerr = [[mean - lo], [hi - mean]] if lo == lo else None
        ax.errorbar([i], [mean], yerr=yerr, fmt="o", capsize=4, color=f"C{i % 10}")
        config = tuple((a, row[a]) for a in axes)
        pts = [p["test_f1"] for p in per_run if tuple((a, p[a]) for a in axes) == config]
        ax.scatter([i + 0.12] * len(pts), pts, s=12, color=f"C{i % 10}", alpha=0.5)
    ax.set_xticks(range(len(rows)), labels, rotation=20, ha="right")
    ax.set_xlim(-0.5, len(rows) - 0.5)
    ax.set_ylabel("test F1 (mean, 95% CI; dots: seeds)")
    ax.set_title(f"{Path(spec.path).name}: preset {spec.preset}")
    if curves:
        ax = panels[0][1]
        for p in per_run:
            config = tuple((a, p[a]) for a in axes)
            i = next(j for j, row in enumerate(rows) if tuple((a, row[a]) for a in axes) == config)
            pts = sorted(tuple(x) for x in results[p["run"]]["curve"])
            first = p is next(q for q in per_run if tuple((a, q[a]) for a in axes) == config)
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", alpha=0.7, color=f"C{i % 10}",
                    drawstyle="steps-post", label=labels[i] if first else None)
        ax.set_xlabel("generated tokens (rollouts + reruns)")
        ax.set_ylabel("held-out F1 (validation)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    _write_atomic(out / "results.png", buf.getvalue())


# ----------------------------------------------------------------------------- the command


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", type=Path, help="the sweep spec (TOML; see docs/distributed.md)")
    p.add_argument("--out", type=Path, required=True, help="sweep directory; finished runs in it are skipped")
    p.add_argument("--quick", action="store_true", help="apply the spec's [quick] tables (a small variant of the grid)")
    p.add_argument("--ray-address", default=None, help="a running Ray cluster (host:port or auto; default: start a local one)")
    p.add_argument("--local", action="store_true", help="run the runs one after another in this process, without Ray (debugging)")
    p.add_argument("--dry-run", action="store_true", help="check the spec, list the runs and what is finished, run nothing")
    p.add_argument("--report", action="store_true", help="write the table of the finished runs (say of a stopped sweep), run nothing")
    p.add_argument(
        "--against", action="append", default=[], metavar="AGENT=HELD_OUT_JSON",
        help="with --report: also pair every configuration's test F1 with agent AGENT of a benchmarks/held_out.py "
        "report of the same test (one per seed; repeat the option), e.g. warm=runs/ho-s0/held_out.json",
    )


def run(args: argparse.Namespace) -> int:
    if args.against and not args.report:
        raise SystemExit("memr2 sweep: --against goes with --report (the table of finished runs)")
    baselines: dict[str, list[str]] = {}
    for item in args.against:
        agent, sep, path = item.partition("=")
        if not sep or not agent or not path:
            raise SystemExit(f"memr2 sweep: --against wants AGENT=HELD_OUT_JSON, got {item!r}")
        baselines.setdefault(agent, []).append(path)
    try:
        spec = load_spec(args.spec, quick=args.quick)
        done = finished_runs(spec, args.out)
        loaded = {agent: load_baseline(paths, agent) for agent, paths in baselines.items()}
    except SpecError as err:
        raise SystemExit(f"memr2 sweep: {err}") from err
    if args.local and args.ray_address:
        raise SystemExit("memr2 sweep: --local runs without Ray; drop --ray-address or --local")
    if args.local and not args.dry_run and not args.report:
        try:
            check_local_backends(spec, done)
        except SpecError as err:
            raise SystemExit(f"memr2 sweep: {err}") from err
    if args.dry_run:
        for r in spec.runs:
            print(f"{'done' if r.name in done else 'todo'}  {r.name}  {_describe(r.settings)}")
        print(f"{len(spec.runs)} runs, {len(done)} finished")
        return 0
    if args.report:
        if not done:
            raise SystemExit(f"memr2 sweep: no run of {args.spec} has finished in {args.out}; nothing to report")
        try:
            write_report(spec, Path(args.out), done, loaded)
        except SpecError as err:
            raise SystemExit(f"memr2 sweep: {err}") from err
        print(f"{len(done)} of {len(spec.runs)} runs finished; table: {Path(args.out) / 'results.md'}")
        return 0
    ray, started = None, False
    if not args.local:  # before any run: Ray missing, a cluster that is down or too small is a clear error now
        from agents.generation.distributed import RayUnavailableError, connect_ray

        try:
            ray, started = connect_ray(args.ray_address)
        except RayUnavailableError as err:
            raise SystemExit(f"memr2 sweep: {str(err).replace('distributed rollouts need', 'memr2 sweep needs')}; "
                             "or run without Ray with --local") from err
        total = ray.cluster_resources()
        for key, want in (("CPU", spec.cpus), ("GPU", spec.gpus)):
            if want > total.get(key, 0):
                if started:
                    ray.shutdown()
                raise SystemExit(f"memr2 sweep: each run asks for {want:g} {key}s ([resources] in {spec.path}) but the Ray "
                                 f"cluster has {total.get(key, 0):g}; no run could ever start")
    try:
        results = run_sweep(spec, args.out, local=args.local, ray=ray)
    finally:
        if started:
            ray.shutdown()
    print(f"table: {Path(args.out) / 'results.md'}")
    return 0 if len(results) == len(spec.runs) else 1

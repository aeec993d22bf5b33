"""Training metrics: one JSON object per line, mirrored to TensorBoard, and PNG plots.

The JSONL file is the record of a run: :class:`MetricsLogger` appends one line per call, with
``step``, wall-clock ``time`` (Unix seconds) and ``elapsed_s`` (seconds since the logger
opened, or the caller's ``clock``), and flushes it at once, so a killed run loses nothing it
logged. Opening the logger on an existing run directory appends (a resumed run continues the
same file, and passes a ``clock`` that continues its time, so ``elapsed_s`` never runs back).
TensorBoard is a convenience mirror of the numeric values; it is used when ``tensorboard`` is
installed and skipped otherwise, and ``logger.tensorboard_enabled`` /
``logger.tensorboard_status`` say which.

Non-finite floats are written as ``NaN`` / ``Infinity`` (Python's ``json`` reads them back), so
a diverging loss stays visible in the log.
"""

from __future__ import annotations

import json
import math
import numbers
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

__all__ = ["MetricsLogger", "read_metrics", "summarize_training", "plot_curves"]

RESERVED_KEYS = ("step", "time", "elapsed_s")


class MetricsLogger:
    """Append metrics to ``<out_dir>/metrics.jsonl``; mirror numbers to ``<out_dir>/tensorboard``.

    >>> with MetricsLogger("runs/demo") as logger:                  # doctest: +SKIP
    ...     logger.log(1, {"loss": 0.5, "eval": {"f1": 0.3}})        # key "eval/f1"

    Values may be Python or NumPy numbers, 0-d tensors, strings, bools, ``None``, lists and
    arrays (JSONL only); nested mappings are flattened with ``/``. Anything else raises
    ``TypeError`` naming the key. ``clock`` (no arguments, seconds) gives each record's
    ``elapsed_s``; by default the seconds since the logger opened.
    """

    def __init__(self, out_dir: str | Path, *, tensorboard: bool = True, filename: str = "metrics.jsonl",
                 clock: Callable[[], float] | None = None):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = self.out_dir / filename
        self._file = open(self.jsonl_path, "a", encoding="utf-8")
        start = time.time()
        self._clock = clock if clock is not None else (lambda: time.time() - start)
        self._writer = None
        self.tensorboard_enabled = False
        self.tensorboard_status = "off: disabled by the caller"
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:  # torch or tensorboard missing: JSONL only
                self.tensorboard_status = f"off: {err}"
            else:
                self._writer = SummaryWriter(log_dir=str(self.out_dir / "tensorboard"), flush_secs=10)
                self.tensorboard_enabled = True
                self.tensorboard_status = "on"

    def log(self, step: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """Write one record ``{"step", "time", "elapsed_s", **metrics}`` and return it."""
        if self._file.closed:
            raise ValueError("MetricsLogger is closed")
        if isinstance(step, bool) or not isinstance(step, numbers.Integral):
            raise TypeError(f"step must be an int, got {step!r}")
        flat = _flatten(metrics)
        clash = [k for k in flat if k in RESERVED_KEYS]
        if clash:
            raise ValueError(f"metric names {clash} are reserved for the logger")
        now = time.time()
        record = {"step": int(step), "time": now, "elapsed_s": float(self._clock()), **flat}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._writer is not None:
            for key, value in flat.items():
                if _is_number(value):
                    self._writer.add_scalar(key, value, global_step=int(step), walltime=now)
        return record

    @property
    def position(self) -> int:
        """Size in bytes of the JSONL file so far (every record is flushed as it is logged): a
        resumed run cuts the file back to the size its checkpoint recorded."""
        return self._file.tell()

    def close(self) -> None:
        """Close the file and the TensorBoard writer; calling it twice is harmless."""
        if not self._file.closed:
            self._file.close()
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _flatten(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"eval": {"f1": x}}`` -> ``{"eval/f1": x}``, values made JSON-ready."""
    flat: dict[str, Any] = {}
    for key, value in metrics.items():
        if not isinstance(key, str):
            raise TypeError(f"metric names must be strings, got {key!r}")
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, prefix=f"{name}/"))
        else:
            flat[name] = _to_json_value(name, value)
    return flat


def _to_json_value(name: str, value: Any) -> Any:
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if hasattr(value, "tolist"):  # NumPy scalars and arrays, torch tensors
        return value.tolist() if getattr(value, "ndim", 0) else value.item()
    if isinstance(value, numbers.Number):
        return float(value)
    if isinstance(value, (list, tuple)):
        return [_to_json_value(name, v) for v in value]
    raise TypeError(f"metric {name!r} has a value of type {type(value).__name__} that cannot be logged")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_metrics(jsonl_path: str | Path) -> list[dict[str, Any]]:
    """Read a metrics file written by :class:`MetricsLogger`.

    Blank lines are ignored; a line that is not a JSON object (for example the last line of a
    run killed mid-write) is skipped with a warning.
    """
    records, bad = [], 0
    with open(jsonl_path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if isinstance(record, dict):
                records.append(record)
            else:
                bad += 1
    if bad:
        warnings.warn(f"{jsonl_path}: skipped {bad} malformed line(s)", stacklevel=2)
    return records


def summarize_training(records: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """What a training run's metrics say about its budget and its learning signal.

    ``records`` are :func:`read_metrics` lines of a ``memr2 train`` run. Returns ``updates``
    (logged update steps), ``generated_tokens`` (the last cumulative count), ``step_s`` (seconds of
    each update), ``zero_var_global`` / ``zero_var_local`` (share of global / local GRPO groups
    whose members all got the same reward, so their advantages are zero: no learning signal; NaN
    when the run made no such groups, as GRPO makes no local ones) and ``validation`` (step,
    ``val/f1``) pairs.
    """
    step_s, validation, tokens = [], [], 0
    groups = {"global": [0.0, 0.0], "local": [0.0, 0.0]}  # kind -> [zero-variance groups, groups]
    for rec in records:
        if "time/step_s" in rec:
            step_s.append(float(rec["time/step_s"]))
        if rec.get("generated_tokens") is not None:
            tokens = max(tokens, int(rec["generated_tokens"]))
        if "val/f1" in rec:
            validation.append((rec.get("step"), float(rec["val/f1"])))
        for kind, counts in groups.items():
            counts[0] += float(rec.get(f"{kind}/zero_variance_groups", 0.0))
            counts[1] += float(rec.get(f"{kind}/groups", 0.0))
    return {
        "updates": len(step_s), "generated_tokens": tokens, "step_s": step_s, "validation": validation,
        **{f"zero_var_{kind}": zero / n if n else math.nan for kind, (zero, n) in groups.items()},
    }


def plot_curves(
    jsonl_path: str | Path,
    out_png: str | Path,
    keys: Sequence[str] | None = None,
    x: str = "step",
) -> Path:
    """Draw one subplot per metric against ``x`` and save a PNG; return its path.

    ``keys=None`` plots every numeric metric in the file. Records lacking ``x`` or a key are
    skipped for that key, and a key with no data at all gets an empty panel saying so, so a
    plot of a partial run always works.
    """
    from matplotlib.figure import Figure  # no pyplot: no global backend, renders with Agg

    records = read_metrics(jsonl_path)
    if keys is None:
        keys = _numeric_keys(records, exclude={x, *RESERVED_KEYS})
    panels = list(keys) or ["(no metrics)"]

    fig = Figure(figsize=(7, 2.4 * len(panels)), layout="constrained")
    axes = fig.subplots(len(panels), 1, squeeze=False, sharex=True)[:, 0]
    for ax, key in zip(axes, panels):
        points = [(r[x], r[key]) for r in records if _is_number(r.get(x)) and _is_number(r.get(key))]
        ax.set_title(key, fontsize=10)
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="." if len(points) < 50 else None, linewidth=1.2)
            ax.grid(alpha=0.3)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray")
    axes[-1].set_xlabel(x)

    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    return out_png


def _numeric_keys(records: Iterable[Mapping[str, Any]], exclude: set[str]) -> list[str]:
    """Keys holding at least one finite number, in order of first appearance."""
    keys: dict[str, None] = {}
    for r in records:
        for k, v in r.items():
            if k not in exclude and _is_number(v) and math.isfinite(v):
                keys.setdefault(k, None)
    return list(keys)

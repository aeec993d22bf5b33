"""Checkpoints: HF ``save_pretrained`` directories plus trainer state, written atomically.

A checkpoint directory holds::

    config.json, model.safetensors, generation_config.json   model.save_pretrained(...)
    tokenizer files                                          tokenizer.save_pretrained(...), if any
    trainer_state.json                                       the trainer's own dict (JSON)
    optimizer.pt                                             optimizer.state_dict(), if given
    rng_state.pt                                             Python, NumPy, torch (and CUDA) RNGs

Atomicity: everything is written into a hidden sibling ``.<name>.tmp-<id>``, every file and
the directory are fsynced, and only then is the directory renamed to its final name. A crash
or an exception before that leaves the previous checkpoint untouched and the temporary
directory is removed (or, after a hard kill, ignored). Replacing an existing checkpoint takes
two renames (old -> ``.<name>.old-<id>``, new -> final), since POSIX cannot rename a directory
over a non-empty one; if a crash falls between them, the next :func:`load_checkpoint` or
:func:`atomic_write_dir` on that path puts the old directory back.

One process writes a given checkpoint path at a time; leftovers of a hard kill next to that
path are removed by the next write to it.

Runs keep numbered checkpoints ``<run_dir>/checkpoint-<step>`` (:func:`checkpoint_path`), and
:func:`latest_checkpoint` picks the complete one with the highest step, so ``--resume`` only
needs the run directory.
"""

from __future__ import annotations

import glob
import json
import os
import random
import re
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

__all__ = [
    "atomic_write_dir",
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "checkpoint_path",
    "checkpoint_step",
    "capture_rng_state",
    "restore_rng_state",
]

TRAINER_STATE = "trainer_state.json"
OPTIMIZER = "optimizer.pt"
RNG_STATE = "rng_state.pt"
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")


@contextmanager
def atomic_write_dir(final_dir: str | Path) -> Iterator[Path]:
    """Yield a temporary directory; on normal exit it replaces ``final_dir`` in one step.

    On an exception the temporary directory is deleted, ``final_dir`` is left as it was and
    the exception propagates.
    """
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    _recover_interrupted_swap(final_dir)
    for stale in _siblings(final_dir, "tmp") + _siblings(final_dir, "old"):  # left by a hard kill
        shutil.rmtree(stale, ignore_errors=True)
    tmp = final_dir.with_name(f".{final_dir.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        if final_dir.exists():
            old = final_dir.with_name(f".{final_dir.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(final_dir, old)
            os.replace(tmp, final_dir)
            _fsync_dir(final_dir.parent)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final_dir)
            _fsync_dir(final_dir.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _recover_interrupted_swap(final_dir)  # if the second rename is what failed
        raise


def _recover_interrupted_swap(final_dir: Path) -> None:
    """If a crash fell between the two renames of a replace, restore the old directory."""
    if final_dir.exists():
        return
    olds = _siblings(final_dir, "old")
    if olds:
        os.replace(max(olds, key=lambda p: p.stat().st_mtime), final_dir)


def _siblings(final_dir: Path, kind: str) -> list[Path]:
    """The hidden ``.<name>.<kind>-<id>`` directories next to ``final_dir``."""
    return list(final_dir.parent.glob(f".{glob.escape(final_dir.name)}.{kind}-*"))


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def capture_rng_state() -> dict[str, Any]:
    """The global RNG states of Python, NumPy (legacy ``np.random``) and torch (CPU and CUDA).

    Stored as plain values and tensors so ``torch.load(weights_only=True)`` can read them.
    Generators the trainer owns (``torch.Generator``, env ``np_random``) are its own state.
    """
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Set the global RNGs back to a state from :func:`capture_rng_state`."""
    random.setstate(state["python"])
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    out_dir: str | Path,
    model: Any,
    tokenizer: Any,
    trainer_state: dict[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
) -> Path:
    """Write a checkpoint directory atomically (see the module docstring); return its path.

    ``model`` and ``tokenizer`` are Hugging Face objects (anything with ``save_pretrained``);
    ``tokenizer=None`` skips it. ``trainer_state`` must be JSON-serialisable: it is checked
    before anything is written. The RNG states are captured at the time of the call.
    """
    try:
        state_text = json.dumps(trainer_state, indent=2)
    except (TypeError, ValueError) as err:
        raise TypeError(f"trainer_state must be JSON-serialisable: {err}") from err

    out_dir = Path(out_dir)
    with atomic_write_dir(out_dir) as tmp:
        model.save_pretrained(tmp)  # safetensors is the default format in transformers
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / OPTIMIZER)
        torch.save(capture_rng_state(), tmp / RNG_STATE)
        (tmp / TRAINER_STATE).write_text(state_text, encoding="utf-8")
    return out_dir


def load_checkpoint(
    path: str | Path,
    *,
    load_model: bool = True,
    restore_rng: bool = False,
    map_location: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Returns a dict with ``path``, ``trainer_state``, ``optimizer`` (a state dict or ``None``),
    ``rng_state``, and, with ``load_model=True``, ``model`` (``AutoModelForCausalLM``) and
    ``tokenizer`` (``AutoTokenizer``, or ``None`` if none was saved). Loading is local only.

    RNG states are returned, not applied, unless ``restore_rng=True``; restore them last,
    after building everything that draws random numbers (``restore_rng_state``).
    """
    path = Path(path)
    _recover_interrupted_swap(path)
    if not (path / TRAINER_STATE).is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {TRAINER_STATE})")

    result: dict[str, Any] = {
        "path": path,
        "trainer_state": json.loads((path / TRAINER_STATE).read_text(encoding="utf-8")),
        "optimizer": None,
        "rng_state": None,
    }
    if (path / OPTIMIZER).is_file():
        result["optimizer"] = torch.load(path / OPTIMIZER, map_location=map_location, weights_only=True)
    if (path / RNG_STATE).is_file():
        result["rng_state"] = torch.load(path / RNG_STATE, weights_only=True)
    if load_model:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        result["model"] = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
        has_tokenizer = (path / "tokenizer_config.json").is_file() or (path / "tokenizer.json").is_file()
        result["tokenizer"] = AutoTokenizer.from_pretrained(path, local_files_only=True) if has_tokenizer else None
    if restore_rng and result["rng_state"] is not None:
        restore_rng_state(result["rng_state"])
    return result


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    """``<run_dir>/checkpoint-<step>``: the name :func:`latest_checkpoint` looks for."""
    return Path(run_dir) / f"checkpoint-{int(step)}"


def checkpoint_step(path: str | Path) -> int | None:
    """The step of a ``checkpoint-<step>`` directory (:func:`checkpoint_path`); ``None`` for any
    other name."""
    match = _CHECKPOINT_NAME.match(Path(path).name)
    return int(match.group(1)) if match else None


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The complete ``checkpoint-<step>`` directory of ``run_dir`` with the highest step.

    Temporary and incomplete directories are ignored; ``None`` if there is none.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    for old in run_dir.glob(".checkpoint-*.old-*"):
        _recover_interrupted_swap(run_dir / old.name[1:].rsplit(".old-", 1)[0])
    best: tuple[int, Path] | None = None
    for child in run_dir.iterdir():
        step = checkpoint_step(child)
        if step is not None and (child / TRAINER_STATE).is_file():
            if best is None or step > best[0]:
                best = (step, child)
    return best[1] if best else None

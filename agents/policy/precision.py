"""Which floating-point dtype a model runs in: the ``--dtype {auto,float32,bfloat16}`` setting.

bfloat16 halves memory and, on CPUs with bfloat16 instructions (``avx512_bf16`` or AMX), runs
about twice as fast as float32. On a CPU without them PyTorch emulates it: measured on a 2-core
AMD EPYC with AVX2 only, a SmolLM2-135M forward pass over 8 x 256 tokens took 32.0 s in bfloat16
against 7.7 s in float32. So ``auto`` picks bfloat16 only where the instructions exist, and
asking for bfloat16 on a CPU without them is an error rather than a silent 4x slowdown.
On CUDA ``auto`` keeps the checkpoint's own dtype (usually bfloat16).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["DTYPE_CHOICES", "cpu_bf16_flags", "resolve_dtype", "describe_dtype", "dtype_name", "add_dtype_argument"]

DTYPE_CHOICES = ("auto", "float32", "bfloat16")

_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_bf16_flags(cpuinfo: str | None = None) -> list[str]:
    """The CPU's bfloat16 instruction flags (empty when it has none, or on a non-Linux host)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return []
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    return [f for f in _BF16_FLAGS if f in flags]


def resolve_dtype(name: str | torch.dtype | None, device: str | torch.device = "cpu", *, cpuinfo: str | None = None) -> torch.dtype | str:
    """Turn a ``--dtype`` choice into what ``from_pretrained`` takes.

    Args:
        name: ``"auto"``, ``"float32"``, ``"bfloat16"``, a ``torch.dtype`` (used as it is, with
            no check of the CPU), or ``None`` (float32
            on CPU, the checkpoint's own dtype elsewhere: the behaviour before ``--dtype``).
        device: where the model will run.
        cpuinfo: the text of ``/proc/cpuinfo`` (tests pass their own).

    Returns:
        A ``torch.dtype``, or the string ``"auto"`` (transformers: the checkpoint's own dtype)
        on accelerators.

    Raises:
        ValueError: an unknown name, or bfloat16 on a CPU without bfloat16 instructions.
    """
    import torch

    device = torch.device(device)
    if isinstance(name, torch.dtype):
        return name  # a dtype object is a deliberate choice in code (tests of half precision use it)
    if name is None:
        return torch.float32 if device.type == "cpu" else "auto"
    if name not in DTYPE_CHOICES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {DTYPE_CHOICES}")
    if device.type != "cpu":
        return "auto" if name == "auto" else getattr(torch, name)
    has_bf16 = bool(cpu_bf16_flags(cpuinfo))
    if name == "auto":
        return torch.bfloat16 if has_bf16 else torch.float32
    if name == "bfloat16" and not has_bf16:
        raise ValueError(
            "--dtype bfloat16 asked for on a CPU without bfloat16 instructions (no avx512_bf16 or "
            "amx_bf16 in /proc/cpuinfo): PyTorch would emulate it, about 4x slower than float32 here; "
            "use --dtype float32 or auto"
        )
    return getattr(torch, name)


def describe_dtype(name: str | None, device: str | torch.device = "cpu") -> str:
    """One line saying which dtype a choice resolved to, and why (printed by the commands)."""
    import torch

    resolved = resolve_dtype(name, device)
    shown = "the checkpoint's own dtype" if resolved == "auto" else dtype_name(resolved)
    if name == "auto" and torch.device(device).type == "cpu":
        flags = cpu_bf16_flags()
        why = f"this CPU has {', '.join(flags)}" if flags else "this CPU has no bfloat16 instructions"
        return f"dtype auto -> {shown} ({why})"
    return f"dtype {name or 'default'} -> {shown}"


def dtype_name(dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``: how reports and ``--dtype`` spell a dtype."""
    return str(dtype).removeprefix("torch.")


def add_dtype_argument(parser) -> None:
    """The ``--dtype`` option of ``memr2 sft``, ``train`` and ``eval``."""
    parser.add_argument(
        "--dtype", choices=DTYPE_CHOICES, default=None,
        help="weight dtype: auto (bfloat16 on CPUs with bfloat16 instructions, else float32; the "
        "checkpoint's own on GPUs), float32 or bfloat16 (default: the preset's, else float32 on CPU)",
    )

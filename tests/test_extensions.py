"""agents._extensions: torch extensions built for CUDA are hidden next to a CPU torch."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from agents import _extensions


@pytest.fixture
def packages(tmp_path, monkeypatch):
    """Two made-up extension packages on sys.path: one linked against libtorch_cuda, one not."""
    for name, library in (("cudavision", b"\x7fELF...libc10_cuda.so\x00libtorch_cuda.so\x00"), ("cpuvision", b"\x7fELF...libtorch_cpu.so\x00")):
        (tmp_path / name / "lib").mkdir(parents=True)
        (tmp_path / name / "__init__.py").write_text("LOADED = True\n")
        (tmp_path / name / "lib" / "_C.so").write_bytes(library)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in ("cudavision", "cpuvision"):
        sys.modules.pop(name, None)


def _cpu_torch() -> bool:
    torch_dir = _extensions._package_dir("torch")
    return torch_dir is not None and not any((torch_dir / "lib").glob("libtorch_cuda.so*"))


@pytest.mark.skipif(not sys.platform.startswith("linux") or not _cpu_torch(), reason="needs a CPU build of torch on Linux")
def test_a_cuda_only_extension_looks_absent_and_a_cpu_one_is_untouched(packages):
    assert _extensions.hide_cuda_only_extensions(("cudavision", "cpuvision")) == ["cudavision"]
    assert "cudavision" in _extensions.hidden_extensions()
    assert importlib.util.find_spec("cudavision") is None  # what transformers checks
    with pytest.raises(ImportError):
        import cudavision  # noqa: F401
    import cpuvision

    assert cpuvision.LOADED
    # an already imported package is never hidden afterwards
    assert _extensions.hide_cuda_only_extensions(("cpuvision",)) == []


def test_nothing_is_hidden_when_torch_has_cuda(packages, monkeypatch):
    fake_torch = packages / "torch_with_cuda"
    (fake_torch / "lib").mkdir(parents=True)
    (fake_torch / "lib" / "libtorch_cuda.so").write_bytes(b"")
    monkeypatch.setattr(_extensions, "_package_dir", lambda name: fake_torch if name == "torch" else packages / name)
    assert _extensions.hide_cuda_only_extensions(("cudavision",)) == []
    assert "cudavision" not in sys.modules

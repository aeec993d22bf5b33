"""Shared fixtures: a local checkpoint that is *not* the tiny default.

``SharedPolicy.from_pretrained`` and ``memr2 sft/train --model PATH`` promise to load any local
Hugging Face checkpoint. The tiny default is a Llama with its own chat template and a single
end-of-turn token, so testing only with it would miss what real instruct checkpoints look
like. ``foreign_checkpoint`` builds, offline, a small random Qwen2 model whose tokenizer uses
the ChatML template (``<|im_start|>role\\n...<|im_end|>\\n``), has no BOS token, and whose
generation config stops on ``<|im_end|>`` as well as the tokenizer's EOS ``<|endoftext|>``:
the layout of Qwen2.5 instruct checkpoints.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CHATML_TEMPLATE = (
    "{%- for m in messages -%}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


@pytest.fixture(scope="session")
def foreign_checkpoint(tmp_path_factory):
    """Directory of a random Qwen2 model (hidden 64, 2 layers) with a ChatML tokenizer."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from agents.policy.tiny import default_tokenizer_corpus, train_tokenizer

    tokenizer = train_tokenizer(default_tokenizer_corpus(n_conversations=20), vocab_size=1024)
    tokenizer.add_special_tokens(
        {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "additional_special_tokens": ["<|im_start|>", "<|im_end|>"]}
    )
    tokenizer.bos_token = None
    tokenizer.chat_template = CHATML_TEMPLATE
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config = transformers.Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config)
    model.generation_config = transformers.GenerationConfig(
        eos_token_id=[im_end, tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id
    )
    out = tmp_path_factory.mktemp("qwen2-chatml")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def load_script():
    """Import a script of the repository that is not in a package (``benchmarks/held_out.py``,
    ``examples/trl_grpo.py``) by its path relative to the root, as a module."""

    def load(relative: str):
        path = ROOT / relative
        spec = importlib.util.spec_from_file_location(f"script_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up while the script runs
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture
def trl_smollm2():
    """The imported SmolLM2-135M-Instruct directory for a slow TRL test; skips without TRL, datasets
    or the model."""
    pytest.importorskip("trl")
    pytest.importorskip("datasets")
    pytest.importorskip("torch")
    from agents.policy.models import imported_path

    model = imported_path("smollm2-135m-instruct")
    if model is None:
        pytest.skip("SmolLM2-135M-Instruct is not imported (memr2 models import smollm2-135m-instruct; set MEMR2_HOME)")
    return model

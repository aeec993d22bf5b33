"""Tokenisation shared by retrieval (BM25) and the extractive reader.

Kept deliberately simple and deterministic: lowercase alphanumeric tokens, a fixed English
stop-word list, and a light suffix-stripping stemmer so that "lives"/"live"/"lived" and
"pets"/"pet" meet. Scoring (token F1) uses its own normalisation in :mod:`memenv.scoring`.
"""

from __future__ import annotations

import re
from functools import lru_cache

__all__ = ["tokenize", "stem", "content_terms", "STOPWORDS"]

_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")

STOPWORDS = frozenset(
    """a an the and or but if of to in on at by for with from into onto about as is are was were
    be been being am do does did doing have has had having i me my mine we us our you your he him
    his she her hers it its they them their this that these those there here what which who whom
    whose when where why how now currently current still any some no not yes so than then too very
    can could will would shall should may might must just also up down out over again once all
    both each few more most other such only own same s t don't doesn't didn't isn't aren't wasn't
    i'm i've i'd you're it's that's what's let's oh well okay ok really yeah hey hi""".split()
)

_SUFFIXES = ("ies", "ied", "ing", "es", "ed", "ly", "s")


@lru_cache(maxsize=65536)
def stem(token: str) -> str:
    """A light, deterministic suffix stripper (not Porter).

    It only has to map inflections of one word to the same key: "live", "lives", "lived" and
    "living" all become "liv"; "pet" and "pets" become "pet".
    """
    if token.isdigit() or len(token) <= 3 or "'" in token:
        return token
    base = token
    for suf in _SUFFIXES:
        if token.endswith(suf) and len(token) - len(suf) >= 3 and not (suf == "s" and token.endswith("ss")):
            base = token[: -len(suf)] + ("y" if suf in ("ies", "ied") else "")
            break
    if len(base) > 3 and base.endswith("e"):
        base = base[:-1]
    if len(base) > 3 and base[-1] == base[-2] and base[-1] not in "lsaeiou":
        base = base[:-1]  # "stopped" -> "stopp" -> "stop"
    return base


def tokenize(text: str) -> list[str]:
    """Lowercase alphanumeric tokens (apostrophe contractions kept whole)."""
    return _TOKEN.findall(text.lower())


def content_terms(text: str) -> list[str]:
    """Stemmed tokens with stop words removed, in order (duplicates kept)."""
    return [stem(t) for t in tokenize(text) if t not in STOPWORDS]

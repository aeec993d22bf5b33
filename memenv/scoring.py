"""Answer scoring.

``token_f1`` is the reward of the paper (SQuAD-style normalisation: lowercase, strip punctuation
and the articles a/an/the, collapse whitespace; multiset token overlap). ``bleu1`` is unigram BLEU
with the brevity penalty, logged beside it.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter

__all__ = ["normalize_answer", "token_f1", "bleu1", "exact_match"]

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: object) -> str:
    """Lowercase, drop punctuation and articles, collapse whitespace. Non-strings are str()-ed."""
    s = str(text).lower().translate(_PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def token_f1(prediction: object, gold: object) -> float:
    """Token-level F1 between normalised prediction and gold (the paper's QA reward).

    Two empty strings score 1.0; one empty side scores 0.0.
    """
    p, g = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not p or not g:
        return float(p == g)
    common = sum((Counter(p) & Counter(g)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: object, gold: object) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def bleu1(prediction: object, gold: object) -> float:
    """Unigram BLEU on normalised tokens: clipped unigram precision times the brevity penalty."""
    p, g = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not p or not g:
        return float(p == g)
    clipped = sum((Counter(p) & Counter(g)).values())
    precision = clipped / len(p)
    bp = 1.0 if len(p) > len(g) else math.exp(1 - len(g) / len(p))
    return bp * precision

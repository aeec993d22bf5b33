"""Readers answer questions from a memory bank. The reader is frozen: it is part of the task.

``Reader`` is the interface every reader implements (the extractive default here; LLM readers
for local HF models or OpenAI-compatible endpoints plug in behind it). A reader that cannot
answer raises :class:`ReaderError`; it never returns a silent empty answer that would score 0.
"""

from __future__ import annotations

import abc
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

from memenv.memory import MemoryBank
from memenv.text import STOPWORDS, content_terms, stem

__all__ = ["Reader", "ReaderError", "ExtractiveReader"]


class ReaderError(RuntimeError):
    """A reader failed to produce an answer (endpoint down, timeout, unusable output)."""


class Reader(abc.ABC):
    """Answers natural-language questions from a :class:`~memenv.memory.MemoryBank`."""

    #: a short name recorded in evaluation outputs
    name: str = "reader"

    @abc.abstractmethod
    def answer(self, question: str, bank: MemoryBank) -> str:
        """Return the answer text for one question."""

    def answer_many(self, questions: Sequence[str], bank: MemoryBank) -> list[str]:
        """Answer several questions against the same bank (batched readers override this)."""
        return [self.answer(q, bank) for q in questions]


# ---------------------------------------------------------------------------------------------
# The model-free default reader
# ---------------------------------------------------------------------------------------------

_POSSESSIVE = re.compile(r"(\w)['\u2019]s\b")
_SENTENCE_END = re.compile(r"(?<=[.!?;])\s+|\n+")
_WORD = re.compile(r"[A-Za-z0-9]+(?:['\u2019][A-Za-z]+)?")
_WHEN = re.compile(r"^\W*(when\b|(on\s+)?(what|which)\s+(date|day)\b)", re.IGNORECASE)
_HOW_MANY = re.compile(r"\bhow\s+many\b", re.IGNORECASE)
_DATE_TERMS = frozenset(stem(w) for w in ("date", "day"))


def _strip_possessives(text: str) -> str:
    """``"Alice's pets"`` -> ``"Alice pets"``, so the owner's name meets the plain name."""
    return _POSSESSIVE.sub(r"\1", text)


def _proper_terms(question: str) -> frozenset[str]:
    """Terms of the capitalised words after the first one: the names the question is about."""
    words = _WORD.findall(_strip_possessives(question))[1:]
    return frozenset(stem(w.lower()) for w in words if w[:1].isupper() and w.lower() not in STOPWORDS)


@dataclass(frozen=True)
class _Sentence:
    """One sentence of a memory: its text, its content terms and its words with their terms."""

    text: str
    terms: frozenset[str]
    words: tuple[tuple[int, int, str | None], ...]  # (start, end, term or None for a stop word)


@lru_cache(maxsize=65536)
def _sentences(content: str) -> tuple[_Sentence, ...]:
    out = []
    for part in _SENTENCE_END.split(content):
        part = part.strip()
        if not part:
            continue
        words = []
        for m in _WORD.finditer(part):
            low = _strip_possessives(m.group(0).lower().replace("\u2019", "'"))
            words.append((m.start(), m.end(), None if low in STOPWORDS else stem(low)))
        terms = frozenset(t for _, _, t in words if t is not None)
        if terms:
            out.append(_Sentence(part, terms, tuple(words)))
    return tuple(out)


def _answer_span(sentence: _Sentence, question_terms: frozenset[str]) -> str:
    """The run of new content words the sentence adds to the question.

    Words split into runs at stop words and at words of the question. The span is the first
    run after the last question word, else the last run before it ("Alice has a pet dog named
    Rex" -> "Rex"; "Alice enjoys painting as a hobby" -> "painting").
    """
    runs: list[tuple[int, int]] = []  # (first word index, last word index)
    last_match = -1
    for i, (_, _, term) in enumerate(sentence.words):
        if term is None or term in question_terms:
            if term is not None:
                last_match = i
            continue
        if runs and runs[-1][1] == i - 1:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    if not runs:
        return ""
    after = [r for r in runs if r[0] > last_match]
    first, last = after[0] if after else runs[-1]
    return sentence.text[sentence.words[first][0] : sentence.words[last][1]]


class ExtractiveReader(Reader):
    """The default reader: model-free and deterministic. Retrieve, match sentences, extract.

    Algorithm, for one question:

    1. **Question terms.** Possessives are stripped ("Alice's" -> "Alice") and the question is
       reduced to its content terms (:func:`memenv.text.content_terms`: stemmed, no stop words).
       "How many" drops "many"; a date question ("When ...", "What date ...") drops "date"/"day".
    2. **Retrieval.** ``bank.search`` (BM25) returns the ``top_k`` candidate memories.
    3. **Sentence matching.** Each memory is split into sentences. When the question names
       someone or something (capitalised words after the first word), a sentence must contain
       at least one of those names. A sentence's *coverage* is the share of the question terms
       it contains. Within one memory the best sentence has the highest coverage, then the
       fewest terms the question does not ask about, then comes first ("Alice now lives in
       Lyon. Alice previously lived in Paris." answers "Where does Alice live?" from the first
       sentence and "Where did Alice live previously?" from the second).
    4. **Abstention.** If no memory's coverage exceeds ``min_coverage`` (half the question
       terms by default), the answer is ``"none"`` (``"0"`` for "how many").
    5. **Answer.** Every memory whose coverage equals the best one is kept (at most
       ``max_items``, in id order): a set question gets all its members, and two memories
       that disagree (a stale value next to the current one) both show up, which costs F1.

       * "when" questions: the ``last_date`` of each kept memory (the session of its latest
         write; ``"session N"`` when the bank holds no date);
       * "how many": the number of distinct kept sentences (not capped by ``max_items``);
       * otherwise: the answer span of each kept sentence (:func:`_answer_span`: the run of
         content words the sentence adds to the question), distinct spans joined by ", ";
         a sentence that adds nothing confirms the question: ``"yes"``.

    Nothing here is specific to the synthetic tasks; their fact and question templates are
    written so that this procedure answers them from a correctly managed memory.
    """

    name = "extractive"

    def __init__(self, top_k: int = 30, min_coverage: float = 0.5, max_items: int = 8, none_answer: str = "none") -> None:
        if top_k < 1 or max_items < 1:
            raise ValueError("top_k and max_items must be >= 1")
        if not 0.0 <= min_coverage < 1.0:
            raise ValueError(f"min_coverage must be in [0, 1), got {min_coverage}")
        self.top_k = top_k
        self.min_coverage = min_coverage
        self.max_items = max_items
        self.none_answer = none_answer

    def answer(self, question: str, bank: MemoryBank) -> str:
        """Answer ``question`` from ``bank`` (see the class docstring for the procedure)."""
        if not isinstance(question, str):
            raise ReaderError(f"question must be a string, got {type(question).__name__}")
        plain = _strip_possessives(question)
        is_when = bool(_WHEN.match(plain))
        is_count = bool(_HOW_MANY.search(plain))
        terms = frozenset(content_terms(plain))
        if is_when:
            terms = terms - _DATE_TERMS
        if is_count:
            terms = terms - {stem("many")}
        if not terms:
            return self.none_answer
        # Query with the plain and the original wording: memories may spell "Alice's".
        candidates = bank.search(f"{plain} {question}", self.top_k)
        names = _proper_terms(question) & terms
        scored = []  # (coverage, entry, sentence)
        for entry, _ in candidates:
            best = None
            for i, sent in enumerate(_sentences(entry.content)):
                if names and not names & sent.terms:
                    continue  # about someone or something else
                hit = len(terms & sent.terms)
                key = (hit, -len(sent.terms - terms), -i)
                if hit and (best is None or key > best[0]):
                    best = (key, sent)
            if best is not None:
                scored.append((best[0][0] / len(terms), entry, best[1]))
        top = max((c for c, _, _ in scored), default=0.0)
        if top <= self.min_coverage:
            return "0" if is_count else self.none_answer
        kept = sorted(((e, s) for c, e, s in scored if c >= top - 1e-9), key=lambda es: es[0].id)
        if is_count:
            return str(len({s.text.lower() for _, s in kept}))
        kept = kept[: self.max_items]
        if is_when:
            dates = [e.last_date or f"session {e.last_session}" for e, _ in kept]
            return ", ".join(dict.fromkeys(dates))
        spans: dict[str, str] = {}
        for _, sent in kept:
            span = _answer_span(sent, terms)
            if span:
                spans.setdefault(span.lower(), span)
        return ", ".join(spans.values()) if spans else "yes"

"""The external memory: immutable entries, a persistent bank and BM25 retrieval.

A :class:`MemoryBank` is a value. Every operation returns a new bank and leaves the old one
untouched, and banks share their entries (which are frozen dataclasses), so a snapshot of the
environment is a reference, not a copy. Writes copy only the two top-level dictionaries (entries
and the inverted index), once per batch of operations.

Ids are stable integers given in order of creation and never reused, so an id in a trainer's log
always names the same entry.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Iterable, Iterator, Protocol, Sequence

from memenv.text import content_terms, tokenize
from memenv.types import OP_ADD, OP_DELETE, OP_NOOP, OP_UPDATE

__all__ = [
    "MemoryEntry",
    "MemoryOp",
    "OpResult",
    "MemoryBank",
    "Retriever",
    "BM25Retriever",
]


@dataclass(frozen=True)
class MemoryEntry:
    """One memory. ``history`` records ``(session, op, content)`` for each write, oldest first."""

    id: int
    speaker: str
    content: str
    first_session: int
    last_session: int
    first_date: str = ""
    last_date: str = ""
    source_ids: tuple[str, ...] = ()
    history: tuple[tuple[int, str, str], ...] = ()
    terms: tuple[str, ...] = field(default=(), repr=False, compare=False)

    @property
    def word_count(self) -> int:
        return len(tokenize(self.content))


@dataclass(frozen=True)
class MemoryOp:
    """An operation on the bank, with real bank ids (the env maps the small ids it shows)."""

    op: str
    id: int | None = None
    text: str = ""
    speaker: str = ""
    dia_ids: tuple[str, ...] = ()


@dataclass(frozen=True)
class OpResult:
    """What happened to one operation: ``ok`` and, if not, why it was skipped."""

    op: MemoryOp
    ok: bool
    entry_id: int | None = None
    error: str = ""


class MemoryBank:
    """A persistent memory bank with a BM25 inverted index.

    Invariants (checked by :meth:`check_invariants` and by property tests):

    * ids are unique, and every id is below ``next_id``;
    * the inverted index holds exactly the terms of the live entries, with their counts;
    * ``total_terms`` and ``word_count`` equal the sums over live entries.
    """

    __slots__ = ("_entries", "_postings", "_next_id", "_total_terms", "_word_count")

    def __init__(self) -> None:
        self._entries: dict[int, MemoryEntry] = {}
        self._postings: dict[str, dict[int, int]] = {}
        self._next_id = 0
        self._total_terms = 0
        self._word_count = 0

    # -- reading ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[MemoryEntry]:
        return iter(self._entries.values())

    def __contains__(self, entry_id: object) -> bool:
        return entry_id in self._entries

    def get(self, entry_id: int) -> MemoryEntry:
        try:
            return self._entries[entry_id]
        except KeyError:
            raise KeyError(f"no memory entry with id {entry_id!r}") from None

    @property
    def next_id(self) -> int:
        return self._next_id

    @property
    def word_count(self) -> int:
        """Words over all memory contents: the ``M`` of the bloat penalty."""
        return self._word_count

    def entries(self, speaker: str | None = None) -> list[MemoryEntry]:
        """Live entries in id order, optionally of one speaker."""
        return [e for e in self._entries.values() if speaker is None or e.speaker == speaker]

    def source_ids(self) -> frozenset[str]:
        """Every dialogue id some live entry was written from (for M-Fail)."""
        return frozenset(d for e in self._entries.values() for d in e.source_ids)

    def search(self, query: str, k: int = 5, speaker: str | None = None) -> list[tuple[MemoryEntry, float]]:
        """Top-``k`` entries by BM25 (k1=1.2, b=0.75), ties broken by id; zero scores omitted."""
        return bm25_search(self, content_terms(query), k, speaker)

    # -- writing ---------------------------------------------------------------------------

    def apply(self, ops: Iterable[MemoryOp], session: int = 0, date: str = "") -> tuple["MemoryBank", list[OpResult]]:
        """Apply operations in order and return ``(new_bank, results)``.

        An invalid operation (unknown id, empty text, unknown op) is skipped and reported in its
        result; the others still apply. ``self`` is never modified.
        """
        new = self._copy()
        touched: set[str] = set()  # terms whose posting dict the new bank already owns
        results = [new._apply_one(op, session, date, touched) for op in ops]
        return new, results

    def add(self, speaker: str, content: str, session: int = 0, date: str = "", dia_ids: Sequence[str] = ()) -> tuple["MemoryBank", int]:
        """Convenience: add one entry, return ``(new_bank, id)``."""
        bank, (res,) = self.apply([MemoryOp(OP_ADD, text=content, speaker=speaker, dia_ids=tuple(dia_ids))], session, date)
        if not res.ok:
            raise ValueError(res.error)
        return bank, res.entry_id  # type: ignore[return-value]

    def _copy(self) -> "MemoryBank":
        new = MemoryBank.__new__(MemoryBank)
        new._entries = dict(self._entries)
        new._postings = dict(self._postings)  # inner dicts are copied on first write
        new._next_id = self._next_id
        new._total_terms = self._total_terms
        new._word_count = self._word_count
        return new

    def _index(self, entry: MemoryEntry, sign: int, touched: set[str]) -> None:
        for term, tf in Counter(entry.terms).items():
            posting = self._postings.get(term)
            if term not in touched:  # copy on first write: older banks share the old dict
                posting = dict(posting) if posting else {}
                touched.add(term)
            elif posting is None:
                posting = {}
            if sign > 0:
                posting[entry.id] = tf
            else:
                posting.pop(entry.id, None)
            if posting:
                self._postings[term] = posting
            else:
                self._postings.pop(term, None)
        self._total_terms += sign * len(entry.terms)
        self._word_count += sign * entry.word_count

    def _apply_one(self, op: MemoryOp, session: int, date: str, touched: set[str]) -> OpResult:
        kind = op.op.upper() if isinstance(op.op, str) else ""
        if kind == OP_NOOP:
            if op.id is not None and op.id not in self._entries:
                return OpResult(op, False, error=f"NOOP: unknown id {op.id}")
            return OpResult(op, True, entry_id=op.id)
        if kind == OP_ADD:
            text = op.text.strip()
            if not text:
                return OpResult(op, False, error="ADD: empty text")
            entry = MemoryEntry(
                id=self._next_id,
                speaker=op.speaker,
                content=text,
                first_session=session,
                last_session=session,
                first_date=date,
                last_date=date,
                source_ids=tuple(op.dia_ids),
                history=((session, OP_ADD, text),),
                terms=tuple(content_terms(text)),
            )
            self._next_id += 1
            self._entries[entry.id] = entry
            self._index(entry, +1, touched)
            return OpResult(op, True, entry_id=entry.id)
        if kind in (OP_UPDATE, OP_DELETE):
            if op.id is None or op.id not in self._entries:
                return OpResult(op, False, error=f"{kind}: unknown id {op.id}")
            old = self._entries[op.id]
            if kind == OP_DELETE:
                del self._entries[op.id]
                self._index(old, -1, touched)
                return OpResult(op, True, entry_id=op.id)
            text = op.text.strip()
            if not text:
                return OpResult(op, False, error="UPDATE: empty text")
            new_sources = old.source_ids + tuple(d for d in op.dia_ids if d not in old.source_ids)
            entry = replace(
                old,
                content=text,
                last_session=session,
                last_date=date,
                source_ids=new_sources,
                history=old.history + ((session, OP_UPDATE, text),),
                terms=tuple(content_terms(text)),
            )
            self._index(old, -1, touched)
            self._entries[op.id] = entry
            self._index(entry, +1, touched)
            return OpResult(op, True, entry_id=op.id)
        return OpResult(op, False, error=f"unknown op {op.op!r}")

    # -- checks ----------------------------------------------------------------------------

    def check_invariants(self) -> None:
        """Raise ``AssertionError`` if the bank's bookkeeping is inconsistent."""
        expect: dict[str, dict[int, int]] = {}
        total = words = 0
        for eid, e in self._entries.items():
            assert eid == e.id, f"entry stored under {eid} has id {e.id}"
            assert 0 <= eid < self._next_id, f"id {eid} not below next_id {self._next_id}"
            assert e.content.strip(), f"entry {eid} has empty content"
            assert tuple(content_terms(e.content)) == e.terms, f"entry {eid} terms are stale"
            for t, tf in Counter(e.terms).items():
                expect.setdefault(t, {})[eid] = tf
            total += len(e.terms)
            words += e.word_count
        assert expect == self._postings, "inverted index does not match the entries"
        assert total == self._total_terms, "total term count is off"
        assert words == self._word_count, "word count is off"

    def __repr__(self) -> str:
        return f"MemoryBank({len(self)} entries, next_id={self._next_id})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MemoryBank) and self._entries == other._entries and self._next_id == other._next_id

    def __hash__(self) -> int:  # banks are values
        return hash((self._next_id, tuple(self._entries.values())))

    def __getstate__(self):
        return (self._entries, self._postings, self._next_id, self._total_terms, self._word_count)

    def __setstate__(self, state) -> None:
        self._entries, self._postings, self._next_id, self._total_terms, self._word_count = state


def bm25_search(
    bank: MemoryBank, query_terms: Sequence[str], k: int, speaker: str | None = None, k1: float = 1.2, b: float = 0.75
) -> list[tuple[MemoryEntry, float]]:
    """Okapi BM25 over the bank's inverted index."""
    n = len(bank)
    if n == 0 or k <= 0:
        return []
    avgdl = bank._total_terms / n if bank._total_terms else 1.0
    scores: dict[int, float] = {}
    for term in set(query_terms):
        posting = bank._postings.get(term)
        if not posting:
            continue
        idf = math.log(1.0 + (n - len(posting) + 0.5) / (len(posting) + 0.5))
        for eid, tf in posting.items():
            dl = len(bank._entries[eid].terms)
            scores[eid] = scores.get(eid, 0.0) + idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * dl / avgdl))
    ranked = sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))
    out = []
    for eid, s in ranked:
        e = bank._entries[eid]
        if speaker is not None and e.speaker != speaker:
            continue
        out.append((e, s))
        if len(out) == k:
            break
    return out


class Retriever(Protocol):
    """Finds candidate memories for a query. An embedding retriever can implement this too."""

    def search(self, bank: MemoryBank, query: str, k: int, speaker: str | None = None) -> list[tuple[MemoryEntry, float]]: ...


class BM25Retriever:
    """The default retriever: BM25 over :func:`memenv.text.content_terms`."""

    def search(self, bank: MemoryBank, query: str, k: int, speaker: str | None = None) -> list[tuple[MemoryEntry, float]]:
        return bank.search(query, k, speaker)

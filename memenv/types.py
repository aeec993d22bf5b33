"""The data model shared by every task source (synthetic generator, LoCoMo, LongMemEval).

All types are frozen dataclasses holding tuples, so a conversation can be shared between
environments, pickled to vector-env workers and hashed without defensive copies.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = [
    "Turn",
    "Session",
    "QAItem",
    "GoldOp",
    "Conversation",
    "parse_dia_id",
    "OP_ADD",
    "OP_UPDATE",
    "OP_DELETE",
    "OP_NOOP",
    "OPS",
]

OP_ADD, OP_UPDATE, OP_DELETE, OP_NOOP = "ADD", "UPDATE", "DELETE", "NOOP"
OPS = (OP_ADD, OP_UPDATE, OP_DELETE, OP_NOOP)

_DIA_ID = re.compile(r"^D(\d+):(\d+)$")


def parse_dia_id(dia_id: str) -> tuple[int, int] | None:
    """Return ``(session, turn)`` for a well-formed dialogue id like ``"D3:2"``, else ``None``.

    Real data holds malformed ids (``"D"``, ``"D:11:26"``); callers decide what to do with them.
    """
    m = _DIA_ID.match(dia_id.strip()) if isinstance(dia_id, str) else None
    return (int(m.group(1)), int(m.group(2))) if m else None


@dataclass(frozen=True)
class Turn:
    """One utterance. ``dia_id`` is ``"D<session>:<turn>"`` (1-based), as in LoCoMo."""

    speaker: str
    dia_id: str
    text: str


@dataclass(frozen=True)
class Session:
    """One session of a conversation: a 1-based index, a date string and its turns in order."""

    index: int
    date: str
    turns: tuple[Turn, ...]


@dataclass(frozen=True)
class QAItem:
    """A question about the conversation.

    Attributes:
        qid: unique id within the conversation.
        question, answer: the text; ``answer`` is always a string (real data has ints).
        evidence: dia_ids of the turns that hold the answer (may be empty in real data).
        category: a name such as ``"current_value"`` (synthetic) or ``"single_hop"`` (LoCoMo).
        answerable_after: the 1-based session after which the question can be answered (the
            session of its latest evidence turn).
        valid_until: the last session after which the answer is still true, or ``None`` if it
            never goes stale. Synthetic "current value" questions go stale when the value changes.
        adversarial_answer: LoCoMo category-5 items carry this instead of a real answer.
    """

    qid: str
    question: str
    answer: str
    evidence: tuple[str, ...]
    category: str
    answerable_after: int
    valid_until: int | None = None
    adversarial_answer: str | None = None

    def evidence_sessions(self) -> tuple[int, ...]:
        """Sorted distinct sessions of the well-formed evidence ids."""
        parsed = (parse_dia_id(d) for d in self.evidence)
        return tuple(sorted({p[0] for p in parsed if p is not None}))

    def is_valid_at(self, session: int) -> bool:
        """True when the question is answerable and its answer still holds after ``session``."""
        if session < self.answerable_after:
            return False
        return self.valid_until is None or session <= self.valid_until


@dataclass(frozen=True)
class GoldOp:
    """One entry of the synthetic gold operation log.

    A turn that carries a fact has one ``GoldOp``: the atomic fact as the extractor should write
    it, and the memory operation a perfect manager applies. ``key`` names the memory slot the fact
    lives in (``"Alice|city"`` for a single-valued attribute, ``"Alice|pets|Rex"`` for one member
    of a set); ``text`` is the memory content after the operation (empty for DELETE and NOOP).
    """

    dia_id: str
    speaker: str
    fact: str
    op: str
    key: str
    text: str = ""
    event: str = ""


@dataclass(frozen=True)
class Conversation:
    """A multi-session conversation between two speakers with its questions.

    ``gold_ops`` is empty for real data. ``meta`` holds source-specific extras (as a tuple of
    key/value pairs so the object stays hashable).
    """

    conv_id: str
    speakers: tuple[str, str]
    sessions: tuple[Session, ...]
    questions: tuple[QAItem, ...]
    gold_ops: tuple[GoldOp, ...] = ()
    source: str = "synthetic"
    meta: tuple[tuple[str, str], ...] = field(default=())

    @property
    def num_sessions(self) -> int:
        return len(self.sessions)

    @property
    def num_turns(self) -> int:
        return sum(len(s.turns) for s in self.sessions)

    def gold_by_dia_id(self) -> dict[str, GoldOp]:
        """The gold log indexed by dialogue id."""
        return {g.dia_id: g for g in self.gold_ops}

    def questions_valid_at(self, session: int) -> tuple[QAItem, ...]:
        """Questions answerable after ``session`` whose answer still holds then."""
        return tuple(q for q in self.questions if q.is_valid_at(session))

    def questions_new_at(self, session: int) -> tuple[QAItem, ...]:
        """Questions that become answerable exactly after ``session`` (and hold then)."""
        return tuple(
            q for q in self.questions if q.answerable_after == session and q.is_valid_at(session)
        )

"""Loader for LongMemEval (Wu et al., ICLR 2025): the ``longmemeval_oracle.json``,
``longmemeval_s.json`` and ``longmemeval_m.json`` files.

Each file is a JSON list of question items::

    {"question_id": "e47becba", "question_type": "knowledge-update",
     "question": "...", "answer": "...", "question_date": "2023/05/30 (Tue) 23:40",
     "haystack_session_ids": ["sharegpt_x_1", "answer_e47becba_1", ...],
     "haystack_dates": ["2023/05/20 (Sat) 02:21", ...],
     "haystack_sessions": [[{"role": "user", "content": "...", "has_answer": true}, ...], ...],
     "answer_session_ids": ["answer_e47becba_1"]}

Every item becomes one :class:`~memenv.types.Conversation` (``conv_id`` = ``question_id``,
speakers ``("user", "assistant")``, ``source="longmemeval"``) holding one question:

- Sessions keep their dates. They are put in chronological order (a stable sort on the parsed
  ``haystack_dates``): the S and M files are already sorted, the oracle file is not, and a memory
  agent must see an old value before its update. ``chronological=False`` keeps the haystack
  order; so does a file whose dates do not all parse (recorded in ``meta["order"]``).
  Sessions are numbered 1.. in that order and turns get dialogue ids ``"D<session>:<turn>"``.
  Empty sessions are left out and their ids recorded in ``meta["empty_sessions"]``.
- Evidence: the dia_ids of the turns marked ``has_answer``; when no turn is marked, every turn of
  the ``answer_session_ids`` sessions (``meta["evidence_from"]`` says which).
- ``answerable_after`` is the session of the latest evidence turn, as for LoCoMo (with no
  evidence at all: the last session). The question is officially asked after the whole history,
  on ``question_date`` (kept in ``meta``): use ``final`` scoring to follow that protocol.
- ``category``: ``"abstention"`` for question ids ending in ``_abs``, otherwise the
  ``question_type`` (``single-session-user``, ``knowledge-update``, ...). Numeric answers become
  strings.

Broken items are reported by index and ``question_id`` with the field at fault: one
:class:`~memenv.data.errors.DataError` listing all of them, or with ``strict=False`` one
:class:`~memenv.data.errors.DataWarning` and the items skipped.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from memenv.data.errors import DataError, DataWarning, collect_conversations, read_json
from memenv.data.errors import json_kind as _kind
from memenv.types import Conversation, QAItem, Session, Turn

__all__ = ["load_longmemeval", "parse_longmemeval", "LONGMEMEVAL_ROLES"]

#: the two speakers of every LongMemEval conversation
LONGMEMEVAL_ROLES = ("user", "assistant")

# "2023/05/20 (Sat) 02:21"; the weekday is ignored, the time is optional.
_DATE = re.compile(r"\s*(\d{4})/(\d{1,2})/(\d{1,2})(?:\s*\([^)]*\))?(?:\s+(\d{1,2}):(\d{2}))?\s*")


def load_longmemeval(
    path: str | os.PathLike[str],
    *,
    chronological: bool = True,
    strict: bool = True,
) -> list[Conversation]:
    """Load a LongMemEval JSON file: one :class:`Conversation` per question item, in file order.

    Args:
        path: the JSON file (oracle, S or M).
        chronological: order each item's sessions by date (default) instead of haystack order.
        strict: raise :class:`DataError` listing every problem (default); when False, skip the
            broken items and warn (:class:`DataWarning`) with the list.

    Raises:
        FileNotFoundError: no file at ``path``.
        DataError: the file is not JSON, not a list, or (strict) an item is broken.
    """
    return parse_longmemeval(
        read_json(path), source=str(path), chronological=chronological, strict=strict
    )


def parse_longmemeval(
    items: Any,
    *,
    source: str = "<longmemeval items>",
    chronological: bool = True,
    strict: bool = True,
) -> list[Conversation]:
    """Like :func:`load_longmemeval`, for items already parsed from JSON."""
    if not isinstance(items, list):
        raise DataError(source, [f"expected a JSON list of question items, got {_kind(items)}"])
    return collect_conversations(
        items, lambda item, index: _parse_item(item, index, chronological), _label, "question_id",
        source=source, strict=strict, what="LongMemEval",
    )


# ---------------------------------------------------------------------------------------------
# internals
# ---------------------------------------------------------------------------------------------


def _label(item: Any, index: int) -> str:
    qid = item.get("question_id") if isinstance(item, dict) else None
    return f"item[{index}] ({qid})" if isinstance(qid, str) and qid else f"item[{index}]"


def _date_key(date: str) -> tuple[int, ...] | None:
    m = _DATE.fullmatch(date)
    if m is None:
        return None
    return tuple(int(g) if g is not None else 0 for g in m.groups())


def _parse_item(
    item: Any, index: int, chronological: bool
) -> tuple[Conversation | None, list[str]]:
    where = _label(item, index)
    if not isinstance(item, dict):
        return None, [f"{where}: expected an object, got {_kind(item)}"]
    problems: list[str] = []

    def text_field(key: str, *, numeric_ok: bool = False, required: bool = True) -> str:
        value = item.get(key)
        if isinstance(value, str) and (value.strip() or not required):
            return value
        if numeric_ok and isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if value is None and not required:
            return ""
        what = "missing" if key not in item else f"got {_kind(value)}"
        problems.append(f"{where} {key!r}: {what}")
        return ""

    qid = text_field("question_id")
    qtype = text_field("question_type")
    question = text_field("question")
    answer = text_field("answer", numeric_ok=True)
    question_date = text_field("question_date", required=False)

    raw_sessions = item.get("haystack_sessions")
    n = len(raw_sessions) if isinstance(raw_sessions, list) else None
    if n is None:
        problems.append(f"{where} 'haystack_sessions': expected a list, got {_kind(raw_sessions)}")
    ids = _string_list(item, "haystack_session_ids", where, problems, length=n)
    dates = _string_list(item, "haystack_dates", where, problems, length=n)
    answer_ids = _string_list(item, "answer_session_ids", where, problems, required=False)
    if problems:
        return None, problems

    # Parse every session's turns first (positions refer to the haystack order).
    parsed: list[tuple[str, str, list[tuple[str, str, bool]]]] = []
    for s, raw in enumerate(raw_sessions):
        at = f"{where} haystack_sessions[{s}]"
        if not isinstance(raw, list):
            problems.append(f"{at}: expected a list of turns, got {_kind(raw)}")
            continue
        turns = [t for k, r in enumerate(raw) if (t := _parse_turn(r, f"{at}[{k}]", problems))]
        parsed.append((ids[s], dates[s], turns))
    if problems:
        return None, problems

    empty = [sid for sid, _, turns in parsed if not turns]
    parsed = [p for p in parsed if p[2]]
    if not parsed:
        return None, [f"{where} 'haystack_sessions': no session with turns"]

    order = "haystack"
    if chronological:
        keys = [_date_key(date) for _, date, _ in parsed]
        if all(k is not None for k in keys):
            parsed = [p for _, p in sorted(zip(keys, parsed), key=lambda kp: kp[0])]
            order = "chronological"
        else:
            order = "haystack (unparsed dates)"

    sessions: list[Session] = []
    marked: list[str] = []
    by_answer_session: list[str] = []
    wanted = set(answer_ids)
    for number, (sid, date, turns) in enumerate(parsed, start=1):
        built = []
        for t, (role, content, has_answer) in enumerate(turns, start=1):
            dia_id = f"D{number}:{t}"
            built.append(Turn(speaker=role, dia_id=dia_id, text=content))
            if has_answer:
                marked.append(dia_id)
            if sid in wanted:
                by_answer_session.append(dia_id)
        sessions.append(Session(index=number, date=date, turns=tuple(built)))

    if marked:
        evidence, evidence_from = marked, "has_answer"
    elif by_answer_session:
        evidence, evidence_from = by_answer_session, "answer_sessions"
    else:
        evidence, evidence_from = [], "none"
    latest = max((int(d[1:].split(":")[0]) for d in evidence), default=sessions[-1].index)

    category = "abstention" if qid.endswith("_abs") else qtype
    present = {sid for sid, _, _ in parsed}
    meta = [
        ("question_id", qid),
        ("question_type", qtype),
        ("question_date", question_date),
        ("session_ids", json.dumps([sid for sid, _, _ in parsed])),
        ("answer_session_ids", json.dumps(answer_ids)),
        ("order", order),
        ("evidence_from", evidence_from),
    ]
    if empty:
        meta.append(("empty_sessions", json.dumps(empty)))
    missing = [a for a in answer_ids if a not in present and a not in empty]
    if missing:
        meta.append(("missing_answer_sessions", json.dumps(missing)))
    conv = Conversation(
        conv_id=qid,
        speakers=LONGMEMEVAL_ROLES,
        sessions=tuple(sessions),
        questions=(
            QAItem(
                qid=qid,
                question=question,
                answer=answer,
                evidence=tuple(evidence),
                category=category,
                answerable_after=latest,
                valid_until=None,
            ),
        ),
        source="longmemeval",
        meta=tuple(meta),
    )
    return conv, []


def _string_list(
    item: dict[str, Any],
    key: str,
    where: str,
    problems: list[str],
    *,
    length: int | None = None,
    required: bool = True,
) -> list[str]:
    value = item.get(key)
    if value is None and not required:
        return []
    if not isinstance(value, list):
        what = "missing" if key not in item else f"expected a list, got {_kind(value)}"
        problems.append(f"{where} {key!r}: {what}")
        return []
    bad = [i for i, v in enumerate(value) if not isinstance(v, str)]
    if bad:
        problems.append(f"{where} {key!r}: entries {bad[:5]} are not strings")
    if length is not None and len(value) != length:
        problems.append(
            f"{where} {key!r}: {len(value)} entries for {length} haystack_sessions"
        )
    return [str(v) for v in value]


def _parse_turn(raw: Any, where: str, problems: list[str]) -> tuple[str, str, bool] | None:
    if not isinstance(raw, dict):
        problems.append(f"{where}: expected an object, got {_kind(raw)}")
        return None
    role, content = raw.get("role"), raw.get("content")
    if role not in LONGMEMEVAL_ROLES:
        problems.append(f"{where} 'role': expected 'user' or 'assistant', got {role!r}")
        return None
    if not isinstance(content, str):
        what = "missing" if "content" not in raw else f"got {_kind(content)}"
        problems.append(f"{where} 'content': {what}")
        return None
    has_answer = raw.get("has_answer", False)
    if not isinstance(has_answer, bool):
        problems.append(f"{where} 'has_answer': expected true or false, got {has_answer!r}")
        return None
    return role, content, has_answer

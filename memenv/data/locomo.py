"""Loader for LoCoMo (``locomo10.json``, Maharana et al. 2024).

The file is a JSON list of records, one per conversation::

    {"sample_id": "conv-26",
     "conversation": {"speaker_a": "Caroline", "speaker_b": "Melanie",
                      "session_1_date_time": "1:56 pm on 8 May, 2023",
                      "session_1": [{"speaker": "Caroline", "dia_id": "D1:1", "text": "...",
                                     "blip_caption": "a photo of ...", ...}, ...], ...},
     "qa": [{"question": "...", "answer": "7 May 2023", "evidence": ["D1:3"], "category": 2},
            ...],
     ...}

The licence of the data (CC BY-NC 4.0) forbids shipping it: pass the path of your own copy.

Quirks of the real file, and what the loader does with them:

- Category-5 (adversarial) items carry ``adversarial_answer`` and usually no ``answer``: the
  answer becomes :data:`LOCOMO_ADVERSARIAL_ANSWER` (the reply LoCoMo's scorer rewards) and the
  adversarial answer is kept in ``QAItem.adversarial_answer``. The two items that have both keep
  their ``answer``.
- Some answers are ints (``2022``): stored as strings.
- Evidence ids can be empty, malformed (``"D"``, ``"D:11:26"``), zero-padded (``"D30:05"``) or
  point at a turn that does not exist (``"D10:19"`` in a 16-turn session). Well-formed ids are
  written canonically (``"D30:5"``) and kept when the turn exists; every other id is left out of
  ``QAItem.evidence`` and recorded (see :func:`evidence_issues`). Entries holding several ids
  (``"D8:6; D9:17"``) are split.
- ``answerable_after`` is the session of the latest kept evidence turn. A question with no usable
  evidence (4 in the real file, all category 3) becomes answerable after the conversation's last
  session: it can be asked, but never before all the dialogue has been seen.
- ``conv-26`` has ``session_N_date_time`` keys for sessions 20..35 that have no turn list: they
  are not sessions (no dialogue), and their numbers are recorded in
  ``meta["sessions_without_turns"]`` (an empty turn list is treated the same way).
- Turns showing an image carry ``blip_caption``: the text becomes
  ``"<text> [Sent an image showing <caption>]"``.

Anything that makes a record unusable (a session that is not a list, a turn without ``speaker``,
``text`` or ``dia_id``, a question without text or with an unknown category, ...) is reported by
record and field. By default the loader raises one :class:`~memenv.data.errors.DataError` listing
every problem; with ``strict=False`` it skips the broken conversations or questions and emits one
:class:`~memenv.data.errors.DataWarning` listing them.
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Any, Iterable, Sequence

from memenv.data.errors import DataError, DataWarning, collect_conversations, read_json
from memenv.data.errors import json_kind as _kind
from memenv.scoring import LOCOMO_CATEGORIES
from memenv.types import Conversation, QAItem, Session, Turn, parse_dia_id

__all__ = [
    "load_locomo",
    "parse_locomo",
    "locomo_split",
    "evidence_issues",
    "LOCOMO_SPLIT",
    "LOCOMO_CATEGORIES",
    "LOCOMO_ADVERSARIAL_ANSWER",
]

log = logging.getLogger(__name__)

#: The split used by the paper: the test split is the seven conversations not used for training
#: or validation (1,089 questions of categories 1-4, 1,085 of them with evidence).
LOCOMO_SPLIT: dict[str, tuple[str, ...]] = {
    "train": ("conv-43", "conv-47"),
    "validation": ("conv-44",),
    "test": ("conv-26", "conv-30", "conv-41", "conv-42", "conv-48", "conv-49", "conv-50"),
}

#: The answer given to category-5 (adversarial) questions that have no ``answer`` in the file:
#: the information is not in the conversation, and LoCoMo's scorer rewards saying so.
LOCOMO_ADVERSARIAL_ANSWER = "Not mentioned in the conversation"

_SESSION_KEY = re.compile(r"session_(\d+)")
_DATE_KEY = re.compile(r"session_(\d+)_date_time")
_EVIDENCE_SEPARATORS = re.compile(r"[;,\s]+")


def load_locomo(
    path: str | os.PathLike[str],
    *,
    drop_adversarial: bool = False,
    strict: bool = True,
) -> list[Conversation]:
    """Load ``locomo10.json`` into :class:`~memenv.types.Conversation` objects, in file order.

    Args:
        path: the JSON file.
        drop_adversarial: leave out category-5 (adversarial) questions.
        strict: raise :class:`DataError` listing every problem (default); when False, skip the
            unusable conversations and questions and warn (:class:`DataWarning`) with the list.

    Raises:
        FileNotFoundError: no file at ``path``.
        DataError: the file is not JSON, not a list of records, or (strict) a record is broken.
    """
    return parse_locomo(
        read_json(path), source=str(path), drop_adversarial=drop_adversarial, strict=strict
    )


def parse_locomo(
    records: Any,
    *,
    source: str = "<locomo records>",
    drop_adversarial: bool = False,
    strict: bool = True,
) -> list[Conversation]:
    """Like :func:`load_locomo`, for records already parsed from JSON (``source`` names them
    in error messages)."""
    if not isinstance(records, list):
        raise DataError(source, [f"expected a JSON list of records, got {_kind(records)}"])
    return collect_conversations(
        records, lambda record, index: _parse_record(record, index, drop_adversarial), _label, "sample_id",
        source=source, strict=strict, what="LoCoMo",
    )


def locomo_split(convs: Iterable[Conversation], name: str) -> list[Conversation]:
    """The conversations of split ``name`` (``"train"``, ``"validation"`` or ``"test"``, see
    :data:`LOCOMO_SPLIT`), in the order given. Conversations missing from ``convs`` are simply
    absent from the result."""
    if name not in LOCOMO_SPLIT:
        raise ValueError(f"unknown LoCoMo split {name!r}; expected one of {sorted(LOCOMO_SPLIT)}")
    wanted = set(LOCOMO_SPLIT[name])
    return [c for c in convs if c.conv_id in wanted]


def evidence_issues(conv: Conversation) -> list[dict[str, str]]:
    """The evidence ids the loader did not keep as they were, for one loaded conversation.

    Each entry is ``{"qid", "id", "issue", "kept_as"}`` with ``issue`` one of ``"malformed"``
    (not ``D<session>:<turn>``; dropped), ``"dangling"`` (no such turn; dropped) or
    ``"non_canonical"`` (e.g. ``"D30:05"``; kept as ``kept_as``).
    """
    raw = dict(conv.meta).get("evidence_issues", "[]")
    return list(json.loads(raw))


# ---------------------------------------------------------------------------------------------
# internals
# ---------------------------------------------------------------------------------------------


def _label(record: Any, index: int) -> str:
    sample_id = record.get("sample_id") if isinstance(record, dict) else None
    if isinstance(sample_id, str) and sample_id:
        return f"record[{index}] ({sample_id})"
    return f"record[{index}]"


def _parse_record(
    record: Any, index: int, drop_adversarial: bool
) -> tuple[Conversation | None, list[str]]:
    """One conversation, or None with the problems that make it unusable.

    Problems confined to single questions are returned too, but only drop those questions.
    """
    where = _label(record, index)
    if not isinstance(record, dict):
        return None, [f"{where}: expected an object, got {_kind(record)}"]
    problems: list[str] = []
    sample_id = record.get("sample_id")
    if not isinstance(sample_id, str) or not sample_id.strip():
        problems.append(f"{where} 'sample_id': missing or not a non-empty string")
    conversation = record.get("conversation")
    if not isinstance(conversation, dict):
        what = "missing" if "conversation" not in record else f"got {_kind(conversation)}"
        problems.append(f"{where} 'conversation': expected an object, {what}")
        return None, problems
    speakers = []
    for key in ("speaker_a", "speaker_b"):
        value = conversation.get(key)
        if not isinstance(value, str) or not value.strip():
            problems.append(f"{where} conversation.{key}: missing or not a non-empty string")
        speakers.append(value)
    sessions, without_turns, missing_dates, session_problems = _parse_sessions(
        conversation, where
    )
    problems.extend(session_problems)
    if not problems and not sessions:
        problems.append(f"{where} 'conversation': no session with turns")
    qa = record.get("qa")
    if not isinstance(qa, list):
        what = "missing" if "qa" not in record else f"got {_kind(qa)}"
        problems.append(f"{where} 'qa': expected a list, {what}")
    if problems:
        return None, problems

    turn_ids = {t.dia_id for s in sessions for t in s.turns}
    last_session = sessions[-1].index
    questions: list[QAItem] = []
    issues: list[dict[str, str]] = []
    question_problems: list[str] = []
    for j, item in enumerate(qa):
        q, q_problems, q_issues = _parse_question(
            item, j, sample_id, where, turn_ids, last_session
        )
        question_problems.extend(q_problems)
        issues.extend(q_issues)
        if q is None:
            continue
        if drop_adversarial and q.category == LOCOMO_CATEGORIES[5]:
            continue
        questions.append(q)
    for issue in issues:
        log.debug("%s: evidence id %r %s", issue["qid"], issue["id"], issue["issue"])

    meta = [("sample_id", sample_id), ("evidence_issues", json.dumps(issues))]
    if without_turns:
        meta.append(("sessions_without_turns", ",".join(map(str, without_turns))))
    if missing_dates:
        meta.append(("sessions_missing_date", ",".join(map(str, missing_dates))))
    conv = Conversation(
        conv_id=sample_id,
        speakers=(speakers[0], speakers[1]),
        sessions=tuple(sessions),
        questions=tuple(questions),
        source="locomo",
        meta=tuple(meta),
    )
    return conv, question_problems


def _parse_sessions(
    conversation: dict[str, Any], where: str
) -> tuple[list[Session], list[int], list[int], list[str]]:
    """Sessions with turns (by number), numbers of dated sessions without turns, numbers of
    sessions without a date, and problems."""
    problems: list[str] = []
    turn_lists: dict[int, Any] = {}
    dates: dict[int, Any] = {}
    for key, value in conversation.items():
        if m := _SESSION_KEY.fullmatch(key):
            turn_lists[int(m.group(1))] = (key, value)
        elif m := _DATE_KEY.fullmatch(key):
            dates[int(m.group(1))] = value
            if not isinstance(value, str):
                problems.append(
                    f"{where} conversation.{key}: expected a string, got {_kind(value)}"
                )

    sessions: list[Session] = []
    without_turns: list[int] = []
    missing_dates: list[int] = []
    seen_ids: set[str] = set()
    for n in sorted(turn_lists):
        key, value = turn_lists[n]
        if not isinstance(value, list):
            problems.append(
                f"{where} conversation.{key}: expected a list of turns, got {_kind(value)}"
            )
            continue
        if not value:
            without_turns.append(n)
            continue
        turns: list[Turn] = []
        for t, raw in enumerate(value):
            turn = _parse_turn(raw, f"{where} conversation.{key}[{t}]", n, problems)
            if turn is None:
                continue
            if turn.dia_id in seen_ids:
                problems.append(
                    f"{where} conversation.{key}[{t}] 'dia_id': duplicate {turn.dia_id!r}"
                )
                continue
            seen_ids.add(turn.dia_id)
            turns.append(turn)
        date = dates.get(n)
        if date is None:
            missing_dates.append(n)
        date_text = date if isinstance(date, str) else ""
        sessions.append(Session(index=n, date=date_text, turns=tuple(turns)))
    without_turns.extend(n for n in dates if n not in turn_lists)
    return sessions, sorted(without_turns), missing_dates, problems


def _parse_turn(raw: Any, where: str, session: int, problems: list[str]) -> Turn | None:
    if not isinstance(raw, dict):
        problems.append(f"{where}: expected an object, got {_kind(raw)}")
        return None
    ok = True
    for key in ("speaker", "text", "dia_id"):
        if key not in raw:
            problems.append(f"{where} {key!r}: missing")
            ok = False
        elif not isinstance(raw[key], str):
            problems.append(f"{where} {key!r}: expected a string, got {_kind(raw[key])}")
            ok = False
    if not ok:
        return None
    if not raw["speaker"].strip():
        problems.append(f"{where} 'speaker': empty")
        return None
    parsed = parse_dia_id(raw["dia_id"])
    if parsed is None:
        problems.append(f"{where} 'dia_id': malformed {raw['dia_id']!r}")
        return None
    if parsed[0] != session:
        problems.append(f"{where} 'dia_id': {raw['dia_id']!r} is not in session {session}")
        return None
    text = raw["text"]
    caption = raw.get("blip_caption")
    if isinstance(caption, str) and caption.strip():
        text = f"{text} [Sent an image showing {caption.strip()}]".strip()
    elif caption is not None and not isinstance(caption, str):
        problems.append(f"{where} 'blip_caption': expected a string, got {_kind(caption)}")
        return None
    return Turn(speaker=raw["speaker"], dia_id=f"D{parsed[0]}:{parsed[1]}", text=text)


def _answer_text(value: Any) -> str | None:
    """Answers may be strings or numbers; anything else is unusable (None)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return None


def _parse_question(
    item: Any,
    j: int,
    sample_id: str,
    where: str,
    turn_ids: set[str],
    last_session: int,
) -> tuple[QAItem | None, list[str], list[dict[str, str]]]:
    """One question, or None with its problems; plus the evidence issues."""
    at = f"{where} qa[{j}]"
    if not isinstance(item, dict):
        return None, [f"{at}: expected an object, got {_kind(item)}"], []
    problems: list[str] = []
    question = item.get("question")
    if not isinstance(question, str) or not question.strip():
        problems.append(f"{at} 'question': missing or not a non-empty string")
    category = item.get("category")
    if isinstance(category, bool) or category not in LOCOMO_CATEGORIES:
        problems.append(f"{at} 'category': expected 1..5, got {category!r}")
        category = None

    adversarial = None
    if item.get("adversarial_answer") is not None:
        adversarial = _answer_text(item["adversarial_answer"])
        if adversarial is None:
            problems.append(f"{at} 'adversarial_answer': expected a string or number")
    answer = _answer_text(item["answer"]) if item.get("answer") is not None else None
    if item.get("answer") is not None and answer is None:
        problems.append(f"{at} 'answer': expected a string or number, got {_kind(item['answer'])}")
    elif category is not None and category != 5 and (answer is None or not answer.strip()):
        problems.append(f"{at} 'answer': missing or empty")
    if category == 5 and answer is None:
        answer = LOCOMO_ADVERSARIAL_ANSWER

    raw_evidence = item.get("evidence", [])
    if not isinstance(raw_evidence, list):
        problems.append(f"{at} 'evidence': expected a list, got {_kind(raw_evidence)}")
    if problems:
        return None, problems, []

    qid = f"{sample_id}:q{j}"
    evidence, issues = _clean_evidence(raw_evidence, qid, turn_ids)
    sessions = [parse_dia_id(d)[0] for d in evidence]  # type: ignore[index]
    q = QAItem(
        qid=qid,
        question=question,
        answer=answer,
        evidence=tuple(evidence),
        category=LOCOMO_CATEGORIES[category],
        answerable_after=max(sessions) if sessions else last_session,
        valid_until=None,
        adversarial_answer=adversarial,
    )
    return q, [], issues


def _clean_evidence(
    raw: Sequence[Any], qid: str, turn_ids: set[str]
) -> tuple[list[str], list[dict[str, str]]]:
    """Canonical evidence ids that name existing turns (deduplicated, in order), and issues."""
    kept: list[str] = []
    issues: list[dict[str, str]] = []
    for entry in raw:
        parts = _EVIDENCE_SEPARATORS.split(entry.strip()) if isinstance(entry, str) else [entry]
        for part in parts:
            if part == "":
                continue
            parsed = parse_dia_id(part) if isinstance(part, str) else None
            if parsed is None:
                issues.append({"qid": qid, "id": str(part), "issue": "malformed", "kept_as": ""})
                continue
            canonical = f"D{parsed[0]}:{parsed[1]}"
            if canonical not in turn_ids:
                issues.append({"qid": qid, "id": part, "issue": "dangling", "kept_as": ""})
                continue
            if canonical != part:
                issues.append(
                    {"qid": qid, "id": part, "issue": "non_canonical", "kept_as": canonical}
                )
            if canonical not in kept:
                kept.append(canonical)
    return kept, issues

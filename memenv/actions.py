"""Tolerant parsing of the agent's action strings.

The extractor answers ``{"facts": [{"speaker", "dia_id", "fact"}]}`` and the manager
``{"operations": [{"op", "id", "text", "speaker", "dia_id"}]}``. Language models wrap JSON in code
fences, add prose around it, change the case of keys and op names, write ids as strings. We accept
all of that. What cannot be read becomes a :class:`ParseResult` with ``error`` set; no input,
however long or strange, raises.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from memenv.types import OP_ADD, OP_DELETE, OP_NOOP, OP_UPDATE

__all__ = ["Fact", "ParsedOp", "ParseResult", "parse_facts", "parse_operations", "MAX_ACTION_CHARS"]

#: Longer action strings are cut to this many characters before parsing.
MAX_ACTION_CHARS = 65536
#: At most this many candidate ``{`` positions are tried, which bounds the parser's work.
_MAX_JSON_STARTS = 32

_OP_ALIASES = {
    "ADD": OP_ADD, "INSERT": OP_ADD, "CREATE": OP_ADD,
    "UPDATE": OP_UPDATE, "EDIT": OP_UPDATE, "MODIFY": OP_UPDATE,
    "DELETE": OP_DELETE, "REMOVE": OP_DELETE,
    "NOOP": OP_NOOP, "NONE": OP_NOOP, "NO_OP": OP_NOOP, "NO-OP": OP_NOOP, "SKIP": OP_NOOP,
}


@dataclass(frozen=True)
class Fact:
    """One extracted fact."""

    speaker: str
    dia_id: str
    text: str


@dataclass(frozen=True)
class ParsedOp:
    """One manager operation as written by the agent (``id`` is the small id shown, if any)."""

    op: str
    id: int | None = None
    text: str = ""
    speaker: str = ""
    dia_id: str = ""


@dataclass(frozen=True)
class ParseResult:
    """Items that could be read, the per-item problems, and a fatal ``error`` (or ``None``)."""

    items: tuple = ()
    problems: tuple[str, ...] = ()
    error: str | None = None


def _find_json(text: str) -> tuple[object | None, str | None]:
    """Return the first JSON object or array embedded in ``text``."""
    if not isinstance(text, str):
        return None, f"action must be a string, got {type(text).__name__}"
    text = text[:MAX_ACTION_CHARS]
    decoder = json.JSONDecoder()
    starts = 0
    pos = 0
    while starts < _MAX_JSON_STARTS:
        candidates = [i for i in (text.find("{", pos), text.find("[", pos)) if i >= 0]
        if not candidates:
            break
        i = min(candidates)
        starts += 1
        try:
            value, _ = decoder.raw_decode(text, i)
        except (ValueError, RecursionError):
            pos = i + 1
            continue
        if isinstance(value, (dict, list)):
            return value, None
        pos = i + 1
    return None, "no JSON object found" if starts == 0 else "no valid JSON object found"


def _lower_keys(d: dict) -> dict:
    return {str(k).strip().lower(): v for k, v in d.items()}


def _as_str(v: object) -> str:
    if v is None:
        return ""
    if isinstance(v, (str, int, float)) and not isinstance(v, bool):
        return str(v).strip()
    return ""


def _as_id(v: object) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, str) and v.strip().lstrip("-").isdigit():
        return int(v.strip())
    return None


def _items(value: object, key: str) -> tuple[list | None, str | None]:
    if isinstance(value, list):
        return value, None
    if isinstance(value, dict):
        d = _lower_keys(value)
        inner = d.get(key)
        if isinstance(inner, list):
            return inner, None
        if inner is None and key == "operations" and "memory" in d and isinstance(d["memory"], list):
            return d["memory"], None  # Mem0-style key
        return None, f'expected a "{key}" list'
    return None, f'expected a "{key}" list'


def parse_facts(text: str) -> ParseResult:
    """Parse an extractor action into :class:`Fact` items.

    A fact needs a non-empty ``fact`` (also accepted: ``text``, ``content``); ``speaker`` and
    ``dia_id`` default to ``""`` and are checked by the environment.
    """
    try:
        value, err = _find_json(text)
        if err:
            return ParseResult(error=err)
        raw, err = _items(value, "facts")
        if err:
            return ParseResult(error=err)
        facts, problems = [], []
        for n, item in enumerate(raw):
            if isinstance(item, str):
                item = {"fact": item}
            if not isinstance(item, dict):
                problems.append(f"fact {n}: not an object")
                continue
            d = _lower_keys(item)
            body = _as_str(d.get("fact", d.get("text", d.get("content"))))
            if not body:
                problems.append(f"fact {n}: empty fact")
                continue
            facts.append(Fact(_as_str(d.get("speaker")), _as_str(d.get("dia_id", d.get("source"))), body))
        return ParseResult(tuple(facts), tuple(problems))
    except Exception as exc:  # pragma: no cover - a last line of defence: parsing never raises
        return ParseResult(error=f"parser failure: {type(exc).__name__}")


def parse_operations(text: str) -> ParseResult:
    """Parse a manager action into :class:`ParsedOp` items.

    Op names are case-insensitive with common aliases (``INSERT`` = ADD, ``NONE`` = NOOP).
    ADD needs ``text``; UPDATE needs ``id`` and ``text``; DELETE needs ``id``; NOOP may omit it.
    Items that break these rules are reported in ``problems`` and dropped.
    """
    try:
        value, err = _find_json(text)
        if err:
            return ParseResult(error=err)
        raw, err = _items(value, "operations")
        if err:
            return ParseResult(error=err)
        ops, problems = [], []
        for n, item in enumerate(raw):
            if not isinstance(item, dict):
                problems.append(f"operation {n}: not an object")
                continue
            d = _lower_keys(item)
            name = _OP_ALIASES.get(_as_str(d.get("op", d.get("event", d.get("action")))).upper())
            if name is None:
                problems.append(f"operation {n}: unknown op {_as_str(d.get('op'))!r}")
                continue
            op = ParsedOp(
                op=name,
                id=_as_id(d.get("id")),
                text=_as_str(d.get("text", d.get("content", d.get("memory")))),
                speaker=_as_str(d.get("speaker")),
                dia_id=_as_str(d.get("dia_id", d.get("source"))),
            )
            if name in (OP_ADD, OP_UPDATE) and not op.text:
                problems.append(f"operation {n}: {name} without text")
                continue
            if name in (OP_UPDATE, OP_DELETE) and op.id is None:
                problems.append(f"operation {n}: {name} without a valid id")
                continue
            ops.append(op)
        return ParseResult(tuple(ops), tuple(problems))
    except Exception as exc:  # pragma: no cover
        return ParseResult(error=f"parser failure: {type(exc).__name__}")

"""Errors and warnings raised by the dataset loaders.

Every loader collects the problems it finds in a file (one readable line each, naming the record
and the field) instead of stopping at the first one. In strict mode (the default) it then raises a
single :class:`DataError` listing all of them; with ``strict=False`` it skips the unusable records
and emits one :class:`DataWarning` with the same list. Nothing is dropped silently.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any, Callable, Iterable

__all__ = ["DataError", "DataWarning", "read_json", "format_problems"]

#: how many problems a DataError message spells out before summarising the rest
_MAX_LISTED = 20


class DataError(ValueError):
    """A data file cannot be used as it is.

    Attributes:
        source: the file (or other source) the problems were found in.
        problems: one human-readable line per problem, e.g.
            ``"conv-26 qa[3] 'answer': missing"``.
    """

    def __init__(self, source: str, problems: Iterable[str]) -> None:
        self.source = str(source)
        self.problems = tuple(problems)
        super().__init__(self._message())

    def _message(self) -> str:
        n = len(self.problems)
        head = f"{self.source}: {n} problem{'s' if n != 1 else ''}"
        if n == 0:
            return head
        listed = [f"  - {p}" for p in self.problems[:_MAX_LISTED]]
        if n > _MAX_LISTED:
            listed.append(f"  ... and {n - _MAX_LISTED} more (see DataError.problems)")
        return head + ":\n" + "\n".join(listed)


class DataWarning(UserWarning):
    """Records were skipped while loading with ``strict=False`` (the message lists them)."""


def format_problems(source: str, problems: Iterable[str]) -> str:
    """The text of a :class:`DataWarning` for skipped records (same layout as DataError)."""
    return DataError(source, problems)._message()


def read_json(path: str | os.PathLike[str]) -> object:
    """Read a JSON file for a loader, turning unreadable content into a :class:`DataError`.

    A missing file raises the usual :class:`FileNotFoundError`; text that is not UTF-8 or not JSON
    raises :class:`DataError` naming the file and the position of the fault.
    """
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        where = f"line {e.lineno}, column {e.colno}"
        raise DataError(path, [f"not valid JSON: {e.msg} ({where})"]) from e
    except UnicodeDecodeError as e:
        raise DataError(path, [f"not UTF-8 text: {e.reason} at byte {e.start}"]) from e


def json_kind(value: Any) -> str:
    """How a JSON value reads in an error message ("an object", "a list", ...)."""
    return {dict: "an object", list: "a list", str: "a string", type(None): "null"}.get(
        type(value), type(value).__name__
    )


def collect_conversations(
    records: list,
    parse_one: Callable[[Any, int], tuple[Any, list[str]]],
    label: Callable[[Any, int], str],
    id_field: str,
    *,
    source: str,
    strict: bool,
    what: str,
) -> list:
    """Parse every record with ``parse_one(record, index) -> (conversation | None, problems)``.

    Duplicate conversation ids are problems too. With ``strict`` any problem raises one
    :class:`DataError` listing them all; otherwise the unusable records are skipped and listed
    in one :class:`DataWarning`: nothing is dropped silently.
    """
    problems: list[str] = []  # each one makes its record (or question) unusable
    convs: list = []
    seen: dict[str, int] = {}
    for index, record in enumerate(records):
        conv, record_problems = parse_one(record, index)
        if conv is not None and conv.conv_id in seen:
            first = label(records[seen[conv.conv_id]], seen[conv.conv_id])
            record_problems.append(f"{label(record, index)} '{id_field}': duplicate of {first.split(' ')[0]}")
            conv = None
        problems.extend(record_problems)
        if conv is not None:
            seen[conv.conv_id] = index
            convs.append(conv)
    if problems:
        if strict:
            raise DataError(source, problems)
        warnings.warn(f"skipped unusable {what} data:\n" + format_problems(source, problems), DataWarning, stacklevel=4)
    return convs

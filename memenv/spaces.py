"""A Gymnasium text space for arbitrary unicode.

Gymnasium's :class:`~gymnasium.spaces.Text` only contains strings over a fixed character set
(alphanumeric by default), but real dialogue holds any unicode. :class:`UnicodeText` contains every
``str`` within its length bounds, samples from a printable charset (so ``sample()`` gives noise
that looks like model output), and stores code points in the shared memory of
``AsyncVectorEnv``, so observations cross process boundaries unchanged.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from typing import Any

import numpy as np
from gymnasium.spaces import Text
from gymnasium.vector.utils import create_shared_memory, read_from_shared_memory, write_to_shared_memory

__all__ = ["UnicodeText"]

_SAMPLE_CHARSET = string.ascii_letters + string.digits + string.punctuation + " \n"


class UnicodeText(Text):
    """A :class:`~gymnasium.spaces.Text` space that contains any unicode string of bounded length."""

    def __init__(self, max_length: int, *, min_length: int = 0, charset: str = _SAMPLE_CHARSET, seed=None):
        super().__init__(max_length, min_length=min_length, charset=charset, seed=seed)

    def contains(self, x: Any) -> bool:
        return isinstance(x, str) and self.min_length <= len(x) <= self.max_length

    def __repr__(self) -> str:
        return f"UnicodeText({self.min_length}, {self.max_length})"

    def __eq__(self, other: Any) -> bool:
        return (
            isinstance(other, UnicodeText)
            and self.min_length == other.min_length
            and self.max_length == other.max_length
        )


# Shared memory layout: per env, one int32 length followed by ``max_length`` code points.
@create_shared_memory.register(UnicodeText)
def _create(space: UnicodeText, n: int = 1, ctx: Any = None):
    import multiprocessing as mp

    return (ctx or mp).Array(np.dtype(np.int32).char, n * (space.max_length + 1))


@write_to_shared_memory.register(UnicodeText)
def _write(space: UnicodeText, index: int, values: str, shared_memory) -> None:
    size = space.max_length + 1
    dest = np.frombuffer(shared_memory.get_obj(), dtype=np.int32)[index * size : (index + 1) * size]
    codes = np.fromiter((ord(c) for c in values[: space.max_length]), dtype=np.int32)
    dest[0] = len(codes)
    dest[1 : 1 + len(codes)] = codes


class SharedTextView(Sequence):
    """The strings of ``n`` envs in shared memory, decoded when read.

    ``AsyncVectorEnv`` calls ``read_from_shared_memory`` once, when it is built, and keeps the
    result as its observation buffer, expecting a view of what the workers write later (numpy
    views do that). A tuple of strings would stay frozen at the empty buffer. ``copy.deepcopy``
    (applied to every observation the vector env returns) and pickling give a plain tuple.
    """

    def __init__(self, space: UnicodeText, shared_memory, n: int):
        self._rows = np.frombuffer(shared_memory.get_obj(), dtype=np.int32).reshape((n, space.max_length + 1))

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return tuple(self[i] for i in range(*index.indices(len(self))))
        row = self._rows[index]
        return "".join(map(chr, row[1 : 1 + row[0]]))

    def __eq__(self, other: Any) -> bool:
        return tuple(self) == (tuple(other) if isinstance(other, (tuple, SharedTextView)) else other)

    def __repr__(self) -> str:
        return repr(tuple(self))

    def __deepcopy__(self, memo) -> tuple[str, ...]:
        return tuple(self)

    def __reduce__(self):
        return (tuple, (tuple(self),))


@read_from_shared_memory.register(UnicodeText)
def _read(space: UnicodeText, shared_memory, n: int = 1) -> SharedTextView:
    return SharedTextView(space, shared_memory, n)

"""A Gymnasium text space for arbitrary unicode.

Gymnasium's :class:`~gymnasium.spaces.Text` only contains strings over a fixed character set
(alphanumeric by default), but real dialogue holds any unicode. :class:`UnicodeText` contains every
``str`` within its length bounds, samples from a printable charset (so ``sample()`` gives noise
that looks like model output), and stores code points in the shared memory of
``AsyncVectorEnv``, so observations cross process boundaries unchanged.
"""

from __future__ import annotations

import string
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


@read_from_shared_memory.register(UnicodeText)
def _read(space: UnicodeText, shared_memory, n: int = 1) -> tuple[str, ...]:
    data = np.frombuffer(shared_memory.get_obj(), dtype=np.int32).reshape((n, space.max_length + 1))
    return tuple("".join(map(chr, row[1 : 1 + row[0]])) for row in data)

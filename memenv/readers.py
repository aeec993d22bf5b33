"""Readers answer questions from a memory bank. The reader is frozen: it is part of the task.

``Reader`` is the interface every reader implements (the extractive default here; LLM readers
for local HF models or OpenAI-compatible endpoints plug in behind it). A reader that cannot
answer raises :class:`ReaderError`; it never returns a silent empty answer that would score 0.
"""

from __future__ import annotations

import abc
from typing import Sequence

from memenv.memory import MemoryBank

__all__ = ["Reader", "ReaderError"]


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

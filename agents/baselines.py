"""Scripted baseline agents for ``MemSession-v0``.

Every agent has ``act(observation, info) -> str`` and returns the JSON action for the role in
``observation["role"]``. They read only the observation and the ``info`` the env returns with it
(``facts``, ``candidates``, and on synthetic tasks the ``gold`` log), so they work unchanged in
vector envs and after ``restore_state``.

* :class:`OracleAgent`: writes the gold facts and gold operations (the upper bound).
* :class:`NoMemoryAgent`: extracts nothing, stores nothing (the lower bound).
* :class:`StoreTurnsAgent`: stores every raw turn (retrieval over the dialogue, like RAG).
* :class:`AddOnlyAgent`: gold facts, but every fact is ADDed: never updates or deletes.
* :class:`NoisyTeacher`: the oracle with a tunable rate of realistic mistakes; the warm-start
  teacher of the tiny model.
"""

from __future__ import annotations

import json
import re
import zlib
from typing import Any

import numpy as np

from memenv.types import OP_ADD, OP_DELETE, OP_NOOP, OP_UPDATE

__all__ = ["OracleAgent", "NoMemoryAgent", "StoreTurnsAgent", "AddOnlyAgent", "NoisyTeacher", "make_agent", "AGENTS",
           "final_memory_score", "mean_final_scores"]

EXTRACTOR, MANAGER = 0, 1
_TURN_LINE = re.compile(r"^\[(D[^\]]*)\]\s*([^:]+):\s?(.*)$")


FACT_KEYS = ("dia_id", "speaker", "fact")
"""Key order of the facts the agents write."""
OP_KEYS = ("op", "id", "dia_id", "speaker", "text")
"""Key order of the operations the agents write."""
# The env reads the keys in any order. The agents put the source dia_id before the fields it
# determines: each later field can then be read off the prompt line that the dia_id names
# ("[D1:2] Keiko: ..."), which is what a small model cloned from these agents can learn. With
# the speaker first, it has to pick the right turn and copy its speaker in one token, and the
# tiny model did not learn that in its warm-start budget (docs/results.md, "Warm start").


def _ordered(item: dict, keys: tuple[str, ...]) -> dict:
    return {k: item[k] for k in keys if k in item} | {k: v for k, v in item.items() if k not in keys}


def _facts_json(facts: list[dict]) -> str:
    return json.dumps({"facts": [_ordered(f, FACT_KEYS) for f in facts]}, ensure_ascii=False)


def _ops_json(ops: list[dict]) -> str:
    return json.dumps({"operations": [_ordered(o, OP_KEYS) for o in ops]}, ensure_ascii=False)


def _require_gold(info: dict) -> dict:
    gold = info.get("gold")
    if gold is None:
        raise ValueError("this agent needs the gold operation log, which only synthetic tasks provide")
    return gold


class NoMemoryAgent:
    """Extracts no facts and performs no operations: the memory stays empty."""

    name = "no-memory"

    def act(self, observation: dict, info: dict) -> str:
        return _facts_json([]) if observation["role"] == EXTRACTOR else _ops_json([])


class StoreTurnsAgent:
    """Stores every dialogue turn verbatim, as a retrieval-augmented baseline would."""

    name = "store-turns"

    def act(self, observation: dict, info: dict) -> str:
        if observation["role"] == EXTRACTOR:
            facts = []
            for line in observation["text"].splitlines():
                m = _TURN_LINE.match(line)
                if m:
                    facts.append({"speaker": m.group(2).strip(), "dia_id": m.group(1), "fact": m.group(3).strip()})
            return _facts_json(facts)
        ops = [
            {"op": OP_ADD, "text": f["text"], "speaker": f["speaker"], "dia_id": f["dia_id"]}
            for f in info.get("facts", [])
            if f["text"].strip()
        ]
        return _ops_json(ops)


class OracleAgent:
    """Follows the gold operation log: the upper bound of the task.

    The manager finds the memory a gold UPDATE/DELETE/NOOP targets among the candidates shown
    (``info["gold"]["candidate_keys"]``); when retrieval did not surface it, an UPDATE becomes an
    ADD and a DELETE or NOOP does nothing, as a perfect manager with the same view would do.
    """

    name = "oracle"

    def act(self, observation: dict, info: dict) -> str:
        gold = _require_gold(info)
        if observation["role"] == EXTRACTOR:
            return _facts_json(self.extract(gold["facts"]))
        return _ops_json(self.manage(info.get("facts", []), gold))

    # The two halves are separate so the noisy teacher can corrupt each.
    def extract(self, gold_facts: list[dict]) -> list[dict]:
        return [{"speaker": g["speaker"], "dia_id": g["dia_id"], "fact": g["fact"]} for g in gold_facts]

    def manage(self, facts: list[dict], gold: dict) -> list[dict]:
        ops: list[dict] = []
        added: dict[str, int] = {}  # key -> index in `ops` of an ADD made in this same action
        keys = gold.get("candidate_keys", [])
        for f in facts:
            g = gold["ops"].get(f["dia_id"])
            if g is None:
                continue
            target = next((i for i, k in enumerate(keys) if k == g["key"]), None)
            kind = g["op"]
            if g["key"] in added and kind in (OP_UPDATE, OP_DELETE):
                j = added[g["key"]]
                if kind == OP_UPDATE:
                    ops[j] = dict(ops[j], text=g["text"], dia_id=g["dia_id"])
                else:
                    ops[j] = None  # type: ignore[call-overload]
                    del added[g["key"]]
                continue
            if kind == OP_ADD or (kind == OP_UPDATE and target is None):
                added[g["key"]] = len(ops)
                ops.append({"op": OP_ADD, "text": g["text"], "speaker": g["speaker"], "dia_id": g["dia_id"]})
            elif target is not None and kind == OP_UPDATE:
                ops.append({"op": OP_UPDATE, "id": target, "text": g["text"], "dia_id": g["dia_id"]})
            elif target is not None and kind in (OP_DELETE, OP_NOOP):
                ops.append({"op": kind, "id": target})
        return [o for o in ops if o is not None]


class AddOnlyAgent(OracleAgent):
    """Gold facts, but the manager only ever ADDs: stale values stay and pile up."""

    name = "add-only"

    def manage(self, facts: list[dict], gold: dict) -> list[dict]:
        ops = []
        for f in facts:
            g = gold["ops"].get(f["dia_id"])
            if g is not None and g["op"] in (OP_ADD, OP_UPDATE):
                ops.append({"op": OP_ADD, "text": g["text"], "speaker": g["speaker"], "dia_id": g["dia_id"]})
        return ops


class NoisyTeacher(OracleAgent):
    """The oracle with a rate ``noise`` of realistic mistakes.

    Each decision draws from a generator seeded by ``(seed, dia_id, role)``, so the teacher is a
    deterministic function of what it sees (reproducible rollouts, consistent across restores).
    Mistakes, each with probability ``noise``:

    * the extractor misses a fact;
    * the manager ADDs where it should UPDATE (a stale duplicate stays);
    * the manager skips a DELETE (a retracted fact stays);
    * the manager DELETEs a memory it should have kept (on a NOOP or an unrelated candidate),
      with probability ``noise / 2``.
    """

    name = "noisy-teacher"

    def __init__(self, noise: float = 0.3, seed: int = 0):
        if not 0.0 <= noise <= 1.0:
            raise ValueError(f"noise must be in [0, 1], got {noise}")
        self.noise = float(noise)
        self.seed = int(seed)

    def _rng(self, dia_id: str, role: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, zlib.crc32(dia_id.encode()), role])

    def keeps(self, dia_id: str) -> bool:
        """Whether the extractor keeps the fact of turn ``dia_id`` (it misses it with probability
        ``noise``). A single-agent teacher, which reads the raw turns, can apply the same mistake."""
        return bool(self._rng(dia_id, EXTRACTOR).random() >= self.noise)

    def extract(self, gold_facts: list[dict]) -> list[dict]:
        return super().extract([g for g in gold_facts if self.keeps(g["dia_id"])])

    def manage(self, facts: list[dict], gold: dict) -> list[dict]:
        clean = super().manage(facts, gold)
        ops = []
        for op in clean:
            rng = self._rng(op.get("dia_id", f"id{op.get('id')}"), MANAGER)
            u = rng.random()
            if op["op"] == OP_UPDATE and u < self.noise:
                g = next((g for g in gold["ops"].values() if g["dia_id"] == op["dia_id"]), None)
                ops.append({"op": OP_ADD, "text": op["text"], "speaker": g["speaker"] if g else "", "dia_id": op["dia_id"]})
            elif op["op"] == OP_DELETE and u < self.noise:
                continue
            elif op["op"] == OP_NOOP and u < self.noise / 2:
                ops.append({"op": OP_DELETE, "id": op["id"]})
            else:
                ops.append(op)
        n_cand = len(gold.get("candidate_keys", []))
        if n_cand and facts:
            rng = self._rng(facts[0]["dia_id"] + "/extra", MANAGER)
            if rng.random() < self.noise / 2:
                ops.append({"op": OP_DELETE, "id": int(rng.integers(n_cand))})
        return ops


AGENTS = {
    "oracle": OracleAgent,
    "no-memory": NoMemoryAgent,
    "store-turns": StoreTurnsAgent,
    "add-only": AddOnlyAgent,
    "noisy-teacher": NoisyTeacher,
}


def make_agent(name: str, **kwargs: Any):
    """Build a scripted agent by name (``oracle``, ``no-memory``, ``store-turns``, ``add-only``,
    ``noisy-teacher``)."""
    try:
        return AGENTS[name](**kwargs)
    except KeyError:
        raise ValueError(f"unknown agent {name!r}; choose one of {sorted(AGENTS)}") from None


def final_memory_score(env: Any) -> dict[str, float]:
    """How a finished episode is compared in held-out tables: ``f1``, the mean F1 of the final
    memory on every question valid at the end of the horizon (``questions_for(mode="final",
    max_questions=None)``; 0 with no question), ``penalty`` (the bloat penalty) and
    ``memory_size`` (entries in the bank)."""
    scorer = env.unwrapped
    qa = scorer.score_questions(scorer.questions_for(mode="final", max_questions=None))
    return {"f1": float(np.mean([q["f1"] for q in qa])) if qa else 0.0, "penalty": scorer.bloat_penalty(),
            "memory_size": len(scorer.save_state().bank)}


def mean_final_scores(scores: list[dict[str, float]], *, per_task: bool = False) -> dict[str, Any]:
    """The means over episodes of :func:`final_memory_score`, with ``reward`` = F1 - penalty; with
    ``per_task``, also ``f1_per_task``."""
    f1, penalty = np.mean([s["f1"] for s in scores]), np.mean([s["penalty"] for s in scores])
    result: dict[str, Any] = {"f1": float(f1), "penalty": float(penalty), "reward": float(f1 - penalty),
                              "memory_size": float(np.mean([s["memory_size"] for s in scores]))}
    if per_task:
        result["f1_per_task"] = [s["f1"] for s in scores]
    return result

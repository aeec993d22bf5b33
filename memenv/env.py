"""``MemSession-v0``: a multi-session memory task as a Gymnasium environment."""

from __future__ import annotations

import functools
import json
import zlib
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from memenv.actions import Fact, ParsedOp, parse_facts, parse_operations
from memenv.memory import BM25Retriever, MemoryBank, MemoryOp, Retriever
from memenv.readers import Reader
from memenv.scoring import bleu1, token_f1
from memenv.spaces import UnicodeText
from memenv.text import tokenize
from memenv.types import OP_ADD, OP_DELETE, OP_NOOP, OP_UPDATE, Conversation, QAItem, Turn

__all__ = ["MemSessionEnv", "EnvState", "EpisodeStats", "ROLES", "EXTRACTOR", "MANAGER", "REWARD_MODES"]

ROLES = ("extractor", "manager")
EXTRACTOR, MANAGER = 0, 1
REWARD_MODES = ("session", "cumulative", "final")
MAX_OBS_CHARS = 100_000
MAX_ACTION_LENGTH = 8192


def _one_line(text: str) -> str:
    """Collapse line breaks so that every turn, fact and memory is one line of the observation."""
    return " ".join(text.split()) if "\n" in text or "\r" in text else text


@dataclass(frozen=True)
class EpisodeStats:
    """Counters over an episode (all ints)."""

    steps: int = 0
    parse_errors: int = 0
    facts: int = 0
    invalid_facts: int = 0
    adds: int = 0
    updates: int = 0
    deletes: int = 0
    noops: int = 0
    invalid_ops: int = 0
    questions_scored: int = 0

    def bump(self, **deltas: int) -> "EpisodeStats":
        return replace(self, **{k: getattr(self, k) + v for k, v in deltas.items()})

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class EnvState:
    """The complete state of an episode: immutable, picklable and cheap to keep.

    The memory bank and the conversation are shared with the live env, never copied: both are
    values that nobody mutates. ``rng`` is the JSON of ``np_random``'s bit-generator state.
    """

    conversation: Conversation
    pos: int
    slice: int
    role: int
    pending: tuple[Fact, ...]
    candidates: tuple[int, ...]
    bank: MemoryBank
    stats: EpisodeStats
    done: bool
    rng: str
    config_key: tuple = field(default=(), repr=False)


class MemSessionEnv(gym.Env):
    """A multi-session memory task: build a memory from dialogue, session by session.

    ## Description

    An agent reads a long conversation between two people, one session at a time, and keeps an
    external memory bank. Each session is cut into ``slices_per_session`` slices of turns. For
    every slice the **extractor** role turns the dialogue into atomic facts, then the **manager**
    role decides, for each fact, whether to ADD it to memory, UPDATE an existing entry, DELETE an
    entry it contradicts, or do nothing (NOOP), seeing up to ``candidates_per_fact`` related
    memories of the same speaker per fact (at most ``max_candidates``). At the end of each session
    a frozen reader answers questions from the memory alone, and the token F1 of its answers,
    minus a penalty for a bloated memory, is the reward. One policy usually plays both roles (the
    observation says which). This is the task of Memory-R2 (Yan et al., 2026).

    ## Action Space

    A string (``UnicodeText``; any string is accepted, longer ones are cut at 65,536 characters).

    * extractor: ``{"facts": [{"speaker": "Alice", "dia_id": "D3:2", "fact": "Alice lives in Paris."}]}``
    * manager: ``{"operations": [{"op": "ADD", "text": "...", "speaker": "Alice", "dia_id": "D3:2"},
      {"op": "UPDATE", "id": 2, "text": "...", "dia_id": "D3:4"}, {"op": "DELETE", "id": 0},
      {"op": "NOOP", "id": 1}]}`` where ids are the small integers of the observation.

    Parsing is tolerant: code fences, prose around the JSON, key and op-name case, string ids and
    aliases (INSERT = ADD, NONE = NOOP) are accepted. An action that cannot be parsed executes
    nothing and sets ``info["parse_error"]``; invalid items (unknown id, missing text, a speaker
    not in the slice) are skipped and listed in ``info["problems"]``. No action string raises.

    ## Observation Space

    ``Dict(role=Discrete(2), text=UnicodeText(100000))``; role 0 = extractor, 1 = manager.

    extractor text::

        date: 8 May 2023
        [D3:4] Alice: I finally moved to Paris last week!
        [D3:5] Bob: Congrats! How is it?

    manager text (``turns:`` instead of ``facts:`` when ``single_agent=True``)::

        date: 8 May 2023
        facts:
        [D3:4] Alice: Alice lives in Paris.
        memories:
        0 [Alice] Alice lives in Berlin.

    The ``date:`` line is omitted when dates are hidden. After the last step the observation is
    ``{"role": 0, "text": ""}``.

    ## Rewards

    Zero except on the step that ends a session (or a ``format_penalty`` on a step whose action
    could not be parsed; default 0, as in the paper). At a session end the reader answers a set of
    questions and the reward is ``mean F1 - lambda * max(0, (M - tau * W) / W)``, with ``M`` the
    words in memory and ``W`` the words of the dialogue seen so far (lambda 0.3, tau 0.7). Which
    questions depends on ``reward_mode``:

    * ``"session"``: the questions that became answerable in this session;
    * ``"cumulative"``: every question answerable so far whose answer still holds (the local
      reward of LoGo-GRPO);
    * ``"final"``: all questions valid at the end, once, after the last session (the global
      reward); other session ends give 0.

    ``max_questions`` caps each set by a seeded subset that depends only on the task, so every
    rollout of a task is scored on the same questions. A session without questions contributes
    F1 0 (only the penalty). ``info["qa"]`` lists every scored question (``qid``, ``prediction``,
    ``answer``, ``f1``, ``bleu1``, ``evidence_sessions``), and ``info`` carries ``f1``,
    ``penalty``, ``m_fail`` and memory statistics.

    ## Starting State

    An empty memory at the first slice of session 1 of a conversation. ``reset(seed=s)`` always
    picks the same conversation (synthetic: a task seed drawn from ``np_random``; given
    ``conversations``: one of them). ``options={"task": i}`` picks the i-th task of
    ``conversations`` or ``task_seeds``; ``options={"state": s}`` resumes a saved state.

    ## Episode End

    Terminated after the scoring of the last of the first ``horizon`` sessions. Never truncated
    (wrap with ``TimeLimit`` to cap steps).

    ## Arguments

    * ``horizon`` (32): sessions per episode (fewer if a conversation is shorter).
    * ``conversations`` (None): real or pre-built ``Conversation``s; synthetic tasks otherwise.
    * ``synthetic_config`` (None): a ``memenv.data.SyntheticConfig`` for generated tasks.
    * ``task_seeds`` (None): restrict synthetic tasks to these seeds (train/validation splits).
    * ``reader`` (``ExtractiveReader()``): the frozen reader.
    * ``reward_mode`` ("session"), ``max_questions`` (None), ``question_seed`` (0).
    * ``slices_per_session`` (3): the paper uses 6 for LoCoMo's ~22-turn sessions; synthetic
      sessions are ~10 turns, and 3 slices keep prompts short for the tiny model while halving the
      number of generation calls.
    * ``single_agent`` (False): no extractor; the manager reads raw turns (the paper's ablation).
    * ``format_penalty`` (0.0), ``bloat_lambda`` (0.3), ``bloat_tau`` (0.7).
    * ``candidates_per_fact`` (5), ``max_candidates`` (25), ``max_facts_per_slice`` (32).
    * ``show_dates`` (None: as the conversation says, else True).
    * ``retriever`` (BM25), ``render_mode`` (None or "ansi").

    ## Version History

    * v0: initial version.
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 4}

    def __init__(
        self,
        horizon: int = 32,
        conversations: Sequence[Conversation] | None = None,
        synthetic_config: Any = None,
        task_seeds: Sequence[int] | None = None,
        reader: Reader | None = None,
        reward_mode: str = "session",
        max_questions: int | None = None,
        question_seed: int = 0,
        slices_per_session: int = 3,
        single_agent: bool = False,
        format_penalty: float = 0.0,
        bloat_lambda: float = 0.3,
        bloat_tau: float = 0.7,
        candidates_per_fact: int = 5,
        max_candidates: int = 25,
        max_facts_per_slice: int = 32,
        show_dates: bool | None = None,
        retriever: Retriever | None = None,
        render_mode: str | None = None,
    ):
        if horizon < 1:
            raise ValueError(f"horizon must be >= 1, got {horizon}")
        if reward_mode not in REWARD_MODES:
            raise ValueError(f"reward_mode must be one of {REWARD_MODES}, got {reward_mode!r}")
        if slices_per_session < 1:
            raise ValueError(f"slices_per_session must be >= 1, got {slices_per_session}")
        if max_questions is not None and max_questions < 1:
            raise ValueError(f"max_questions must be None or >= 1, got {max_questions}")
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be None or 'ansi', got {render_mode!r}")
        if conversations is not None:
            conversations = tuple(conversations)
            if not conversations or not all(isinstance(c, Conversation) for c in conversations):
                raise ValueError("conversations must be a non-empty sequence of memenv Conversation objects")
        if task_seeds is not None:
            task_seeds = tuple(int(s) for s in task_seeds)
            if not task_seeds:
                raise ValueError("task_seeds must not be empty")
        self.horizon = int(horizon)
        self.conversations = conversations
        self.task_seeds = task_seeds
        self.synthetic_config = synthetic_config
        if reader is None:
            from memenv.readers import ExtractiveReader

            reader = ExtractiveReader()
        self.reader = reader
        self.retriever = retriever or BM25Retriever()
        self.reward_mode = reward_mode
        self.max_questions = max_questions
        self.question_seed = int(question_seed)
        self.slices_per_session = int(slices_per_session)
        self.single_agent = bool(single_agent)
        self.format_penalty = float(format_penalty)
        self.bloat_lambda = float(bloat_lambda)
        self.bloat_tau = float(bloat_tau)
        self.candidates_per_fact = int(candidates_per_fact)
        self.max_candidates = int(max_candidates)
        self.max_facts_per_slice = int(max_facts_per_slice)
        self.show_dates = show_dates
        self.render_mode = render_mode

        self.observation_space = spaces.Dict(
            {"role": spaces.Discrete(2), "text": UnicodeText(MAX_OBS_CHARS)}
        )
        self.action_space = UnicodeText(MAX_ACTION_LENGTH)

        self._state: EnvState | None = None
        self._layout_cache: dict[str, tuple] = {}

    # ------------------------------------------------------------------ task selection

    @property
    def num_tasks(self) -> int | None:
        """Number of distinct tasks, or ``None`` for unbounded synthetic tasks."""
        if self.conversations is not None:
            return len(self.conversations)
        return len(self.task_seeds) if self.task_seeds is not None else None

    def _synthetic(self, task_seed: int) -> Conversation:
        from memenv.data.synthetic import SyntheticConfig, generate_conversation

        cfg = self.synthetic_config or SyntheticConfig()
        if cfg.num_sessions < self.horizon:
            cfg = replace(cfg, num_sessions=self.horizon)
        try:
            return _shared_synthetic(int(task_seed), cfg)
        except TypeError:  # an unhashable config (holding lists): generate without the cache
            return generate_conversation(int(task_seed), cfg)

    def _pick_task(self, options: dict) -> Conversation:
        if "conversation" in options:
            conv = options["conversation"]
            if not isinstance(conv, Conversation):
                raise TypeError("options['conversation'] must be a memenv Conversation")
            return conv
        if "task" in options:
            i = int(options["task"])
            if self.conversations is not None:
                if not 0 <= i < len(self.conversations):
                    raise IndexError(f"task {i} out of range: {len(self.conversations)} conversations")
                return self.conversations[i]
            if self.task_seeds is not None:
                if not 0 <= i < len(self.task_seeds):
                    raise IndexError(f"task {i} out of range: {len(self.task_seeds)} task seeds")
                return self._synthetic(self.task_seeds[i])
            return self._synthetic(i)
        if self.conversations is not None:
            return self.conversations[int(self.np_random.integers(len(self.conversations)))]
        if self.task_seeds is not None:
            return self._synthetic(self.task_seeds[int(self.np_random.integers(len(self.task_seeds)))])
        return self._synthetic(int(self.np_random.integers(2**31 - 1)))

    # ------------------------------------------------------------------ layout helpers

    def _layout(self, conv: Conversation) -> tuple:
        """Per episode session: (session, slices, cumulative dialogue words). Cached per conversation."""
        key = conv.conv_id
        cached = self._layout_cache.get(key)
        if cached is not None and cached[0] is conv:
            return cached[1]
        out, words = [], 0
        for sess in conv.sessions[: self.horizon]:
            turns = sess.turns
            n = min(self.slices_per_session, len(turns))
            bounds = np.linspace(0, len(turns), n + 1).round().astype(int) if n else [0]
            slices = tuple(turns[bounds[i] : bounds[i + 1]] for i in range(n))
            words += sum(len(tokenize(t.text)) for t in turns)
            out.append((sess, slices, words))
        layout = tuple(out)
        self._layout_cache[key] = (conv, layout)
        return layout

    def _config_key(self) -> tuple:
        return (self.horizon, self.slices_per_session, self.single_agent, self.reward_mode, self.max_questions, self.question_seed)

    def _dates_shown(self, conv: Conversation) -> bool:
        if self.show_dates is not None:
            return self.show_dates
        return dict(conv.meta).get("show_dates", "1") != "0"

    # ------------------------------------------------------------------ gym API

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        options = dict(options or {})
        if "state" in options:
            return self.restore_state(options["state"])
        conv = self._pick_task(options)
        state = EnvState(
            conversation=conv,
            pos=0,
            slice=0,
            role=MANAGER if self.single_agent else EXTRACTOR,
            pending=(),
            candidates=(),
            bank=MemoryBank(),
            stats=EpisodeStats(),
            done=False,
            rng="",
            config_key=self._config_key(),
        )
        if not any(slices for _, slices, _ in self._layout(conv)):
            raise ValueError(f"conversation {conv.conv_id!r} has no turns in its first {self.horizon} sessions")
        state, reward, info = self._settle(state, {})
        if self.single_agent and not state.done:
            state = self._prepare_manager(state, self._raw_facts(state))
        self._state = state
        return self._obs(), self._info(info)

    def step(self, action: str):
        st = self._state
        if st is None:
            raise RuntimeError("call reset() before step()")
        if st.done:
            raise RuntimeError("the episode has ended: call reset()")
        info: dict[str, Any] = {"acted_role": ROLES[st.role], "parse_error": None, "problems": []}
        reward = 0.0
        st = replace(st, stats=st.stats.bump(steps=1))
        if st.role == EXTRACTOR:
            res = parse_facts(action)
            facts, problems = self._check_facts(st, res.items) if res.error is None else ((), [])
            problems = list(res.problems) + problems
            st = replace(st, stats=st.stats.bump(facts=len(facts), invalid_facts=len(problems)))
            if facts:
                st = self._prepare_manager(st, facts)
            else:
                st, reward, info = self._advance(st, info)
        else:
            res = parse_operations(action)
            problems = list(res.problems)
            if res.error is None:
                st, op_problems = self._apply_ops(st, res.items)
                problems += op_problems
            st, reward, info = self._advance(st, info)
        if res.error is not None:
            info["parse_error"] = res.error
            st = replace(st, stats=st.stats.bump(parse_errors=1))
            reward -= self.format_penalty
        info["problems"] = problems
        self._state = st
        return self._obs(), float(reward), st.done, False, self._info(info)

    def render(self):
        if self.render_mode != "ansi" or self._state is None:
            return None
        st = self._state
        lines = [f"[{ROLES[st.role]}] session {self._session_number(st)} slice {st.slice + 1}", self._obs()["text"], "--- memory ---"]
        lines += [f"{e.id} [{e.speaker}] {e.content}" for e in st.bank]
        return "\n".join(lines)

    # ------------------------------------------------------------------ snapshots

    def save_state(self) -> EnvState:
        """Return the complete episode state as an immutable, picklable :class:`EnvState`."""
        if self._state is None:
            raise RuntimeError("call reset() before save_state()")
        return replace(self._state, rng=json.dumps(self.np_random.bit_generator.state))

    def restore_state(self, state: EnvState):
        """Continue from a saved state; returns ``(observation, info)`` like ``reset``.

        Replaying the same actions afterwards reproduces observations, rewards and info exactly.
        """
        if not isinstance(state, EnvState):
            raise TypeError(f"expected an EnvState from save_state(), got {type(state).__name__}")
        if state.config_key != self._config_key():
            raise ValueError(
                "this state was saved by an env with different settings "
                f"(horizon, slices, single_agent, reward_mode, max_questions, question_seed): "
                f"{state.config_key} != {self._config_key()}"
            )
        if state.rng:
            rng_state = json.loads(state.rng)
            gen = np.random.Generator(getattr(np.random, rng_state["bit_generator"])())
            gen.bit_generator.state = rng_state
            self._np_random = gen
        self._state = state
        return self._obs(), self._info({})

    # ------------------------------------------------------------------ scoring (public)

    def questions_for(
        self, session: int | None = None, mode: str | None = None, max_questions: int | None = -1
    ) -> tuple[QAItem, ...]:
        """The questions the env scores after ``session`` (1-based; default: the current one) in
        ``mode`` (default: the env's ``reward_mode``), as a seeded subset of at most
        ``max_questions`` (default: the env's setting; ``None``: all). The subset depends only on
        the task, the mode and the session, so every rollout of a task gets the same questions."""
        st = self._require_state()
        mode = mode or self.reward_mode
        if mode not in REWARD_MODES:
            raise ValueError(f"mode must be one of {REWARD_MODES}")
        conv = st.conversation
        k = self._session_number(st) if session is None else int(session)
        if mode == "session":
            qs = conv.questions_new_at(k)
        else:
            qs = conv.questions_valid_at(k)
        cap = self.max_questions if max_questions == -1 else max_questions
        return self._subset(conv, qs, f"{mode}:{k}", cap)

    def score_questions(self, questions: Sequence[QAItem], bank: MemoryBank | None = None) -> list[dict]:
        """Answer ``questions`` from ``bank`` (default: the current memory) and score them.

        Returns one record per question: ``qid``, ``question``, ``answer``, ``prediction``,
        ``f1``, ``bleu1``, ``evidence``, ``evidence_sessions``. Trainers use this for credit
        assignment; reader failures propagate as :class:`memenv.readers.ReaderError`.
        """
        bank = self._require_state().bank if bank is None else bank
        questions = list(questions)
        preds = self.reader.answer_many([q.question for q in questions], bank) if questions else []
        return [
            {
                "qid": q.qid,
                "question": q.question,
                "category": q.category,
                "answer": q.answer,
                "prediction": p,
                "f1": token_f1(p, q.answer),
                "bleu1": bleu1(p, q.answer),
                "evidence": list(q.evidence),
                "evidence_sessions": list(q.evidence_sessions()),
            }
            for q, p in zip(questions, preds)
        ]

    def bloat_penalty(self, bank: MemoryBank | None = None, session: int | None = None) -> float:
        """``lambda * max(0, (M - tau*W) / W)`` for ``bank`` after ``session`` (defaults: current)."""
        st = self._require_state()
        bank = st.bank if bank is None else bank
        layout = self._layout(st.conversation)
        k = (min(st.pos, len(layout) - 1) if session is None else self._pos_of(st, session))
        w = layout[k][2]
        if w <= 0:
            return 0.0
        return self.bloat_lambda * max(0.0, (bank.word_count - self.bloat_tau * w) / w)

    # ------------------------------------------------------------------ internals

    def _require_state(self) -> EnvState:
        if self._state is None:
            raise RuntimeError("call reset() first")
        return self._state

    def _session_number(self, st: EnvState) -> int:
        layout = self._layout(st.conversation)
        return layout[min(st.pos, len(layout) - 1)][0].index

    def _pos_of(self, st: EnvState, session: int) -> int:
        for i, (sess, _, _) in enumerate(self._layout(st.conversation)):
            if sess.index == session:
                return i
        raise ValueError(f"session {session} is not in this episode")

    def _subset(self, conv: Conversation, qs: tuple[QAItem, ...], tag: str, cap: int | None) -> tuple[QAItem, ...]:
        if cap is None or len(qs) <= cap:
            return qs
        seed = [self.question_seed, zlib.crc32(conv.conv_id.encode()), zlib.crc32(tag.encode())]
        idx = np.random.default_rng(seed).choice(len(qs), cap, replace=False)
        return tuple(qs[i] for i in sorted(idx))

    def _slice_turns(self, st: EnvState) -> tuple[Turn, ...]:
        return self._layout(st.conversation)[st.pos][1][st.slice]

    def _raw_facts(self, st: EnvState) -> tuple[Fact, ...]:
        return tuple(Fact(t.speaker, t.dia_id, t.text) for t in self._slice_turns(st))

    def _check_facts(self, st: EnvState, facts: Sequence[Fact]) -> tuple[tuple[Fact, ...], list[str]]:
        turns = self._slice_turns(st)
        speakers = {t.speaker.lower(): t.speaker for t in turns} | {s.lower(): s for s in st.conversation.speakers}
        dia_ids = {t.dia_id for t in turns}
        by_dia = {t.dia_id: t.speaker for t in turns}
        good, problems = [], []
        for n, f in enumerate(facts):
            if len(good) >= self.max_facts_per_slice:
                problems.append(f"fact {n}: over the limit of {self.max_facts_per_slice} facts per slice")
                continue
            dia_id = f.dia_id if f.dia_id in dia_ids else ""
            if f.dia_id and not dia_id:
                problems.append(f"fact {n}: dia_id {f.dia_id!r} is not in this slice (kept without a source)")
            speaker = speakers.get(f.speaker.lower()) or by_dia.get(dia_id)
            if speaker is None:
                problems.append(f"fact {n}: unknown speaker {f.speaker!r}")
                continue
            good.append(Fact(speaker, dia_id, f.text))
        return tuple(good), problems

    def _prepare_manager(self, st: EnvState, facts: tuple[Fact, ...]) -> EnvState:
        ids: list[int] = []
        seen: set[int] = set()
        for f in facts:
            for entry, _ in self.retriever.search(st.bank, f.text, self.candidates_per_fact, speaker=f.speaker):
                if entry.id not in seen and len(ids) < self.max_candidates:
                    seen.add(entry.id)
                    ids.append(entry.id)
        return replace(st, role=MANAGER, pending=facts, candidates=tuple(ids))

    def _apply_ops(self, st: EnvState, ops: Sequence[ParsedOp]) -> tuple[EnvState, list[str]]:
        problems: list[str] = []
        facts_by_dia = {f.dia_id: f for f in st.pending if f.dia_id}
        default = st.pending[0] if st.pending else None
        mem_ops: list[MemoryOp] = []
        for n, op in enumerate(ops):
            bank_id = None
            if op.op != OP_ADD and op.id is not None:
                if not 0 <= op.id < len(st.candidates):
                    problems.append(f"operation {n}: {op.op} id {op.id} is not one of the {len(st.candidates)} memories shown")
                    continue
                bank_id = st.candidates[op.id]
            src = facts_by_dia.get(op.dia_id) or default
            dia = op.dia_id if op.dia_id in facts_by_dia else (src.dia_id if src else "")
            speaker = op.speaker if op.speaker in st.conversation.speakers else (src.speaker if src else op.speaker)
            if op.op == OP_ADD and not speaker:
                problems.append(f"operation {n}: ADD without a known speaker")
                continue
            mem_ops.append(MemoryOp(op.op, bank_id, op.text, speaker, (dia,) if dia else ()))
        # DELETE then UPDATE of the same id in one action: later ops on a deleted id fail cleanly.
        session = self._session_number(st)
        date = self._layout(st.conversation)[st.pos][0].date
        bank, results = st.bank.apply(mem_ops, session=session, date=date)
        counts = {"adds": 0, "updates": 0, "deletes": 0, "noops": 0, "invalid_ops": len(problems)}
        name = {OP_ADD: "adds", OP_UPDATE: "updates", OP_DELETE: "deletes", OP_NOOP: "noops"}
        for r in results:
            if r.ok:
                counts[name[r.op.op]] += 1
            else:
                counts["invalid_ops"] += 1
                problems.append(r.error)
        return replace(st, bank=bank, stats=st.stats.bump(**counts)), problems

    def _advance(self, st: EnvState, info: dict) -> tuple[EnvState, float, dict]:
        """Move past the current slice; score the session if it ended."""
        st = replace(st, slice=st.slice + 1, pending=(), candidates=(), role=MANAGER if self.single_agent else EXTRACTOR)
        st, reward, info = self._settle(st, info)
        if self.single_agent and not st.done:
            st = self._prepare_manager(st, self._raw_facts(st))
        return st, reward, info

    def _settle(self, st: EnvState, info: dict) -> tuple[EnvState, float, dict]:
        """Score every session whose slices are exhausted, then stop at the next real step."""
        layout = self._layout(st.conversation)
        reward = 0.0
        while not st.done and st.slice >= len(layout[st.pos][1]):
            r, info = self._score_session(st, info)
            reward += r
            pos = st.pos + 1
            st = replace(st, pos=pos, slice=0, done=pos >= len(layout))
            if st.done:
                st = replace(st, pos=len(layout) - 1)
        return st, reward, info

    def _score_session(self, st: EnvState, info: dict) -> tuple[float, dict]:
        layout = self._layout(st.conversation)
        session = layout[st.pos][0].index
        last = st.pos == len(layout) - 1
        if self.reward_mode == "final" and not last:
            return 0.0, {**info, "session_end": session}
        questions = self.questions_for(session=session)
        qa = self.score_questions(questions, st.bank)
        mean_f1 = float(np.mean([r["f1"] for r in qa])) if qa else 0.0
        penalty = self.bloat_penalty(st.bank, session=session)
        held = st.bank.source_ids()
        evidence = [d for q in questions for d in q.evidence]
        m_fail = (sum(d not in held for d in evidence) / len(evidence)) if evidence else None
        info = dict(info)
        info.setdefault("qa", [])
        info["qa"] = info["qa"] + qa
        info.update(session_end=session, f1=mean_f1, penalty=penalty, m_fail=m_fail, num_questions=len(qa))
        return mean_f1 - penalty, info

    def _obs(self) -> dict:
        st = self._state
        if st is None or st.done:
            return {"role": EXTRACTOR, "text": ""}
        conv = st.conversation
        sess = self._layout(conv)[st.pos][0]
        lines = [f"date: {sess.date}"] if self._dates_shown(conv) and sess.date else []
        if st.role == EXTRACTOR:
            lines += [f"[{t.dia_id}] {t.speaker}: {_one_line(t.text)}" for t in self._slice_turns(st)]
        else:
            lines.append("turns:" if self.single_agent else "facts:")
            lines += [f"[{f.dia_id}] {f.speaker}: {_one_line(f.text)}" if f.dia_id else f"{f.speaker}: {_one_line(f.text)}" for f in st.pending]
            lines.append("memories:")
            for i, bid in enumerate(st.candidates):
                e = st.bank.get(bid)
                lines.append(f"{i} [{e.speaker}] {_one_line(e.content)}")
        text = "\n".join(lines)
        if len(text) > MAX_OBS_CHARS:
            text = text[: MAX_OBS_CHARS - 15] + "\n[truncated]"
        return {"role": st.role, "text": text}

    def _info(self, info: dict) -> dict:
        st = self._state
        assert st is not None
        info = dict(info)
        info.update(
            conv_id=st.conversation.conv_id,
            session=self._session_number(st),
            slice=st.slice,
            role=ROLES[st.role],
            memory_size=len(st.bank),
            memory_words=st.bank.word_count,
            stats=st.stats.as_dict(),
        )
        if st.done:
            return info
        if st.role == EXTRACTOR:
            info["slice_dia_ids"] = [t.dia_id for t in self._slice_turns(st)]
        else:
            info["facts"] = [f.__dict__.copy() for f in st.pending]
            info["candidates"] = [
                {"id": i, "bank_id": b, "speaker": st.bank.get(b).speaker, "content": st.bank.get(b).content, "source_ids": list(st.bank.get(b).source_ids)}
                for i, b in enumerate(st.candidates)
            ]
        if st.conversation.gold_ops:
            info["gold"] = self._gold_info(st)
        return info

    def _gold_info(self, st: EnvState) -> dict:
        gold = st.conversation.gold_by_dia_id()
        if st.role == EXTRACTOR:
            return {"facts": [gold[t.dia_id].__dict__.copy() for t in self._slice_turns(st) if t.dia_id in gold]}
        keys = []
        for b in st.candidates:
            srcs = [gold[d] for d in st.bank.get(b).source_ids if d in gold]
            keys.append(srcs[-1].key if srcs else None)
        ops = {f.dia_id: gold[f.dia_id].__dict__.copy() for f in st.pending if f.dia_id in gold}
        return {"ops": ops, "candidate_keys": keys}


@functools.lru_cache(maxsize=256)
def _shared_synthetic(task_seed: int, config) -> Conversation:
    """Synthetic conversations shared by every env in the process (a vector of envs or a
    trainer's env pool resets on the same tasks again and again). Conversations are never
    mutated by the env, so sharing them is safe."""
    from memenv.data.synthetic import generate_conversation

    return generate_conversation(task_seed, config)

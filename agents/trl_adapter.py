"""``MemSession-v0`` as a TRL tool environment (``GRPOTrainer(environment_factory=...)``).

TRL's ``environment_factory`` contract (TRL >= 1.x, experimental there):

* the factory is called with no arguments and returns an environment instance; TRL keeps a pool
  of instances and reuses them, one per rollout;
* at the start of each rollout TRL calls ``reset(**row)`` with every column of the dataset row
  (``prompt`` included); a returned string is appended to the row's last user message;
* every public method other than ``reset`` and ``get_reward`` becomes a tool: its name, type
  hints and Google-style docstring are rendered into the tool schema the model sees, and a tool
  that raises (bad arguments included: a missing or unknown argument, a wrong type, a memory
  number not shown) sends ``{"error": message}`` back to the model, and the rollout goes on;
* ``get_reward()`` (no arguments, returns a float) is called once per finished rollout and
  serves as a reward function of weight 1.

:class:`MemoryToolEnv` plays the task as the paper's single-agent ablation (the manager reads
the raw turns, ``single_agent=True``): each observation is a slice of dialogue plus the related
memories, numbered 0..k-1. The model calls :meth:`~MemoryToolEnv.add_memory`,
:meth:`~MemoryToolEnv.update_memory` and :meth:`~MemoryToolEnv.delete_memory` for that slice,
then :meth:`~MemoryToolEnv.next_turns` to apply them and read the next slice. Operations are
checked when called (unknown memory numbers raise, so the model is told at once), and applied
together as one env step. The reward is the env's episode return: the session scores (mean F1
of the reader's answers minus the bloat penalty). If the model stops before the end, the
remaining slices are played with no operations when the reward is asked for, so every rollout is
scored on the same questions.

Each tool call is counted on the instance (``tool_calls``, ``tool_errors``), and every scored
episode leaves a summary in ``history`` (reward, calls, errors and the env's operation counters),
so a training run can report what the model actually did.

TRL appends the text ``reset`` returns to the last user message as is, with no separator:
:data:`DEFAULT_PROMPT` ends with a blank line for that; end your own prompt the same way.

A dataset row names its episode with any of these columns (the others are ignored):

* ``seed``: ``env.reset(seed=seed)``, the same task for every rollout of the row;
* ``task``: the index of a conversation (``conversations=``) or a task seed (``task_seeds=``);
* ``state``: a snapshot to start from, an ``EnvState`` or the string of :func:`encode_state`.

Example::

    from agents.trl_adapter import MemoryToolEnv, DEFAULT_PROMPT
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": DEFAULT_PROMPT}]] * 64,
                                 "seed": list(range(64))})
    trainer = GRPOTrainer(model=path, train_dataset=dataset, args=GRPOConfig(...),
                          environment_factory=MemoryToolEnv.factory(horizon=4))

TRL is an optional dependency: nothing here imports it.
"""

from __future__ import annotations

import base64
import collections
import functools
import json
import pickle
from typing import Any, Callable

import gymnasium as gym

import memenv  # noqa: F401  (registers MemSession-v0)
from memenv.env import EnvState

__all__ = ["MemoryToolEnv", "DEFAULT_PROMPT", "encode_state", "decode_state", "reward_from_environments", "reply_stats"]

#: A user prompt that explains the tools; put it in the dataset's ``prompt`` column.
DEFAULT_PROMPT = (
    "You keep a memory of a long conversation between two people, one slice at a time. "
    "Each slice shows the new dialogue turns and the stored memories related to them, numbered 0, 1, 2... "
    "For each new fact worth remembering call add_memory; when a turn changes a stored fact call "
    "update_memory with its number; when a turn makes a stored fact false call delete_memory. "
    "Keep memories short and self-contained. When you are done with a slice, call next_turns to "
    "read the next one. Continue until next_turns says the conversation is over.\n\n"
)

_END = "The conversation is over. No more turns."


def _tool(method: Callable) -> Callable:
    """Count a tool's calls and failures on the instance; the signature, type hints and docstring
    (what TRL renders into the tool schema) are the method's own."""

    @functools.wraps(method)
    def counted(self, *args: Any, **kwargs: Any) -> str:
        self.tool_calls[method.__name__] += 1
        try:
            return method(self, *args, **kwargs)
        except Exception:
            self.tool_errors += 1
            raise

    return counted


def encode_state(state: EnvState) -> str:
    """A snapshot as an ASCII string, for a dataset column (base64 of its pickle)."""
    if not isinstance(state, EnvState):
        raise TypeError(f"expected an EnvState from save_state(), got {type(state).__name__}")
    return base64.b64encode(pickle.dumps(state)).decode("ascii")


def decode_state(value: EnvState | str | bytes) -> EnvState:
    """Inverse of :func:`encode_state`; also accepts an ``EnvState`` or raw pickle bytes.

    Like any pickle, only decode strings you made yourself.
    """
    if isinstance(value, EnvState):
        return value
    if isinstance(value, str):
        value = base64.b64decode(value.encode("ascii"), validate=True)
    if not isinstance(value, (bytes, bytearray)):
        raise TypeError(f"a state must be an EnvState, its encode_state() string or pickle bytes, got {type(value).__name__}")
    state = pickle.loads(value)
    if not isinstance(state, EnvState):
        raise TypeError(f"the decoded state is a {type(state).__name__}, not an EnvState")
    return state


class MemoryToolEnv:
    """A ``MemSession-v0`` episode driven by tool calls (see the module docstring).

    Args:
        env: an existing ``MemSession-v0`` env created with ``single_agent=True``; if omitted,
            one is made with ``gym.make("MemSession-v0", single_agent=True, **env_kwargs)``.
        finish_on_reward: when ``get_reward()`` is called before the episode ends, play the
            remaining slices with no operations first (default). If ``False``, return the
            reward collected so far.
        history: how many episode summaries to keep in ``history`` (the latest ones).
        **env_kwargs: ``MemSession-v0`` arguments (``horizon``, ``conversations``, ``reader``...).

    Use :meth:`factory` to get the no-argument callable TRL wants. Besides the tools and
    ``reset``/``get_reward``, the instance exposes attributes only (TRL turns every public
    method into a tool): ``env``, ``done``, ``total_reward``, ``last_info``, ``pending``,
    ``tool_calls`` (a ``Counter`` of this episode's calls by tool, failed ones included),
    ``tool_errors`` (this episode's failed calls) and ``history`` (one dict per scored episode:
    ``row``, ``reward``, ``tool_calls``, ``tool_errors``, ``finished_by_model`` and ``stats``, the
    env's counters such as ``adds``, ``updates``, ``deletes`` and ``invalid_ops`` for this episode
    only).
    """

    def __init__(self, env: gym.Env | None = None, *, finish_on_reward: bool = True, history: int = 10_000, **env_kwargs: Any):
        if env is None:
            if not env_kwargs.pop("single_agent", True):
                raise ValueError("MemoryToolEnv plays the single-agent task (the manager reads raw turns): single_agent must be True")
            env = gym.make("MemSession-v0", single_agent=True, **env_kwargs)
        elif env_kwargs:
            raise TypeError(f"pass either env or MemSession-v0 arguments, not both (got {sorted(env_kwargs)})")
        if not getattr(env.unwrapped, "single_agent", False):
            raise ValueError("MemoryToolEnv needs a MemSession-v0 env made with single_agent=True")
        self.env = env
        self.finish_on_reward = bool(finish_on_reward)
        self.done = False
        self.total_reward = 0.0
        self.last_info: dict = {}
        self.pending: list[dict] = []
        self.tool_calls: collections.Counter = collections.Counter()
        self.tool_errors = 0
        self.history: collections.deque = collections.deque(maxlen=history)
        self._started = False
        self._row: dict = {}
        self._scored = False
        self._stats_at_reset: dict = {}

    @classmethod
    def factory(cls, **kwargs: Any) -> Callable[[], "MemoryToolEnv"]:
        """A no-argument callable making instances with ``kwargs``: pass it as ``environment_factory``."""
        return functools.partial(cls, **kwargs)

    # -- TRL lifecycle ------------------------------------------------------------------------

    def reset(self, **row: Any) -> str:
        """Start the episode the dataset row names (``seed``, ``task`` or ``state``; other
        columns such as ``prompt`` are ignored) and return the first slice as text."""
        seed, task, state = row.get("seed"), row.get("task"), row.get("state")
        if seed is None and task is None and state is None:
            raise ValueError("the dataset row must name its episode with a 'seed', 'task' or 'state' column")
        options: dict[str, Any] = {}
        if state is not None:
            options["state"] = decode_state(state)
        elif task is not None:
            options["task"] = int(task)
        obs, info = self.env.reset(seed=None if seed is None else int(seed), options=options)
        self.total_reward = 0.0
        self.pending = []
        self.tool_calls = collections.Counter()
        self.tool_errors = 0
        self._row = {k: v for k, v in (("seed", seed), ("task", task)) if v is not None}
        self._scored = False
        self._started = True
        self._stats_at_reset = dict(info.get("stats", {}))  # a saved state brings its episode's counts
        self._accept(obs, False, info)
        return self._render(obs, info)

    def get_reward(self) -> float:
        """The episode return (session scores summed), finishing the episode first if needed."""
        self._require_started()
        finished_by_model = self.done
        if self.finish_on_reward:
            while not self.done:
                self._step()
        if not self._scored:
            self._scored = True
            self.history.append({
                "row": dict(self._row), "reward": float(self.total_reward), "tool_calls": dict(self.tool_calls),
                "tool_errors": self.tool_errors, "finished_by_model": finished_by_model,
                "stats": self._episode_stats(),
            })
        return float(self.total_reward)

    # -- tools --------------------------------------------------------------------------------

    @_tool
    def add_memory(self, text: str, speaker: str, dia_id: str = "") -> str:
        """Store a new memory.

        Args:
            text: The memory, one short self-contained fact, for example "Alice lives in Paris."
            speaker: The name of the person the fact is about, as written in the dialogue.
            dia_id: The id of the turn the fact comes from, for example "D3:2".

        Returns:
            A confirmation that the memory will be stored when next_turns is called.
        """
        self._require_open()
        text = _clean(text, "text")
        self.pending.append({"op": "ADD", "text": text, "speaker": str(speaker).strip(), "dia_id": str(dia_id).strip()})
        return f"Queued: add {text!r}."

    @_tool
    def update_memory(self, memory_id: int, text: str, dia_id: str = "") -> str:
        """Replace the content of a stored memory whose fact has changed.

        Args:
            memory_id: The number of the memory, as shown in the list of memories.
            text: The new content of the memory, one short self-contained fact.
            dia_id: The id of the turn the change comes from, for example "D3:2".

        Returns:
            A confirmation that the memory will be updated when next_turns is called.
        """
        self._require_open()
        memory_id = self._check_id(memory_id)
        text = _clean(text, "text")
        self.pending.append({"op": "UPDATE", "id": memory_id, "text": text, "dia_id": str(dia_id).strip()})
        return f"Queued: update memory {memory_id} to {text!r}."

    @_tool
    def delete_memory(self, memory_id: int) -> str:
        """Delete a stored memory that the dialogue shows is no longer true.

        Args:
            memory_id: The number of the memory, as shown in the list of memories.

        Returns:
            A confirmation that the memory will be deleted when next_turns is called.
        """
        self._require_open()
        memory_id = self._check_id(memory_id)
        self.pending.append({"op": "DELETE", "id": memory_id})
        return f"Queued: delete memory {memory_id}."

    @_tool
    def next_turns(self) -> str:
        """Apply the queued memory changes and move on to the next slice of the conversation.

        Returns:
            The next dialogue turns with their related memories, or a message that the conversation is over.
        """
        self._require_open()
        return self._step()

    # -- internals ----------------------------------------------------------------------------

    def _step(self) -> str:
        """Apply the queued operations as one env step; the text :meth:`next_turns` returns."""
        action = json.dumps({"operations": self.pending}, ensure_ascii=False)
        self.pending = []
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.total_reward += float(reward)
        self._accept(obs, terminated or truncated, info)
        skipped = info.get("problems") or []
        note = f"({len(skipped)} operation(s) skipped: {'; '.join(skipped[:3])})\n" if skipped else ""
        return note + (_END if self.done else self._render(obs, info))

    def _episode_stats(self) -> dict:
        """The env's counters (``adds``, ``updates``...) for what happened since :meth:`reset`: a row
        that starts from a saved ``state`` does not count the operations made before it was saved."""
        now = dict(self.last_info.get("stats", {}))
        return {k: v - self._stats_at_reset.get(k, 0) if isinstance(v, (int, float)) and not isinstance(v, bool) else v
                for k, v in now.items()}

    def _accept(self, obs: dict, done: bool, info: dict) -> None:
        self.done = bool(done)
        self.last_info = info

    def _render(self, obs: dict, info: dict) -> str:
        if self.done:
            return _END
        return f"Session {info.get('session', '?')}, part {int(info.get('slice', 0)) + 1}:\n{obs['text']}"

    def _require_started(self) -> None:
        if not self._started:
            raise RuntimeError("call reset() first")

    def _require_open(self) -> None:
        self._require_started()
        if self.done:
            raise RuntimeError("the conversation is over; no more memory changes are possible")

    def _check_id(self, memory_id: Any) -> int:
        """The memory number as an int, if it is one of the numbers shown for this slice."""
        shown = len(self.last_info.get("candidates", []))
        value = _as_int(memory_id)
        if value is None or not 0 <= value < shown:
            valid = f"the numbers shown are 0 to {shown - 1}" if shown else "no memories are shown for these turns"
            raise ValueError(f"there is no memory {memory_id!r} in the list shown: {valid}")
        return value


def _as_int(value: Any) -> int | None:
    """An int from an int, an integral float or a digit string (models write all three)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


def reward_from_environments(environments: list, **kwargs: Any) -> list[float]:
    """A TRL reward function that reads each rollout's :meth:`MemoryToolEnv.get_reward`.

    Only for TRL versions whose ``environment_factory`` does not call ``get_reward`` itself
    (TRL 1.16 does): passing it there too would count the reward twice.
    """
    return [env.get_reward() for env in environments]


def reply_stats(completions: list, log_metric: Callable[[str, float], None] | None = None, **kwargs: Any) -> list[None]:
    """A TRL reward function that scores nothing and logs what the model's replies were.

    Give it to ``GRPOTrainer(reward_funcs=[reply_stats], ...)`` next to the env: it returns ``None``
    for every rollout (TRL turns that into NaN and leaves it out of the reward), and through TRL's
    ``log_metric`` it logs, per step, ``replies/per_rollout`` (assistant turns per rollout),
    ``replies/with_tool_call`` (the share of those turns that TRL parsed into at least one tool
    call: a turn without one ends the rollout's tool loop) and ``replies/parsed_calls_per_rollout``.
    ``completions`` is what TRL passes: per rollout, the list of assistant and tool messages.
    """
    replies = with_call = calls = 0
    for messages in completions:
        for message in messages if isinstance(messages, list) else []:
            if isinstance(message, dict) and message.get("role") == "assistant":
                replies += 1
                parsed = message.get("tool_calls") or []
                with_call += bool(parsed)
                calls += len(parsed)
    if log_metric is not None and completions:
        log_metric("replies/per_rollout", replies / len(completions))
        log_metric("replies/with_tool_call", with_call / replies if replies else 0.0)
        log_metric("replies/parsed_calls_per_rollout", calls / len(completions))
    return [None] * len(completions)


def _clean(text: Any, name: str) -> str:
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{name} must be a non-empty string")
    return text.strip()

"""A warm start for the TRL path: the noisy teacher's episodes as ``MemoryToolEnv`` tool-call chats.

An instruct model that has never seen the task's action format writes few tool calls that parse,
so GRPO's rewards do not vary (docs/third_party.md). The project's own pipeline warm-starts on a
noisy teacher; this module gives the TRL path the same, in the form TRL's ``SFTTrainer`` takes:

* :func:`teacher_conversation` plays one episode of :class:`agents.trl_adapter.MemoryToolEnv` with
  :class:`agents.baselines.NoisyTeacher` as the manager and records it as the chat the model would
  have had under ``GRPOTrainer(environment_factory=...)``: the same first user message
  (:data:`~agents.trl_adapter.DEFAULT_PROMPT` plus the first slice), one assistant reply per slice
  whose tool calls are the teacher's operations followed by ``next_turns``, the tools' answers as
  ``tool`` messages (the text TRL would send back, errors included), and a short final reply
  (:data:`FINAL_REPLY`) once ``next_turns`` says the conversation is over.
* :func:`build_sft_dataset` makes rows ``{"messages": [...], "tools": "<JSON>"}`` for
  ``SFTConfig(assistant_only_loss=True)``. Tool-call arguments are stored as JSON strings (a
  ``datasets`` table would otherwise merge the argument sets of different tools into one struct and
  add ``null`` arguments); the project's template renders such a string exactly as it renders the
  dict (:func:`arguments_text`).
* :func:`check_round_trip` renders every assistant reply with the tokenizer's template and parses it
  back the way ``GRPOTrainer`` parses a generated reply; a reply that does not come back as the same
  calls stops the build with the example and reply named, before any training.

Nothing here imports TRL at module level; :func:`require_trl` checks the installed version.
"""

from __future__ import annotations

import inspect
import json
from typing import Any, Callable, Sequence

from agents.trl_adapter import DEFAULT_PROMPT, MemoryToolEnv

__all__ = [
    "FINAL_REPLY", "TRL_MIN_VERSION", "require_trl", "tool_methods", "tool_schemas", "arguments_text", "operation_calls",
    "teacher_conversation", "teacher_return", "build_sft_dataset", "check_round_trip", "parse_reply", "call_tool",
]

#: What the teacher answers after ``next_turns`` reports the end: a reply without a tool call,
#: which ends TRL's tool loop.
FINAL_REPLY = "Done."

#: The first TRL release whose ``GRPOTrainer`` takes ``environment_factory`` with the interface
#: ``MemoryToolEnv`` implements (and whose ``SFTTrainer`` reads a ``tools`` column).
TRL_MIN_VERSION = "1.16"


def require_trl(feature: str = "GRPOTrainer(environment_factory=...)") -> str:
    """The installed TRL version; raises ``ImportError`` naming the version needed when TRL is
    missing or its ``GRPOTrainer`` has no ``environment_factory`` argument."""
    try:
        import trl
        from trl import GRPOTrainer
    except ImportError as err:
        raise ImportError(f"{feature} needs TRL >= {TRL_MIN_VERSION}: pip install 'memory-r2[trl]' ({err})") from err
    if "environment_factory" not in inspect.signature(GRPOTrainer.__init__).parameters:
        raise ImportError(
            f"{feature} needs TRL >= {TRL_MIN_VERSION}, whose GRPOTrainer takes environment_factory; "
            f"TRL {trl.__version__} is installed: pip install -U 'trl>={TRL_MIN_VERSION}'"
        )
    return trl.__version__


def tool_methods(env: MemoryToolEnv) -> list[Callable]:
    """The env's tools in the order ``GRPOTrainer`` lists them: its public methods other than
    ``reset`` and ``get_reward``, by name (``inspect.getmembers`` order)."""
    return [
        getattr(env, name) for name, _ in inspect.getmembers(type(env), predicate=inspect.isfunction)
        if name not in ("reset", "get_reward") and not name.startswith("_")
    ]


def tool_schemas(env: MemoryToolEnv) -> list[dict]:
    """The JSON schemas ``apply_chat_template`` makes of :func:`tool_methods` (the system section a
    model sees under ``GRPOTrainer``)."""
    from transformers.utils import get_json_schema

    return [get_json_schema(method) for method in tool_methods(env)]


def arguments_text(arguments: dict) -> str:
    """A call's arguments as the project's tool template writes them (``tojson`` with ``</``
    written ``<\\/``): the template renders this string exactly as it renders the dict."""
    return json.dumps(arguments, ensure_ascii=False).replace("</", "<\\/")


def operation_calls(operations: Sequence[dict]) -> list[tuple[str, dict]]:
    """``MemSession-v0`` operations as ``MemoryToolEnv`` tool calls ``(name, arguments)``; NOOPs are
    dropped (the tools have none). Raises ``ValueError`` for an unknown ``op``."""
    calls = []
    for op in operations:
        kind = op.get("op")
        if kind == "ADD":
            calls.append(("add_memory", {"text": op["text"], "speaker": op.get("speaker", ""), "dia_id": op.get("dia_id", "")}))
        elif kind == "UPDATE":
            calls.append(("update_memory", {"memory_id": int(op["id"]), "text": op["text"], "dia_id": op.get("dia_id", "")}))
        elif kind == "DELETE":
            calls.append(("delete_memory", {"memory_id": int(op["id"])}))
        elif kind != "NOOP":
            raise ValueError(f"unknown memory operation {kind!r} in {op}")
    return calls


def call_tool(tools: dict[str, Callable], name: str, arguments: Any) -> tuple[str, bool]:
    """Run one parsed call as ``GRPOTrainer`` does; returns the answer it sends back
    (``str(result)``, or ``str({"error": ...})`` when the tool does not exist, the arguments are not
    an object, or the tool raises) and whether the call failed."""
    try:
        if name not in tools:
            raise ValueError(f"Tool {name} not found.")
        if not isinstance(arguments, dict):
            raise TypeError(f"the arguments of {name} are not an object")
        return str(tools[name](**arguments)), False
    except Exception as err:  # noqa: BLE001 (TRL sends any tool error back to the model)
        return str({"error": str(err)}), True


def teacher_conversation(env: MemoryToolEnv, teacher: Any, row: dict, prompt: str = DEFAULT_PROMPT) -> tuple[list[dict], float]:
    """Play the episode ``row`` names (``seed``, ``task`` or ``state``) with ``teacher`` (an agent
    with ``act(observation, info)``, e.g. :class:`~agents.baselines.NoisyTeacher`) as the manager,
    through the env's tools. Returns the chat (arguments as dicts) and the episode return.

    The manager reads the raw turns here, so a teacher with a ``keeps(dia_id)`` method (the noisy
    teacher) also misses the facts its extractor would miss: the data carry both kinds of mistakes
    at the teacher's rate, as the two-role warm start of ``memr2 sft`` does."""
    tools = {method.__name__: method for method in tool_methods(env)}
    messages = [{"role": "user", "content": prompt + env.reset(**row)}]
    while not env.done:
        info = env.last_info
        if hasattr(teacher, "keeps"):  # the manager reads raw turns: it also makes the extractor's misses
            info = {**info, "facts": [f for f in info.get("facts", []) if teacher.keeps(f["dia_id"])]}
        action = teacher.act({"role": info.get("role", 1), "text": ""}, info)
        try:
            operations = json.loads(action)["operations"]
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"the teacher's action is not an operations object: {action[:200]!r}") from err
        calls = operation_calls(operations) + [("next_turns", {})]
        messages.append({"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": name, "arguments": arguments}} for name, arguments in calls]})
        for name, arguments in calls:
            messages.append({"role": "tool", "name": name, "content": call_tool(tools, name, arguments)[0]})
    messages.append({"role": "assistant", "content": FINAL_REPLY})
    return messages, env.get_reward()


def teacher_return(env: MemoryToolEnv, row: dict, *, noise: float = 0.3, draws: int = 4, seed: int = 0) -> float:
    """The noisy teacher's mean episode return on the episode ``row`` names, over ``draws`` draws of
    its mistakes (``NoisyTeacher(noise, seed=seed + j)``), played in ``env``.

    A measure of how hard that conversation is for a policy that plays like the warm start's data:
    ``examples/trl_grpo.py`` logs it beside each step's rewards, because a GRPO step plays one
    conversation, and which one moves a step's mean reward more than a few updates do.
    Deterministic in ``(row, env settings, noise, draws, seed)``."""
    from agents.baselines import NoisyTeacher

    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    return sum(teacher_conversation(env, NoisyTeacher(noise=noise, seed=seed + j), row)[1] for j in range(draws)) / draws


def build_sft_dataset(rows: Sequence[dict], *, env_kwargs: dict, noise: float = 0.3, seed: int = 0,
                      prompt: str = DEFAULT_PROMPT) -> tuple[list[dict], dict]:
    """SFT rows ``{"messages", "tools"}`` from the noisy teacher on each episode of ``rows``, and a
    summary (episodes, replies, calls by tool, tool errors, the teacher's mean return).

    The teacher's mistakes are redrawn per episode (``NoisyTeacher(noise, seed=seed + i)``), so the
    data shows a spread of decisions around the gold log; ``env_kwargs`` are the ``MemSession-v0``
    arguments (see :func:`agents.presets.env_kwargs`). Deterministic in ``(rows, env_kwargs, noise, seed)``.
    """
    from agents.baselines import NoisyTeacher

    env = MemoryToolEnv(**env_kwargs)
    schemas = json.dumps(tool_schemas(env))
    examples, returns, calls, errors, replies = [], [], {}, 0, 0
    for i, row in enumerate(rows):
        messages, ret = teacher_conversation(env, NoisyTeacher(noise=noise, seed=seed + i), row, prompt)
        returns.append(ret)
        for m in messages:
            if m["role"] == "assistant":
                replies += 1
                for call in m.get("tool_calls") or []:
                    fn = call["function"]
                    calls[fn["name"]] = calls.get(fn["name"], 0) + 1
                    fn["arguments"] = arguments_text(fn["arguments"])
            elif m["role"] == "tool" and m["content"].startswith("{'error'"):
                errors += 1
        examples.append({"messages": messages, "tools": schemas})
    summary = {"episodes": len(examples), "replies": replies, "tool_calls": dict(sorted(calls.items())), "tool_errors": errors,
               "teacher_mean_return": sum(returns) / max(len(returns), 1)}
    return examples, summary


def parse_reply(tokenizer: Any, ids: list[int], prefix: list[int], tools: list | None) -> dict:
    """A generated reply's token ids parsed as ``GRPOTrainer`` parses them (TRL's ``parse_response``
    when TRL is installed, else ``tokenizer.parse_response``): ``{"content", "tool_calls"?}``."""
    try:
        from trl.chat_template_utils import parse_response
    except ImportError:
        try:
            return tokenizer.parse_response(ids, prefix=prefix, tools=tools)
        except Exception:  # noqa: BLE001 (as TRL does: a reply that does not parse is text)
            return {"role": "assistant", "content": tokenizer.decode(ids, skip_special_tokens=True)}
    return parse_response(tokenizer, ids, prefix=prefix, tools=tools)


def _calls_of(message: dict) -> list[tuple[str, dict]]:
    out = []
    for call in message.get("tool_calls") or []:
        fn = call.get("function", call)
        arguments = fn.get("arguments")
        out.append((fn.get("name"), json.loads(arguments) if isinstance(arguments, str) else arguments))
    return out


def check_round_trip(tokenizer: Any, examples: Sequence[dict], chat_template_kwargs: dict | None = None) -> int:
    """Render every assistant reply of ``examples`` with ``tokenizer``'s chat template and parse it
    back as ``GRPOTrainer`` would; returns the number of replies checked.

    Raises:
        ValueError: naming the example, the reply, the text the template renders and what it parses
            back as, when a reply's tool calls (name and arguments) or its text do not come back, or
            when the rendered prompt is not a token prefix of the rendered reply.
    """
    kwargs = dict(chat_template_kwargs or {})
    checked = 0
    for k, example in enumerate(examples):
        messages = example["messages"]
        tools = example.get("tools")
        tools = json.loads(tools) if isinstance(tools, str) else tools
        for j, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt_ids = tokenizer.apply_chat_template(messages[:j], tools=tools, add_generation_prompt=True, tokenize=True,
                                                       return_dict=False, **kwargs)
            full_ids = tokenizer.apply_chat_template(messages[: j + 1], tools=tools, tokenize=True, return_dict=False, **kwargs)
            where = f"warm-start example {k} (reply {j} of its chat)"
            try:
                want = _calls_of(message)
            except ValueError as err:
                raise ValueError(f"{where}: a tool call's arguments are not a JSON object ({err}): {message['tool_calls']}") from None
            if full_ids[: len(prompt_ids)] != prompt_ids:
                raise ValueError(f"{where}: the rendered prompt is not a token prefix of the prompt and reply; "
                                 f"the template renders this chat differently with and without the reply")
            reply_ids = full_ids[len(prompt_ids):]
            parsed = parse_reply(tokenizer, reply_ids, prompt_ids, tools)
            got = _calls_of(parsed)
            text_ok = (parsed.get("content") or "").strip() == (message.get("content") or "").strip()
            if want != got or not text_ok:
                raise ValueError(
                    f"{where}: the template renders {tokenizer.decode(reply_ids)!r}, which parses back as tool calls "
                    f"{got} and text {parsed.get('content')!r}, not as {want} and {message.get('content')!r}"
                )
            checked += 1
    return checked

"""The TRL environment_factory adapter, tested against TRL's contract without installing TRL."""

from __future__ import annotations

import inspect
import json
import pickle
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import pytest

import memenv  # noqa: F401
from agents.trl_adapter import DEFAULT_PROMPT, MemoryToolEnv, decode_state, encode_state, reward_from_environments

H = 2
ROOT = Path(__file__).resolve().parent.parent
ROW = {"prompt": [{"role": "user", "content": DEFAULT_PROMPT}]}
TOOLS = {"add_memory", "update_memory", "delete_memory", "next_turns"}


def trl_tools(instance) -> dict:
    """The tools TRL would expose: public functions of the class except reset and get_reward."""
    return {
        name: getattr(instance, name)
        for name, _ in inspect.getmembers(type(instance), predicate=inspect.isfunction)
        if name not in ("reset", "get_reward") and not name.startswith("_")
    }


def turn_lines(text: str) -> list[tuple[str, str, str]]:
    out = []
    for line in text.splitlines():
        if line.startswith("[D") and "] " in line and ": " in line:
            dia, rest = line[1:].split("] ", 1)
            speaker, said = rest.split(": ", 1)
            out.append((dia, speaker, said))
    return out


# ---------------------------------------------------------------------------------------------
# The contract
# ---------------------------------------------------------------------------------------------


def test_factory_and_tool_surface_match_trls_contract():
    factory = MemoryToolEnv.factory(horizon=H)
    a, b = factory(), factory()  # TRL calls the factory with no arguments, once per rollout slot
    assert a is not b and a.env is not b.env
    assert callable(a.reset) and callable(a.get_reward)
    assert set(trl_tools(a)) == TOOLS
    assert not inspect.signature(MemoryToolEnv.get_reward).parameters.keys() - {"self"}


def test_tool_schemas_render_with_transformers():
    utils = pytest.importorskip("transformers.utils")
    env = MemoryToolEnv(horizon=H)
    for name, method in trl_tools(env).items():
        schema = utils.get_json_schema(method)["function"]
        assert schema["name"] == name and schema["description"]
        for param in schema["parameters"]["properties"].values():
            assert param["type"] in ("string", "integer") and param["description"]
    props = utils.get_json_schema(env.update_memory)["function"]["parameters"]
    assert props["properties"]["memory_id"]["type"] == "integer"
    assert set(props["required"]) == {"memory_id", "text"}


def test_reset_names_the_episode_by_seed_task_or_state():
    env = MemoryToolEnv(horizon=H)
    first = env.reset(**ROW, seed=7)
    assert first.startswith("Session 1, part 1:") and "turns:" in first
    assert MemoryToolEnv(horizon=H).reset(**ROW, seed=7) == first  # same row, same task
    assert env.reset(**ROW, seed=8) != first

    by_task = MemoryToolEnv(horizon=H, task_seeds=[11, 12])
    assert by_task.reset(**ROW, task=1) != by_task.reset(**ROW, task=0)

    env.reset(**ROW, seed=7)
    after_one = env.next_turns()
    state = env.env.unwrapped.save_state()
    for value in (state, encode_state(state), pickle.dumps(state)):
        assert MemoryToolEnv(horizon=H).reset(**ROW, state=value) == after_one

    with pytest.raises(ValueError, match="'seed', 'task' or 'state'"):
        env.reset(**ROW)


def test_state_encoding_round_trip_and_errors():
    env = MemoryToolEnv(horizon=H)
    env.reset(seed=0)
    state = env.env.unwrapped.save_state()
    text = encode_state(state)
    assert text.isascii() and decode_state(text) == state
    with pytest.raises(TypeError, match="EnvState"):
        encode_state("x")
    with pytest.raises(TypeError, match="not an EnvState"):
        decode_state(pickle.dumps([1, 2]))


# ---------------------------------------------------------------------------------------------
# Episodes through the tools
# ---------------------------------------------------------------------------------------------


def test_tool_episode_equals_the_gymnasium_episode_with_the_same_operations():
    env = MemoryToolEnv(horizon=H)
    text = env.reset(**ROW, seed=3)
    actions = []
    while not env.done:
        ops = []
        for dia, speaker, said in turn_lines(text):
            env.add_memory(text=said, speaker=speaker, dia_id=dia)
            ops.append({"op": "ADD", "text": said, "speaker": speaker, "dia_id": dia})
        shown = len(env.last_info.get("candidates", []))
        if shown:
            env.update_memory(shown - 1, "Updated fact.", dia_id="")
            ops.append({"op": "UPDATE", "id": shown - 1, "text": "Updated fact.", "dia_id": ""})
        actions.append(json.dumps({"operations": ops}, ensure_ascii=False))
        text = env.next_turns()
    reward = env.get_reward()
    assert text == "The conversation is over. No more turns."
    assert env.last_info["stats"]["updates"] > 0  # the episode exercised UPDATE, not only ADD

    gym_env = gym.make("MemSession-v0", horizon=H, single_agent=True)
    gym_env.reset(seed=3)
    expected = sum(gym_env.step(a)[1] for a in actions)
    assert reward == pytest.approx(expected)
    assert env.get_reward() == reward  # idempotent


def test_tool_errors_are_clear():
    env = MemoryToolEnv(horizon=H)
    with pytest.raises(RuntimeError, match="reset"):
        env.add_memory("x", "Ann")
    env.reset(seed=0)
    with pytest.raises(ValueError, match="no memory 0 in the list shown"):
        env.delete_memory(0)  # nothing is stored yet, so nothing is shown
    with pytest.raises(ValueError, match="non-empty"):
        env.add_memory("  ", "Ann")
    with pytest.raises(ValueError, match="no memory"):
        env.update_memory(True, "x")
    env.get_reward()
    with pytest.raises(RuntimeError, match="over"):
        env.next_turns()


def test_get_reward_finishes_the_episode_or_not():
    finishing = MemoryToolEnv(horizon=H)
    finishing.reset(seed=1)
    assert isinstance(finishing.get_reward(), float) and finishing.done

    partial = MemoryToolEnv(horizon=H, finish_on_reward=False)
    partial.reset(seed=1)
    assert partial.get_reward() == 0.0 and not partial.done
    assert reward_from_environments([finishing, partial]) == [finishing.get_reward(), 0.0]


def test_pooled_instance_is_fully_reset():
    env = MemoryToolEnv(horizon=H)
    env.reset(seed=2)
    env.add_memory("Something.", "x")
    env.get_reward()
    first = env.reset(seed=2)
    assert env.pending == [] and env.total_reward == 0.0 and not env.done
    assert first == MemoryToolEnv(horizon=H).reset(seed=2)


def test_needs_the_single_agent_task():
    with pytest.raises(ValueError, match="single_agent"):
        MemoryToolEnv(horizon=H, single_agent=False)
    with pytest.raises(ValueError, match="single_agent=True"):
        MemoryToolEnv(env=gym.make("MemSession-v0", horizon=H))
    wrapped = MemoryToolEnv(env=gym.make("MemSession-v0", horizon=H, single_agent=True))
    assert wrapped.reset(seed=0).startswith("Session 1")


def test_trl_is_not_imported_and_the_example_dry_run_works():
    code = "import sys, agents.trl_adapter; assert 'trl' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
    out = subprocess.run(
        [sys.executable, "examples/trl_grpo.py", "--dry-run", "--horizon", str(H)],
        check=True, cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert out.stdout.count("reward") == 3


# ---------------------------------------------------------------------------------------------
# Bad tool calls, as TRL runs them
# ---------------------------------------------------------------------------------------------


def call_like_trl(env, name: str, arguments) -> str:
    """What TRL 1.16's tool loop does with one parsed call: ``tool(**arguments)``, and any exception
    becomes ``{"error": message}``, sent back to the model as the tool's answer (``str`` of it)."""
    tools = trl_tools(env)
    try:
        if name not in tools:
            raise ValueError(f"Tool {name} not found.")
        result = tools[name](**arguments)
    except Exception as e:  # noqa: BLE001  (TRL catches everything a tool raises)
        result = {"error": str(e)}
    return str(result)


@pytest.mark.parametrize(
    "name, arguments, message",
    [
        ("add_memory", {"text": "Marta has a dog.", "speeker": "Marta"}, "unexpected keyword argument 'speeker'"),
        ("add_memory", {"text": "Marta has a dog."}, "missing 1 required positional argument: 'speaker'"),
        ("add_memory", {"text": None, "speaker": "Marta"}, "text must be a non-empty string"),
        ("add_memory", {"text": ["a", "b"], "speaker": "Marta"}, "text must be a non-empty string"),
        ("update_memory", {"memory_id": "first", "text": "x"}, "no memory 'first'"),
        ("update_memory", {"memory_id": 2.5, "text": "x"}, "no memory 2.5"),
        ("delete_memory", {"memory_id": 99}, "no memory 99 in the list shown"),
        ("next_turns", {"force": True}, "unexpected keyword argument 'force'"),
        ("remember", {"text": "x"}, "Tool remember not found"),
        ("add_memory", "not a dict", "must be a mapping"),
    ],
)
def test_a_bad_tool_call_is_an_error_message_and_the_episode_goes_on(name, arguments, message):
    env = MemoryToolEnv(horizon=H)
    env.reset(**ROW, seed=0)
    env.add_memory("Marta is allergic to mustard.", "Marta", "D1:1")
    answer = call_like_trl(env, name, arguments)
    assert answer.startswith("{'error': ") and message in answer
    # Nothing was queued or applied by the bad call, the good one is still pending, and the episode goes on.
    assert [op["text"] for op in env.pending] == ["Marta is allergic to mustard."]
    assert call_like_trl(env, "next_turns", {}).startswith("Session 1, part 2:")
    assert env.last_info["stats"]["adds"] == 1
    reward = env.get_reward()
    assert isinstance(reward, float) and env.done
    summary = env.history[-1]
    assert summary["reward"] == reward and summary["stats"]["adds"] == 1 and not summary["finished_by_model"]
    counted_by_env = name in trl_tools(env) and isinstance(arguments, dict)
    assert summary["tool_errors"] == int(counted_by_env)  # TRL rejects the others before calling the tool


def test_tool_calls_after_the_end_are_errors_and_the_reward_is_stable():
    env = MemoryToolEnv(horizon=H)
    env.reset(**ROW, seed=1)
    while not env.done:
        call_like_trl(env, "next_turns", {})
    reward = env.get_reward()
    for name, arguments in (("next_turns", {}), ("add_memory", {"text": "x", "speaker": "Ann"})):
        assert "the conversation is over" in call_like_trl(env, name, arguments)
    assert env.get_reward() == reward and len(env.history) == 1  # scored once
    assert env.history[0]["finished_by_model"] and env.history[0]["tool_errors"] == 0 and env.tool_errors == 2
    assert env.tool_calls == {"next_turns": 7, "add_memory": 1}


def test_tool_counters_are_per_episode_and_the_schema_is_unchanged():
    utils = pytest.importorskip("transformers.utils")
    env = MemoryToolEnv(horizon=H)
    env.reset(seed=0)
    env.add_memory("A fact.", "Marta")
    assert env.tool_calls == {"add_memory": 1} and env.tool_errors == 0
    env.reset(seed=0)
    assert env.tool_calls == {} and env.tool_errors == 0
    # the counting wrapper keeps the name, docstring and type hints TRL renders
    schema = utils.get_json_schema(env.add_memory)["function"]
    assert schema["name"] == "add_memory" and set(schema["parameters"]["required"]) == {"text", "speaker"}
    assert inspect.signature(env.add_memory).parameters.keys() == {"text", "speaker", "dia_id"}


def test_reply_stats_logs_the_share_of_replies_with_a_tool_call_and_scores_nothing():
    from agents.trl_adapter import reply_stats

    call = {"type": "function", "function": {"name": "next_turns", "arguments": {}}}
    completions = [
        # a call, its answer, then a reply without a call (which ends TRL's tool loop)
        [{"role": "assistant", "content": "", "tool_calls": [call, call]}, {"role": "tool", "name": "next_turns", "content": "..."},
         {"role": "assistant", "content": "done"}],
        [{"role": "assistant", "content": "prose only"}],
    ]
    logged = {}
    assert reply_stats(completions, log_metric=logged.__setitem__, environments=[None, None]) == [None, None]
    assert logged == {"replies/per_rollout": 1.5, "replies/with_tool_call": pytest.approx(1 / 3),
                      "replies/parsed_calls_per_rollout": 1.0}
    assert reply_stats([[{"role": "assistant", "content": "x"}]]) == [None]  # no log_metric: nothing logged, no error


def test_history_counts_only_the_operations_of_the_episode_when_a_row_starts_from_a_state():
    env = MemoryToolEnv(horizon=H)
    env.reset(**ROW, seed=0)
    for i in range(3):
        env.add_memory(f"Marta has fact number {i}.", "Marta")
    env.next_turns()
    state = encode_state(env.env.unwrapped.save_state())
    again = MemoryToolEnv(horizon=H)
    again.reset(**ROW, state=state)
    again.add_memory("Noor paints.", "Noor")
    again.get_reward()
    assert again.history[-1]["stats"]["adds"] == 1  # not the 3 made before the state was saved
    assert again.last_info["stats"]["adds"] == 4  # the env's own counter runs on
    env.get_reward()
    assert env.history[-1]["stats"]["adds"] == 3

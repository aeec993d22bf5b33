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

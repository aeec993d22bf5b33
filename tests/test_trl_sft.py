"""The TRL warm start's data (``agents.trl_sft``) and the tool-calling evaluation loop
(``agents.trl_play``): the teacher's chats are what TRL would have seen, survive the chat template,
and a model that writes them back scores what the teacher scores."""

from __future__ import annotations

import json
import sys
import types

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agents.baselines import NoisyTeacher
from agents.presets import PRESETS, env_kwargs, make_env_fn, task_seeds
from agents.trl_adapter import DEFAULT_PROMPT, MemoryToolEnv
from agents.trl_sft import (
    FINAL_REPLY, arguments_text, build_sft_dataset, check_round_trip, operation_calls, require_trl, teacher_conversation,
    teacher_return, tool_schemas,
)
from agents.trl_template import apply_tool_template
from tests.test_trl_template import chatml_tokenizer

PRESET = PRESETS["small"]
SEEDS = task_seeds(0, PRESET)


def kwargs(horizon: int = 1, split: str = "sft") -> dict:
    return env_kwargs(PRESET, horizon, SEEDS[split])


@pytest.fixture(scope="module")
def tok():
    return apply_tool_template(chatml_tokenizer())


def test_teacher_chat_is_the_one_trl_would_build():
    env = MemoryToolEnv(**kwargs(horizon=2))
    messages, ret = teacher_conversation(env, NoisyTeacher(noise=0.3, seed=4), {"task": 3})
    first = MemoryToolEnv(**kwargs(horizon=2)).reset(task=3)
    assert messages[0] == {"role": "user", "content": DEFAULT_PROMPT + first}
    assert messages[-1] == {"role": "assistant", "content": FINAL_REPLY}
    replies = [i for i, m in enumerate(messages) if m["role"] == "assistant" and m.get("tool_calls")]
    assert len(replies) == 2 * PRESET.slices_per_session  # one reply per slice
    for i in replies:
        calls = messages[i]["tool_calls"]
        assert calls[-1]["function"]["name"] == "next_turns"  # each reply ends the slice
        answers = messages[i + 1: i + 1 + len(calls)]
        assert [a["role"] for a in answers] == ["tool"] * len(calls)
        assert [a["name"] for a in answers] == [c["function"]["name"] for c in calls]
    assert messages[-2]["content"] == "The conversation is over. No more turns."
    # Replaying the chat's calls on a fresh env gives the same answers and the same return.
    replay = MemoryToolEnv(**kwargs(horizon=2))
    replay.reset(task=3)
    for i in replies:
        for call, answer in zip(messages[i]["tool_calls"], messages[i + 1:]):
            fn = call["function"]
            assert str(getattr(replay, fn["name"])(**fn["arguments"])) == answer["content"]
    assert replay.get_reward() == pytest.approx(ret)
    assert env.history[-1]["tool_errors"] == 0 and env.history[-1]["finished_by_model"]


def test_teacher_return_is_the_mean_over_its_draws_and_tracks_how_hard_a_conversation_is():
    env = MemoryToolEnv(**kwargs(horizon=2, split="train"))
    draws = [teacher_conversation(MemoryToolEnv(**kwargs(horizon=2, split="train")), NoisyTeacher(noise=0.3, seed=5 + j),
                                  {"task": 1})[1] for j in range(3)]
    assert teacher_return(env, {"task": 1}, draws=3, seed=5) == pytest.approx(sum(draws) / 3)
    assert teacher_return(env, {"task": 1}, draws=3, seed=5) == teacher_return(env, {"task": 1}, draws=3, seed=5)
    returns = {teacher_return(env, {"task": t}) for t in range(6)}
    assert len(returns) > 1  # conversations differ in how much a good policy scores
    with pytest.raises(ValueError, match="draws must be >= 1"):
        teacher_return(env, {"task": 1}, draws=0)


def test_operation_calls_map_every_operation_and_refuse_unknown_ones():
    ops = [{"op": "ADD", "text": "A.", "speaker": "Ann", "dia_id": "D1:1"}, {"op": "UPDATE", "id": 2, "text": "B.", "dia_id": "D1:2"},
           {"op": "DELETE", "id": 0}, {"op": "NOOP", "id": 1}]
    assert operation_calls(ops) == [
        ("add_memory", {"text": "A.", "speaker": "Ann", "dia_id": "D1:1"}),
        ("update_memory", {"memory_id": 2, "text": "B.", "dia_id": "D1:2"}),
        ("delete_memory", {"memory_id": 0}),
    ]
    with pytest.raises(ValueError, match="unknown memory operation 'MOVE'"):
        operation_calls([{"op": "MOVE", "id": 0}])


def test_dataset_is_deterministic_and_stores_arguments_as_json_text():
    rows = [{"task": i} for i in range(3)]
    a, summary = build_sft_dataset(rows, env_kwargs=kwargs(), noise=0.3, seed=1)
    b, _ = build_sft_dataset(rows, env_kwargs=kwargs(), noise=0.3, seed=1)
    assert a == b
    c, _ = build_sft_dataset(rows, env_kwargs=kwargs(), noise=0.9, seed=1)
    assert a != c  # the noise changes the decisions
    assert json.loads(a[0]["tools"]) == tool_schemas(MemoryToolEnv(**kwargs()))
    assert [t["function"]["name"] for t in json.loads(a[0]["tools"])] == ["add_memory", "delete_memory", "next_turns", "update_memory"]
    for example in a:
        for m in example["messages"]:
            for call in m.get("tool_calls") or []:
                assert isinstance(call["function"]["arguments"], str)
                json.loads(call["function"]["arguments"])
    assert summary["episodes"] == 3 and summary["tool_calls"]["next_turns"] == 3 * PRESET.slices_per_session
    assert summary["replies"] == 3 * (PRESET.slices_per_session + 1)


def test_teacher_data_survive_the_template_and_a_broken_call_is_named(tok):
    examples, summary = build_sft_dataset([{"task": i} for i in range(4)], env_kwargs=kwargs(horizon=2), noise=0.3)
    assert check_round_trip(tok, examples) == summary["replies"]
    broken = json.loads(json.dumps(examples))
    call = broken[2]["messages"][1]["tool_calls"][0]["function"]
    call["arguments"] = call["arguments"][:-1]  # cut JSON
    with pytest.raises(ValueError, match=r"warm-start example 2 \(reply 1 of its chat\): a tool call's arguments are not a JSON"):
        check_round_trip(tok, broken)
    # Valid JSON the template cannot write back: arguments text made without arguments_text(), whose
    # "</tool_call>" is not written "<\\/tool_call>" and ends the block early.
    forged = json.loads(json.dumps(examples))
    forged[3]["messages"][1]["tool_calls"][0]["function"]["arguments"] = json.dumps({"text": "a </tool_call> b", "speaker": "Ann"})
    with pytest.raises(ValueError, match=r"warm-start example 3 \(reply 1 of its chat\): the template renders .* parses back as"):
        check_round_trip(tok, forged)


TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=40).filter(str.strip)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXT | st.sampled_from(["a </tool_call> b", 'say "hi"', "line\nbreak", "Zoë’s café", "<tool_call>"]),
       speaker=TEXT, memory_id=st.integers(0, 50))
def test_argument_text_renders_and_parses_like_the_dict(tok, text, speaker, memory_id):
    calls = [("add_memory", {"text": text, "speaker": speaker, "dia_id": "D1:1"}),
             ("update_memory", {"memory_id": memory_id, "text": text, "dia_id": "D2:3"}), ("next_turns", {})]

    def chat(as_text: bool) -> list[dict]:
        return [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": n, "arguments": arguments_text(a) if as_text else a}} for n, a in calls]}]

    schemas = tool_schemas(MemoryToolEnv(**kwargs()))
    assert tok.apply_chat_template(chat(True), tools=schemas, tokenize=False) == tok.apply_chat_template(chat(False), tools=schemas, tokenize=False)
    assert check_round_trip(tok, [{"messages": chat(True), "tools": json.dumps(schemas)}]) == 1


def test_require_trl_names_the_version_needed(monkeypatch):
    class OldGRPOTrainer:
        def __init__(self, model, reward_funcs, args=None, train_dataset=None):
            pass

    fake = types.ModuleType("trl")
    fake.__version__ = "0.19.1"
    fake.GRPOTrainer = OldGRPOTrainer
    monkeypatch.setitem(sys.modules, "trl", fake)
    with pytest.raises(ImportError, match=r"needs TRL >= 1\.16.*TRL 0\.19\.1 is installed"):
        require_trl()
    monkeypatch.setitem(sys.modules, "trl", None)  # not installed
    with pytest.raises(ImportError, match=r"pip install 'memory-r2\[trl\]'"):
        require_trl()


class ReplayModel:
    """A stand-in for a causal LM whose ``generate`` writes the teacher's next reply of whichever
    chat the prompt belongs to (found by its first user message), as token ids after the prompt."""

    def __init__(self, tok, chats: list[list[dict]], schemas: list[dict]):
        import torch

        self.torch, self.tok, self.replies = torch, tok, {}
        for messages in chats:
            replies = []
            for j, m in enumerate(messages):
                if m["role"] == "assistant":
                    head = tok.apply_chat_template(messages[:j], tools=schemas, add_generation_prompt=True, tokenize=True, return_dict=False)
                    full = tok.apply_chat_template(messages[: j + 1], tools=schemas, tokenize=True, return_dict=False)
                    replies.append(full[len(head):])
            self.replies[messages[0]["content"]] = replies
        self.calls = 0

    def parameters(self):
        yield self.torch.zeros(1)

    def generate(self, input_ids, attention_mask, max_new_tokens, **_):
        self.calls += 1
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            text = self.tok.decode([i for i, m in zip(ids, mask) if m])
            key = next(k for k in self.replies if k in text)
            turn = text.count("<|im_start|>assistant") - 1
            rows.append(self.replies[key][turn][:max_new_tokens])
        width = max(map(len, rows))
        pad = self.tok.pad_token_id
        return self.torch.tensor([ids + r + [pad] * (width - len(r)) for ids, r in zip(input_ids.tolist(), rows)])


def test_played_tool_episodes_score_what_the_teacher_scores(tok):
    pytest.importorskip("torch")
    from agents.commands.sft import agent_final_score
    from agents.trl_play import tool_final_score

    teacher = NoisyTeacher(noise=0.3, seed=0)
    env_fn = make_env_fn(PRESET, 2, SEEDS["val"], single_agent=True)
    chats = [teacher_conversation(MemoryToolEnv(env=env_fn()), teacher, {"task": t})[0] for t in range(3)]
    schemas = tool_schemas(MemoryToolEnv(env=env_fn()))
    model = ReplayModel(tok, chats, schemas)
    played = tool_final_score(model, tok, env_fn, range(3), max_new_tokens=4096, batch=2)

    class RawTurnTeacher:  # the teacher as teacher_conversation plays it: it also misses facts
        def act(self, obs, info):
            return teacher.act(obs, {**info, "facts": [f for f in info["facts"] if teacher.keeps(f["dia_id"])]})

    scripted = agent_final_score(RawTurnTeacher(), env_fn, range(3), per_task=True)
    assert scripted["f1"] < agent_final_score(teacher, env_fn, range(3))["f1"]  # the misses cost F1
    assert played["f1_per_task"] == pytest.approx(scripted["f1_per_task"])
    assert played["memory_size"] == scripted["memory_size"] and played["penalty"] == pytest.approx(scripted["penalty"])
    assert played["reply_parse_rate"] == 1.0 and played["tool_error_rate"] == 0.0 and played["truncated_rate"] == 0.0
    assert played["finished_by_model"] == 1.0 and played["open_replies"] == 3 * 2 * PRESET.slices_per_session
    assert played["replies"] == played["open_replies"] + 3  # and each said Done.
    # Cut replies: nothing parses, the episode is closed after its first reply and played out empty.
    cut = tool_final_score(ReplayModel(tok, chats, schemas), tok, env_fn, range(3), max_new_tokens=8)
    assert cut["reply_parse_rate"] == 0.0 and cut["truncated_rate"] == 1.0 and cut["replies"] == 3 and cut["memory_size"] == 0


def test_grpo_example_plots_a_run_and_measures_its_trend(tmp_path, load_script, capsys):
    pytest.importorskip("matplotlib")
    grpo = load_script("examples/trl_grpo.py")
    steps = [{"step": i, "reward": 0.1 * i, "reward_std": 0.0 if i == 3 else 0.05, "replies_with_tool_call": 1.0,
              "episode_rewards": [0.1 * i - 0.05, 0.1 * i + 0.05]} for i in range(1, 9)]
    (tmp_path / "steps.jsonl").write_text("".join(json.dumps(s) + "\n" for s in steps))
    grpo.main(["--plot", str(tmp_path)])
    assert (tmp_path / "curve.png").stat().st_size > 0
    trend = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert trend["slope_per_step"] == pytest.approx(0.1) and trend["slope_ci95"][0] > 0
    assert trend["first_half_reward"] == pytest.approx(0.25) and trend["second_half_reward"] == pytest.approx(0.65)
    assert trend["steps_with_reward_std"] == 7
    flat = grpo.reward_trend([dict(s, reward=0.3) for s in steps])
    assert flat["slope_per_step"] == pytest.approx(0.0, abs=1e-12) and "vs_teacher" not in flat
    # steps that carry the teacher's return on their conversations: the trend relative to it too, and a 4th panel
    relative = [dict(s, teacher_rewards=[0.08 * s["step"]] * 2, reward_vs_teacher=0.02 * s["step"]) for s in steps]
    (tmp_path / "steps.jsonl").write_text("".join(json.dumps(s) + "\n" for s in relative))
    grpo.main(["--plot", str(tmp_path)])
    trend = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert trend["slope_per_step"] == pytest.approx(0.1) and trend["vs_teacher"]["slope_per_step"] == pytest.approx(0.02)
    assert trend["vs_teacher"]["first_half_reward"] == pytest.approx(0.05)
    assert "revisits" not in trend  # these steps name no conversations
    # Four conversations played twice each (steps 1-4, then 5-8): each one's last visit minus its first.
    rows = [dict(s, episode_rows=[{"task": (s["step"] - 1) % 4}] * 2) for s in steps]
    revisits = grpo.reward_trend(rows)["revisits"]
    assert revisits["conversations"] == 4 and revisits["mean_gain"] == pytest.approx(0.4)
    assert revisits["gain_per_conversation"] == {f'{{"task": {r}}}': pytest.approx(0.4) for r in range(4)}
    assert revisits["gain_ci95"] == pytest.approx([0.4, 0.4])
    assert revisits["visits"] == 8 and revisits["within_slope_per_step"] == pytest.approx(0.1)  # 0.4 over 4 steps
    # a conversation played once has no gain; one whose second visit is worse counts against
    rows[7] = dict(rows[7], episode_rewards=[0.0, 0.2])
    rows[6] = dict(rows[6], episode_rows=[{"task": 9}] * 2)
    revisits = grpo.reward_trend(rows)["revisits"]
    assert revisits["conversations"] == 3 and revisits["gain_per_conversation"]['{"task": 3}'] == pytest.approx(0.1 - 0.4)
    assert revisits["mean_gain"] == pytest.approx((0.4 + 0.4 - 0.3) / 3)
    assert revisits["gain_ci95"][0] < revisits["mean_gain"] < revisits["gain_ci95"][1]
    assert revisits["within_slope_per_step"] == pytest.approx((0.1 + 0.1 - 0.3 / 4) / 3)
    # Three visits: the slope uses the one between, which the last-minus-first gain ignores.
    three = [{"step": i, "reward": 0.0, "episode_rows": [{"task": 0}], "episode_rewards": [r]}
             for i, r in [(1, 0.2), (2, 0.8), (3, 0.2)]]
    three += [{"step": i, "reward": 0.0, "episode_rows": [{"task": 1}], "episode_rewards": [r]}
              for i, r in [(4, 0.0), (5, 0.3), (6, 0.6)]]
    revisits = grpo.revisit_gains(three)
    assert revisits["visits"] == 6 and revisits["gain_per_conversation"]['{"task": 0}'] == pytest.approx(0.0)
    assert revisits["within_slope_per_step"] == pytest.approx((0.0 + 0.3) / 2)
    assert grpo.revisit_gains(three[:1]) == {}


def test_grpo_example_plays_a_presets_training_conversations(load_script):
    grpo = load_script("examples/trl_grpo.py")
    args = grpo.parser().parse_args(["--preset", "small", "--horizon", "2", "--rows", "4"])
    kwargs = grpo.preset_env_kwargs(args)
    assert kwargs["task_seeds"] == SEEDS["train"] and kwargs["max_questions"] == PRESET.max_questions
    assert kwargs["slices_per_session"] == PRESET.slices_per_session and kwargs["reward_mode"] == "final"
    env = MemoryToolEnv(**kwargs)
    assert env.reset(task=1) == MemoryToolEnv(**kwargs).reset(task=1)
    assert grpo.preset_env_kwargs(grpo.parser().parse_args([])) == {}
    with pytest.raises(SystemExit, match="has 64 training conversations"):
        grpo.preset_env_kwargs(grpo.parser().parse_args(["--preset", "small", "--rows", "65"]))


# ---------------------------------------------------------------------------------------------
# Slow: the whole TRL route on SmolLM2-135M-Instruct, on a CPU
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_trl_sft_warm_start_then_grpo_gets_rewards_that_vary(tmp_path, load_script, trl_smollm2):
    """A few SFTTrainer steps on the teacher's tool calls, then 2 GRPOTrainer steps from that
    checkpoint on the small preset's env with its default settings (no ``bloat_tau=0``, no top-k,
    no prefill; temperature 0.7): the warm-started model writes calls that reach the env, the group's rewards differ,
    and the weights move. About 10 minutes on 2 cores."""
    import torch

    model = trl_smollm2
    sft = load_script("examples/trl_sft.py")
    warm = tmp_path / "sft"
    summary = sft.main(["--model", str(model), "--output-dir", str(warm), "--horizon", "1", "--episodes", "16",
                        "--batch-size", "2", "--max-steps", "10", "--learning-rate", "3e-4", "--probe-episodes", "0"])
    assert summary["steps"] == 10 and summary["data"]["replies_checked"] == summary["data"]["replies"]
    assert summary["losses"][-1]["loss"] < summary["losses"][0]["loss"]
    assert (warm / "model.safetensors").exists() and (warm / "sft_summary.json").exists()

    grpo = load_script("examples/trl_grpo.py")
    args = grpo.parser().parse_args([
        "--model", str(warm), "--output-dir", str(tmp_path / "grpo"), "--preset", "small", "--horizon", "1", "--rows", "2",
        "--num-generations", "4", "--max-steps", "2", "--max-completion-length", "1024", "--max-tool-calls", "8",
        "--temperature", "0.7", "--learning-rate", "1e-5", "--seed", "0", "--device", "cpu", "--no-save",
    ])
    threads = torch.get_num_threads()
    try:
        trainer, envs = grpo.build_trainer(args)  # the saved tool template is picked up without --tool-template
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        trainer.train()
    finally:
        torch.set_num_threads(threads)
    steps = grpo.summarize(trainer, 0.0)["steps"]
    assert [s["step"] for s in steps] == [1, 2]
    assert sum(s["replies_with_tool_call"] for s in steps) / 2 > 0.5, steps  # the warm start writes calls
    assert sum(sum(s["tool_calls"].values()) for s in steps) > 0 and sum(s["env_operations"]["adds"] for s in steps) > 0
    assert any(s["reward_std"] > 0 for s in steps), [s["episode_rewards"] for s in steps]
    assert any(not torch.equal(p.detach(), before[n]) for n, p in trainer.model.named_parameters())

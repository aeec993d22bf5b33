"""The tool-calling chat template (agents/trl_template.py) and the TRL example's setup.

The fast tests build a byte-level ChatML tokenizer in memory (no model files); the TRL checks skip
when TRL is not installed. The slow test trains SmolLM2-135M-Instruct for 2 GRPO steps on a CPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agents.trl_adapter import DEFAULT_PROMPT, MemoryToolEnv
from agents.trl_template import (
    RESPONSE_TEMPLATE, TOOL_CHAT_TEMPLATE, TOOL_TEMPLATE_HINT, apply_tool_template, precision_settings, supports_tools,
    with_tool_template_hint,
)

ROOT = Path(__file__).resolve().parent.parent
H = 2

# SmolLM2-135M-Instruct's own template: ChatML without tool calling.
PLAIN_CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def chatml_tokenizer(chat_template: str = PLAIN_CHATML):
    """A byte-level tokenizer with the ChatML special tokens, built in memory."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    alphabet = sorted(tokenizers.pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    tk = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = tokenizers.decoders.ByteLevel()
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = chat_template
    return tok


def env_tools(env: MemoryToolEnv) -> list:
    return [env.add_memory, env.update_memory, env.delete_memory, env.next_turns]


CALLS = [
    {"type": "function", "function": {"name": "add_memory", "arguments": {"text": "Marta is allergic to mustard.", "speaker": "Marta", "dia_id": "D1:1"}}},
    {"type": "function", "function": {"name": "delete_memory", "arguments": {"memory_id": 0}}},
    {"type": "function", "function": {"name": "next_turns", "arguments": {}}},
]


def conversation(env: MemoryToolEnv) -> list[dict]:
    return [
        {"role": "user", "content": DEFAULT_PROMPT + env.reset(seed=0)},
        {"role": "assistant", "content": "", "tool_calls": CALLS},
        {"role": "tool", "name": "add_memory", "content": "Queued: add 'Marta is allergic to mustard.'."},
        {"role": "tool", "name": "delete_memory", "content": "{'error': 'there is no memory 0 in the list shown'}"},
        {"role": "tool", "name": "next_turns", "content": "Session 1, part 2: ..."},
    ]


# ---------------------------------------------------------------------------------------------
# The template (transformers only)
# ---------------------------------------------------------------------------------------------


def test_the_plain_template_cannot_do_tools_and_the_tool_template_can():
    tok = chatml_tokenizer()
    assert not supports_tools(tok)
    assert apply_tool_template(tok) is tok
    assert tok.chat_template == TOOL_CHAT_TEMPLATE and tok.response_template == RESPONSE_TEMPLATE
    assert supports_tools(tok)


def test_supports_tools_without_trl_matches_trls_check(monkeypatch):
    tok = chatml_tokenizer()
    with_trl = [supports_tools(tok)]
    monkeypatch.setitem(sys.modules, "trl.chat_template_utils", None)  # import fails: the fallback runs
    without_trl = [supports_tools(tok)]
    apply_tool_template(tok)
    without_trl.append(supports_tools(tok))
    monkeypatch.undo()
    with_trl.append(supports_tools(tok))
    assert without_trl == [False, True]
    if importlib.util.find_spec("trl") is not None:
        assert with_trl == without_trl


def test_the_template_renders_a_tool_calling_conversation():
    tok = apply_tool_template(chatml_tokenizer())
    env = MemoryToolEnv(horizon=H)
    text = tok.apply_chat_template(conversation(env), tools=env_tools(env), tokenize=False, add_generation_prompt=True)
    system, rest = text.split("<|im_end|>\n", 1)
    assert system.startswith("<|im_start|>system\n") and "<tools>\n" in system
    listed = [json.loads(line) for line in system.split("<tools>\n")[1].split("</tools>")[0].splitlines()]
    assert [t["name"] for t in listed] == ["add_memory", "update_memory", "delete_memory", "next_turns"]
    assert listed[1]["parameters"]["properties"]["memory_id"]["type"] == "integer"
    assert "[D1:1] Marta:" in rest
    blocks = rest.split("<|im_start|>assistant\n")[1].split("<|im_end|>")[0]
    assert blocks.count("<tool_call>\n") == 3
    parsed = [json.loads(b.split("\n</tool_call>")[0]) for b in blocks.split("<tool_call>\n")[1:]]
    assert parsed == [c["function"] for c in CALLS]
    # the three answers: one user turn, one <tool_response> each, then the generation prompt
    answers = rest.split("<|im_start|>user\n")[-1]
    assert answers.count("<tool_response>\n") == 3 and "there is no memory 0" in answers
    assert text.endswith("</tool_response><|im_end|>\n<|im_start|>assistant\n")
    # no tools: no tool section, and the plain turns are ChatML
    plain = tok.apply_chat_template([{"role": "system", "content": "S."}, {"role": "user", "content": "hi"}], tokenize=False)
    assert plain == "<|im_start|>system\nS.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"


def test_the_prefill_opens_every_reply_with_a_tool_call_only_when_asked():
    tok = apply_tool_template(chatml_tokenizer())
    env = MemoryToolEnv(horizon=H)
    msgs = conversation(env)[:1]
    plain = tok.apply_chat_template(msgs, tools=env_tools(env), tokenize=False, add_generation_prompt=True)
    opened = tok.apply_chat_template(msgs, tools=env_tools(env), tokenize=False, add_generation_prompt=True, start_with_tool_call=True)
    assert opened == plain + '<tool_call>\n{"name": "'
    # TRL renders the turn after tool answers without tools=: the prefill must be there too
    after_tools = tok.apply_chat_template(conversation(env), tokenize=False, add_generation_prompt=True, start_with_tool_call=True)
    assert after_tools.endswith('</tool_response><|im_end|>\n<|im_start|>assistant\n<tool_call>\n{"name": "')
    assert not tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False, start_with_tool_call=True).endswith('"')


def test_apply_tool_template_refuses_a_tokenizer_that_is_not_chatml():
    tok = chatml_tokenizer()
    tok.eos_token = "<|endoftext|>"
    with pytest.raises(ValueError, match="end-of-sequence token"):
        apply_tool_template(tok)


def test_parse_response_reads_the_tool_calls_back():
    tok = apply_tool_template(chatml_tokenizer())
    env = MemoryToolEnv(horizon=H)
    msgs = conversation(env)
    prompt = tok.apply_chat_template(msgs[:1], tools=env_tools(env), tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(msgs[:2], tools=env_tools(env), tokenize=False)
    reply = full[len(prompt):]
    parsed = tok.parse_response(reply, prefix=prompt, tools=env_tools(env))
    assert parsed["tool_calls"] == CALLS and not parsed.get("content")
    # text before the calls is the content; an integer argument written as a string is typed back
    text = 'I will store it.\n<tool_call>\n{"name": "update_memory", "arguments": {"memory_id": "1", "text": "x"}}\n</tool_call><|im_end|>'
    parsed = tok.parse_response(text, prefix=prompt, tools=env_tools(env))
    assert parsed["content"] == "I will store it."
    assert parsed["tool_calls"][0]["function"] == {"name": "update_memory", "arguments": {"memory_id": 1, "text": "x"}}


# Text a model may put in an argument or before its calls: anything but the ChatML control tokens
# (the tokenizer turns "<|im_end|>" in text into the control token, which ends a turn by design).
_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40).filter(lambda t: "<|" not in t)
_PIECES = st.sampled_from(["</tool_call>", "<tool_call>", "\n", '"', "\\", "{", "}", "</", "é", "🙂", "D1:2"])
_ARG_TEXT = st.lists(st.one_of(_TEXT, _PIECES), max_size=5).map("".join).filter(lambda t: "<|" not in t)
_CALL = st.one_of(
    st.fixed_dictionaries({"text": _ARG_TEXT, "speaker": _ARG_TEXT}, optional={"dia_id": _ARG_TEXT}).map(lambda a: ("add_memory", a)),
    st.fixed_dictionaries({"memory_id": st.integers(0, 10**6), "text": _ARG_TEXT}, optional={"dia_id": _ARG_TEXT}).map(
        lambda a: ("update_memory", a)),
    st.fixed_dictionaries({"memory_id": st.integers(0, 10**6)}).map(lambda a: ("delete_memory", a)),
    st.just(("next_turns", {})),
)
_CONTENT = _TEXT.map(str.strip).filter(lambda t: "<tool_call>" not in t and "<" not in t[:1])


@pytest.fixture(scope="module")
def tool_tokenizer():
    return apply_tool_template(chatml_tokenizer())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(calls=st.lists(_CALL, min_size=1, max_size=4), content=_CONTENT)
def test_rendered_tool_calls_parse_back_to_the_same_calls(tool_tokenizer, calls, content):
    """Property: whatever the arguments hold (quotes, newlines, non-ASCII, even "</tool_call>"), a
    reply rendered by the template and tokenized parses back, through the token ids as TRL does it,
    into the same calls and the same text before them."""
    tok = tool_tokenizer
    tools = env_tools(MemoryToolEnv(horizon=H))
    message = {"role": "assistant", "content": content,
               "tool_calls": [{"type": "function", "function": {"name": n, "arguments": a}} for n, a in calls]}
    user = [{"role": "user", "content": "Session 1, part 1: ..."}]
    prompt = tok.apply_chat_template(user, tools=tools, add_generation_prompt=True, return_dict=False)
    full = tok.apply_chat_template(user + [message], tools=tools, return_dict=False)
    assert full[: len(prompt)] == prompt  # prefix-preserving
    reply = full[len(prompt):]
    assert tok.convert_ids_to_tokens(reply[-2:]) == ["<|im_end|>", "Ċ"]  # the turn ends with the end token
    parsed = tok.parse_response(reply[:-1], prefix=prompt, tools=tools)
    assert parsed["tool_calls"] == message["tool_calls"]
    assert (parsed.get("content") or "") == content


def test_hint_is_added_to_trls_tool_error_only():
    trl_error = ValueError("The provided chat template does not support tool calling. The template must be able to ...")
    hinted = with_tool_template_hint(trl_error)
    assert str(hinted).startswith(str(trl_error)) and "--tool-template" in str(hinted) and TOOL_TEMPLATE_HINT in str(hinted)
    other = ValueError("something else")
    assert with_tool_template_hint(other) is other


def test_precision_settings_fit_this_machine():
    torch = pytest.importorskip("torch")
    from agents.policy.precision import cpu_bf16_flags

    cpu = precision_settings("auto", "cpu")
    assert cpu["use_cpu"] and cpu["bf16"] == bool(cpu_bf16_flags()) and not cpu["fp16"]
    assert cpu["model_init_kwargs"] == {"dtype": "float32"}
    assert precision_settings("float32", "cpu")["bf16"] is False
    if not cpu_bf16_flags():
        with pytest.raises(ValueError, match="bfloat16"):
            precision_settings("bfloat16", "cpu")
    with pytest.raises(ValueError, match="unknown dtype"):
        precision_settings("float16", "cpu")
    with pytest.raises(ValueError, match="cpu or cuda"):
        precision_settings("auto", "meta")
    if not torch.cuda.is_available():
        assert precision_settings("auto")["use_cpu"]  # no GPU: the CPU, never TRL's bf16-on-GPU default
        with pytest.raises(ValueError, match="no GPU"):
            precision_settings("auto", "cuda")


# ---------------------------------------------------------------------------------------------
# With TRL
# ---------------------------------------------------------------------------------------------


def test_trl_accepts_the_template_and_parses_a_rendered_call():
    pytest.importorskip("trl")
    from trl.chat_template_utils import is_chat_template_prefix_preserving, parse_response, supports_tool_calling

    tok = chatml_tokenizer()
    assert not supports_tool_calling(tok)
    apply_tool_template(tok)
    assert supports_tool_calling(tok) and is_chat_template_prefix_preserving(tok)
    env = MemoryToolEnv(horizon=H)
    msgs = conversation(env)
    prompt_ids = tok.apply_chat_template(msgs[:1], tools=env_tools(env), add_generation_prompt=True, return_dict=False)
    full_ids = tok.apply_chat_template(msgs[:2], tools=env_tools(env), return_dict=False)
    assert full_ids[: len(prompt_ids)] == prompt_ids
    parsed = parse_response(tok, full_ids[len(prompt_ids):], prefix=prompt_ids, tools=env_tools(env))
    assert parsed["tool_calls"] == CALLS
    # with the prefill, the model writes the rest of the block
    opened = tok.apply_chat_template(msgs[:1], tools=env_tools(env), add_generation_prompt=True, return_dict=False, start_with_tool_call=True)
    rest = tok('add_memory", "arguments": {"text": "Noor paints.", "speaker": "Noor"}}\n</tool_call><|im_end|>', add_special_tokens=False)["input_ids"]
    parsed = parse_response(tok, rest, prefix=opened, tools=env_tools(env))
    assert parsed["tool_calls"] == [{"type": "function", "function": {"name": "add_memory", "arguments": {"text": "Noor paints.", "speaker": "Noor"}}}]
    # a malformed block is not a tool call: TRL falls back to text
    bad = tok('<tool_call>\n{"name": add_memory}\n</tool_call><|im_end|>', add_special_tokens=False)["input_ids"]
    assert "tool_calls" not in parse_response(tok, bad, prefix=prompt_ids, tools=env_tools(env))


def test_grpo_config_from_precision_settings_builds_on_this_machine(tmp_path):
    trl = pytest.importorskip("trl")
    config = trl.GRPOConfig(output_dir=str(tmp_path), report_to="none", **precision_settings("auto"))
    assert config.bf16 == precision_settings("auto")["bf16"]


def load_example():
    spec = importlib.util.spec_from_file_location("trl_grpo_example", ROOT / "examples" / "trl_grpo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_model_dir(path: Path) -> Path:
    """A randomly initialised 1-layer Llama with the in-memory ChatML tokenizer, saved to ``path``."""
    transformers = pytest.importorskip("transformers")
    tok = chatml_tokenizer()
    config = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=4096, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def example_args(model: Path, out: Path, *extra: str) -> argparse.Namespace:
    return load_example().parser().parse_args(
        ["--model", str(model), "--output-dir", str(out), "--horizon", str(H), "--rows", "2", "--num-generations", "2",
         "--max-steps", "1", "--max-completion-length", "32", "--max-tool-calls", "1", "--no-save", *extra]
    )


def test_example_without_tool_template_gives_trls_error_and_our_hint(tmp_path):
    pytest.importorskip("trl")
    example = load_example()
    model = tiny_model_dir(tmp_path / "tiny")
    with pytest.raises(ValueError, match="does not support tool calling") as err:
        example.build_trainer(example_args(model, tmp_path / "run"))
    assert "--tool-template" in str(err.value)
    with pytest.raises(SystemExit, match="--tool-template"):
        example.train(example_args(model, tmp_path / "run"))
    trainer, envs = example.build_trainer(example_args(model, tmp_path / "run", "--tool-template"))
    assert trainer.processing_class.chat_template == TOOL_CHAT_TEMPLATE and len(envs) == 1
    assert {t.__name__ for t in trainer.tools} == {"add_memory", "update_memory", "delete_memory", "next_turns"}
    assert next(trainer.model.parameters()).device.type == ("cpu" if trainer.args.use_cpu else "cuda")


def test_example_learning_rate_schedule_reaches_the_trainer(tmp_path):
    """``--lr-scheduler constant`` keeps the rate for the whole run; the default is TRL's linear decay."""
    pytest.importorskip("trl")
    example = load_example()
    model = tiny_model_dir(tmp_path / "tiny")
    default, _ = example.build_trainer(example_args(model, tmp_path / "a", "--tool-template"))
    constant, _ = example.build_trainer(example_args(model, tmp_path / "b", "--tool-template", "--lr-scheduler", "constant"))
    halfway = []
    for trainer in (default, constant):
        trainer.create_optimizer_and_scheduler(num_training_steps=10)
        for _ in range(5):
            trainer.optimizer.step()
            trainer.lr_scheduler.step()
        halfway.append(trainer.lr_scheduler.get_last_lr()[0] / trainer.args.learning_rate)
    assert halfway == pytest.approx([0.5, 1.0])
    with pytest.raises(SystemExit):
        example.parser().parse_args(["--lr-scheduler", "step"])


def test_example_run_resumes_from_its_checkpoint_and_logs_the_teacher_on_each_steps_conversations(tmp_path):
    """A run killed after its first checkpoint continues with ``--resume``: the model, optimizer and
    data position come from the checkpoint, steps.jsonl keeps the steps before it, and the summary
    counts the episodes of the whole run; its steps are those of a run that was never killed. Each
    step's record names the conversations it played and the noisy teacher's return on each of them."""
    pytest.importorskip("trl")
    from agents.trl_sft import teacher_return

    example = load_example()
    model, out = tiny_model_dir(tmp_path / "tiny"), tmp_path / "run"
    with pytest.raises(SystemExit, match="no checkpoint-N directory"):
        example.train(example_args(model, out, "--tool-template", "--resume"))
    first = example.train(example_args(model, out, "--tool-template", "--save-steps", "1", "--rows", "3"))
    assert (out / "checkpoint-1").is_dir() and [s["step"] for s in first["steps"]] == [1]
    (out / "steps.jsonl").write_text((out / "steps.jsonl").read_text() + '{"step": 2, "elapsed_s": 1.0}\n')  # a step lost with the kill
    resumed = example.train(example_args(model, out, "--tool-template", "--save-steps", "1", "--rows", "3",
                                         "--max-steps", "2", "--resume"))
    steps = example.read_steps(out / "steps.jsonl")
    assert [s["step"] for s in steps] == [1, 2] and steps[0] == first["steps"][0]
    assert resumed["episodes"] == 2 * 2 == sum(s["episodes"] for s in steps)  # 2 steps x 2 rollouts
    assert (out / "checkpoint-2").is_dir() and not (out / "checkpoint-1").exists()  # the latest is kept
    # The resumed run goes on where the killed one stopped: step 2 plays the conversation a run never
    # killed plays at step 2 (not step 1's again), and logs the same record.
    whole = example.train(example_args(model, tmp_path / "whole", "--tool-template", "--save-steps", "1",
                                       "--rows", "3", "--max-steps", "2"))["steps"]
    def untimed(records):
        return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in records]

    assert untimed(whole) == untimed(steps)
    env = MemoryToolEnv(horizon=H)
    for s in steps:
        assert len(s["episode_rows"]) == len(s["teacher_rewards"]) == s["episodes"]
        assert len({json.dumps(r) for r in s["episode_rows"]}) == 1  # one group: one conversation
        assert s["teacher_rewards"][0] == pytest.approx(teacher_return(env, s["episode_rows"][0]))
        assert s["reward_vs_teacher"] == pytest.approx(
            sum(s["episode_rewards"]) / s["episodes"] - sum(s["teacher_rewards"]) / s["episodes"])
        assert len(s["episode_adds"]) == s["episodes"] and sum(s["episode_adds"]) == s["env_operations"]["adds"]


# ---------------------------------------------------------------------------------------------
# Slow: 2 real GRPO steps on SmolLM2-135M-Instruct, on a CPU
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_trl_grpo_trains_smollm2_through_the_tools(tmp_path, trl_smollm2):
    """2 real GRPO steps of TRL's trainer on SmolLM2-135M-Instruct, on the CPU, with the project's
    template: the model's tool calls are parsed by TRL and run against the env, the reward TRL
    trains on is the env's episode return, and the weights move. About 5-10 minutes on 2 cores.

    The env's bloat threshold is set to 0 (``bloat_tau=0``: every stored word costs reward), so each
    memory the model adds changes the episode's return and a group's rollouts differ whenever some
    add a memory and others do not. With the default threshold this model's reward is almost
    always 0 at horizon 2, and GRPO has no gradient when a group's rewards are equal."""
    import torch

    model = trl_smollm2
    probe = MemoryToolEnv(horizon=H, bloat_tau=0.0)
    probe.reset(seed=0)
    probe.add_memory("A note.", "Marta")
    assert probe.get_reward() < 0  # the premise: a memory costs reward
    example = load_example()
    args = example_args(
        model, tmp_path / "run", "--tool-template", "--start-with-tool-call", "--device", "cpu", "--threads", "1",
        "--num-generations", "6", "--max-steps", "2", "--max-completion-length", "96", "--max-tool-calls", "2",
        "--temperature", "0.7", "--top-k", "50", "--learning-rate", "1e-5", "--seed", "0",
    )
    threads = torch.get_num_threads()
    try:
        trainer, envs = example.build_trainer(args, rows=[{"seed": 0}, {"seed": 1}], env_kwargs={"bloat_tau": 0.0})
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        trainer.train()
    finally:
        torch.set_num_threads(threads)
    summary = example.summarize(trainer, 0.0)
    steps = summary["steps"]
    assert [s["step"] for s in steps] == [1, 2]
    assert [json.loads(line)["step"] for line in (tmp_path / "run" / "steps.jsonl").read_text().splitlines()] == [1, 2]

    # Tool calls were parsed out of the model's text by TRL and run against the env.
    assert summary["episodes"] == 2 * 6 and all(s["episodes"] == 6 for s in steps)  # 2 steps x 6 rollouts, scored once
    assert sum(s["tool_calls_per_rollout"] for s in steps) > 0  # TRL's own count of executed calls
    assert sum(s["replies_with_tool_call"] for s in steps) > 0  # replies TRL parsed into a tool call
    assert sum(summary["tool_calls"].values()) > 0  # calls that reached the env's tools
    ops = summary["env_operations"]
    assert ops["adds"] + ops["updates"] + ops["deletes"] + ops["invalid_ops"] > 0, summary  # the env applied them
    # The reward TRL trains on is the env's episode return, step by step.
    for s in steps:
        assert s["env_reward"] == pytest.approx(sum(s["episode_rewards"]) / 6, abs=1e-5)
        assert s["reward"] == pytest.approx(s["env_reward"], abs=1e-5)  # reply_stats adds nothing to it
    # The weights moved (GRPO has a gradient only when a group's rewards differ).
    if all(s["reward_std"] == 0 for s in steps):
        pytest.fail(f"every rollout of both groups got the same reward {summary['episode_rewards']}: no gradient")
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert changed, "no parameter changed in 2 GRPO steps"

"""The warm start: teacher data, the assistant-only loss, and a CI-sized behaviour-cloning run.

The CI-sized run is the ``smoke`` preset with a smaller model (hidden 128, 2 layers instead of
192 x 4) so that the whole module stays well under 90 s on a 2-core CPU. It must lift the
valid-JSON rate of greedy actions on held-out observations from below ``BEFORE_MAX`` to above
``AFTER_MIN``.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from agents.policy import SharedPolicy  # noqa: E402
from agents.commands.sft import (  # noqa: E402
    IGNORE_INDEX,
    REPORT_NAME,
    Example,
    _batch_order,
    agent_final_score,
    collate,
    format_report,
    masked_lm_loss,
    sft_horizon,
    teacher_examples,
    warm_start,
)
from agents.presets import PRESETS, task_seeds, make_env_fn  # noqa: E402
from memenv.actions import parse_facts, parse_operations  # noqa: E402

BEFORE_MAX = 0.2
"""Most valid-JSON rate allowed for the random-init model."""
AFTER_MIN = 0.8
"""Least valid-JSON rate required after the CI-sized warm start (per role and overall)."""

CI_PRESET = replace(PRESETS["smoke"], sft_steps=80, sft_batch=16, sft_lr=2e-3)


@pytest.fixture(scope="module")
def warm(tmp_path_factory):
    """One CI-sized warm start shared by the tests of this module: (out_dir, report)."""
    out = tmp_path_factory.mktemp("sft") / "warm_start"
    seeds = task_seeds(0, CI_PRESET)
    report = warm_start(
        out, CI_PRESET, seed=0, task_seeds=seeds["sft"], eval_seeds=seeds["val"], progress=False, probes_per_role=24
    )
    return out, report


# ------------------------------------------------------------------------------ teacher data


def test_teacher_examples_are_deterministic_and_parse():
    preset = PRESETS["smoke"]
    seeds = task_seeds(0, preset)["sft"][:2]
    first = teacher_examples(preset, seeds, horizon=4, noise=0.3, seed=0)
    again = teacher_examples(preset, seeds, horizon=4, noise=0.3, seed=0)
    assert first == again
    assert {e.role for e in first} == {0, 1}
    for e in first:
        assert isinstance(e, Example) and e.text
        parser = parse_facts if e.role == 0 else parse_operations
        assert parser(e.action).error is None
    # The teacher's seed decides its mistakes; with noise 0 it is the oracle on every seed.
    clean = teacher_examples(preset, seeds, horizon=4, noise=0.0, seed=0)
    assert clean == teacher_examples(preset, seeds, horizon=4, noise=0.0, seed=1)
    assert clean != first


def test_teacher_actions_name_the_source_dia_id_first():
    """The warm start clones the key order too: the dia_id comes before the speaker and the text
    it determines, so that the model can read them off the prompt line the dia_id names."""
    preset = PRESETS["smoke"]
    examples = teacher_examples(preset, task_seeds(0, preset)["sft"][:2], horizon=4, noise=0.3, seed=0)
    items = [item for e in examples for item in next(iter(json.loads(e.action).values()))]
    sourced = [list(item) for item in items if "dia_id" in item]
    assert len(sourced) > 10
    for keys in sourced:
        assert keys.index("dia_id") < min(keys.index(k) for k in ("speaker", "fact", "text") if k in keys)
    for item in items:
        if "op" in item:
            assert list(item)[0] == "op"


def test_teacher_examples_follow_the_env_observations():
    preset = PRESETS["smoke"]
    seeds = task_seeds(0, preset)["sft"][:1]
    examples = teacher_examples(preset, seeds, horizon=3, noise=0.3, seed=0)
    env = make_env_fn(preset, 3, seeds)()
    obs, _ = env.reset(options={"task": 0})
    for e in examples:
        assert (e.role, e.text) == (obs["role"], obs["text"])
        obs, *_ = env.step(e.action)


def test_sft_horizon_covers_the_whole_curriculum_unless_the_preset_sets_it():
    assert sft_horizon(PRESETS["quick"]) == 8  # curriculum 4 -> 8
    assert sft_horizon(replace(PRESETS["tiny"], sft_horizon=None)) == 32
    assert sft_horizon(PRESETS["tiny"]) == 8  # many short conversations instead
    assert sft_horizon(PRESETS["smoke"]) == 8  # at least MIN_SFT_HORIZON sessions
    assert sft_horizon(replace(PRESETS["smoke"], sft_horizon=2)) == 8


def test_batch_order_is_seeded_and_covers_the_data():
    lengths = [5 + (i * 7) % 40 for i in range(100)]
    order = _batch_order(lengths, 10, 25, seed=3)
    assert order == _batch_order(lengths, 10, 25, seed=3)
    assert order != _batch_order(lengths, 10, 25, seed=4)
    assert len(order) == 25 and all(len(b) == 10 for b in order)
    first_epoch = [i for b in order[:10] for i in b]
    assert sorted(first_epoch) == list(range(100))  # each example once per epoch


# ---------------------------------------------------------------------------- the loss


def test_collate_labels_only_assistant_tokens():
    rows = [([1, 3, 7, 8, 9, 2], [0, 0, 0, 1, 1, 1]), ([1, 3, 9, 2], [0, 0, 1, 1])]
    input_ids, attention_mask, labels = collate(rows, pad_id=0)
    assert input_ids.tolist() == [[1, 3, 7, 8, 9, 2], [1, 3, 9, 2, 0, 0]]
    assert attention_mask.tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]]
    x = IGNORE_INDEX
    assert labels.tolist() == [[x, x, x, 8, 9, 2], [x, x, 9, 2, x, x]]


def test_loss_ignores_logits_that_predict_prompt_or_padding():
    rows = [([1, 3, 7, 8, 9, 2], [0, 0, 0, 1, 1, 1]), ([1, 3, 9, 2], [0, 0, 1, 1])]
    _, _, labels = collate(rows, pad_id=0)
    logits = torch.randn(2, 6, 16, requires_grad=True)
    loss = masked_lm_loss(logits, labels)
    loss.backward()
    # Position t predicts token t + 1: only positions whose next token is an assistant token
    # receive gradient.
    trained = torch.zeros(2, 6, dtype=torch.bool)
    trained[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    grad_norm = logits.grad.abs().sum(-1)
    assert torch.all(grad_norm[trained] > 0)
    assert torch.all(grad_norm[~trained] == 0)
    # Changing what the prompt and padding positions predict leaves the loss unchanged.
    other = logits.detach().clone()
    other[~trained] = torch.randn_like(other[~trained]) * 10
    assert torch.allclose(masked_lm_loss(other, labels), loss.detach())


def test_loss_on_a_real_batch_is_the_mean_negative_logprob_of_the_replies(warm):
    out, _ = warm
    policy = SharedPolicy.from_pretrained(out)
    preset = CI_PRESET
    examples = teacher_examples(preset, task_seeds(0, preset)["val"], horizon=3, noise=0.3, seed=0)[:6]
    rows = [policy.training_example(e.role, e.text, e.action) for e in examples]
    input_ids, attention_mask, labels = collate(rows, policy.pad_id)
    with torch.no_grad():
        loss = masked_lm_loss(policy.model(input_ids=input_ids, attention_mask=attention_mask).logits, labels)
        # The same tokens scored by a different code path (left padding, completion log-probs).
        prompts = [policy.render(e.role, e.text) for e in examples]
        replies = [ids[len(p) :] for (ids, _), p in zip(rows, prompts)]
        logprobs = policy.logprobs_of(prompts, replies)
    # The reply is the whole assistant turn up to its stop token, exactly the masked tokens.
    assert [len(r) for r in replies] == [sum(m) for _, m in rows]
    expected = -torch.cat(logprobs).mean()
    assert abs(float(loss) - float(expected)) < 1e-4


# --------------------------------------------------------------------- the CI warm start


def test_warm_start_teaches_the_json_formats(warm):
    _, report = warm
    before, after = report["valid_json_before"], report["valid_json_after"]
    assert before["valid_json"] < BEFORE_MAX
    assert after["valid_json"] > AFTER_MIN
    assert after["valid_json/extractor"] > AFTER_MIN
    assert after["valid_json/manager"] > AFTER_MIN
    assert report["loss_last"] < report["loss_first"] / 2
    env = report["env"]
    assert set(env) >= {"model", "teacher", "oracle", "no_memory"}
    assert env["oracle"]["f1"] >= env["teacher"]["f1"] >= env["no_memory"]["f1"]
    assert 0.0 <= env["model"]["f1"] <= 1.0
    assert report["steps"] == CI_PRESET.sft_steps and len(report["loss"]) == CI_PRESET.sft_steps
    assert "valid JSON" in format_report(report)


def test_saved_directory_loads_with_plain_auto_classes(warm, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, report = warm
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template
    saved = json.loads((out / REPORT_NAME).read_text())
    assert saved["valid_json_after"] == report["valid_json_after"]
    # The reloaded model acts like the trained one: a valid extractor action on a held-out slice.
    policy = SharedPolicy(model, tokenizer, prompt_style=CI_PRESET.prompt_style)
    example = next(e for e in teacher_examples(CI_PRESET, task_seeds(0, CI_PRESET)["val"], horizon=2, noise=0.3, seed=0) if e.role == 0)
    gen = policy.generate([{"role": 0, "text": example.text}], temperature=0.0, max_new_tokens=CI_PRESET.max_new_tokens)[0]
    assert gen.finish_reason == "stop"


def test_teacher_score_matches_final_mode_scoring():
    from agents.baselines import OracleAgent
    from agents.commands.evaluate import play_episode

    preset = PRESETS["smoke"]
    seeds = task_seeds(0, preset)["val"]
    env_fn = make_env_fn(preset, 3, seeds)
    score = agent_final_score(OracleAgent(), env_fn, range(len(seeds)))
    # make_env_fn's env already scores every final-mode question at the end of the episode.
    episode = play_episode(env_fn(), OracleAgent(), options={"task": 0})
    assert len(seeds) == 1
    assert score["f1"] == pytest.approx(episode.mean_f1)


def test_cli_parses_sft_arguments():
    from agents.cli import build_parser

    args = build_parser().parse_args(["sft", "--preset", "smoke", "--out", "x", "--steps", "5", "--no-progress"])
    assert (args.preset, str(args.out), args.steps, args.no_progress, args.seed) == ("smoke", "x", 5, True, 0)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["sft", "--preset", "smoke"])  # --out is required


# ------------------------------------------------------------------ your own checkpoint


def _weights(directory):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True)
    return model, model.state_dict()


def test_sft_warm_starts_a_local_checkpoint_and_keeps_its_tokenizer(foreign_checkpoint, tmp_path):
    """``memr2 sft --model PATH`` clones the teacher into *that* checkpoint (here a Qwen2 model
    with a ChatML template) instead of building the tiny model, and saves it in the same form."""
    from transformers import AutoTokenizer

    from agents.cli import main

    out = tmp_path / "warm"
    argv = ["sft", "--preset", "smoke", "--model", str(foreign_checkpoint), "--out", str(out)]
    assert main(argv + ["--steps", "40", "--lr", "3e-3", "--batch-size", "8", "--no-progress"]) == 0
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["model"]["source"] == str(foreign_checkpoint)
    assert report["model"]["model_type"] == "qwen2" and report["model"]["hidden_size"] == 64
    assert (report["steps"], report["lr"], report["batch_size"]) == (40, 3e-3, 8)
    assert report["loss_last"] < report["loss_first"] / 2
    model, weights = _weights(out)
    _, start = _weights(foreign_checkpoint)
    assert model.config.model_type == "qwen2"
    assert any(not torch.equal(weights[k], start[k]) for k in start)
    assert "<|im_start|>" in AutoTokenizer.from_pretrained(out, local_files_only=True).chat_template


def test_sft_with_zero_steps_measures_the_checkpoint_as_it_is(foreign_checkpoint, tmp_path):
    """``--steps 0`` trains nothing: the saved weights are the input's, bit for bit (so the warm
    start really starts from the given checkpoint), and the report holds its scores; without
    ``--lr`` a checkpoint gets the fine-tuning default, not the tiny model's 2e-3."""
    from agents.cli import main
    from agents.commands.sft import PRETRAINED_LR

    out = tmp_path / "as_is"
    assert main(["sft", "--preset", "smoke", "--model", str(foreign_checkpoint), "--out", str(out), "--steps", "0", "--no-progress"]) == 0
    _, start = _weights(foreign_checkpoint)
    _, saved = _weights(out)
    assert start.keys() == saved.keys() and all(torch.equal(start[k], saved[k]) for k in start)
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["lr"] == PRETRAINED_LR and report["loss"] == []
    assert report["valid_json_after"] == report["valid_json_before"]
    assert set(report["env"]) >= {"model", "teacher", "oracle", "no_memory"}


def test_sft_tasks_sets_how_many_conversations_the_teacher_plays(foreign_checkpoint, tmp_path):
    """``--tasks N`` builds the training data from the first N warm-start task seeds of the run
    seed (the default's seeds are the first ``sft_tasks`` of them)."""
    from agents.cli import main
    from agents.commands.sft import sft_horizon, teacher_examples
    from agents.presets import PRESETS, task_seeds

    out = tmp_path / "more_tasks"
    args = ["sft", "--preset", "smoke", "--model", str(foreign_checkpoint), "--out", str(out), "--steps", "0"]
    assert main(args + ["--tasks", "6", "--no-progress"]) == 0
    report = json.loads((out / REPORT_NAME).read_text())
    preset = PRESETS["smoke"]
    seeds = task_seeds(0, preset)["sft"]
    assert preset.sft_tasks < 6 and seeds == [seeds[0] + i for i in range(preset.sft_tasks)]
    expected = teacher_examples(preset, [seeds[0] + i for i in range(6)], horizon=sft_horizon(preset), noise=preset.teacher_noise, seed=0)
    assert report["data"]["train_tasks"] == 6
    assert report["data"]["examples"] == len(expected)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--model", "{missing}"], "cannot warm-start"),
        (["--preset", "paper"], "does not warm-start the tiny model"),
        (["--preset", "paper", "--model", "{checkpoint}"], "pass --steps"),
        (["--lr", "0"], "--lr must be positive"),
        (["--batch-size", "0"], "--batch-size must be positive"),
        (["--steps", "-1"], "--steps must be >= 0"),
        (["--tasks", "0"], "--tasks must be between 1 and 700,000"),
    ],
)
def test_sft_cli_rejects_bad_options_clearly(extra, message, foreign_checkpoint, tmp_path):
    from agents.cli import main

    extra = [a.format(missing=tmp_path / "nowhere", checkpoint=foreign_checkpoint) for a in extra]
    with pytest.raises(SystemExit) as err:
        main(["sft", "--out", str(tmp_path / "out"), "--no-progress"] + extra)
    assert message in str(err.value)
    assert not (tmp_path / "out").exists()

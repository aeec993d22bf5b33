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
from hypothesis import given
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from agents.policy import SharedPolicy  # noqa: E402
from agents.commands.sft import (  # noqa: E402
    REPORT_NAME,
    Example,
    _batch_order,
    agent_final_score,
    format_report,
    sft_horizon,
    sft_loss,
    split_reply,
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


@given(
    st.lists(st.integers(0, 500), min_size=1, max_size=20),
    st.lists(st.integers(0, 500), min_size=1, max_size=20),
    st.lists(st.integers(0, 500), max_size=3),
)
def test_split_reply_returns_the_prompt_and_the_masked_tokens(prompt, reply, after):
    ids = prompt + reply + after
    mask = [0] * len(prompt) + [1] * len(reply) + [0] * len(after)
    assert split_reply(ids, mask) == (prompt, reply)


def test_split_reply_refuses_masks_it_cannot_read():
    with pytest.raises(ValueError, match="mask entries"):
        split_reply([1, 2, 3], [0, 1])
    with pytest.raises(ValueError, match="more than one run"):
        split_reply([1, 2, 3, 4], [0, 1, 0, 1])
    with pytest.raises(ValueError, match="no prompt"):
        split_reply([1, 2], [1, 1])


def test_loss_is_the_token_mean_cross_entropy_of_the_replies(warm):
    """``sft_loss`` (reply positions only, left padding) equals the textbook loss: full logits
    of right-padded rows, cross-entropy on the reply tokens, one weight per token."""
    import torch.nn.functional as F

    out, _ = warm
    policy = SharedPolicy.from_pretrained(out)
    examples = teacher_examples(CI_PRESET, task_seeds(0, CI_PRESET)["val"], horizon=3, noise=0.3, seed=0)[:6]
    rows = [policy.training_example(e.role, e.text, e.action) for e in examples]
    pairs = [split_reply(ids, mask) for ids, mask in rows]
    assert [p for p, _ in pairs] == [policy.render(e.role, e.text) for e in examples]
    assert len({len(r) for _, r in pairs}) > 1  # replies of different lengths: a token mean differs from a row mean
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, mask in rows:  # one row at a time: no padding at all
            logits = policy.model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
            targets = torch.tensor(ids[1:])
            learned = torch.tensor(mask[1:], dtype=torch.bool)
            total += float(F.cross_entropy(logits[learned], targets[learned], reduction="sum"))
            count += int(learned.sum())
        loss = sft_loss(policy, pairs)
    assert abs(float(loss) - total / count) < 1e-4


def test_gradient_checkpointing_changes_memory_not_the_training(warm):
    """The `small` preset clones the teacher with activation checkpointing: the same losses and
    weights as without it."""
    from agents.commands.sft import behaviour_clone

    out, _ = warm
    examples = teacher_examples(CI_PRESET, task_seeds(0, CI_PRESET)["val"], horizon=2, noise=0.3, seed=0)[:24]
    runs = []
    for checkpointing in (False, True):
        policy = SharedPolicy.from_pretrained(out)
        history = behaviour_clone(policy, examples, steps=3, batch_size=8, lr=1e-3, seed=0, progress=False,
                                  gradient_checkpointing=checkpointing)
        assert any(getattr(m, "gradient_checkpointing", False) is True for m in policy.model.modules()) == checkpointing
        runs.append((history["loss"], [p.detach().clone() for p in policy.model.parameters()]))
    (plain_loss, plain_weights), (ckpt_loss, ckpt_weights) = runs
    assert ckpt_loss == pytest.approx(plain_loss, abs=1e-5) and len(set(plain_loss)) == 3  # the weights moved
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(plain_weights, ckpt_weights))


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

"""``memr2 eval`` end to end: synthetic tasks, one LoCoMo conversation (when the data file is
present), LLM reader and judge on a fake local endpoint, a tiny checkpoint, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agents.cli import main
from test_llm_reader import FakeServer  # tests/ is on sys.path under pytest

# The data is CC BY-NC: it lives beside the repository, never in it.
LOCOMO_FILE = Path(__file__).parents[2] / "shared" / "data" / "locomo10.json"
real = pytest.mark.skipif(not LOCOMO_FILE.exists(), reason=f"{LOCOMO_FILE} not present")


def _eval(*argv: str) -> int:
    return main(["eval", "--no-progress", *argv])


def _results(out: Path) -> tuple[dict, str]:
    return json.loads((out / "results.json").read_text()), (out / "results.md").read_text()


# ------------------------------------------------------------------------------------------
# synthetic tasks
# ------------------------------------------------------------------------------------------


def test_synthetic_oracle_writes_results_and_table(tmp_path, capsys):
    out = tmp_path / "oracle"
    assert _eval("--agent", "oracle", "--episodes", "2", "--horizon", "6", "--out", str(out)) == 0
    res, md = _results(out)
    cfg = res["config"]
    assert cfg["agent"] == "oracle" and cfg["kind"] == "synthetic" and cfg["reward_mode"] == "final"
    assert cfg["horizon"] == 6 and cfg["slices_per_session"] == 3 and cfg["episodes"] == 2
    assert cfg["reader"] == {"reader": "extractive"}
    assert [e["conv_id"] for e in res["episodes"]] == ["syn-0-0", "syn-0-1"]
    summary, cats = res["summary"], res["categories"]
    assert summary["questions"] == len(res["questions"]) == cats["all"]["n"] > 0
    assert sum(row["n"] for name, row in cats.items() if name != "all") == cats["all"]["n"]
    assert cats["all"]["f1"] > 0.95  # the upper bound reads (almost) everything right
    assert set(cats["all"]) == {"n", "f1", "bleu1"}  # no LoCoMo scorer, no judge
    assert summary["memory_size"] > 0 and summary["ops"]["adds"] > 0 and summary["ops"]["parse_errors"] == 0
    # every question is scored once, with the final memory, and comes with its prediction
    q = res["questions"][0]
    assert {"qid", "question", "answer", "prediction", "f1", "category", "conv_id"} <= set(q)
    assert len({x["qid"] for x in res["questions"]}) == len(res["questions"])
    # the same table is printed and written
    printed = capsys.readouterr().out
    assert md.strip() in printed
    assert "| category | n | F1 | BLEU-1 |" in md and "| **all** |" in md and "M-Fail" in md


def test_synthetic_baselines_rank_as_expected(tmp_path):
    f1 = {}
    for agent, extra in [("oracle", []), ("no-memory", []), ("noisy-teacher", ["--noise", "0.5"])]:
        out = tmp_path / agent
        assert _eval("--agent", agent, *extra, "--episodes", "2", "--horizon", "6", "--out", str(out)) == 0
        res, _ = _results(out)
        f1[agent] = res["categories"]["all"]["f1"]
        if agent == "no-memory":
            assert res["summary"]["memory_size"] == 0 and res["summary"]["m_fail"] == 1.0
        if agent == "noisy-teacher":
            assert res["config"]["agent"] == "noisy-teacher(0.5)" and res["config"]["noise"] == 0.5
    assert f1["oracle"] > f1["noisy-teacher"] > f1["no-memory"]


def test_same_seed_same_results(tmp_path):
    for name in ("a", "b"):
        assert _eval("--agent", "noisy-teacher", "--episodes", "1", "--horizon", "4", "--seed", "3", "--out", str(tmp_path / name)) == 0
    a, b = (_results(tmp_path / n)[0] for n in ("a", "b"))
    assert a == b


def test_max_questions_caps_each_conversation(tmp_path):
    out = tmp_path / "capped"
    assert _eval("--agent", "oracle", "--episodes", "2", "--horizon", "6", "--max-questions", "5", "--out", str(out)) == 0
    res, md = _results(out)
    assert [e["questions"] for e in res["episodes"]] == [5, 5]
    assert "at most 5 questions per conversation" in md


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--agent", "nobody"], "unknown agent"),
        (["--agent", "oracle", "--noise", "0.2"], "--noise applies to --agent noisy-teacher only"),
        (["--agent", "noisy-teacher", "--noise", "1.5"], "--noise must be in [0, 1]"),
        (["--agent", "oracle", "--data", "imagenet"], "--data must be"),
        (["--agent", "oracle", "--data", "locomo"], "needs a path"),
        (["--agent", "oracle", "--split", "test"], "--split applies to LoCoMo only"),
        (["--agent", "oracle", "--horizon", "0"], "--horizon must be >= 1"),
        (["--agent", "oracle", "--reader", "gpt"], "--reader must be"),
        (["--agent", "oracle", "--reader", "openai:http://127.0.0.1:1"], "URL#MODEL"),
        (["--agent", "store-turns", "--data", "locomo:/no/such/file.json"], "No such file"),
        (["--agent", "store-turns", "--reader", "hf:/no/such/model"], "never downloads"),
        (["--agent", "oracle", "--reader", "openai:http://127.0.0.1:1#m", "--reader-prefill"], "--reader-prefill needs --reader hf:"),
        (["--agent", "checkpoint:/no/such/dir"], "does not exist"),
        (["--agent", "checkpoint:/no/such/dir", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    ],
)
def test_bad_requests_fail_clearly(argv, message, capsys):
    assert _eval(*argv) == 2
    err = capsys.readouterr().err
    assert "memr2 eval: error:" in err and message in err


# ------------------------------------------------------------------------------------------
# LLM reader and judge on a fake OpenAI-compatible endpoint
# ------------------------------------------------------------------------------------------


@pytest.fixture
def server():
    s = FakeServer()
    yield s
    s.close()


def test_llm_reader_and_judge(tmp_path, server, capsys):
    out = tmp_path / "llm"
    spec = f"{server.url}#fake-model"
    argv = ["--agent", "oracle", "--episodes", "1", "--horizon", "3", "--reader", f"openai:{spec}", "--judge", spec, "--out", str(out)]
    assert _eval(*argv) == 0
    res, md = _results(out)
    assert res["config"]["reader"]["backend"] == "openai:fake-model:max_tokens=256"
    assert res["config"]["judge"]["judge_model"] == "fake-model"
    assert all(q["prediction"] == "Q:" + q["question"] for q in res["questions"])
    assert res["categories"]["all"]["j"] == 1.0  # the fake judge accepts every "Q:" answer
    assert "| J |" in md
    assert (out / "reader_cache.json").exists() and (out / "judge_cache.json").exists()
    calls = server.calls
    assert _eval(*argv) == 0  # a rerun is answered from both caches
    assert server.calls == calls

    server.mode = "no_tags"
    capsys.readouterr()
    assert _eval("--agent", "no-memory", "--episodes", "1", "--horizon", "2", "--reader", f"openai:{spec}") == 1
    assert "no <answer>" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------
# a checkpoint policy
# ------------------------------------------------------------------------------------------


def test_checkpoint_agent_acts_greedily(tmp_path):
    pytest.importorskip("transformers")
    model_dir = _tiny_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "eval"
    # two episodes in lockstep: one batched generate call per step for both
    argv = ["--agent", f"checkpoint:{model_dir}", "--episodes", "2", "--horizon", "1", "--max-new-tokens", "6", "--device", "cpu", "--backend", "hf"]
    assert _eval(*argv, "--out", str(out)) == 0
    res, md = _results(out)
    assert res["config"]["agent"] == f"checkpoint:{model_dir}"
    assert [e["conv_id"] for e in res["episodes"]] == ["syn-0-0", "syn-0-1"]
    # a random model writes no valid JSON: every action is an unparsable no-op, never a crash
    assert res["summary"]["ops"]["parse_errors"] > 0 and res["summary"]["memory_size"] == 0
    assert res["config"]["policy"] == {"prompt_style": "compact", "max_new_tokens": 6, "dtype": "float32", "backend": "hf"}


def _tiny_checkpoint(directory: Path) -> Path:
    from agents.policy.tiny import build_tiny_model

    texts = ['{"facts": []}', '{"operations": []}'] * 10
    return build_tiny_model(directory, texts=texts, vocab_size=300, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)


def test_checkpoint_agent_decodes_as_its_trainer_recorded(tmp_path):
    """`memr2 train` records prompt style and max_new_tokens beside the policy: eval uses them
    unless told otherwise (a 384-token policy cut at 256 would lose operations)."""
    pytest.importorskip("transformers")
    model_dir = _tiny_checkpoint(tmp_path / "ckpt")
    (model_dir / "trainer_state.json").write_text(json.dumps({"stage": 1, "prompt_style": "full", "max_new_tokens": 5}))
    argv = ["--agent", f"checkpoint:{model_dir}", "--episodes", "1", "--horizon", "1", "--device", "cpu", "--backend", "hf"]
    assert _eval(*argv, "--out", str(tmp_path / "a")) == 0
    assert _results(tmp_path / "a")[0]["config"]["policy"] == {"prompt_style": "full", "max_new_tokens": 5, "dtype": "float32", "backend": "hf"}
    # the command line wins
    assert _eval(*argv, "--max-new-tokens", "7", "--prompt-style", "compact", "--out", str(tmp_path / "b")) == 0
    assert _results(tmp_path / "b")[0]["config"]["policy"] == {"prompt_style": "compact", "max_new_tokens": 7, "dtype": "float32", "backend": "hf"}


def test_checkpoint_settings_fall_back_and_follow_the_saved_dtype(tmp_path):
    from agents.commands.evaluate import DEFAULT_MAX_NEW_TOKENS, EvalError, checkpoint_settings

    assert checkpoint_settings(tmp_path) == {"prompt_style": "compact", "max_new_tokens": DEFAULT_MAX_NEW_TOKENS, "dtype": None}
    # a warm start records its settings in sft_report.json; weights saved in bfloat16 run in
    # bfloat16 where the CPU has the instructions ("auto"), float32 elsewhere
    (tmp_path / "sft_report.json").write_text(json.dumps({"max_new_tokens": 384, "model": {"prompt_style": "full", "dtype": "bfloat16"}}))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "dtype": "bfloat16"}))
    assert checkpoint_settings(tmp_path) == {"prompt_style": "full", "max_new_tokens": 384, "dtype": "auto"}
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "torch_dtype": "float32"}))
    (tmp_path / "sft_report.json").unlink()
    assert checkpoint_settings(tmp_path)["dtype"] is None
    (tmp_path / "trainer_state.json").write_text('{"prompt_style": ')
    with pytest.raises(EvalError, match="trainer_state.json is not readable JSON"):
        checkpoint_settings(tmp_path)


# ------------------------------------------------------------------------------------------
# LoCoMo
# ------------------------------------------------------------------------------------------


@real
def test_locomo_one_conversation(tmp_path):
    out = tmp_path / "locomo"
    argv = ["--agent", "store-turns", "--data", f"locomo:{LOCOMO_FILE}", "--episodes", "1", "--out", str(out)]
    assert _eval(*argv) == 0
    res, md = _results(out)
    cfg = res["config"]
    assert cfg["split"] == "test" and cfg["slices_per_session"] == 6
    assert [e["conv_id"] for e in res["episodes"]] == ["conv-26"]
    assert cfg["horizon"] == 19  # every session of conv-26 that has turns
    cats = res["categories"]
    assert list(cats) == ["multi_hop", "temporal", "open_domain", "single_hop", "adversarial", "all"]
    assert {"locomo_f1", "nltk_bleu1"} <= set(cats["all"])
    assert "| category | n | F1 | BLEU-1 | LoCoMo F1 | NLTK BLEU-1 |" in md
    # store-turns keeps every turn: nothing is missing from memory
    assert res["summary"]["m_fail"] == 0.0 and res["summary"]["ops"]["adds"] == res["summary"]["memory_size"]

    out2 = tmp_path / "locomo-no5"
    assert _eval(*argv[:-1], str(out2), "--drop-adversarial") == 0
    res2, md2 = _results(out2)
    assert "adversarial" not in res2["categories"]
    assert res2["categories"]["all"]["n"] == cats["all"]["n"] - cats["adversarial"]["n"]
    assert "category 5 dropped" in md2


@real
@pytest.mark.parametrize("agent", ["oracle", "add-only", "noisy-teacher"])
def test_gold_agents_are_refused_on_real_data(agent, capsys):
    assert _eval("--agent", agent, "--data", f"locomo:{LOCOMO_FILE}", "--episodes", "1") == 2
    assert "only synthetic tasks have" in capsys.readouterr().err

"""benchmarks/held_out.py --combine: agents evaluated in separate calls on the same held-out
conversations merge into one report with paired differences."""

import json
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def held_out(load_script):
    return load_script("benchmarks/held_out.py")


META = {"preset": "small", "seed": 0, "episodes": 3, "horizon": 8, "slices": 2}


def _report(path: Path, rows: dict, checkpoints: list[str], meta=META) -> Path:
    path.mkdir(parents=True)
    full = {name: {"f1": sum(f) / len(f), "f1_per_task": f, "memory_size": 1.0} for name, f in rows.items()}
    (path / "held_out.json").write_text(json.dumps({"meta": meta, "checkpoints": checkpoints, "rows": full}))
    return path / "held_out.json"


def test_combine_pairs_each_run_with_the_first_checkpoint_and_pools_the_seeds(held_out, tmp_path):
    a = _report(tmp_path / "a", {"teacher": [0.5, 0.5, 0.5], "warm": [0.2, 0.4, 0.6]}, ["warm"])
    b = _report(tmp_path / "b", {"teacher": [0.5, 0.5, 0.5], "rl-s0": [0.3, 0.5, 0.7]}, ["rl-s0"])
    c = _report(tmp_path / "c", {"teacher": [0.9, 0.9, 0.9], "rl-s1": [0.2, 0.6, 0.8]}, ["rl-s1"])
    held_out.combine([a, b, c], tmp_path / "out")
    data = json.loads((tmp_path / "out" / "held_out.json").read_text())
    assert data["checkpoints"] == ["warm", "rl-s0", "rl-s1"]
    assert data["rows"]["teacher"]["f1"] == pytest.approx(0.5)  # the first file's baseline row is kept
    assert data["rows"]["rl-s0"]["diff_to_warm"]["mean"] == pytest.approx(0.1)
    assert data["rows"]["rl-s0"]["diff_to_warm"]["ci95"] == pytest.approx([0.1, 0.1])
    assert data["pooled"]["mean"] == pytest.approx((0.1 + 0.4 / 3) / 2)  # rl-s1 - warm: 0, 0.2, 0.2
    assert "rl-s1 - warm" in (tmp_path / "out" / "held_out.md").read_text()


def test_combine_refuses_reports_of_different_conversations(held_out, tmp_path):
    a = _report(tmp_path / "a", {"warm": [0.2, 0.4, 0.6]}, ["warm"])
    b = _report(tmp_path / "b", {"rl": [0.3, 0.5, 0.7]}, ["rl"], meta={**META, "horizon": 4})
    with pytest.raises(SystemExit, match="not the same conversations"):
        held_out.combine([a, b], tmp_path / "out")


def test_combine_names_a_missing_or_broken_report(held_out, tmp_path):
    a = _report(tmp_path / "a", {"warm": [0.2, 0.4, 0.6]}, ["warm"])
    with pytest.raises(SystemExit, match="still-running/held_out.json: not a readable held_out.json"):
        held_out.combine([a, tmp_path / "still-running" / "held_out.json"], tmp_path / "out")
    (tmp_path / "cut.json").write_text('{"meta": ')
    with pytest.raises(SystemExit, match="cut.json: not a readable held_out.json"):
        held_out.combine([a, tmp_path / "cut.json"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_groups_compare_the_seed_means_of_two_algorithms_on_the_same_conversations(held_out, tmp_path):
    a = _report(tmp_path / "a", {"warm": [0.2, 0.4, 0.6]}, ["warm"])
    b = _report(tmp_path / "b", {"logo-s1": [0.3, 0.5, 0.7], "logo-s2": [0.5, 0.5, 0.5]}, ["logo-s1", "logo-s2"])
    c = _report(tmp_path / "c", {"grpo-s1": [0.2, 0.4, 0.6]}, ["grpo-s1"])
    groups = held_out.parse_groups(["logo=logo-s1,logo-s2", "grpo=grpo-s1"])
    held_out.combine([a, b, c], tmp_path / "out", groups)
    data = json.loads((tmp_path / "out" / "held_out.json").read_text())
    # logo's seed mean per conversation: 0.4, 0.5, 0.6 -> +0.2, +0.1, 0.0 over warm; grpo equals warm.
    assert data["groups"]["logo"]["mean"] == pytest.approx(0.1) and data["groups"]["logo"]["members"] == ["logo-s1", "logo-s2"]
    assert data["groups"]["grpo"]["mean"] == pytest.approx(0.0) and data["groups"]["grpo"]["ci95"] == pytest.approx([0, 0])
    assert data["groups"]["logo - grpo"]["mean"] == pytest.approx(0.1)
    assert data["pooled"] == {}  # the groups replace the pool of every checkpoint
    assert "| logo - grpo | +0.100 |" in (tmp_path / "out" / "held_out.md").read_text()


def test_a_group_naming_an_unknown_checkpoint_or_badly_formed_is_refused(held_out, tmp_path):
    a = _report(tmp_path / "a", {"warm": [0.2, 0.4, 0.6], "rl-s1": [0.3, 0.5, 0.7]}, ["warm", "rl-s1"])
    with pytest.raises(SystemExit, match="rl-s9 is not a checkpoint after the first"):
        held_out.combine([a], tmp_path / "out", held_out.parse_groups(["logo=rl-s1,rl-s9"]))
    with pytest.raises(SystemExit, match="warm is not a checkpoint after the first"):  # the base cannot be in a group
        held_out.combine([a], tmp_path / "out", held_out.parse_groups(["logo=warm"]))
    for bad in ("logo", "logo=", "=rl-s1"):
        with pytest.raises(SystemExit, match="expected NAME=CHECKPOINT"):
            held_out.parse_groups([bad])
    with pytest.raises(SystemExit, match="given twice"):
        held_out.parse_groups(["a=rl-s1", "a=rl-s1"])
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_pool_merges_two_sets_of_conversations_agent_by_agent(held_out, tmp_path):
    s0 = {**META, "seed": 0, "episodes": 3}
    s9 = {**META, "seed": 9, "episodes": 2}
    files = [
        _report(tmp_path / "w0", {"warm": [0.2, 0.4, 0.6]}, ["warm"], meta=s0),
        _report(tmp_path / "r0", {"rl": [0.3, 0.5, 0.7], "rl-only-here": [0.9, 0.9, 0.9]}, ["rl", "rl-only-here"], meta=s0),
        _report(tmp_path / "w9", {"warm": [0.5, 0.5]}, ["warm"], meta=s9),
        _report(tmp_path / "r9", {"rl": [0.5, 0.7]}, ["rl"], meta=s9),
    ]
    # without --pool, different conversations are refused
    with pytest.raises(SystemExit, match="--pool merges"):
        held_out.combine(files, tmp_path / "no")
    held_out.combine(files, tmp_path / "out", held_out.parse_groups(["logo=rl"]), pool=True)
    data = json.loads((tmp_path / "out" / "held_out.json").read_text())
    assert data["meta"]["seed"] == [0, 9] and data["meta"]["episodes"] == 5
    assert data["checkpoints"] == ["warm", "rl"]  # rl-only-here was not played on seed 9's conversations
    assert data["rows"]["rl"]["f1_per_task"] == [0.3, 0.5, 0.7, 0.5, 0.7]
    assert data["rows"]["rl"]["f1"] == pytest.approx(2.7 / 5)
    # paired over all five conversations: +0.1 on the first three, +0.0 and +0.2 on the others
    assert data["rows"]["rl"]["diff_to_warm"]["mean"] == pytest.approx(0.1)
    assert data["groups"]["logo"]["mean"] == pytest.approx(0.1)
    assert "run seeds 0 and 9: 5 held-out test conversations" in (tmp_path / "out" / "held_out.md").read_text()
    # sets that differ in more than their conversations do not pool
    other = _report(tmp_path / "h4", {"warm": [0.1]}, ["warm"], meta={**META, "seed": 5, "horizon": 4})
    with pytest.raises(SystemExit, match="differ in more than the conversations"):
        held_out.combine([*files, other], tmp_path / "bad", pool=True)


def test_a_tool_calling_checkpoint_plays_the_same_conversations(held_out, tmp_path, monkeypatch):
    """--tool-checkpoint: a chat model that acts through MemoryToolEnv's tools gets a row scored like
    the others. A random model writes no call that parses: its memory stays empty, so its F1 is the
    no-memory agent's on every conversation, and every reply counts as a parse error."""
    pytest.importorskip("torch")
    from tests.test_trl_template import tiny_model_dir

    model = tiny_model_dir(tmp_path / "random-chat-model")
    monkeypatch.setattr("sys.argv", ["held_out.py", "--preset", "smoke", "--episodes", "2", "--horizon", "1",
                                     "--tool-checkpoint", f"random={model}", "--max-new-tokens", "8", "--out", str(tmp_path / "out")])
    held_out.main()
    data = json.loads((tmp_path / "out" / "held_out.json").read_text())
    row = data["rows"]["random"]
    assert data["checkpoints"] == ["random"] and len(row["f1_per_task"]) == 2
    assert row["f1_per_task"] == data["rows"]["no memory"]["f1_per_task"] and row["memory_size"] == 0
    assert row["parse_error_rate"] == 1.0 and row["replies"] == 2
    assert "| random |" in (tmp_path / "out" / "held_out.md").read_text()

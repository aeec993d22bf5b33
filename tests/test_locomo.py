"""LoCoMo loader: exact numbers on the real file (when present), quirks and broken files on
small fixtures written here."""

from __future__ import annotations

import copy
import json
import pickle
from collections import Counter
from pathlib import Path

import pytest

from memenv.data.errors import DataError, DataWarning
from memenv.data.locomo import (
    LOCOMO_ADVERSARIAL_ANSWER,
    LOCOMO_SPLIT,
    evidence_issues,
    load_locomo,
    locomo_split,
    parse_locomo,
)
from memenv.types import Conversation

# The data is CC BY-NC: it lives beside the repository, never in it.
LOCOMO_FILE = Path(__file__).parents[2] / "shared" / "data" / "locomo10.json"

# ------------------------------------------------------------------------------------------
# the real file
# ------------------------------------------------------------------------------------------

real = pytest.mark.skipif(not LOCOMO_FILE.exists(), reason=f"{LOCOMO_FILE} not present")


@pytest.fixture(scope="module")
def convs() -> list[Conversation]:
    return load_locomo(LOCOMO_FILE)


def _by_id(convs):
    return {c.conv_id: c for c in convs}


@real
def test_real_file_counts(convs):
    assert len(convs) == 10
    assert sum(c.num_sessions for c in convs) == 272
    assert sum(c.num_turns for c in convs) == 5882
    assert sum(len(c.questions) for c in convs) == 1986
    cats = Counter(q.category for c in convs for q in c.questions)
    assert cats == {
        "multi_hop": 282,
        "temporal": 321,
        "open_domain": 96,
        "single_hop": 841,
        "adversarial": 446,
    }
    assert all(c.source == "locomo" for c in convs)


@real
def test_real_file_test_split(convs):
    test = locomo_split(convs, "test")
    assert [c.conv_id for c in test] == list(LOCOMO_SPLIT["test"])
    questions = [q for c in test for q in c.questions if q.category != "adversarial"]
    assert len(questions) == 1089
    assert sum(1 for q in questions if q.evidence) == 1085
    assert [c.conv_id for c in locomo_split(convs, "train")] == ["conv-43", "conv-47"]
    assert [c.conv_id for c in locomo_split(convs, "validation")] == ["conv-44"]


@real
def test_real_file_quirks(convs):
    by_id = _by_id(convs)
    qs = {q.qid: q for c in convs for q in c.questions}
    # int answers become strings
    assert qs["conv-26:q1"].answer == "2022"
    assert all(isinstance(q.answer, str) and q.answer for q in qs.values())
    # adversarial items: our answer, their adversarial answer kept; the 2 with both keep theirs
    adversarial = [q for q in qs.values() if q.category == "adversarial"]
    assert all(q.adversarial_answer for q in adversarial)
    assert sum(q.answer != LOCOMO_ADVERSARIAL_ANSWER for q in adversarial) == 2
    # malformed / dangling / zero-padded evidence ids are recorded, not kept as they were
    issues = [i for c in convs for i in evidence_issues(c)]
    kinds = {(i["id"], i["issue"]) for i in issues}
    assert ("D", "malformed") in kinds and ("D:11:26", "malformed") in kinds
    assert ("D10:19", "dangling") in kinds and ("D30:05", "non_canonical") in kinds
    assert qs["conv-50:q69"].evidence == ("D30:5",)
    # every kept id names a real turn
    for c in convs:
        ids = {t.dia_id for s in c.sessions for t in s.turns}
        assert all(d in ids for q in c.questions for d in q.evidence)
    # questions without evidence are answerable after the last session
    no_evidence = [q for q in qs.values() if not q.evidence]
    assert sorted(q.qid for q in no_evidence) == [
        "conv-26:q30", "conv-26:q46", "conv-50:q39", "conv-50:q42",
    ]
    assert qs["conv-26:q30"].answerable_after == by_id["conv-26"].sessions[-1].index == 19
    # answerable_after is the latest evidence session everywhere else
    for q in qs.values():
        if q.evidence:
            assert q.answerable_after == max(q.evidence_sessions())
        assert q.valid_until is None
    # conv-26 has dates for sessions 20..35 without turns
    conv26 = by_id["conv-26"]
    assert conv26.num_sessions == 19
    assert dict(conv26.meta)["sessions_without_turns"] == ",".join(map(str, range(20, 36)))
    # images are described in the text
    turn = conv26.sessions[0].turns[4]
    assert turn.dia_id == "D1:5"
    assert turn.text.endswith("[Sent an image showing a photo of a dog walking past a wall "
                              "with a painting of a woman]")


@real
def test_real_file_drop_adversarial():
    convs = load_locomo(LOCOMO_FILE, drop_adversarial=True)
    assert sum(len(c.questions) for c in convs) == 1986 - 446
    assert all(q.category != "adversarial" for c in convs for q in c.questions)


# ------------------------------------------------------------------------------------------
# small fixtures
# ------------------------------------------------------------------------------------------


def _record(sample_id="conv-1", **overrides):
    """A small valid LoCoMo record with two sessions of three turns."""
    conversation = {
        "speaker_a": "Ann",
        "speaker_b": "Bob",
        "session_1_date_time": "1:00 pm on 1 May, 2023",
        "session_1": [
            {"speaker": "Ann", "dia_id": "D1:1", "text": "I adopted a cat."},
            {"speaker": "Bob", "dia_id": "D1:2", "text": "Nice!"},
            {"speaker": "Ann", "dia_id": "D1:3", "text": "Look at her.",
             "img_url": ["http://example.invalid/cat.jpg"], "blip_caption": "a photo of a cat",
             "query": "cat"},
        ],
        "session_2_date_time": "2:00 pm on 9 May, 2023",
        "session_2": [
            {"speaker": "Bob", "dia_id": "D2:1", "text": "I moved to Lyon."},
            {"speaker": "Ann", "dia_id": "D2:2", "text": "Since when?"},
            {"speaker": "Bob", "dia_id": "D2:3", "text": "Since 2021."},
        ],
    }
    qa = [
        {"question": "What pet did Ann adopt?", "answer": "a cat", "evidence": ["D1:1"],
         "category": 4},
        {"question": "When did Bob move?", "answer": 2021, "evidence": ["D2:3"], "category": 2},
    ]
    record = {"sample_id": sample_id, "conversation": conversation, "qa": qa}
    record.update(overrides)
    return record


def _write(tmp_path, data, name="locomo.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


def test_fixture_loads(tmp_path):
    (conv,) = load_locomo(_write(tmp_path, [_record()]))
    assert conv.conv_id == "conv-1" and conv.speakers == ("Ann", "Bob")
    assert [s.index for s in conv.sessions] == [1, 2]
    assert conv.sessions[1].date == "2:00 pm on 9 May, 2023"
    assert conv.num_turns == 6
    assert conv.sessions[0].turns[2].text == "Look at her. [Sent an image showing a photo of a cat]"
    q0, q1 = conv.questions
    assert (q0.qid, q0.category, q0.answerable_after) == ("conv-1:q0", "single_hop", 1)
    assert (q1.answer, q1.category, q1.answerable_after) == ("2021", "temporal", 2)
    assert evidence_issues(conv) == []
    pickle.loads(pickle.dumps(conv))  # picklable for vector-env workers
    hash(conv)


def test_fixture_quirks(tmp_path):
    rec = _record()
    conv = rec["conversation"]
    conv["session_3_date_time"] = "3:00 pm on 20 May, 2023"  # date but no turns
    conv["session_4_date_time"] = "4:00 pm on 21 May, 2023"
    conv["session_4"] = []  # an empty turn list: same thing
    rec["qa"] += [
        {"question": "Adversarial?", "adversarial_answer": "Lyon", "evidence": ["D2:1"],
         "category": 5},
        {"question": "No evidence?", "answer": "yes", "evidence": [], "category": 3},
        {"question": "Messy evidence?", "answer": "cat, Lyon", "category": 1,
         "evidence": ["D", "D:11:26", "D2:02", "D1:1; D2:1", "D9:1", "D1:99", "D1:1"]},
        {"question": "Adversarial with answer", "answer": "No", "adversarial_answer": "Yes",
         "evidence": ["D1:1"], "category": 5},
    ]
    (c,) = load_locomo(_write(tmp_path, [rec]))
    qs = c.questions
    assert c.num_sessions == 2
    assert dict(c.meta)["sessions_without_turns"] == "3,4"
    adv = qs[2]
    assert (adv.category, adv.answer, adv.adversarial_answer) == (
        "adversarial", LOCOMO_ADVERSARIAL_ANSWER, "Lyon")
    assert adv.answerable_after == 2
    assert qs[3].evidence == () and qs[3].answerable_after == 2  # the last session
    messy = qs[4]
    assert messy.evidence == ("D2:2", "D1:1", "D2:1")
    assert messy.answerable_after == 2
    issues = {(i["id"], i["issue"]) for i in evidence_issues(c) if i["qid"] == messy.qid}
    assert issues == {
        ("D", "malformed"), ("D:11:26", "malformed"), ("D2:02", "non_canonical"),
        ("D9:1", "dangling"), ("D1:99", "dangling"),
    }
    assert (qs[5].answer, qs[5].adversarial_answer) == ("No", "Yes")
    # drop_adversarial removes both category-5 items and keeps the qids of the others
    (c2,) = load_locomo(_write(tmp_path, [rec]), drop_adversarial=True)
    assert [q.qid for q in c2.questions] == ["conv-1:q0", "conv-1:q1", "conv-1:q3", "conv-1:q4"]


def test_session_gaps_and_numeric_order(tmp_path):
    rec = _record()
    conv = rec["conversation"]
    conv["session_10_date_time"] = "x"
    conv["session_10"] = [{"speaker": "Ann", "dia_id": "D10:1", "text": "late"}]
    (c,) = load_locomo(_write(tmp_path, [rec]))
    assert [s.index for s in c.sessions] == [1, 2, 10]  # numeric, not string, order


# -- broken files -------------------------------------------------------------------------


def test_not_json(tmp_path):
    with pytest.raises(DataError, match="not valid JSON") as e:
        load_locomo(_write(tmp_path, "[{"))
    assert isinstance(e.value, ValueError)
    assert str(tmp_path) in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_locomo(tmp_path / "nope.json")


@pytest.mark.parametrize("data", [{"sample_id": "conv-1"}, "text", 3, None])
def test_top_level_not_a_list(tmp_path, data):
    with pytest.raises(DataError, match="expected a JSON list"):
        load_locomo(_write(tmp_path, json.dumps(data)))


def _breakers():
    """(description, mutation of a record, text expected in the error)."""

    def drop_conversation(r):
        del r["conversation"]

    def session_not_list(r):
        r["conversation"]["session_2"] = {"D2:1": "hi"}

    def turn_without(key):
        def f(r):
            del r["conversation"]["session_1"][1][key]
        return f

    def turn_not_object(r):
        r["conversation"]["session_1"][0] = "Ann: hi"

    def text_not_string(r):
        r["conversation"]["session_2"][0]["text"] = None

    def bad_dia_id(r):
        r["conversation"]["session_2"][0]["dia_id"] = "D2-1"

    def wrong_session(r):
        r["conversation"]["session_2"][0]["dia_id"] = "D1:7"

    def duplicate_dia_id(r):
        r["conversation"]["session_1"][1]["dia_id"] = "D1:1"

    def no_speaker_a(r):
        del r["conversation"]["speaker_a"]

    def no_sample_id(r):
        del r["sample_id"]

    def qa_not_list(r):
        r["qa"] = {"question": "?"}

    def no_sessions(r):
        for k in [k for k in r["conversation"] if k.startswith("session_")]:
            del r["conversation"][k]

    return [
        ("no conversation", drop_conversation,
         "conv-1) 'conversation': expected an object, missing"),
        ("session not a list", session_not_list,
         "conversation.session_2: expected a list of turns"),
        ("turn without speaker", turn_without("speaker"), "session_1[1] 'speaker': missing"),
        ("turn without text", turn_without("text"), "session_1[1] 'text': missing"),
        ("turn without dia_id", turn_without("dia_id"), "session_1[1] 'dia_id': missing"),
        ("turn not an object", turn_not_object, "session_1[0]: expected an object"),
        ("text not a string", text_not_string, "session_2[0] 'text': expected a string"),
        ("malformed dia_id", bad_dia_id, "'dia_id': malformed 'D2-1'"),
        ("dia_id of another session", wrong_session, "is not in session 2"),
        ("duplicate dia_id", duplicate_dia_id, "duplicate 'D1:1'"),
        ("no speaker_a", no_speaker_a, "conversation.speaker_a"),
        ("no sample_id", no_sample_id, "record[0] 'sample_id'"),
        ("qa not a list", qa_not_list, "'qa': expected a list"),
        ("no sessions", no_sessions, "no session with turns"),
    ]


@pytest.mark.parametrize("desc,breaker,expected", _breakers(), ids=[b[0] for b in _breakers()])
def test_broken_record_raises_naming_record_and_field(tmp_path, desc, breaker, expected):
    rec = _record()
    breaker(rec)
    with pytest.raises(DataError) as e:
        load_locomo(_write(tmp_path, [rec]))
    assert expected in str(e.value), str(e.value)
    assert any(expected in p for p in e.value.problems)


def _bad_questions():
    return [
        ({"answer": "x", "evidence": [], "category": 4}, "qa[2] 'question'"),
        ({"question": "q", "answer": "x", "evidence": [], "category": 7}, "qa[2] 'category'"),
        ({"question": "q", "answer": "x", "evidence": [], "category": "4"}, "qa[2] 'category'"),
        ({"question": "q", "evidence": ["D1:1"], "category": 1}, "qa[2] 'answer': missing"),
        ({"question": "q", "answer": ["x"], "evidence": [], "category": 1}, "qa[2] 'answer'"),
        ({"question": "q", "answer": "x", "evidence": "D1:1", "category": 4}, "qa[2] 'evidence'"),
        ("just text", "qa[2]: expected an object"),
    ]


@pytest.mark.parametrize("item,expected", _bad_questions())
def test_broken_question_raises(tmp_path, item, expected):
    rec = _record()
    rec["qa"].append(item)
    with pytest.raises(DataError, match=expected.replace("[", r"\[").replace("]", r"\]")):
        load_locomo(_write(tmp_path, [rec]))


def test_all_problems_reported_at_once(tmp_path):
    good, bad1, bad2 = _record("conv-1"), _record("conv-2"), _record("conv-3")
    del bad1["conversation"]["session_1"][0]["speaker"]
    bad2["conversation"]["session_2"] = "oops"
    bad2["qa"][0]["category"] = 9
    with pytest.raises(DataError) as e:
        load_locomo(_write(tmp_path, [good, bad1, bad2]))
    text = str(e.value)
    assert "record[1] (conv-2)" in text and "record[2] (conv-3)" in text
    assert len(e.value.problems) == 2  # conv-3's questions are not checked once it is unusable


def test_non_strict_skips_and_warns(tmp_path):
    good, bad = _record("conv-1"), _record("conv-2")
    del bad["conversation"]["session_1"][0]["speaker"]
    good["qa"].append({"question": "q", "answer": "x", "evidence": [], "category": 42})
    with pytest.warns(DataWarning) as record:
        convs = load_locomo(_write(tmp_path, [good, bad]), strict=False)
    message = str(record[0].message)
    assert "record[1] (conv-2)" in message and "qa[2] 'category'" in message
    # the broken conversation is skipped; the broken question only
    assert [c.conv_id for c in convs] == ["conv-1"]
    assert [q.qid for q in convs[0].questions] == ["conv-1:q0", "conv-1:q1"]


def test_duplicate_sample_id(tmp_path):
    with pytest.raises(DataError, match="duplicate of record\\[0\\]"):
        load_locomo(_write(tmp_path, [_record("conv-1"), _record("conv-1")]))


def test_parse_locomo_does_not_mutate_input():
    recs = [_record()]
    before = copy.deepcopy(recs)
    parse_locomo(recs)
    assert recs == before


def test_locomo_split():
    assert set(LOCOMO_SPLIT["test"]).isdisjoint(LOCOMO_SPLIT["train"] + LOCOMO_SPLIT["validation"])
    assert len(set(sum(LOCOMO_SPLIT.values(), ()))) == 10
    convs = parse_locomo([_record("conv-44"), _record("conv-43"), _record("conv-1")])
    assert [c.conv_id for c in locomo_split(convs, "train")] == ["conv-43"]
    assert [c.conv_id for c in locomo_split(convs, "validation")] == ["conv-44"]
    assert locomo_split(convs, "test") == []
    with pytest.raises(ValueError, match="unknown LoCoMo split"):
        locomo_split(convs, "dev")

"""LongMemEval loader on the invented fixture ``tests/fixtures/lme_schema_fixture.json`` and on
broken variants of it."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from memenv.data.errors import DataError, DataWarning
from memenv.data.longmemeval import load_longmemeval, parse_longmemeval

FIXTURE = Path(__file__).parent / "fixtures" / "lme_schema_fixture.json"


def _items():
    return json.loads(FIXTURE.read_text())


def _write(tmp_path, data):
    path = tmp_path / "lme.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


@pytest.fixture(scope="module")
def convs():
    return {c.conv_id: c for c in load_longmemeval(FIXTURE)}


def test_one_conversation_per_item(convs):
    assert list(convs) == ["mini_ssu_01", "mini_ku_02", "mini_tr_03", "mini_ssu_04_abs"]
    for c in convs.values():
        assert c.speakers == ("user", "assistant") and c.source == "longmemeval"
        assert len(c.questions) == 1 and c.questions[0].qid == c.conv_id
        assert {t.speaker for s in c.sessions for t in s.turns} <= {"user", "assistant"}
        assert [s.index for s in c.sessions] == list(range(1, c.num_sessions + 1))
        for s in c.sessions:
            assert [t.dia_id for t in s.turns] == [
                f"D{s.index}:{k}" for k in range(1, len(s.turns) + 1)
            ]


def test_single_session_user(convs):
    c = convs["mini_ssu_01"]
    (q,) = c.questions
    assert q.category == "single-session-user"
    assert q.evidence == ("D2:1",) and q.answerable_after == 2 and q.valid_until is None
    assert c.sessions[1].date == "2023/03/21 (Tue) 19:42"
    assert c.sessions[1].turns[0].text.startswith("My border collie Pip")
    meta = dict(c.meta)
    assert meta["question_date"] == "2023/04/02 (Sun) 10:15"
    assert meta["evidence_from"] == "has_answer"


def test_knowledge_update_is_put_in_date_order(convs):
    c = convs["mini_ku_02"]
    (q,) = c.questions
    assert q.category == "knowledge-update" and q.answer == "Globex"
    # the haystack lists the update first; chronological order puts Acme (March) first
    assert "Acme" in c.sessions[0].turns[0].text and c.sessions[0].date.startswith("2023/03/01")
    assert "Globex" in c.sessions[1].turns[0].text
    assert q.evidence == ("D1:1", "D2:1") and q.answerable_after == 2
    meta = dict(c.meta)
    assert meta["order"] == "chronological"
    assert json.loads(meta["session_ids"]) == ["answer_mini_ku_02_1", "answer_mini_ku_02_2"]


def test_haystack_order_on_request():
    c = {c.conv_id: c for c in load_longmemeval(FIXTURE, chronological=False)}["mini_ku_02"]
    assert "Globex" in c.sessions[0].turns[0].text
    assert dict(c.meta)["order"] == "haystack"


def test_numeric_answer_becomes_string(convs):
    assert convs["mini_tr_03"].questions[0].answer == "2"
    assert convs["mini_tr_03"].questions[0].category == "temporal-reasoning"


def test_abstention_falls_back_to_answer_sessions(convs):
    c = convs["mini_ssu_04_abs"]
    (q,) = c.questions
    assert q.category == "abstention"
    assert dict(c.meta)["question_type"] == "single-session-user"
    # no turn has has_answer: all turns of the answer session are the evidence
    assert q.evidence == ("D1:1", "D1:2") and dict(c.meta)["evidence_from"] == "answer_sessions"


def test_unparsable_dates_keep_haystack_order(tmp_path):
    items = _items()
    items[1]["haystack_dates"][0] = "sometime in June"
    (c,) = [c for c in load_longmemeval(_write(tmp_path, items)) if c.conv_id == "mini_ku_02"]
    assert dict(c.meta)["order"] == "haystack (unparsed dates)"
    assert c.sessions[0].date == "sometime in June"


def test_empty_session_and_no_evidence(tmp_path):
    items = _items()[:1]
    items[0]["haystack_sessions"].insert(0, [])
    items[0]["haystack_session_ids"].insert(0, "empty_1")
    items[0]["haystack_dates"].insert(0, "2023/01/01 (Sun) 00:00")
    for turn in items[0]["haystack_sessions"][2]:
        turn.pop("has_answer", None)
    items[0]["answer_session_ids"] = []
    (c,) = load_longmemeval(_write(tmp_path, items))
    assert c.num_sessions == 2
    assert json.loads(dict(c.meta)["empty_sessions"]) == ["empty_1"]
    assert c.questions[0].evidence == () and c.questions[0].answerable_after == 2
    assert dict(c.meta)["evidence_from"] == "none"


# -- broken files -------------------------------------------------------------------------


def test_not_json(tmp_path):
    with pytest.raises(DataError, match="not valid JSON"):
        load_longmemeval(_write(tmp_path, '[{"question_id": '))


def test_not_a_list(tmp_path):
    with pytest.raises(DataError, match="expected a JSON list"):
        load_longmemeval(_write(tmp_path, {"data": []}))


def _set(path, value):
    def f(item):
        *head, last = path
        target = item
        for key in head:
            target = target[key]
        target[last] = value
    return f


def _del(key):
    def f(item):
        del item[key]
    return f


BREAKERS = [
    ("no question_id", _del("question_id"), "item[0] 'question_id': missing"),
    ("no question", _del("question"), "(mini_ssu_01) 'question': missing"),
    ("answer is a list", _set(["answer"], ["a"]), "'answer': got a list"),
    ("sessions not a list", _set(["haystack_sessions"], {}),
     "'haystack_sessions': expected a list"),
    ("dates too short", _set(["haystack_dates"], ["2023/03/10 (Fri) 08:00"]),
     "'haystack_dates': 1 entries for 2 haystack_sessions"),
    ("no session ids", _del("haystack_session_ids"), "'haystack_session_ids': missing"),
    ("session not a list", _set(["haystack_sessions", 1], "text"),
     "haystack_sessions[1]: expected a list of turns"),
    ("bad role", _set(["haystack_sessions", 0, 1, "role"], "system"), "[0][1] 'role'"),
    ("no content", _set(["haystack_sessions", 1, 0, "content"], None), "[1][0] 'content'"),
    ("has_answer not bool", _set(["haystack_sessions", 1, 0, "has_answer"], "yes"),
     "'has_answer': expected true or false"),
    ("turn not an object", _set(["haystack_sessions", 0, 0], "hi"),
     "haystack_sessions[0][0]: expected an object"),
]


@pytest.mark.parametrize("desc,breaker,expected", BREAKERS, ids=[b[0] for b in BREAKERS])
def test_broken_item_raises(tmp_path, desc, breaker, expected):
    items = _items()
    breaker(items[0])
    with pytest.raises(DataError) as e:
        load_longmemeval(_write(tmp_path, items))
    assert isinstance(e.value, ValueError)
    assert any(expected in p for p in e.value.problems), e.value.problems


def test_non_strict_skips_and_warns(tmp_path):
    items = _items()
    items[1]["haystack_sessions"][0][0]["role"] = "narrator"
    items.append("not an item")
    with pytest.warns(DataWarning) as record:
        convs = load_longmemeval(_write(tmp_path, items), strict=False)
    message = str(record[0].message)
    assert "item[1] (mini_ku_02)" in message and "item[4]: expected an object" in message
    assert [c.conv_id for c in convs] == ["mini_ssu_01", "mini_tr_03", "mini_ssu_04_abs"]


def test_duplicate_question_id(tmp_path):
    items = _items()
    items.append(copy.deepcopy(items[0]))
    with pytest.raises(DataError, match=r"duplicate of item\[0\]"):
        load_longmemeval(_write(tmp_path, items))


def test_parse_does_not_mutate_input():
    items = _items()
    before = copy.deepcopy(items)
    parse_longmemeval(items)
    assert items == before

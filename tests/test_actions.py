from hypothesis import given, settings, strategies as st

from memenv.actions import MAX_ACTION_CHARS, Fact, ParsedOp, parse_facts, parse_operations


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_parsers_never_raise_on_any_text(text):
    for parse in (parse_facts, parse_operations):
        res = parse(text)
        assert res.error is None or isinstance(res.error, str)
        assert isinstance(res.items, tuple)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_parsers_never_raise_on_arbitrary_json(value):
    import json

    for wrapped in (value, {"facts": value}, {"operations": value}, {"facts": [value]}, {"operations": [value]}):
        text = json.dumps(wrapped)
        parse_facts(text)
        parse_operations(text)


def test_non_string_action_is_a_parse_error():
    assert parse_facts(None).error  # type: ignore[arg-type]
    assert parse_operations(123).error  # type: ignore[arg-type]


def test_facts_tolerate_fences_prose_and_key_case():
    text = 'Sure! Here you go:\n```json\n{"Facts": [{"Speaker": "Alice", "DIA_ID": "D1:2", "Fact": "Alice lives in Paris."}]}\n```'
    res = parse_facts(text)
    assert res.error is None
    assert res.items == (Fact("Alice", "D1:2", "Alice lives in Paris."),)


def test_facts_skip_empty_and_non_objects():
    res = parse_facts('{"facts": [{"speaker": "A", "fact": ""}, 3, "Bob likes tea."]}')
    assert res.items == (Fact("", "", "Bob likes tea."),)
    assert len(res.problems) == 2


def test_unparsable_text_sets_error():
    assert parse_facts("no json here").error == "no JSON object found"
    assert parse_facts('{"facts": [').error is not None
    assert parse_operations('{"facts": []}').error == 'expected a "operations" list'


def test_operations_aliases_ids_and_validation():
    text = """{"operations": [
        {"op": "insert", "text": "Alice has a cat.", "speaker": "Alice", "dia_id": "D2:1"},
        {"op": "Update", "id": "2", "text": "Alice lives in Rome."},
        {"op": "DELETE", "id": 0.0},
        {"op": "none", "id": 1},
        {"op": "NOOP"},
        {"op": "UPDATE", "text": "no id"},
        {"op": "DELETE", "id": "x"},
        {"op": "ADD"},
        {"op": "FLY", "id": 1}
    ]}"""
    res = parse_operations(text)
    assert res.error is None
    assert res.items == (
        ParsedOp("ADD", None, "Alice has a cat.", "Alice", "D2:1"),
        ParsedOp("UPDATE", 2, "Alice lives in Rome."),
        ParsedOp("DELETE", 0),
        ParsedOp("NOOP", 1),
        ParsedOp("NOOP", None),
    )
    assert len(res.problems) == 4


def test_first_valid_json_wins_after_broken_prefix():
    res = parse_operations('{"operations": [ broken ... then {"operations": [{"op": "NOOP", "id": 0}]}')
    assert res.items == (ParsedOp("NOOP", 0),)


def test_huge_input_is_bounded():
    text = "{" * (MAX_ACTION_CHARS * 3)
    assert parse_operations(text).error is not None

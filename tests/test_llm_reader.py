"""LLM reader: prompt and retrieval protocol, caching, retries and explicit failures, against a
fake OpenAI-compatible server on 127.0.0.1 and a tiny random Hugging Face model built offline."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from memenv.llm_reader import (
    HFReaderBackend,
    REPLY_PREFILLED,
    REPLY_WITH_TAGS,
    LLMReader,
    OpenAIReaderBackend,
    extract_answer,
)
from memenv.memory import MemoryBank
from memenv.readers import ReaderError


def _bank() -> MemoryBank:
    bank = MemoryBank()
    bank, _ = bank.add("Alice", "Alice lives in Berlin.", session=1, date="8 May 2023", dia_ids=["D1:1"])
    bank, _ = bank.add("Bob", "Bob has a dog named Rex.", session=1, date="8 May 2023", dia_ids=["D1:2"])
    bank, _ = bank.add("Alice", "Alice moved to Paris.", session=3, date="2 June 2023", dia_ids=["D3:4"])
    bank, _ = bank.add("Alice", "Alice likes tennis.", session=2, date="20 May 2023", dia_ids=["D2:1"])
    return bank


# ------------------------------------------------------------------------------------------
# a fake OpenAI-compatible server
# ------------------------------------------------------------------------------------------


class FakeServer:
    """Answers chat completions on 127.0.0.1; ``mode`` picks the behaviour, ``calls`` counts
    requests. Modes: ``ok`` (answers ``<answer>Q:<question></answer>``; as a judge, CORRECT when
    the graded answer holds ``Q:``), ``no_tags``, ``slow``,
    ``flaky`` (HTTP 503 for the first two requests), ``garbage`` (not JSON), ``bad_request``."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.calls = 0
        self.bodies: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.calls += 1
                server.bodies.append(body)
                if server.mode == "slow":
                    time.sleep(1.0)
                if server.mode == "flaky" and server.calls <= 2:
                    return self._send(503, b'{"error": "warming up"}')
                if server.mode == "bad_request":
                    return self._send(400, b'{"error": "bad model"}')
                if server.mode == "garbage":
                    return self._send(200, b"<html>not json</html>")
                prompt = body["messages"][0]["content"]
                if prompt.startswith("You grade answers"):  # memenv.scoring.JUDGE_PROMPT
                    verdict = {"reason": "fake", "label": "CORRECT" if "Q:" in prompt else "WRONG"}
                    reply = {"choices": [{"message": {"role": "assistant", "content": json.dumps(verdict)}}]}
                    return self._send(200, json.dumps(reply).encode())
                question = re.search(r"^Question: (.*)$", prompt, re.M).group(1)
                content = "I am not sure." if server.mode == "no_tags" else f"Thinking. <answer> Q:{question} </answer>"
                reply = {"choices": [{"message": {"role": "assistant", "content": content}}]}
                self._send(200, json.dumps(reply).encode())

            def _send(self, code, payload):
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                try:
                    self.wfile.write(payload)
                except OSError:  # the client gave up (timeout test)
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = FakeServer()
    yield s
    s.close()


def _backend(server, **kw) -> OpenAIReaderBackend:
    kw.setdefault("backoff", 0.01)
    return OpenAIReaderBackend(server.url, "fake-model", **kw)


# ------------------------------------------------------------------------------------------
# prompt protocol
# ------------------------------------------------------------------------------------------


def test_extract_answer_takes_the_last_tagged_answer():
    assert extract_answer("put it inside <answer></answer>. <ANSWER> Paris </Answer>") == "Paris"
    assert extract_answer("<answer>\nmulti\nline\n</answer>") == "multi\nline"
    assert extract_answer("<answer></answer>") == ""
    assert extract_answer("Paris") is None
    assert extract_answer("<answer>Paris") is None


def test_prompt_shows_top_k_memories_per_speaker_with_dates(server):
    reader = LLMReader(_backend(server), k=2)
    prompt = reader.prompt("Where does Alice live?", _bank())
    alice, bob = prompt.index("Memories of Alice:"), prompt.index("Memories of Bob:")
    assert alice < bob
    # k=2 per speaker: the two best BM25 hits among Alice's memories (a tie goes to the lower
    # id), shown oldest first with their session date
    assert prompt[alice:bob].strip() == (
        "Memories of Alice:\n- [8 May 2023] Alice lives in Berlin.\n- [2 June 2023] Alice moved to Paris."
    )
    assert "Memories of Bob:\n- [8 May 2023] Bob has a dog named Rex." in prompt
    assert "Question: Where does Alice live?" in prompt
    assert "<answer>" in prompt and "Not mentioned in the conversation" in prompt
    empty = reader.prompt("Where does Alice live?", MemoryBank())
    assert "the memory is empty" in empty


def test_retrieve_filters_by_speaker_and_orders_by_session(server):
    reader = LLMReader(_backend(server), k=30)
    found = reader.retrieve("Alice Bob Berlin Paris tennis dog", _bank())
    assert [e.content for e in found["Alice"]] == ["Alice lives in Berlin.", "Alice likes tennis.", "Alice moved to Paris."]
    assert [e.speaker for e in found["Bob"]] == ["Bob"]
    # too few BM25 hits: the most recent other memories of the speaker fill up to k
    found = LLMReader(_backend(server), k=2).retrieve("Berlin", _bank())
    assert [e.content for e in found["Alice"]] == ["Alice lives in Berlin.", "Alice moved to Paris."]
    assert [e.content for e in found["Bob"]] == ["Bob has a dog named Rex."]


# ------------------------------------------------------------------------------------------
# OpenAI-compatible backend
# ------------------------------------------------------------------------------------------


def test_answers_come_from_the_endpoint_and_are_cached(server, tmp_path):
    cache = tmp_path / "cache.json"
    reader = LLMReader(_backend(server), cache_path=cache)
    bank = _bank()
    qs = ["Where does Alice live?", "What is Bob's dog called?", "Where does Alice live?"]
    assert reader.answer_many(qs, bank) == ["Q:" + q for q in qs]
    assert server.calls == 2  # the repeated question is asked once
    body = server.bodies[0]
    assert body["model"] == "fake-model" and body["temperature"] == 0
    assert reader.answer("What is Bob's dog called?", bank) == "Q:What is Bob's dog called?"
    assert server.calls == 2 and reader.cache_hits == 2

    # a new reader on the same cache file asks nothing
    again = LLMReader(_backend(server), cache_path=cache)
    assert again.answer("Where does Alice live?", bank) == "Q:Where does Alice live?"
    assert server.calls == 2
    saved = json.loads(cache.read_text())
    assert saved["format"] == "memr2-reader-cache" and len(saved["entries"]) == 2

    # a different memory gives a different prompt: asked again
    bank2, _ = bank.add("Alice", "Alice lives in Rome.", session=4, date="1 July 2023")
    reader.answer("Where does Alice live?", bank2)
    assert server.calls == 3


def test_reply_without_answer_tags_raises(server):
    server.mode = "no_tags"
    reader = LLMReader(_backend(server))
    with pytest.raises(ReaderError, match="no <answer>"):
        reader.answer("Where does Alice live?", _bank())


def test_reply_without_answer_tags_can_be_a_counted_penalty(server, tmp_path):
    server.mode = "no_tags"
    reader = LLMReader(_backend(server), on_missing_answer="penalty", cache_path=tmp_path / "c.json")
    assert reader.answer_many(["Where does Alice live?", "Who?"], _bank()) == ["", ""]
    assert reader.missing_answers == 2
    assert not (tmp_path / "c.json").exists()  # unusable replies are never cached


def test_unreachable_endpoint_raises_after_retries():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = OpenAIReaderBackend(f"http://127.0.0.1:{port}/v1", "m", retries=2, backoff=0.01, timeout=2)
    with pytest.raises(ReaderError, match="after 3 attempt"):
        LLMReader(backend).answer("Where does Alice live?", _bank())
    assert backend.requests == 3


def test_timeout_raises(server):
    server.mode = "slow"
    backend = _backend(server, timeout=0.2, retries=1)
    with pytest.raises(ReaderError, match="unreachable or too slow"):
        LLMReader(backend).answer("Where does Alice live?", _bank())
    assert backend.requests == 2


def test_server_errors_are_retried_with_backoff(server):
    server.mode = "flaky"
    reader = LLMReader(_backend(server, retries=2))
    assert reader.answer("Where?", _bank()) == "Q:Where?"
    assert server.calls == 3


def test_client_errors_and_garbage_fail_clearly(server):
    server.mode = "bad_request"
    backend = _backend(server, retries=3)
    with pytest.raises(ReaderError, match="HTTP 400"):
        LLMReader(backend).answer("Where?", _bank())
    assert server.calls == 1  # a 400 is not retried
    server.mode = "garbage"
    with pytest.raises(ReaderError, match="not a chat-completion response"):
        LLMReader(_backend(server, retries=0)).answer("Where?", _bank())


def test_broken_cache_file_is_reported(tmp_path, server):
    bad = tmp_path / "cache.json"
    bad.write_text("{not json")
    with pytest.raises(ReaderError, match="unreadable"):
        LLMReader(_backend(server), cache_path=bad)
    bad.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ReaderError, match="not a memr2-reader-cache"):
        LLMReader(_backend(server), cache_path=bad)


def test_env_scores_with_the_llm_reader(server):
    from memenv.env import MemSessionEnv
    from memenv.types import Conversation, QAItem, Session, Turn

    conv = Conversation(
        conv_id="c",
        speakers=("Alice", "Bob"),
        sessions=(Session(1, "8 May 2023", (Turn("Alice", "D1:1", "I live in Berlin."), Turn("Bob", "D1:2", "Nice."))),),
        questions=(QAItem("c:q0", "Where does Alice live?", "Q:Where does Alice live?", ("D1:1",), "single_hop", 1),),
        source="locomo",
    )
    env = MemSessionEnv(conversations=[conv], reader=LLMReader(_backend(server)), slices_per_session=1)
    env.reset(seed=0)
    env.step(json.dumps({"facts": [{"speaker": "Alice", "dia_id": "D1:1", "fact": "Alice lives in Berlin."}]}))
    _, _, done, _, info = env.step(json.dumps({"operations": [{"op": "ADD", "text": "Alice lives in Berlin.", "speaker": "Alice", "dia_id": "D1:1"}]}))
    assert done and info["qa"][0]["f1"] == 1.0
    # a failing reader surfaces as ReaderError from the step that scores, never as a silent 0
    server.mode = "no_tags"
    env.reset(seed=0)
    with pytest.raises(ReaderError):
        env.step(json.dumps({"facts": []}))  # empty memory: a new prompt, asked and unusable


# ------------------------------------------------------------------------------------------
# local Hugging Face backend
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_hf():
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers import LlamaConfig, LlamaForCausalLM

    from agents.policy.tiny import train_tokenizer

    texts = ["Alice lives in Berlin. Bob has a dog named Rex. <answer>Paris</answer>"] * 20
    tokenizer = train_tokenizer(texts, vocab_size=300)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config), tokenizer


def test_hf_random_model_without_tags_raises_or_is_penalised(tiny_hf, tmp_path):
    model, tokenizer = tiny_hf
    backend = HFReaderBackend(model, tokenizer, device="cpu", max_new_tokens=8, batch_size=2)
    replies = backend.complete(["short", "a much longer prompt about Alice and Berlin"])
    assert len(replies) == 2 and all(isinstance(r, str) for r in replies)
    with pytest.raises(ReaderError, match="no <answer>"):
        LLMReader(backend).answer("Where does Alice live?", _bank())
    reader = LLMReader(backend, on_missing_answer="penalty")
    assert reader.answer_many(["Where does Alice live?"] * 3, _bank()) == [""] * 3
    assert reader.missing_answers == 3 and reader.backend_calls == 1

    # the saved directory loads with local files only; a missing one never triggers a download
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    loaded = HFReaderBackend(tmp_path / "m", device="cpu", max_new_tokens=4)
    assert str((tmp_path / "m").resolve()) in loaded.cache_id
    with pytest.raises(FileNotFoundError, match="never downloads"):
        HFReaderBackend(tmp_path / "nope")


def test_hf_backend_decodes_only_the_new_tokens(tiny_hf):
    """A stand-in model that appends a fixed tagged answer checks padding, slicing and decoding."""
    import torch

    model, tokenizer = tiny_hf
    answer_ids = tokenizer("<answer>Paris</answer>", add_special_tokens=False)["input_ids"]

    class Scripted(torch.nn.Module):
        config = model.config

        def generate(self, input_ids, attention_mask, **kwargs):
            assert kwargs["do_sample"] is False
            assert (attention_mask[:, -1] == 1).all()  # left padded
            tail = torch.tensor([answer_ids] * input_ids.shape[0])
            return torch.cat([input_ids, tail], dim=1)

    backend = HFReaderBackend(Scripted(), tokenizer, device="cpu", batch_size=3)
    reader = LLMReader(backend)
    qs = [f"Question number {i} about Alice?" for i in range(5)]
    assert reader.answer_many(qs, _bank()) == ["Paris"] * 5


@pytest.mark.parametrize(("continuation", "expected"), [("Paris</answer> because", "Paris"), ("Paris\nThe memories say", "Paris"), (" Rex", "Rex"), ("", ""), ("\n\nRex\nmore", "Rex"),
                          ("Not known\n\nQuestion: ... <answer>Paris</answer>", "Not known")])
def test_hf_backend_prefill_answer(tiny_hf, continuation, expected):
    """With answer prefilling the prompt ends with <answer>; the reply is closed at the model's
    own </answer>, else at its first line break."""
    import torch

    model, tokenizer = tiny_hf
    prefix = tokenizer("<answer>", add_special_tokens=False)["input_ids"]
    tail_ids = tokenizer(continuation, add_special_tokens=False)["input_ids"] if continuation else []

    class Scripted(torch.nn.Module):
        config = model.config

        def generate(self, input_ids, attention_mask, **kwargs):
            assert input_ids[:, -len(prefix):].tolist() == [prefix] * input_ids.shape[0]
            tail = torch.tensor([tail_ids] * input_ids.shape[0], dtype=torch.long).reshape(input_ids.shape[0], len(tail_ids))
            return torch.cat([input_ids, tail], dim=1)

    plain = HFReaderBackend(Scripted(), tokenizer, device="cpu")
    backend = HFReaderBackend(Scripted(), tokenizer, device="cpu", prefill_answer=True)
    assert backend.cache_id != plain.cache_id  # cached replies of one mode are never reused by the other
    reply = backend.complete(["Where does Alice live?"])[0]
    assert reply.startswith("<answer>")
    reader = LLMReader(backend)
    assert reader.answer("Where does Alice live?", _bank()) == expected
    # the prefilled prompt asks for the answer only and shows no example answer to copy
    assert reader.prompt("Where does Alice live?", _bank()).endswith(REPLY_PREFILLED)
    assert "for example" not in reader.prompt("Where does Alice live?", _bank())
    assert LLMReader(plain).prompt("Where does Alice live?", _bank()).endswith(REPLY_WITH_TAGS)

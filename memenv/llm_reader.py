"""An LLM reader: a frozen language model answers questions from the memory bank.

This is the paper's answer agent. For a question it retrieves the top ``k`` memories (30 by
default) of each speaker with the bank's BM25 and a speaker filter, shows them with the date of
the session they were last written in (``MemoryEntry.last_date``), and asks the model to put its
final answer inside ``<answer>...</answer>``. The model runs behind a small backend interface:

* :class:`HFReaderBackend`: a local Hugging Face causal LM (local files only, never downloads;
  torch and transformers are imported only when it is built);
* :class:`OpenAIReaderBackend`: any OpenAI-compatible ``/v1/chat/completions`` endpoint, such as
  a vLLM server, with the standard library only (timeouts, retries with exponential backoff).

Replies are cached by a hash of (backend, prompt) in memory and, optionally, in a JSON file that
is rewritten atomically after each batch, so a killed evaluation resumes without asking again.

Failure is explicit. An unreachable endpoint, a timeout, an HTTP error that survives the retries,
or a reply without ``<answer>`` tags raises :class:`~memenv.readers.ReaderError`; the reader
never returns a silent empty answer that would score 0. The one exception is opt-in:
``on_missing_answer="penalty"`` turns a reply without tags into the empty answer (F1 0, a
penalty the policy cannot tell from a wrong answer), counts it in
:attr:`LLMReader.missing_answers` and logs a warning. Use it only with weak models whose
formatting failures should be charged to the memory being read, never to hide a broken server.

Example::

    from memenv.llm_reader import LLMReader, OpenAIReaderBackend
    reader = LLMReader(OpenAIReaderBackend("http://127.0.0.1:8000", "Qwen/Qwen2.5-7B-Instruct"),
                       cache_path="runs/reader_cache.json")
    env = gym.make("MemSession-v0", reader=reader)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, Sequence

from memenv.memory import BM25Retriever, MemoryBank, MemoryEntry, Retriever
from memenv.readers import Reader, ReaderError
from memenv.scoring import _chat_completions_url, _is_loopback, write_json_atomic

__all__ = [
    "LLMReader",
    "ReaderBackend",
    "HFReaderBackend",
    "OpenAIReaderBackend",
    "READER_PROMPT",
    "READER_PROMPT_VERSION",
    "REPLY_WITH_TAGS",
    "REPLY_PREFILLED",
    "extract_answer",
    "MISSING_ANSWER_POLICIES",
]

log = logging.getLogger(__name__)

#: Bumped whenever :data:`READER_PROMPT` or the memory rendering changes, so that cached replies
#: to another prompt are never reused (the version is part of every cache key).
READER_PROMPT_VERSION = 1

#: The reader prompt, filled with ``memories`` (one block per speaker), ``question``,
#: ``unknown_answer`` and ``reply_format`` (:data:`REPLY_WITH_TAGS` or :data:`REPLY_PREFILLED`).
#: Written in our own words after the protocol of the paper.
READER_PROMPT = """You answer questions about a long conversation between two people. You cannot see \
the conversation itself, only memories that were written down while it happened. Each memory \
starts with the date of the session it comes from.

{memories}

Answer from these memories only:
- Use the latest memory when memories disagree: a later one replaces an earlier one.
- For questions about time, turn relative expressions ("last week", "yesterday") into dates \
using the date of the memory, and give the date or period.
- Keep the answer short: a few words, a name, a date or a number, not a sentence.
- If the memories do not hold the answer, answer "{unknown_answer}".

Question: {question}

{reply_format}"""

#: The end of :data:`READER_PROMPT` for a backend that writes its own tags.
REPLY_WITH_TAGS = """You may think first in one or two sentences. Then write the final answer inside \
<answer></answer>, for example <answer>Paris</answer>."""

#: The end of :data:`READER_PROMPT` when the backend prefills ``<answer>`` (no example answer
#: that a small model could copy, no room to think).
REPLY_PREFILLED = "Write only the short answer, on one line."

#: What the reader does with a reply that has no ``<answer>...</answer>``.
MISSING_ANSWER_POLICIES = ("raise", "penalty")

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.IGNORECASE | re.DOTALL)
_PREFILL = "<answer>"
_CACHE_FORMAT = "memr2-reader-cache"


def extract_answer(reply: str) -> str | None:
    """The text inside the last ``<answer>...</answer>`` of ``reply`` (stripped), or ``None``.

    The last pair wins because models sometimes echo the instruction (``"inside
    <answer></answer>"``) or revise themselves before the final answer. Tags are matched
    case-insensitively; ``<answer></answer>`` is an explicit empty answer and returns ``""``.
    """
    found = _ANSWER.findall(reply) if isinstance(reply, str) else []
    return found[-1].strip() if found else None


# ---------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------


class ReaderBackend(Protocol):
    """Turns prompts into model replies (the raw text, tags included)."""

    #: identifies the model and decoding settings in cache keys (same id, same replies)
    cache_id: str

    def complete(self, prompts: Sequence[str]) -> list[str]:
        """One reply per prompt, in order. Raises :class:`ReaderError` on failure."""
        ...


class OpenAIReaderBackend:
    """An OpenAI-compatible chat-completions endpoint (vLLM, llama.cpp, a hosted API).

    Each prompt is sent as one user message at temperature 0. Requests to a loopback address
    bypass any HTTP proxy configured in the environment.

    Args:
        base_url: the server, e.g. ``"http://127.0.0.1:8000"``, ``".../v1"`` or the full
            ``".../v1/chat/completions"`` URL.
        model: the model name sent to the server (part of the cache key).
        api_key: sent as a Bearer token when given.
        timeout: seconds per HTTP request.
        retries: extra attempts after a failed one (connection error, timeout, HTTP 429 or 5xx,
            a response that is not a chat completion), waiting ``backoff * 2**i`` seconds before
            attempt ``i + 1``. Other HTTP errors (400, 401, 404...) fail at once.
        backoff: the first wait, in seconds.
        max_tokens: most tokens per reply.
        concurrency: requests in flight at once in :meth:`complete` (a vLLM server batches them).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        timeout: float = 60.0,
        retries: int = 3,
        *,
        backoff: float = 1.0,
        max_tokens: int = 256,
        concurrency: int = 8,
    ) -> None:
        if not model:
            raise ValueError("OpenAIReaderBackend needs a model name")
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0, got {timeout}")
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self.url = _chat_completions_url(base_url)
        self.model = model
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.max_tokens = int(max_tokens)
        self.concurrency = int(concurrency)
        self._api_key = api_key
        handlers = [urllib.request.ProxyHandler({})] if _is_loopback(self.url) else []
        self._opener = urllib.request.build_opener(*handlers)
        self.cache_id = f"openai:{model}:max_tokens={self.max_tokens}"
        #: HTTP requests sent so far (retries included)
        self.requests = 0
        self._count_lock = threading.Lock()

    def complete(self, prompts: Sequence[str]) -> list[str]:
        if len(prompts) <= 1 or self.concurrency == 1:
            return [self._ask(p) for p in prompts]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(prompts))) as pool:
            return list(pool.map(self._ask, prompts))

    def _request(self, prompt: str) -> urllib.request.Request:
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": 0,
            "max_tokens": self.max_tokens,
        }
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        return urllib.request.Request(self.url, data=json.dumps(body).encode("utf-8"), headers=headers, method="POST")

    def _ask(self, prompt: str) -> str:
        last = "no attempt made"
        attempts = 0
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            attempts += 1
            with self._count_lock:
                self.requests += 1
            try:
                with self._opener.open(self._request(prompt), timeout=self.timeout) as resp:
                    return _reply_text(resp.read())
            except urllib.error.HTTPError as e:
                detail = e.read()[:200].decode("utf-8", "replace") if e.fp else ""
                last = f"HTTP {e.code} {e.reason}: {detail}".strip()
                if e.code != 429 and e.code < 500:
                    break  # a client error does not go away by asking again
            except ValueError as e:  # an unusable response body
                last = str(e)
            except (urllib.error.URLError, OSError) as e:
                # URLError: refused, DNS; OSError: timeouts, resets (http.client errors too).
                last = f"endpoint unreachable or too slow ({e.__class__.__name__}: {getattr(e, 'reason', e)})"
            except Exception as e:  # noqa: BLE001 - e.g. http.client.BadStatusLine on garbage
                last = f"request failed ({e.__class__.__name__}: {e})"
        raise ReaderError(f"reader model {self.model!r} at {self.url} gave no reply after {attempts} attempt(s): {last}")


def _reply_text(body: bytes) -> str:
    """The message text of a chat-completion response body; ValueError if there is none."""
    try:
        content = json.loads(body.decode("utf-8"))["choices"][0]["message"]["content"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, IndexError, TypeError) as e:
        raise ValueError(f"not a chat-completion response ({e.__class__.__name__}: {e}): {body[:200]!r}") from None
    if not isinstance(content, str):
        raise ValueError(f"the chat completion has no text content: {body[:200]!r}")
    return content


class HFReaderBackend:
    """A local Hugging Face causal LM, decoding greedily in batches.

    Args:
        model_path_or_model: a local directory saved with ``save_pretrained`` (loaded with
            ``local_files_only=True``; a missing directory raises ``FileNotFoundError`` and
            nothing is ever downloaded), or a ``PreTrainedModel`` already in memory.
        tokenizer: required with a model object; loaded from the directory otherwise.
        device: ``"cpu"``, ``"cuda"``, ... or ``"auto"`` (CUDA when available).
        dtype: weight dtype when loading from a directory (default: the checkpoint's own on
            accelerators, float32 on CPU).
        max_new_tokens: most tokens per reply.
        batch_size: prompts per ``generate`` call.
        prefill_answer: start every reply with ``<answer>`` (answer prefilling) for small models
            that do not follow the tag instruction (SmolLM2-135M never writes the tags on its
            own). The prompt then asks for the short answer only (:data:`REPLY_PREFILLED`), the
            model continues after ``<answer>`` and decoding stops at ``</answer>``; the reply is
            ``<answer>`` + the first non-empty line it wrote (up to ``</answer>``) +
            ``</answer>``. The model cannot think before answering in this mode.

    Prompts are wrapped in the tokenizer's chat template as one user message when it has one,
    and fed as plain text otherwise.
    """

    def __init__(
        self,
        model_path_or_model: Any,
        tokenizer: Any = None,
        device: str = "auto",
        *,
        dtype: Any = None,
        max_new_tokens: int = 128,
        batch_size: int = 8,
        prefill_answer: bool = False,
    ) -> None:
        if batch_size < 1 or max_new_tokens < 1:
            raise ValueError("batch_size and max_new_tokens must be >= 1")
        from_path = isinstance(model_path_or_model, (str, os.PathLike))
        if from_path and not (Path(model_path_or_model).expanduser() / "config.json").is_file():
            raise FileNotFoundError(
                f"{str(model_path_or_model)!r} is not a local model directory (no config.json); the HF "
                "reader loads save_pretrained directories only and never downloads"
            )
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if from_path:
            path = Path(model_path_or_model).expanduser()
            if dtype is None:
                dtype = torch.float32 if self.device.type == "cpu" else "auto"
            tokenizer = tokenizer or AutoTokenizer.from_pretrained(path, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
            name = str(path.resolve())
        else:
            if tokenizer is None:
                raise ValueError("pass the tokenizer along with a model object")
            model = model_path_or_model
            name = getattr(model.config, "_name_or_path", "") or type(model).__name__
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.max_new_tokens = int(max_new_tokens)
        self.batch_size = int(batch_size)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token")
        self._pad_id = int(pad)
        self.prefill_answer = bool(prefill_answer)
        # a prefilled answer ends at the closing tag at the latest: stop decoding there (not at a
        # line break: small models often start their answer with one)
        self._stops = {"stop_strings": ["</answer>"], "tokenizer": tokenizer} if self.prefill_answer else {}
        self.cache_id = f"hf:{name}:max_new_tokens={self.max_new_tokens}" + (":prefill_answer" if self.prefill_answer else "")

    def _encode(self, prompt: str) -> list[int]:
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
            )
            if self.prefill_answer:
                text += _PREFILL
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return list(self.tokenizer(prompt + ("\n" + _PREFILL if self.prefill_answer else ""))["input_ids"])

    def _finish(self, continuation: str) -> str:
        """The reply as returned: the raw text, or with prefilling ``<answer>`` + the
        continuation's first non-empty line, up to the model's own ``</answer>``, +
        ``</answer>``."""
        if not self.prefill_answer:
            return continuation
        answer = continuation.lstrip().split("\n", 1)[0]
        answer = re.split(r"</answer>", answer, maxsplit=1, flags=re.IGNORECASE)[0]
        return _PREFILL + answer.strip() + "</answer>"

    def complete(self, prompts: Sequence[str]) -> list[str]:
        import torch

        replies: list[str] = []
        for start in range(0, len(prompts), self.batch_size):
            encoded = [self._encode(p) for p in prompts[start : start + self.batch_size]]
            width = max(len(ids) for ids in encoded)
            input_ids = torch.full((len(encoded), width), self._pad_id, dtype=torch.long)
            attention = torch.zeros((len(encoded), width), dtype=torch.long)
            for row, ids in enumerate(encoded):  # left padding: every row ends where generation starts
                input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
                attention[row, width - len(ids) :] = 1
            try:
                with torch.no_grad():
                    out = self.model.generate(
                        input_ids=input_ids.to(self.device),
                        attention_mask=attention.to(self.device),
                        do_sample=False,
                        max_new_tokens=self.max_new_tokens,
                        pad_token_id=self._pad_id,
                        **self._stops,
                    )
            except (RuntimeError, ValueError) as e:  # out of memory, context too long, ...
                raise ReaderError(f"HF reader {self.cache_id} failed to generate: {e}") from e
            replies.extend(self._finish(self.tokenizer.decode(row[width:], skip_special_tokens=True)) for row in out.tolist())
        return replies


# ---------------------------------------------------------------------------------------------
# The reader
# ---------------------------------------------------------------------------------------------


class LLMReader(Reader):
    """The paper's frozen answer agent behind the :class:`~memenv.readers.Reader` interface.

    Args:
        backend: an :class:`OpenAIReaderBackend`, an :class:`HFReaderBackend` or anything with
            ``cache_id`` and ``complete(prompts) -> replies``.
        k: memories retrieved per speaker (paper: 30).
        cache_path: a JSON file of replies keyed by prompt hash; loaded when it exists,
            rewritten atomically after each batch of new replies. ``None`` keeps the cache in
            memory only.
        on_missing_answer: ``"raise"`` (default): a reply without ``<answer>`` tags raises
            :class:`ReaderError`. ``"penalty"``: it becomes the empty answer (scored 0), is
            counted in :attr:`missing_answers` and logged; see the module docstring.
        unknown_answer: what the prompt tells the model to answer when the memories do not
            hold the answer (LoCoMo's scorer rewards "Not mentioned ..."; synthetic tasks
            expect ``"none"``).
        retriever: how memories are found (default: BM25 with a speaker filter).

    Memories are shown per speaker (see :meth:`retrieve`), oldest first (by session, then id),
    each as ``- [<last_date>] <content>`` (the date is left out when the entry has none).
    Speakers are taken from the bank in order of first appearance.
    """

    def __init__(
        self,
        backend: ReaderBackend,
        k: int = 30,
        cache_path: str | os.PathLike[str] | None = None,
        on_missing_answer: str = "raise",
        unknown_answer: str = "Not mentioned in the conversation",
        retriever: Retriever | None = None,
    ) -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if on_missing_answer not in MISSING_ANSWER_POLICIES:
            raise ValueError(f"on_missing_answer must be one of {MISSING_ANSWER_POLICIES}, got {on_missing_answer!r}")
        self.backend = backend
        self.k = int(k)
        self.on_missing_answer = on_missing_answer
        self.unknown_answer = unknown_answer
        self.retriever = retriever or BM25Retriever()
        self.name = f"llm[{backend.cache_id}]"
        self._cache_path = Path(cache_path) if cache_path is not None else None
        self._cache: dict[str, dict[str, str]] = self._load_cache()
        #: replies answered from the cache / asked from the backend / without answer tags
        self.cache_hits = 0
        self.backend_calls = 0
        self.missing_answers = 0

    @property
    def info(self) -> dict[str, Any]:
        """What to record beside results read with this reader."""
        return {
            "reader": "llm",
            "backend": self.backend.cache_id,
            "k": self.k,
            "prompt_version": READER_PROMPT_VERSION,
            "on_missing_answer": self.on_missing_answer,
        }

    # -- prompts -----------------------------------------------------------------------------

    def retrieve(self, question: str, bank: MemoryBank) -> dict[str, list[MemoryEntry]]:
        """The top-``k`` memories of each speaker for ``question``, oldest first.

        BM25 only returns memories that share a term with the question; when a speaker has fewer
        such hits than ``k``, the most recent other memories of that speaker fill the list, so
        the model sees ``min(k, memories of the speaker)`` entries, as with the paper's dense
        top-k retrieval.
        """
        out = {}
        for speaker in dict.fromkeys(e.speaker for e in bank):
            hits = [e for e, _ in self.retriever.search(bank, question, self.k, speaker=speaker)]
            if len(hits) < self.k:
                seen = {e.id for e in hits}
                rest = sorted((e for e in bank.entries(speaker) if e.id not in seen), key=lambda e: (e.last_session, e.id))
                hits += rest[-(self.k - len(hits)) :]
            out[speaker] = sorted(hits, key=lambda e: (e.last_session, e.id))
        return out

    def prompt(self, question: str, bank: MemoryBank) -> str:
        """The exact prompt sent to the model for ``question``."""
        blocks = []
        for speaker, entries in self.retrieve(question, bank).items():
            lines = [f"- [{e.last_date}] {e.content}" if e.last_date else f"- {e.content}" for e in entries]
            blocks.append(f"Memories of {speaker}:\n" + "\n".join(lines))
        memories = "\n\n".join(blocks) if blocks else "Memories: (the memory is empty)"
        reply_format = REPLY_PREFILLED if getattr(self.backend, "prefill_answer", False) else REPLY_WITH_TAGS
        return READER_PROMPT.format(memories=memories, question=question, unknown_answer=self.unknown_answer, reply_format=reply_format)

    # -- answering ---------------------------------------------------------------------------

    def answer(self, question: str, bank: MemoryBank) -> str:
        return self.answer_many([question], bank)[0]

    def answer_many(self, questions: Sequence[str], bank: MemoryBank) -> list[str]:
        """Answer every question against ``bank``; uncached prompts go to the backend in one call."""
        prompts = [self.prompt(q, bank) for q in questions]
        keys = [self._key(p) for p in prompts]
        missing = list(dict.fromkeys(k for k in keys if k not in self._cache))
        self.cache_hits += len(keys) - len(missing)  # repeats within the batch count as hits
        if missing:
            by_key = dict(zip(keys, prompts))
            replies = self.backend.complete([by_key[k] for k in missing])
            self.backend_calls += len(missing)
            if len(replies) != len(missing):
                raise ReaderError(f"backend {self.backend.cache_id} returned {len(replies)} replies for {len(missing)} prompts")
            fresh = False
            for key, reply in zip(missing, replies):
                ans = extract_answer(reply)
                if ans is not None:  # only usable replies are cached: a fixed server is asked again
                    self._cache[key] = {"answer": ans, "reply": reply}
                    fresh = True
            if fresh:
                self._save_cache()
            replies_by_key = dict(zip(missing, replies))
        else:
            replies_by_key = {}
        answers = []
        for key, question in zip(keys, questions):
            hit = self._cache.get(key)
            if hit is not None:
                answers.append(hit["answer"])
                continue
            reply = replies_by_key[key]
            if self.on_missing_answer == "raise":
                raise ReaderError(
                    f"reader {self.backend.cache_id} gave no <answer>...</answer> for {question!r}; "
                    f"reply: {reply[:300]!r}"
                )
            self.missing_answers += 1
            log.warning("reader reply without <answer> tags scored as the empty answer (penalty): %r", reply[:200])
            answers.append("")
        return answers

    # -- cache -------------------------------------------------------------------------------

    def _key(self, prompt: str) -> str:
        payload = json.dumps([READER_PROMPT_VERSION, self.backend.cache_id, prompt], ensure_ascii=False)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def _load_cache(self) -> dict[str, dict[str, str]]:
        path = self._cache_path
        if path is None or not path.exists():
            return {}
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ReaderError(f"reader cache {path} is unreadable ({e}); move it away") from e
        entries = data.get("entries") if isinstance(data, dict) and data.get("format") == _CACHE_FORMAT else None
        if not isinstance(entries, dict):
            raise ReaderError(f"reader cache {path} is not a {_CACHE_FORMAT} file; move it away")
        return {k: v for k, v in entries.items() if isinstance(v, dict) and isinstance(v.get("answer"), str)}

    def _save_cache(self) -> None:
        if self._cache_path is not None:
            write_json_atomic(self._cache_path, {"format": _CACHE_FORMAT, "version": 1, "entries": self._cache})



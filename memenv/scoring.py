"""Answer scoring.

``token_f1`` is the reward of the paper (SQuAD-style normalisation: lowercase, strip punctuation
and the articles a/an/the, collapse whitespace; multiset token overlap). ``bleu1`` is unigram BLEU
with the brevity penalty, logged beside it.

Published LoCoMo numbers come from other scorers, and only compare under the same one:

- :func:`locomo_f1`: the official LoCoMo QA F1 (Porter-stemmed multiset overlap with the
  per-category rules of the LoCoMo evaluation script). Needs ``nltk`` (the ``eval`` extra).
- :func:`mem0_f1` and :func:`nltk_bleu1`: the set-based unstemmed F1 and the NLTK sentence BLEU-1
  (smoothing method 1) used by Mem0's evaluation. No dependency.
- :class:`LLMJudge`: the "LLM-as-a-judge" accuracy (CORRECT/WRONG, generous about format) against
  any OpenAI-compatible chat-completions endpoint, with an on-disk verdict cache.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import math
import os
import re
import string
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

__all__ = [
    "normalize_answer",
    "token_f1",
    "bleu1",
    "exact_match",
    "LOCOMO_CATEGORIES",
    "locomo_category_id",
    "locomo_normalize",
    "locomo_f1",
    "mem0_f1",
    "nltk_bleu1",
    "LLMJudge",
    "JudgeError",
    "JUDGE_PROMPT",
]

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: object) -> str:
    """Lowercase, drop punctuation and articles, collapse whitespace. Non-strings are str()-ed."""
    s = str(text).lower().translate(_PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def token_f1(prediction: object, gold: object) -> float:
    """Token-level F1 between normalised prediction and gold (the paper's QA reward).

    Two empty strings score 1.0; one empty side scores 0.0.
    """
    p, g = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not p or not g:
        return float(p == g)
    common = sum((Counter(p) & Counter(g)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: object, gold: object) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def bleu1(prediction: object, gold: object) -> float:
    """Unigram BLEU on normalised tokens: clipped unigram precision times the brevity penalty."""
    p, g = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not p or not g:
        return float(p == g)
    clipped = sum((Counter(p) & Counter(g)).values())
    precision = clipped / len(p)
    bp = 1.0 if len(p) > len(g) else math.exp(1 - len(g) / len(p))
    return bp * precision


# ---------------------------------------------------------------------------------------------
# Official LoCoMo F1
# ---------------------------------------------------------------------------------------------

#: LoCoMo question categories as numbered in ``locomo10.json``.
LOCOMO_CATEGORIES: dict[int, str] = {
    1: "multi_hop",
    2: "temporal",
    3: "open_domain",
    4: "single_hop",
    5: "adversarial",
}
_LOCOMO_CATEGORY_IDS = {name: cid for cid, name in LOCOMO_CATEGORIES.items()}

_LOCOMO_ARTICLES = re.compile(r"\b(a|an|the|and)\b")
_ADVERSARIAL_MARKERS = ("no information available", "not mentioned")


def locomo_category_id(category: int | str) -> int:
    """The LoCoMo category number (1..5) for a number or a name.

    Names are matched case-insensitively, with ``-`` or spaces accepted for ``_``
    (``"multi-hop"``, ``"Single hop"``); digit strings such as ``"3"`` are accepted too.
    """
    if isinstance(category, bool):
        raise ValueError(f"unknown LoCoMo category {category!r}")
    if isinstance(category, int):
        if category in LOCOMO_CATEGORIES:
            return category
        raise ValueError(f"unknown LoCoMo category {category!r}; expected 1..5")
    if isinstance(category, str):
        key = category.strip().lower().replace("-", "_").replace(" ", "_")
        if key.isdigit() and int(key) in LOCOMO_CATEGORIES:
            return int(key)
        if key in _LOCOMO_CATEGORY_IDS:
            return _LOCOMO_CATEGORY_IDS[key]
    raise ValueError(
        f"unknown LoCoMo category {category!r}; expected 1..5 or one of "
        + ", ".join(LOCOMO_CATEGORIES.values())
    )


def locomo_normalize(text: object) -> str:
    """LoCoMo's answer normalisation.

    Differs from :func:`normalize_answer` in two ways, both taken from the LoCoMo evaluation
    script: commas are deleted first, and ``and`` is removed along with the articles.
    """
    s = str(text).replace(",", "").lower().translate(_PUNCT)
    s = _LOCOMO_ARTICLES.sub(" ", s)
    return " ".join(s.split())


@lru_cache(maxsize=1)
def _porter_stemmer() -> Any:
    try:
        from nltk.stem import PorterStemmer
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "locomo_f1 needs NLTK's Porter stemmer; install it with "
            "`pip install memory-r2[eval]` (or `pip install nltk`)"
        ) from e
    return PorterStemmer()


@lru_cache(maxsize=65536)
def _porter_stem(word: str) -> str:
    return _porter_stemmer().stem(word)


def _locomo_tokens(text: object) -> list[str]:
    return [_porter_stem(w) for w in locomo_normalize(text).split()]


def _locomo_overlap_f1(prediction: object, gold: object) -> float:
    """Porter-stemmed multiset-overlap F1; 0.0 whenever nothing overlaps (even two empties)."""
    p, g = _locomo_tokens(prediction), _locomo_tokens(gold)
    common = sum((Counter(p) & Counter(g)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def locomo_f1(prediction: object, gold: object, category: int | str) -> float:
    """The official LoCoMo QA F1 for one answer.

    Tokens are normalised with :func:`locomo_normalize` and Porter-stemmed (NLTK); the score is
    the multiset-overlap F1, by category:

    - 1 ``multi_hop``: prediction and gold are split on ``,``; each gold part takes its best F1
      against the prediction parts, and the parts are averaged.
    - 2 ``temporal``, 4 ``single_hop``: plain F1.
    - 3 ``open_domain``: the gold keeps only the text before the first ``;``.
    - 5 ``adversarial``: 1.0 if the prediction contains "not mentioned" or
      "no information available" (any case), else 0.0; the gold is ignored.

    ``category`` is a number (1..5) or a name from :data:`LOCOMO_CATEGORIES`.
    Raises ImportError (naming the ``eval`` extra) when NLTK is missing.
    """
    cid = locomo_category_id(category)
    pred = str(prediction)
    if cid == 5:
        lowered = pred.lower()
        return float(any(marker in lowered for marker in _ADVERSARIAL_MARKERS))
    ref = str(gold)
    if cid == 1:
        pred_parts = [p.strip() for p in pred.split(",")]
        gold_parts = [g.strip() for g in ref.split(",")]
        best = [max(_locomo_overlap_f1(p, g) for p in pred_parts) for g in gold_parts]
        return sum(best) / len(best)
    if cid == 3:
        ref = ref.split(";")[0].strip()
    return _locomo_overlap_f1(pred, ref)


# ---------------------------------------------------------------------------------------------
# Mem0's evaluation metrics
# ---------------------------------------------------------------------------------------------

_MEM0_SEPARATORS = str.maketrans({".": " ", ",": " ", "!": " ", "?": " "})


def _mem0_tokens(text: str) -> set[str]:
    return set(text.lower().translate(_MEM0_SEPARATORS).split())


def mem0_f1(prediction: object, gold: object) -> float:
    """Mem0's token F1: lowercase, ``.,!?`` become spaces, split on whitespace, and compare the
    *sets* of tokens (no stemming, no article removal, repeated words count once).

    An empty (or ``None``) side scores 0.0, as in Mem0's script.
    """
    p = "" if prediction is None else str(prediction).strip()
    g = "" if gold is None else str(gold).strip()
    if not p or not g:
        return 0.0
    pt, gt = _mem0_tokens(p), _mem0_tokens(g)
    if not pt or not gt:
        return 0.0
    common = len(pt & gt)
    if common == 0:
        return 0.0
    precision, recall = common / len(pt), common / len(gt)
    return 2 * precision * recall / (precision + recall)


# Words (with inner hyphens or apostrophes), numbers (with inner . or ,), or single symbols.
_WORD_TOKEN = re.compile(r"\d+(?:[.,]\d+)*|\w+(?:[-']\w+)*|[^\w\s]")


def _bleu_tokens(text: object) -> list[str]:
    if isinstance(text, (list, tuple)):
        return [str(t) for t in text]
    return _WORD_TOKEN.findall(str(text).lower())


def nltk_bleu1(prediction: object | Sequence[str], gold: object | Sequence[str]) -> float:
    """Sentence BLEU-1 exactly as ``nltk.translate.bleu_score.sentence_bleu([gold], prediction,
    weights=(1, 0, 0, 0), smoothing_function=SmoothingFunction().method1)`` computes it.

    With unigram weights only, that is ``BP * p1``: ``p1`` the clipped unigram precision and
    ``BP`` the brevity penalty ``exp(1 - r/c)`` when the prediction (length ``c``) is not longer
    than the gold (length ``r``); 0.0 when no unigram matches or the prediction is empty. The
    arithmetic follows NLTK step for step so results agree to the last bit.

    Lists or tuples are taken as already-tokenised text. Strings are lowercased and split into
    words, numbers and punctuation marks by a simple regular expression. Mem0 tokenises with
    ``nltk.word_tokenize``, which needs the downloaded Punkt model; the two agree on short answers
    except for contractions (``"don't"`` stays one token here, NLTK makes ``"do", "n't"``).
    """
    hyp, ref = _bleu_tokens(prediction), _bleu_tokens(gold)
    ref_counts = Counter(ref)
    matches = sum(min(n, ref_counts[w]) for w, n in Counter(hyp).items())
    if matches == 0:  # NLTK returns 0 before smoothing when no unigram matches
        return 0.0
    c, r = len(hyp), len(ref)
    bp = 1.0 if c > r else math.exp(1 - r / c)
    # NLTK: bp * exp(fsum(w_n * log(p_n))); the n >= 2 terms have weight 0 and vanish.
    return bp * math.exp(math.fsum([math.log(matches / c)]))


# ---------------------------------------------------------------------------------------------
# LLM judge
# ---------------------------------------------------------------------------------------------

#: Bumped whenever :data:`JUDGE_PROMPT` changes, so cached verdicts of another prompt never mix.
JUDGE_PROMPT_VERSION = 1

#: The judge prompt (filled with ``question``, ``gold`` and ``prediction``). It follows the
#: generous CORRECT/WRONG protocol of Mem0's evaluation, in our own words.
JUDGE_PROMPT = """You grade answers to questions about a long conversation between two people.
You get the question, the gold (reference) answer, and a generated answer to grade.

Be generous. The generated answer may be longer, phrased differently, or give extra detail; it is
CORRECT as long as it refers to the same thing, person, place or topic as the gold answer.
For questions about time, it is CORRECT when it points to the same date or period as the gold
answer, whatever the format ("7 May 2023", "May 7th, 2023", "2023-05-07") and even if it uses a
relative expression ("the week before", "last Tuesday") that matches the gold answer.
It is WRONG when it names something else, contradicts the gold answer, or gives no answer.

Question: {question}
Gold answer: {gold}
Generated answer: {prediction}

Reply with one JSON object and nothing else, in this form, where <label> is CORRECT or WRONG:
{{"reason": "<one short sentence>", "label": "<label>"}}"""

_LABELS = {"CORRECT": True, "WRONG": False}
_CACHE_FORMAT = "memr2-judge-cache"


class JudgeError(RuntimeError):
    """The LLM judge could not produce a verdict (endpoint down, HTTP error, unusable reply,
    unreadable cache). Never replaced by a default verdict."""


class _UnusableReply(Exception):
    pass


def _chat_completions_url(base_url: str) -> str:
    url = base_url.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    if url.endswith("/v1"):
        return url + "/chat/completions"
    return url + "/v1/chat/completions"


def _is_loopback(url: str) -> bool:
    host = urllib.parse.urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _parse_label(body: bytes) -> bool:
    """Verdict from an OpenAI-style chat-completion response body, or _UnusableReply."""
    try:
        reply = json.loads(body.decode("utf-8"))
        content = reply["choices"][0]["message"]["content"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, IndexError, TypeError) as e:
        raise _UnusableReply(f"not a chat-completion response ({e.__class__.__name__}: {e})")
    if not isinstance(content, str):
        raise _UnusableReply("the reply has no text content")
    start, end = content.find("{"), content.rfind("}")
    if start < 0 or end < start:
        raise _UnusableReply(f"no JSON object in the reply: {content[:200]!r}")
    try:
        obj = json.loads(content[start : end + 1])
    except json.JSONDecodeError:
        raise _UnusableReply(f"the reply's JSON does not parse: {content[:200]!r}")
    label = obj.get("label") if isinstance(obj, dict) else None
    if not isinstance(label, str) or label.strip().upper() not in _LABELS:
        raise _UnusableReply(f'no "label" of CORRECT or WRONG in the reply: {content[:200]!r}')
    return _LABELS[label.strip().upper()]


class LLMJudge:
    """LLM-as-a-judge accuracy, Mem0 style: a chat model labels each answer CORRECT or WRONG.

    Talks to any OpenAI-compatible ``/v1/chat/completions`` endpoint (vLLM, llama.cpp, a hosted
    API) with the standard library only, at temperature 0, asking for a JSON reply
    ``{"label": "CORRECT" | "WRONG"}``.

    Args:
        base_url: the server, e.g. ``"http://127.0.0.1:8000"``, ``".../v1"`` or the full
            ``".../v1/chat/completions"`` URL.
        model: the judge model name sent to the server; recorded in :attr:`info` and in every
            cache entry (report it with the accuracy).
        api_key: sent as a Bearer token when given.
        cache_path: a JSON file of verdicts keyed by a hash of (model, prompt). Loaded if it
            exists, rewritten atomically after each new verdict, so a killed evaluation resumes
            without asking again.
        timeout: seconds per HTTP request.
        retries: extra attempts after a failed one (connection error, timeout, HTTP 429/5xx or
            an unusable reply), with exponential backoff starting at ``backoff`` seconds.
        json_mode: also send ``response_format={"type": "json_object"}``.

    :meth:`judge` raises :class:`JudgeError` when no verdict can be had; it never guesses.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        cache_path: str | os.PathLike[str] | None = None,
        timeout: float = 30,
        retries: int = 2,
        *,
        backoff: float = 0.5,
        json_mode: bool = True,
        max_tokens: int = 200,
    ) -> None:
        if not model:
            raise ValueError("LLMJudge needs a model name")
        if retries < 0:
            raise ValueError("retries must be >= 0")
        self.url = _chat_completions_url(base_url)
        self.model = model
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.json_mode = json_mode
        self.max_tokens = max_tokens
        self._api_key = api_key
        self._cache_path = Path(cache_path) if cache_path is not None else None
        self._cache: dict[str, dict[str, Any]] = self._load_cache()
        self._lock = threading.Lock()
        self._opener = (
            urllib.request.build_opener(urllib.request.ProxyHandler({}))
            if _is_loopback(self.url)
            else urllib.request.build_opener()
        )
        #: HTTP requests sent so far
        self.requests = 0
        #: verdicts answered from the cache
        self.cache_hits = 0

    # -- public ------------------------------------------------------------------------------

    @property
    def info(self) -> dict[str, Any]:
        """What to record beside a judge accuracy: model, endpoint and prompt version."""
        return {
            "judge_model": self.model,
            "endpoint": self.url,
            "prompt_version": JUDGE_PROMPT_VERSION,
        }

    def prompt(self, question: object, gold: object, prediction: object) -> str:
        """The exact prompt sent for one answer."""
        return JUDGE_PROMPT.format(question=question, gold=gold, prediction=prediction)

    def judge(self, question: object, gold: object, prediction: object) -> bool:
        """True when the judge labels ``prediction`` CORRECT for ``question`` with ``gold``."""
        prompt = self.prompt(question, gold, prediction)
        key = self._key(prompt)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self.cache_hits += 1
                return bool(hit["correct"])
        verdict = self._ask(prompt)
        with self._lock:
            self._cache[key] = {
                "model": self.model,
                "label": "CORRECT" if verdict else "WRONG",
                "correct": verdict,
            }
            self._save_cache()
        return verdict

    # -- internals ---------------------------------------------------------------------------

    def _key(self, prompt: str) -> str:
        payload = json.dumps({"model": self.model, "prompt": prompt}, ensure_ascii=False)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def _request(self, prompt: str) -> urllib.request.Request:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": 0,
            "max_tokens": self.max_tokens,
        }
        if self.json_mode:
            body["response_format"] = {"type": "json_object"}
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        return urllib.request.Request(
            self.url, data=json.dumps(body).encode("utf-8"), headers=headers, method="POST"
        )

    def _ask(self, prompt: str) -> bool:
        last = "no attempt made"
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                self.requests += 1
                with self._opener.open(self._request(prompt), timeout=self.timeout) as resp:
                    body = resp.read()
                return _parse_label(body)
            except urllib.error.HTTPError as e:
                detail = e.read()[:200].decode("utf-8", "replace") if e.fp else ""
                last = f"HTTP {e.code} {e.reason}: {detail}".strip()
                if e.code != 429 and e.code < 500:
                    break  # a client error will not go away by asking again
            except _UnusableReply as e:
                last = f"unusable reply: {e}"
            except (urllib.error.URLError, OSError, ValueError) as e:
                # URLError: refused / DNS; OSError: timeouts, resets; ValueError: bad URL, and
                # http.client errors such as RemoteDisconnected derive from these too.
                reason = getattr(e, "reason", e)
                last = f"endpoint unreachable ({e.__class__.__name__}: {reason})"
            except Exception as e:  # noqa: BLE001 - e.g. http.client.BadStatusLine on garbage
                last = f"request failed ({e.__class__.__name__}: {e})"
        raise JudgeError(
            f"LLM judge {self.model!r} at {self.url} gave no verdict after "
            f"{attempt + 1} attempt(s): {last}"
        )

    def _load_cache(self) -> dict[str, dict[str, Any]]:
        path = self._cache_path
        if path is None or not path.exists():
            return {}
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise JudgeError(f"judge cache {path} is unreadable ({e}); move it away") from e
        if not isinstance(data, dict) or data.get("format") != _CACHE_FORMAT:
            raise JudgeError(f"judge cache {path} is not a {_CACHE_FORMAT} file; move it away")
        entries = data.get("entries")
        if not isinstance(entries, dict):
            raise JudgeError(f"judge cache {path} is not a {_CACHE_FORMAT} file; move it away")
        return {k: v for k, v in entries.items() if isinstance(v, dict) and "correct" in v}

    def _save_cache(self) -> None:
        path = self._cache_path
        if path is None:
            return
        write_json_atomic(path, {"format": _CACHE_FORMAT, "version": 1, "entries": self._cache})


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> None:
    """Write ``data`` as JSON to ``path`` through a temporary file, fsync and rename, so the
    file is always either the old or the new content."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, ensure_ascii=False, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise

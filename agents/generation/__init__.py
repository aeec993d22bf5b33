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

from agents.generation.continuous import continuous_generate
from agents.generation.hf import HFBackend
from agents.generation.interface import (
    BackendOutput,
    GenerationBackend,
    left_pad,
    stop_token_ids,
)
from agents.generation.rollout import EpisodeRecord, RolloutEngine, Start, TurnRecord

__all__ = [
    "GenerationBackend", "BackendOutput", "HFBackend", "continuous_generate", "left_pad", "stop_token_ids",
    "RolloutEngine", "Start", "EpisodeRecord", "TurnRecord",
]

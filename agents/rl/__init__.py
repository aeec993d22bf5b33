"""Reinforcement learning: rollouts in, parameter updates out.

Read in data-flow order:

- :mod:`~agents.rl.advantages`: group ids and group-normalised advantages (plain functions).
- :mod:`~agents.rl.loss`: the turn-level clipped surrogate, entropy and k3 KL.
- :mod:`~agents.rl.optim`: AdamW, with float32 master weights for half-precision models.
- :mod:`~agents.rl.update`: one policy update over the rows that carry an advantage.
- :mod:`~agents.rl.grpo`: the GRPO baseline (global, trajectory-level groups).
- :mod:`~agents.rl.logo_grpo`: LoGo-GRPO (global groups plus local rerollout groups).
- :mod:`~agents.rl.curriculum`: horizon stages and greedy validation.
"""

from __future__ import annotations

from agents._lazy import lazy_exports

_EXPORTS = {
    "group_advantages": "agents.rl.advantages",
    "make_group_id": "agents.rl.advantages",
    "Stage": "agents.rl.curriculum",
    "parse_stages": "agents.rl.curriculum",
    "validate": "agents.rl.curriculum",
    "GRPO": "agents.rl.grpo",
    "GRPOConfig": "agents.rl.grpo",
    "LoGoConfig": "agents.rl.logo_grpo",
    "LoGoGRPO": "agents.rl.logo_grpo",
    "UpdateConfig": "agents.rl.update",
    "policy_update": "agents.rl.update",
}

__all__ = list(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

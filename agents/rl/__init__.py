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

from agents.rl.advantages import group_advantages, make_group_id
from agents.rl.curriculum import Stage, parse_stages, validate
from agents.rl.grpo import GRPO, GRPOConfig
from agents.rl.logo_grpo import LoGoConfig, LoGoGRPO
from agents.rl.update import UpdateConfig, policy_update

__all__ = [
    "group_advantages", "make_group_id", "UpdateConfig", "policy_update",
    "GRPO", "GRPOConfig", "LoGoGRPO", "LoGoConfig", "Stage", "parse_stages", "validate",
]

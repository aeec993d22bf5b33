"""memenv: multi-session memory tasks as Gymnasium environments.

``import memenv`` registers ``MemSession-v0``::

    import gymnasium as gym, memenv
    env = gym.make("MemSession-v0", horizon=32)
    obs, info = env.reset(seed=0)
    state = env.unwrapped.save_state()
"""

from gymnasium.envs.registration import register, registry

from memenv import data
from memenv.checker import check_env
from memenv.env import ROLES, EnvState, MemSessionEnv
from memenv.memory import MemoryBank, MemoryEntry, MemoryOp
from memenv.types import Conversation, GoldOp, QAItem, Session, Turn

__all__ = [
    "ROLES",
    "MemSessionEnv",
    "EnvState",
    "MemoryBank",
    "MemoryEntry",
    "MemoryOp",
    "Conversation",
    "Session",
    "Turn",
    "QAItem",
    "GoldOp",
    "data",
    "check_env",
]

__version__ = "0.1.0"

if "MemSession-v0" not in registry:
    register(id="MemSession-v0", entry_point="memenv.env:MemSessionEnv")

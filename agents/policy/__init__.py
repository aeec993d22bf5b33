"""The policy: one causal LM playing the extractor and the manager through role prompts.

- :mod:`~agents.policy.prompts`: the role names and system prompts (``compact`` and ``full``).
- :mod:`~agents.policy.shared`: ``SharedPolicy``, the LM, its tokenizer and a generation backend.
- :mod:`~agents.policy.tiny`: the embedded tiny model and its tokenizer, built with no download.
"""

from agents.policy.prompts import PROMPT_STYLES, ROLES, system_prompt
from agents.policy.shared import Generation, SharedPolicy

__all__ = ["SharedPolicy", "Generation", "ROLES", "PROMPT_STYLES", "system_prompt"]

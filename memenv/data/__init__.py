"""Task sources: every one yields :class:`memenv.types.Conversation` objects.

* synthetic tasks: :func:`generate_conversation`, :func:`generate_conversations`
* LoCoMo: :func:`load_locomo` (and :func:`locomo_split` for the paper's split)
* LongMemEval: :func:`load_longmemeval`
"""

from memenv.data.errors import DataError, DataWarning
from memenv.data.locomo import LOCOMO_CATEGORIES, LOCOMO_SPLIT, load_locomo, locomo_split
from memenv.data.longmemeval import load_longmemeval
from memenv.data.synthetic import SyntheticConfig, generate_conversation, generate_conversations

__all__ = [
    "SyntheticConfig",
    "generate_conversation",
    "generate_conversations",
    "load_locomo",
    "locomo_split",
    "LOCOMO_SPLIT",
    "LOCOMO_CATEGORIES",
    "load_longmemeval",
    "DataError",
    "DataWarning",
]

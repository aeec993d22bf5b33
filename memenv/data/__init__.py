"""Task sources: every one yields :class:`memenv.types.Conversation` objects."""

from memenv.data.synthetic import SyntheticConfig, generate_conversation, generate_conversations

__all__ = ["SyntheticConfig", "generate_conversation", "generate_conversations"]

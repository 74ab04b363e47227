"""The LLM worker peer (design §5)."""

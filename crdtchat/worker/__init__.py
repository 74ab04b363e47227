"""The LLM worker peer (DESIGN §5)."""

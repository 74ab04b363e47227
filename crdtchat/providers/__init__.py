"""LLM providers behind one interface (`base.Provider`)."""

"""lserve: long-context LLM serving with unified block-sparse attention."""

"""Two-stage vision-token pruning (design note 002): merge before the LLM, select inside it."""

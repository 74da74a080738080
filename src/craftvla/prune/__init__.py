"""Two-stage vision-token pruning (the original design notes' pruner): merge before the LLM, select inside it."""

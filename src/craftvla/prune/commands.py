"""`craftvla prune train|eval`: the pruning verbs (see prune/train.py and prune/evaluate.py)."""

from __future__ import annotations

import importlib

SUBVERBS = {"train": ("craftvla.prune.train", "train the merger (--stage 1) or the pruner heads (--stage 2)"),
            "eval": ("craftvla.prune.evaluate", "task loss, tokens, FLOPs and latency: unpruned / soft / hard")}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in SUBVERBS:
        lines = ["usage: craftvla prune <train|eval> [--flag value ...]", ""]
        lines += [f"  {name:<6} {text}" for name, (_, text) in SUBVERBS.items()]
        print("\n".join(lines))
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return int(importlib.import_module(SUBVERBS[argv[0]][0]).main(argv[1:]) or 0)

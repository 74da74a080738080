"""`craftvla prune train|eval`: the pruning verbs (see prune/train.py and prune/evaluate.py)."""

from __future__ import annotations

import importlib

SUBVERBS = {
    "train": ("craftvla.prune.train", "train the merger (--stage 1) or the pruner heads (--stage 2)"),
    "eval": ("craftvla.prune.evaluate", "task loss, tokens, FLOPs and latency: unpruned / soft / hard"),
}


def main(argv: list[str]) -> int:
    from craftvla.cli import run_sub_verb

    entries = {
        name: (lambda rest, module=module: importlib.import_module(module).main(rest), text)
        for name, (module, text) in SUBVERBS.items()
    }
    return run_sub_verb("prune", argv, entries)

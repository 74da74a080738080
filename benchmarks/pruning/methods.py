"""The pruning benchmark's methods: how each one reaches a budget b, the fraction of the vision tokens
left after its last reduction.

A `Recipe` is what a method does at one budget, independent of the policy's depth: pooling inside
the vision towers (to `vision_merge_ratio` of the patches, after `vision_merge_depth` of their
blocks), a merger before the LLM (to `merge_ratio` of the tokens) and/or a scorer inside it that keeps `keep` of them after a
quarter and half of the LLM's layers (`PruningConfig`'s default schedule: layers 1, 2 of 4; 6, 12
of 24). Learned parts are trained by `craftvla prune train` (stage 1: the merger; stage 2: the
scorer heads with `objective`); everything else applies to the base policy as it is.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Optional

LEARNED_MERGER = "learned_v2"  # the two-stage system's merger (stage 1 trains it)
LEARNED_SCORER = "attention"  # the pruner heads stage 2 trains


@dataclass(frozen=True)
class Recipe:
    vision_merge_ratio: float = 1.0
    vision_merge_depth: float = 0.33
    vision_merger: str = "pool"
    merger: str = "none"
    merge_ratio: float = 1.0
    scorer: str = "none"
    keep: tuple[float, ...] = ()
    objective: Optional[str] = None  # stage 2's objective (learned scorer only)

    @property
    def stage1(self) -> Optional[float]:
        """The merge ratio stage 1 trains a merger (or the towers' learned merge) for, or None."""
        from craftvla.config import LEARNED_MERGERS

        if self.vision_merge_ratio < 1.0 and self.vision_merger in LEARNED_MERGERS:
            return self.vision_merge_ratio
        return self.merge_ratio if self.merger in LEARNED_MERGERS else None

    def stage1_flags(self) -> list[str]:
        """`craftvla prune train --stage 1` flags for the learned merge (call when `stage1`)."""
        if self.vision_merge_ratio < 1.0:
            return [*self.tower_flags(), "--vision_merger", self.vision_merger]
        return ["--merger", self.merger, "--merge_ratio", f"{self.merge_ratio:g}"]

    def tower_flags(self) -> list[str]:
        return [
            "--vision_merge_ratio",
            f"{self.vision_merge_ratio:g}",
            "--vision_merge_depth",
            f"{self.vision_merge_depth:g}",
        ]

    @property
    def stage2(self) -> bool:
        return self.scorer == LEARNED_SCORER

    def pruning(self) -> dict:
        """`PruningConfig` keyword arguments (learned parts freshly initialised)."""
        fields = {"merger": self.merger, "scorer": self.scorer, "keep": list(self.keep)}
        if self.vision_merge_ratio < 1.0:
            fields |= {
                "vision_merge_ratio": self.vision_merge_ratio,
                "vision_merge_depth": self.vision_merge_depth,
                "vision_merger": self.vision_merger,
            }
        return fields | ({"merge_ratio": self.merge_ratio} if self.merger != "none" else {})

    def apply_flags(self) -> list[str]:
        """`craftvla prune eval` flags that apply the parameter-free parts to a policy."""
        flags = []
        if self.vision_merge_ratio < 1.0 and self.stage1 is None:
            flags += self.tower_flags() + (
                ["--vision_merger", self.vision_merger] if self.vision_merger != "pool" else []
            )
        if self.merger != "none" and self.stage1 is None:
            flags += ["--merger", self.merger, "--merge_ratio", f"{self.merge_ratio:g}"]
        if self.scorer != "none" and not self.stage2:
            flags += ["--scorer", self.scorer, "--keep", ",".join(f"{k:g}" for k in self.keep)]
        return flags

    def record(self) -> dict:
        return asdict(self) | {"keep": list(self.keep)}


def in_llm(scorer: str) -> Callable[[float], Recipe]:
    """Parameter-free scorers inside the LLM: 2b then b (the learned pruners' schedule)."""
    return lambda b: Recipe(scorer=scorer, keep=(min(1.0, 2 * b), b))


def pre_llm(merger: str) -> Callable[[float], Recipe]:
    """Mergers before the LLM, straight to b."""
    return lambda b: Recipe(merger=merger, merge_ratio=b)


def in_towers(depth: float, merger: str = "pool") -> Callable[[float], Recipe]:
    """Merging inside the vision towers after `depth` of their blocks, straight to b."""
    return lambda b: Recipe(vision_merge_ratio=b, vision_merge_depth=depth, vision_merger=merger)


def learned(objective: str = "adversarial", merger: bool = True) -> Callable[[float], Recipe]:
    """The two-stage system: the learned merger to half (stage 1), then pruner heads (stage 2) keeping
    the rest of the budget, 4b then 2b of the merged tokens. At b = 0.5 the merger alone meets it.
    `merger=False`: the pruner heads on the unmerged policy, 2b then b."""

    def make(b: float) -> Recipe:
        if merger and b >= 0.5:
            return Recipe(merger=LEARNED_MERGER, merge_ratio=0.5)
        if not merger:
            return Recipe(scorer=LEARNED_SCORER, keep=(min(1.0, 2 * b), b), objective=objective)
        return Recipe(
            merger=LEARNED_MERGER,
            merge_ratio=0.5,
            scorer=LEARNED_SCORER,
            keep=(min(1.0, 4 * b), 2 * b),
            objective=objective,
        )

    return make


METHODS: dict[str, Callable[[float], Recipe]] = {
    "random": in_llm("random"),
    "fastv": in_llm("fastv"),
    "instruction": in_llm("instruction"),
    "pool": pre_llm("pool"),
    "tome": pre_llm("tome"),
    "merger": pre_llm(LEARNED_MERGER),  # stage 1 alone, merging to b
    "window": pre_llm("learned_window"),  # stage 1 alone with the cheap merger (weights within pool's windows)
    "pool_vit": in_towers(0.33),
    "tome_vit": in_towers(0.33, "tome"),  # ToMe's matching inside the towers (the first tower's; both merge alike)
    "window_vit": in_towers(0.33, "learned_window"),  # learned weights within the towers' windows (stage 1)
    "learned_vit": in_towers(0.33, LEARNED_MERGER),  # the dense instruction-aware merger inside the towers (stage 1)
    "learned_tome": pre_llm("learned_tome"),  # ToMe's sets, learned instruction-aware weights within each (stage 1)
    "learned_tome_vit": in_towers(
        0.33, "learned_tome"
    ),  # the same inside the towers (ToMe's sets decided on the first)
    "learned": learned(),
}
# Ablations at b = 0.25 only: stage 2's objective, and the pruner heads without the merger.
ABLATIONS: dict[str, Callable[[float], Recipe]] = {
    "learned_distill": learned("distill"),
    "learned_task": learned("task"),
    "pruners_only": learned(merger=False),
}


def recipe(method: str, budget: float) -> Recipe:
    return {**METHODS, **ABLATIONS}[method](budget)

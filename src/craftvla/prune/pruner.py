"""`LayerSpecificPruner`: token selection at configured LLM layers, hard or soft.

At each pruning layer l with keep fraction f, k = round(f * N) of the N vision tokens that entered
the LLM survive (fixed budgets: the same k for every sample). Inference (`soft=False`) removes the
others from the sequence (`TokenLayout.keep_vision`: survivors keep their position ids, the mask is
rebuilt). Training (`soft=True`) keeps the sequence and returns relaxed keep weights whose > 0.5 part is
the same top-k decision: those tokens are masked out as attention keys while the weights carry the
gradient (`model.language.keep_attention`), so soft without noise computes what hard computes.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from craftvla.model.language import TokenSelector
from craftvla.model.sequence import TokenLayout
from craftvla.prune.gumbel import relaxed_keep, topk_columns


class LayerSpecificPruner(nn.Module):
    """Scores vision tokens at the layers of `schedule` [(layer, keep fraction), ...] with either one
    learned head per layer (`heads`) or one shared parameter-free `scorer` (the baselines)."""

    def __init__(
        self,
        schedule: list[tuple[int, float]],
        heads: Optional[dict[int, nn.Module]] = None,
        scorer: Optional[nn.Module] = None,
    ):
        super().__init__()
        self.schedule = dict(schedule)
        self.heads = nn.ModuleDict({str(layer): head for layer, head in (heads or {}).items()})
        self.scorer = scorer
        self.soft = False  # training: straight-through masks instead of removal
        self.noise = True  # soft mode draws Gumbel noise while the module is in training mode
        self.temperature = 1.0

    @property
    def learned(self) -> bool:
        return len(self.heads) > 0

    def scores(self, layer: int, hidden: torch.Tensor, layout: TokenLayout) -> torch.Tensor:  # -> (B, N_vis)
        return (self.heads[str(layer)] if self.learned else self.scorer)(hidden, layout, layer)

    def budget(self, layer: int, num_input: int) -> int:
        return max(1, round(self.schedule[layer] * num_input))

    def selector(self, num_input: int, stats: dict) -> TokenSelector:
        """The TokenSelector for one forward whose LLM received `num_input` vision tokens; it records
        `keep/<layer>` (the fraction of those kept) and `tokens/<layer>` (how many) into `stats`."""

        def select(layer: int, hidden: torch.Tensor, layout: TokenLayout) -> Optional[torch.Tensor]:
            if layer not in self.schedule:
                return None
            k = self.budget(layer, num_input)
            stats[f"tokens/{layer}"] = torch.tensor(float(min(k, layout.num_vision)))
            stats[f"keep/{layer}"] = torch.tensor(min(k, layout.num_vision) / num_input)
            if self.soft:
                with torch.set_grad_enabled(torch.is_grad_enabled() and self.learned):
                    scores = self.scores(layer, hidden, layout)
                return relaxed_keep(
                    scores, k, self.temperature, noise=self.noise and self.training, alive=layout.vision_mask
                )
            if k >= layout.num_vision:
                return None
            return topk_columns(self.scores(layer, hidden, layout), k)

        return select

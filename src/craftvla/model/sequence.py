"""The token sequence: the one place that builds the LLM input and knows where each token sits.

    [BOS] [vision patches x N_vis] [instruction x T] [action queries x Q] [STOP]

Everything downstream (action heads, bridge features, anchor caches, trainers) reads positions from
a `TokenLayout`'s index tensors; the one cut by length, the autoregressive decoder's prefix
([BOS] + vision + text, `TokenLayout.prefix`), is computed here from the tensors' shapes so the host
never waits on the device. The layout is per layer:
when the LLM's layer loop removes vision tokens (`TokenLayout.keep_vision`), the layers after
it get a shorter sequence and a new layout, while every survivor keeps its original position id.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import Optional

import torch


def gather_tokens(hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """hidden (B, L, D), index (B, n) long -> (B, n, D): each sample's tokens at its own positions."""
    return hidden.gather(1, index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))


@dataclass
class TokenLayout:
    """Where each token group sits in one layer's sequence of length L, per sample."""

    vision_index: torch.Tensor  # (B, N_vis) long: vision-patch positions, ascending
    text_index: torch.Tensor  # (B, T) long: instruction positions (right-padded per sample)
    text_mask: torch.Tensor  # (B, T) bool: True for real instruction tokens
    query_index: torch.Tensor  # (B, Q) long: action-query positions
    attention_mask: torch.Tensor  # (B, L) long: 1 = real token, 0 = instruction padding
    position_ids: torch.Tensor  # (B, L) long: RoPE / absolute positions, kept through removals
    token_index: torch.Tensor  # (B, L) long: each token's position in the full (embedding-layer) sequence
    # (B, N_vis) bool: False for vision tokens masked out (soft pruning); None = all visible.
    vision_mask: Optional[torch.Tensor] = None
    # (B, N_vis) float in [0, 1]: soft pruning's relaxed keep weights (vision_mask = weights > 0.5),
    # through which gradients reach the scores (`model.language.keep_attention`); None without.
    vision_soft: Optional[torch.Tensor] = None

    @property
    def seq_len(self) -> int:
        return self.attention_mask.shape[1]

    @property
    def num_vision(self) -> int:
        return self.vision_index.shape[1]

    def vision(self, hidden: torch.Tensor) -> torch.Tensor:  # (B, L, D) -> (B, N_vis, D)
        return gather_tokens(hidden, self.vision_index)

    def queries(self, hidden: torch.Tensor) -> torch.Tensor:  # (B, L, D) -> (B, Q, D)
        return gather_tokens(hidden, self.query_index)

    def text(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # -> (B, T, D), (B, T)
        return gather_tokens(hidden, self.text_index), self.text_mask

    def last_token_index(self) -> torch.Tensor:  # (B,) position of each sample's last real token
        positions = torch.arange(self.seq_len, device=self.attention_mask.device)
        return (self.attention_mask.bool() * positions).argmax(dim=1)

    def preceding(self, index: torch.Tensor) -> torch.Tensor:
        """(B, n) positions -> (B, n) the position of the last real token before each (instruction
        padding skipped): in a causal LM, the state that predicts the token at `index`. Position 0
        (the first token) has none and maps to itself."""
        positions = torch.arange(self.seq_len, device=index.device)
        last_real = torch.where(self.attention_mask.bool(), positions, 0).cummax(dim=1).values  # (B, L)
        return last_real.gather(1, (index - 1).clamp(min=0))

    def prefix(self) -> tuple[int, "TokenLayout"]:
        """[BOS][vision][text], everything before the action queries (what an autoregressive decoder
        prefills): its length, from the shapes (no host sync), and its layout. For a sequence as
        `build_sequence` makes it, which ends [queries x Q][STOP]."""
        first = self.seq_len - self.query_index.shape[1] - 1
        return first, dataclasses.replace(
            self,
            attention_mask=self.attention_mask[:, :first],
            position_ids=self.position_ids[:, :first],
            token_index=self.token_index[:, :first],
        )

    def mask_vision(self, weights: torch.Tensor) -> "TokenLayout":
        """The same tokens with relaxed keep weights (B, N_vis) applied: tokens with weight <= 0.5
        are masked out (and stay so), the weights multiply into `vision_soft`."""
        keep = weights > 0.5
        mask = keep if self.vision_mask is None else self.vision_mask & keep
        soft = weights if self.vision_soft is None else self.vision_soft * weights
        return dataclasses.replace(self, vision_mask=mask, vision_soft=soft)

    def key_keep(self) -> Optional[tuple[torch.Tensor, Optional[torch.Tensor]]]:
        """(B, L) attention-key weights, hard (the vision mask, 1 for other tokens) and relaxed
        (`vision_soft`, or None); None when no vision token is masked."""
        if self.vision_mask is None:
            return None

        def spread(values: torch.Tensor) -> torch.Tensor:
            return torch.ones_like(self.attention_mask, dtype=values.dtype).scatter(1, self.vision_index, values)

        return spread(self.vision_mask.float()), None if self.vision_soft is None else spread(self.vision_soft)

    def keep_vision(self, keep: torch.Tensor) -> tuple[torch.Tensor, "TokenLayout"]:
        """Keep the vision tokens at columns `keep` (B, k) of `vision_index`, and every other token.

        Returns `order` (B, L') — the positions, ascending, of the surviving tokens in this
        sequence (gather hidden states with it) — and the layout of the shorter sequence, where
        L' = L - N_vis + k is the same for every sample. Survivors keep their position ids.
        """
        batch, length = self.attention_mask.shape
        device = keep.device
        kept_vision, rank = self.vision_index.gather(1, keep).sort(dim=1)  # (B, k) sequence positions, ascending
        survives = torch.ones(batch, length, dtype=torch.bool, device=device)
        survives.scatter_(1, self.vision_index, False)
        survives.scatter_(1, kept_vision, True)
        new_len = length - self.num_vision + keep.shape[1]
        positions = torch.arange(length, device=device)
        order = torch.where(survives, positions, positions + length).argsort(dim=1)[:, :new_len]  # (B, L')
        new_index = torch.full((batch, length), -1, dtype=torch.long, device=device)
        new_index.scatter_(1, order, torch.arange(new_len, device=device).expand(batch, -1))  # old -> new position
        layout = TokenLayout(
            vision_index=new_index.gather(1, kept_vision),
            text_index=new_index.gather(1, self.text_index),
            text_mask=self.text_mask,
            query_index=new_index.gather(1, self.query_index),
            attention_mask=self.attention_mask.gather(1, order),
            position_ids=self.position_ids.gather(1, order),
            token_index=self.token_index.gather(1, order),
            vision_mask=None if self.vision_mask is None else self.vision_mask.gather(1, keep.gather(1, rank)),
            vision_soft=None if self.vision_soft is None else self.vision_soft.gather(1, keep.gather(1, rank)),
        )
        return order, layout


def build_sequence(
    bos: torch.Tensor,
    vision: torch.Tensor,
    text: torch.Tensor,
    text_mask: torch.Tensor,
    queries: torch.Tensor,
    stop: torch.Tensor,
) -> tuple[torch.Tensor, TokenLayout]:
    """Concatenate the token groups and return `(inputs_embeds (B, L, D), layout)`.

    bos, stop: (D,); vision: (B, N_vis, D); text: (B, T, D) with text_mask (B, T) bool; queries: (Q, D),
    or (B, Q, D) when each sample's differ (a discrete head's teacher-forced action slots).
    """
    batch, n_vis, dim = vision.shape
    n_text, n_query = text.shape[1], queries.shape[-2]
    device = vision.device
    embeds = torch.cat(
        [
            bos.expand(batch, 1, dim),
            vision,
            text,
            queries.expand(batch, n_query, dim) if queries.dim() == 2 else queries,
            stop.expand(batch, 1, dim),
        ],
        dim=1,
    )  # (B, 1 + N_vis + T + Q + 1, D)
    start = list(itertools.accumulate([1, n_vis, n_text, n_query]))  # first index of each group (no tensor: no sync)

    def ones(n: int) -> torch.Tensor:
        return torch.ones(batch, n, dtype=torch.long, device=device)

    attention_mask = torch.cat([ones(1 + n_vis), text_mask.long(), ones(n_query + 1)], dim=1)  # (B, L)
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)

    def span(first: int, end: int) -> torch.Tensor:  # (B, end - first)
        return torch.arange(first, end, device=device).expand(batch, -1)

    layout = TokenLayout(
        vision_index=span(start[0], start[1]),
        text_index=span(start[1], start[2]),
        text_mask=text_mask.bool(),
        query_index=span(start[2], start[3]),
        attention_mask=attention_mask,
        position_ids=position_ids,
        token_index=span(0, embeds.shape[1]),
    )
    return embeds, layout

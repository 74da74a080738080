"""The token layout: the one place that builds the LLM input sequence and knows where things are.

    [BOS] [vision patches x N_vis] [instruction x T] [action queries x Q] [STOP]

Everything downstream (action head, CRaFT bridge features, anchor caches) reads positions from
`TokenLayout`'s index tensors; nobody slices hidden states by offsets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TokenLayout:
    """Positions of each token group in a batch's sequence of length `seq_len`."""

    vision_index: torch.Tensor  # (N_vis,) long: vision-patch positions (same for every sample)
    text_index: torch.Tensor  # (T,) long: instruction positions (right-padded per sample)
    text_mask: torch.Tensor  # (B, T) bool: True for real instruction tokens
    query_index: torch.Tensor  # (Q,) long: action-query positions
    attention_mask: torch.Tensor  # (B, L) long: 1 = real token, 0 = instruction padding
    position_ids: torch.Tensor  # (B, L) long: contiguous over real tokens

    @property
    def seq_len(self) -> int:
        return self.attention_mask.shape[1]

    def vision(self, hidden: torch.Tensor) -> torch.Tensor:  # (B, L, D) -> (B, N_vis, D)
        return hidden.index_select(1, self.vision_index)

    def queries(self, hidden: torch.Tensor) -> torch.Tensor:  # (B, L, D) -> (B, Q, D)
        return hidden.index_select(1, self.query_index)

    def text(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # -> (B, T, D), (B, T)
        return hidden.index_select(1, self.text_index), self.text_mask

    def last_token_index(self) -> torch.Tensor:  # (B,) position of each sample's last real token
        positions = torch.arange(self.seq_len, device=self.attention_mask.device)
        return (self.attention_mask.bool() * positions).argmax(dim=1)


def build_sequence(bos: torch.Tensor, vision: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor,
                   queries: torch.Tensor, stop: torch.Tensor) -> tuple[torch.Tensor, TokenLayout]:
    """Concatenate the token groups and return `(inputs_embeds (B, L, D), layout)`.

    bos, stop: (D,); vision: (B, N_vis, D); text: (B, T, D) with text_mask (B, T) bool; queries: (Q, D).
    """
    batch, n_vis, dim = vision.shape
    n_text, n_query = text.shape[1], queries.shape[0]
    device = vision.device
    embeds = torch.cat([
        bos.expand(batch, 1, dim), vision, text, queries.expand(batch, n_query, dim), stop.expand(batch, 1, dim),
    ], dim=1)  # (B, 1 + N_vis + T + Q + 1, D)
    start = torch.cumsum(torch.tensor([1, n_vis, n_text, n_query]), 0).tolist()  # first index of each group
    ones = torch.ones(batch, 1 + n_vis, dtype=torch.long, device=device)
    attention_mask = torch.cat([ones, text_mask.long(), ones[:, : n_query + 1]], dim=1)  # (B, L)
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    layout = TokenLayout(
        vision_index=torch.arange(start[0], start[1], device=device),
        text_index=torch.arange(start[1], start[2], device=device),
        text_mask=text_mask.bool(),
        query_index=torch.arange(start[2], start[3], device=device),
        attention_mask=attention_mask,
        position_ids=position_ids,
    )
    return embeds, layout

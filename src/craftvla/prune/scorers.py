"""Stage 2 scorers: one score per vision token at a pruning layer; higher = keep.

Every scorer maps `(hidden (B, L, D), layout, layer)` — the states entering LLM layer `layer + 1`
and where each token sits — to scores `(B, N_vis)` over `layout`'s vision tokens. Learned heads:
`VisionPrunerHead` (one cross-attention layer: vision tokens attend to the instruction) and
`VisionPrunerHeadSimple` (an MLP on each token and the pooled instruction). Parameter-free
baselines: `RandomScorer`, `FastVScorer` (attention received from the last token, FastV) and
`InstructionScorer` (attention from the instruction tokens, LightVLA's parameter-free query).
"""

from __future__ import annotations

import torch
from torch import nn

from craftvla.model.sequence import TokenLayout


def _pooled_text(hidden: torch.Tensor, layout: TokenLayout) -> torch.Tensor:  # -> (B, D)
    text, mask = layout.text(hidden)  # (B, T, D), (B, T)
    keep = mask.unsqueeze(-1).to(hidden.dtype)
    return (text * keep).sum(1) / keep.sum(1).clamp_min(1)


class VisionPrunerHead(nn.Module):
    """Vision tokens (queries) attend to the instruction tokens (keys/values), then a linear score."""

    def __init__(self, dim: int, hidden_dim: int = 64, num_heads: int = 4):
        super().__init__()
        self.norm_vision, self.norm_text = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.proj_vision = nn.Linear(dim, hidden_dim)
        self.attend = nn.MultiheadAttention(hidden_dim, num_heads, kdim=dim, vdim=dim, batch_first=True)
        self.score = nn.Sequential(nn.LayerNorm(hidden_dim), nn.Linear(hidden_dim, 1))

    def forward(self, hidden: torch.Tensor, layout: TokenLayout, layer: int = 0) -> torch.Tensor:  # -> (B, N_vis)
        vision = self.proj_vision(self.norm_vision(layout.vision(hidden)))  # (B, N, h)
        text, mask = layout.text(hidden)
        text = self.norm_text(text)
        read, _ = self.attend(vision, text, text, key_padding_mask=~mask, need_weights=False)  # (B, N, h)
        return self.score(vision + read).squeeze(-1)


class VisionPrunerHeadSimple(nn.Module):
    """MLP on [vision token, pooled instruction] -> a score."""

    def __init__(self, dim: int, hidden_dim: int = 64):
        super().__init__()
        self.norm = nn.LayerNorm(2 * dim)
        self.mlp = nn.Sequential(nn.Linear(2 * dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, 1))

    def forward(self, hidden: torch.Tensor, layout: TokenLayout, layer: int = 0) -> torch.Tensor:
        vision = layout.vision(hidden)  # (B, N, D)
        text = _pooled_text(hidden, layout).unsqueeze(1).expand_as(vision)
        return self.mlp(self.norm(torch.cat([vision, text], dim=-1))).squeeze(-1)


class RandomScorer(nn.Module):
    """Uniform random scores (a fresh draw every call; seed with torch.manual_seed)."""

    def forward(self, hidden: torch.Tensor, layout: TokenLayout, layer: int = 0) -> torch.Tensor:
        return torch.rand(layout.vision_index.shape, device=hidden.device)


class _AttentionScorer(nn.Module):
    """Scores from the attention the next decoder layer computes on `hidden` (its own norm, q/k
    projections and rotary embedding), averaged over heads and over the reading tokens `readers`."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = [backbone]  # a plain list: the LLM is not this module's child (no double registration)

    def readers(self, layout: TokenLayout) -> tuple[torch.Tensor, torch.Tensor]:  # -> index (B, R), mask (B, R)
        raise NotImplementedError

    def attention_to_vision(self, layer_idx: int, hidden: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

        llm = self.backbone[0]
        layer = llm.layers[layer_idx]
        attn = layer.self_attn
        x = layer.input_layernorm(hidden)  # (B, L, D)
        shape = (*x.shape[:2], -1, attn.head_dim)
        q = attn.q_proj(x).view(shape).transpose(1, 2)  # (B, h, L, e)
        k = attn.k_proj(x).view(shape).transpose(1, 2)
        cos, sin = llm.model.rotary_emb(x, layout.position_ids)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k = repeat_kv(k, q.shape[1] // k.shape[1])
        index, mask = self.readers(layout)  # (B, R)
        q = q.gather(2, index[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[-1]))  # (B, h, R, e)
        logits = (q @ k.transpose(2, 3)) * attn.scaling  # (B, h, R, L)
        visible = layout.attention_mask.bool()  # (B, L): no padding, and (soft mode) no masked-out vision token
        keep = layout.key_keep()
        if keep is not None:
            visible = visible & (keep[0] > 0)
        logits = logits.masked_fill(~visible[:, None, None, :], float("-inf"))
        probs = logits.softmax(dim=-1).mean(dim=1)  # (B, R, L)
        weights = mask.to(probs.dtype).unsqueeze(-1)
        received = (probs * weights).sum(1) / weights.sum(1).clamp_min(1)  # (B, L)
        return received.gather(1, layout.vision_index)  # (B, N_vis)

    def forward(self, hidden: torch.Tensor, layout: TokenLayout, layer: int = 0) -> torch.Tensor:
        return self.attention_to_vision(layer, hidden, layout)


class FastVScorer(_AttentionScorer):
    """FastV (Chen et al. 2024): the attention each vision token receives from the last token."""

    def readers(self, layout):
        last = layout.last_token_index().unsqueeze(1)  # (B, 1)
        return last, torch.ones_like(last, dtype=torch.bool)


class InstructionScorer(_AttentionScorer):
    """LightVLA-style parameter-free scores: the attention each vision token receives from the
    instruction tokens (their mean over real tokens and heads)."""

    def readers(self, layout):
        return layout.text_index, layout.text_mask

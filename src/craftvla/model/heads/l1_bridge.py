"""`l1_bridge`: a VLA-Adapter-style bridge-attention head (after its L1RegressionActionHead; not
key-compatible with the released MLPResNet, see model/released.py), trained with L1.

One `BridgeBlock` per LLM layer: the action-chunk latent attends (a) to itself and to that
layer's action-query states plus a proprioception token, and (b) to that layer's vision-patch
states through a tanh gate initialised at zero, so the raw vision branch opens only as training
finds it useful (VLA-Adapter's "bridge attention").
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from craftvla.config import L1BridgeHeadConfig
from craftvla.keys import ACTION_KEY, ACTION_PAD_KEY
from craftvla.model.context import VLMContext
from craftvla.model.heads.base import ActionHead


class BridgeBlock(nn.Module):
    """x (B, H, d) attends to [x, queries (B, Q, D), proprio (B, P, D)] and, gated, to vision (B, N, D)
    (only the vision tokens a (B, N) bool `vision_mask` marks visible, when one is given)."""

    def __init__(self, dim: int, llm_dim: int, num_heads: int, gate_init: float, mlp_ratio: int = 4):
        super().__init__()
        self.num_heads = num_heads
        self.norm_x = nn.LayerNorm(dim)
        self.norm_cond = nn.LayerNorm(llm_dim)  # LLM states of different layers differ wildly in scale
        self.q_proj = nn.Linear(dim, dim)
        self.kv_self = nn.Linear(dim, 2 * dim)
        self.kv_adapter = nn.Linear(llm_dim, 2 * dim)
        self.kv_vision = nn.Linear(llm_dim, 2 * dim)
        self.gate = nn.Parameter(torch.tensor(float(gate_init)))
        self.o_proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(
            nn.LayerNorm(dim), nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim)
        )

    def _heads(self, t: torch.Tensor) -> torch.Tensor:  # (B, n, d) -> (B, heads, n, d / heads)
        return rearrange(t, "b n (h e) -> b h n e", h=self.num_heads)

    def condition(self, vision, queries, proprio, vision_mask=None) -> tuple:
        """The keys and values this block reads from the VLM context: computed once per context,
        reused by every call of `forward` (a flow head's denoising steps)."""
        k_ad, v_ad = self.kv_adapter(self.norm_cond(torch.cat([queries, proprio], dim=1))).chunk(
            2, dim=-1
        )  # (B, Q+P, d)
        k_vis, v_vis = self.kv_vision(self.norm_cond(vision)).chunk(2, dim=-1)  # (B, N, d)
        return self._heads(k_ad), self._heads(v_ad), self._heads(k_vis), self._heads(v_vis), vision_mask

    def forward(self, x: torch.Tensor, cond: tuple) -> torch.Tensor:  # x (B, H, d), cond from `condition`
        k_ad, v_ad, k_vis, v_vis, vision_mask = cond
        h = self.norm_x(x)
        q = self._heads(self.q_proj(h))  # (B, h, H, e)
        k_self, v_self = self.kv_self(h).chunk(2, dim=-1)  # (B, H, d) each
        main = F.scaled_dot_product_attention(
            q, torch.cat([self._heads(k_self), k_ad], 2), torch.cat([self._heads(v_self), v_ad], 2)
        )
        seen = self._attend_vision(q, k_vis, v_vis, vision_mask)
        mixed = rearrange(main + torch.tanh(self.gate) * seen, "b h n e -> b n (h e)")  # (B, H, d)
        x = x + self.o_proj(mixed)
        return x + self.mlp(x)

    @staticmethod
    def _attend_vision(q, k, v, mask):  # (B, h, H, e), (B, h, N, e) x2, (B, N) bool | None -> (B, h, H, e)
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v)
        seen = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        return torch.where(mask.any(dim=1)[:, None, None, None], seen, 0.0)  # no visible token: no vision read


class FlatReadout(nn.Module):
    """Patch tokens (B, N, D) -> C channels per token, flattened (B, N * C) -> MLP -> one token (B, 1, D).

    Unlike attention pooling, the flattened vector keeps which patch each feature came from, so a
    linear map can read an object's position directly (the read-out of CNN behaviour-cloning policies)."""

    def __init__(self, dim: int, channels: int, num_tokens: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.reduce = nn.Linear(dim, channels)
        self.out = nn.Sequential(nn.Linear(num_tokens * channels, dim), nn.GELU(), nn.Linear(dim, dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(self.reduce(self.norm(tokens)).flatten(1)).unsqueeze(1)


class L1BridgeHead(ActionHead):
    """Per-layer vision and query states + proprio -> an action chunk `(B, H, A)`, trained with L1.

    Block l reads LLM layer l+1's action-query states and vision states (`vision_source="llm"`,
    VLA-Adapter) or the vision tokens entering the LLM (`"projector"`); per-layer subsets of
    vision tokens (after token removal) and masked-out tokens are both fine.
    """

    def __init__(
        self,
        cfg: L1BridgeHeadConfig,
        llm_dim: int,
        num_layers: int,
        state_dim: int,
        action_dim: int,
        chunk_size: int,
        num_vision_tokens: int,
    ):
        super().__init__()
        self.vision_source = cfg.vision_source
        self.context_source = getattr(cfg, "context", "layers")  # flow_matching may read only the last layer
        dim = cfg.hidden_dim or llm_dim
        # VLA-Adapter's ProprioProjector: state -> one LLM-width token.
        self.proprio = nn.Sequential(nn.Linear(state_dim, llm_dim), nn.GELU(), nn.Linear(llm_dim, llm_dim))
        self.chunk_embed = nn.Parameter(torch.randn(chunk_size, dim) * 0.02)  # one latent per future step
        self.blocks = nn.ModuleList(
            BridgeBlock(dim, llm_dim, cfg.num_heads, cfg.gate_init, cfg.mlp_ratio) for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, action_dim)
        # Built last so that without it the head's parameters (and their seeded init) are unchanged.
        self.flat = FlatReadout(llm_dim, cfg.flat_readout, num_vision_tokens) if cfg.flat_readout else None
        self.reads_patches = self.flat is not None

    def conditions(self, context: VLMContext) -> list[tuple]:
        """Every block's keys and values from the context (see `BridgeBlock.condition`)."""
        proprio = self.proprio(context.state).unsqueeze(1)  # (B, 1, D)
        if self.flat is not None:  # the position-preserving vision token joins proprio: (B, 2, D)
            proprio = torch.cat([proprio, self.flat(context.patch_tokens())], dim=1)
        conds = []
        for i, block in enumerate(self.blocks):
            layer = i + 1 if self.context_source == "layers" else context.num_layers
            source = 0 if self.vision_source == "projector" else layer
            conds.append(
                block.condition(context.vision(source), context.queries(layer), proprio, context.vision_mask(source))
            )
        return conds

    def trunk(self, x: torch.Tensor, conds: list[tuple]) -> torch.Tensor:  # (B, H, d) latents -> (B, H, A)
        for block, cond in zip(self.blocks, conds):
            x = block(x, cond)
        return self.out(self.norm(x))

    def forward(self, context: VLMContext) -> torch.Tensor:  # -> (B, H, A)
        x = self.chunk_embed.expand(context.state.shape[0], -1, -1)  # (B, H, d)
        return self.trunk(x, self.conditions(context))

    def loss(self, context: VLMContext, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = l1_loss(self(context), batch[ACTION_KEY], batch[ACTION_PAD_KEY])
        return loss, {"l1_loss": loss.detach()}

    def sample(self, context: VLMContext, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return self(context)  # deterministic: no noise to draw


def l1_loss(pred: torch.Tensor, target: torch.Tensor, is_pad: torch.Tensor) -> torch.Tensor:
    """Mean L1 over real (non-padded) steps: pred, target (B, H, A), is_pad (B, H) bool."""
    keep = (~is_pad).unsqueeze(-1).to(pred.dtype)  # (B, H, 1)
    return ((pred - target).abs() * keep).sum() / (keep.sum() * pred.shape[-1]).clamp(min=1)

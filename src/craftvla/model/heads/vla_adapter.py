"""`vla_adapter`: VLA-Adapter's released action head, key- and shape-compatible with the `model.*`
keys of its `action_head--*checkpoint.pt`, written from a reading of prismatic/models/action_heads.py
(OpenHelix-Team/VLA-Adapter at 838a36d) and proven equal to that code on files it wrote
(tests/fixtures/vla_adapter/, tests/model/test_vla_adapter_head.py).

B batch, H chunk, A action size, D the LLM's width (= the head's), L the LLM's layers:

    x = zeros (B, H, A * D)   (+ N(0, 0.02^2) noise (H, A * D), drawn afresh per training call)
    x = relu(fc1(layer_norm1(x)))                                        (B, H, D)
    block i reads LLM layer i + 1, i = 0 .. L - 1:
        keys and values: x itself, the adapter stream [action states (B, Q, D); proprio token (B, 1, D)]
        and the task stream (B, N, D) whose logits a tanh gate (zero at init) scales
        x = ffn(o_proj(attention) + x),   ffn = LayerNorm -> Linear -> ReLU, no residual around it
    actions = fc2(layer_norm2(x))                                        (B, H, A)

Two block variants: the original (`pro=False`: one q/k/v/o shared by the three streams, no
positions -- every row of the chunk then sees identical inputs at inference, so all H actions of a
chunk come out equal, as FACTS.md records of their code) and the Pro (`pro=True`: its own keys and
values per stream, RoPE on the queries and on each stream's keys, and a `film_gen` layer the release
stores and its code never calls: it loads and is unused here too).

Their training perturbation is less small than its 0.02 suggests: layer_norm1 normalises the all-zero
input plus the noise, so in training fc1 reads a fresh unit-variance random vector per row, and at
inference a constant (the norm's bias). It is kept (a release was trained so); `input_noise_std 0`
turns it off.

Where this differs from their code, on purpose: it runs in the policy's dtype (theirs casts the
proprio input and the LLM states to bf16 before the head, so it cannot run in fp32 as written);
the task stream may be masked (soft token pruning) or shorter (pruned layers); and L follows the
LLM (theirs builds 24 blocks whatever the LLM).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from craftvla.config import VLAAdapterHeadConfig
from craftvla.errors import ConfigError
from craftvla.keys import ACTION_KEY, ACTION_PAD_KEY
from craftvla.model.context import VLMContext
from craftvla.model.heads.base import ActionHead
from craftvla.model.heads.l1_bridge import l1_loss
from craftvla.model.sequence import gather_tokens

# (adapter (B, Q + 1, D), task (B, N, D), task keep mask (B, N) bool or None): what one block reads.
Streams = tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]


def rope_frequencies(head_dim: int, base: float = 10000.0) -> torch.Tensor:  # -> (head_dim / 2,) fp32
    return 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # as theirs, to the bit


def rope_tables(n: int, inv_freq: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (n, head_dim) for positions 0 .. n - 1 in VLA-Adapter's layout: the head_dim / 2
    frequencies repeated as two halves [f_0 .. f_{e/2-1}, f_0 .. f_{e/2-1}]. The angles are computed in
    `inv_freq`'s dtype, the module's (theirs is a buffer: a bf16 head computes bf16 angles)."""
    positions = torch.arange(n, device=inv_freq.device, dtype=inv_freq.dtype)
    angles = torch.outer(positions, inv_freq)  # (n, e / 2)
    angles = torch.cat([angles, angles], dim=-1)  # (n, e)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, h, n, e) -> x cos + turn(x) sin, where turn maps each adjacent pair (a, b) to (-b, a).
    With the half-repeated frequencies of `rope_tables` the two members of a pair turn at different
    frequencies: not a rotation in the usual sense, but what the released weights were trained with."""
    pairs = x.unflatten(-1, (-1, 2))  # (B, h, n, e / 2, 2)
    turned = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)  # (B, h, n, e)
    return x * cos + turned * sin


class _Block(nn.Module):
    """One residual block: x attends to [itself, the adapter stream, the gated task stream]."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.ffn = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.ReLU())
        self.q_proj = nn.Linear(dim, dim)
        self.o_proj = nn.Linear(dim, dim)
        self.gating_factor = nn.Parameter(torch.zeros(1))

    def _heads(self, t: torch.Tensor) -> torch.Tensor:  # (B, n, D) -> (B, h, n, D / h)
        return rearrange(t, "b n (h e) -> b h n e", h=self.num_heads)

    def project(self, x, adapter, task) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """q (B, h, H, e) and the keys and values of [x, adapter, task], each (B, h, n, e)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, streams: Streams) -> torch.Tensor:  # x (B, H, D) -> (B, H, D)
        adapter, task, task_mask = streams
        q, keys, values = self.project(x, adapter, task)
        keys[2] = keys[2] * torch.tanh(self.gating_factor)  # q . (g k) = g (q . k): the gate scales the task logits
        mask = None
        if task_mask is not None:  # (B, 1, 1, H + Q + 1 + N): every self and adapter key, the kept task keys
            others = torch.ones(x.shape[0], keys[0].shape[2] + keys[1].shape[2], dtype=torch.bool, device=x.device)
            mask = torch.cat([others, task_mask], dim=1)[:, None, None, :]
        out = F.scaled_dot_product_attention(q, torch.cat(keys, 2), torch.cat(values, 2), attn_mask=mask)
        return self.ffn(self.o_proj(rearrange(out, "b h n e -> b n (h e)")) + x)


class OriginalBlock(_Block):
    """VLA-Adapter's `MLPResNetBlock`: one k/v projection shared by all three streams, no positions."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__(dim, num_heads)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)

    def project(self, x, adapter, task):
        sources = (x, adapter, task)
        keys = [self._heads(self.k_proj(s)) for s in sources]
        values = [self._heads(self.v_proj(s)) for s in sources]
        return self._heads(self.q_proj(x)), keys, values


class ProBlock(_Block):
    """VLA-Adapter's `MLPResNetBlock_Pro`: keys and values per stream, RoPE within each stream."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__(dim, num_heads)
        for name in ("k_self", "v_self", "k_adapter", "v_adapter", "k_task", "v_task"):
            setattr(self, name, nn.Linear(dim, dim))
        self.film_gen = nn.Sequential(nn.Linear(dim, 2 * dim))  # in the release's files; never called
        self.register_buffer("inv_freq", rope_frequencies(dim // num_heads), persistent=False)

    def project(self, x, adapter, task):
        q, k_self = self._heads(self.q_proj(x)), self._heads(self.k_self(x))
        k_adapter, k_task = self._heads(self.k_adapter(adapter)), self._heads(self.k_task(task))
        cos, sin = rope_tables(x.shape[1], self.inv_freq, q.dtype)
        q, k_self = apply_rope(q, cos, sin), apply_rope(k_self, cos, sin)
        k_adapter = apply_rope(k_adapter, *rope_tables(adapter.shape[1], self.inv_freq, q.dtype))  # from 0 per stream
        k_task = apply_rope(k_task, *rope_tables(task.shape[1], self.inv_freq, q.dtype))
        values = [self._heads(self.v_self(x)), self._heads(self.v_adapter(adapter)), self._heads(self.v_task(task))]
        return q, [k_self, k_adapter, k_task], values


class ResidualMLP(nn.Module):
    """VLA-Adapter's `MLPResNet` (the same parameter names): input norm and projection, one block
    per LLM layer, output norm and projection."""

    def __init__(self, num_blocks: int, in_dim: int, dim: int, out_dim: int, pro: bool, num_heads: int):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(in_dim)
        self.fc1 = nn.Linear(in_dim, dim)
        block = ProBlock if pro else OriginalBlock
        self.mlp_resnet_blocks = nn.ModuleList(block(dim, num_heads) for _ in range(num_blocks))
        self.layer_norm2 = nn.LayerNorm(dim)
        self.fc2 = nn.Linear(dim, out_dim)

    def forward(self, x: torch.Tensor, streams: list[Streams]) -> torch.Tensor:  # (B, H, A*D) -> (B, H, A)
        x = F.relu(self.fc1(self.layer_norm1(x)))
        for block, s in zip(self.mlp_resnet_blocks, streams, strict=True):
            x = block(x, s)
        return self.fc2(self.layer_norm2(x))


class VLAAdapterHead(ActionHead):
    """The VLM context -> an action chunk (B, H, A) by VLA-Adapter's head, trained with L1.

    Parameters: `proprio` (the release's proprio_projector: Linear -> GELU -> Linear, state -> one
    LLM-width token) and `model` (the release's action head: `ResidualMLP`)."""

    def __init__(
        self,
        cfg: VLAAdapterHeadConfig,
        llm_dim: int,
        num_layers: int,
        state_dim: int,
        action_dim: int,
        chunk_size: int,
        num_vision_tokens: int,
    ):
        super().__init__()
        if cfg.hidden_dim not in (None, llm_dim):
            raise ConfigError(f"head.hidden_dim={cfg.hidden_dim}: the vla_adapter head is the LLM's width ({llm_dim})")
        if llm_dim % cfg.num_heads or (cfg.pro and (llm_dim // cfg.num_heads) % 2):
            raise ConfigError(
                f"head.num_heads={cfg.num_heads}: must divide the LLM width {llm_dim}"
                + (" into an even head size (RoPE)" if cfg.pro else "")
            )
        self.streams_mode, self.noise_std = cfg.streams, cfg.input_noise_std
        self.chunk_size, self.in_dim = chunk_size, action_dim * llm_dim
        self.proprio = nn.Sequential(nn.Linear(state_dim, llm_dim), nn.GELU(), nn.Linear(llm_dim, llm_dim))
        self.model = ResidualMLP(num_layers, self.in_dim, llm_dim, action_dim, cfg.pro, cfg.num_heads)

    def streams(self, context: VLMContext) -> list[Streams]:
        """What each block reads from the context (see `VLAAdapterHeadConfig.streams`)."""
        proprio = self.proprio(context.state).unsqueeze(1)  # (B, 1, D)
        out = []
        for layer in range(1, len(self.model.mlp_resnet_blocks) + 1):
            hidden, layout = context.hidden_states[layer], context.layouts[layer]
            if self.streams_mode == "tokens":
                actions, task, mask = layout.queries(hidden), layout.vision(hidden), layout.vision_mask
            else:  # the state one real token before each query / vision token
                actions = gather_tokens(hidden, layout.preceding(layout.query_index))  # (B, Q, D)
                before = layout.preceding(layout.vision_index)  # (B, N)
                task = gather_tokens(hidden, before)
                keep = layout.key_keep()
                mask = None if keep is None else keep[0].gather(1, before) > 0.5
            out.append((torch.cat([actions, proprio], dim=1), task, mask))
        return out

    def chunk(self, context: VLMContext, noise: bool) -> torch.Tensor:  # -> (B, H, A)
        """The chunk; `noise` adds the training-time input perturbation (one draw per call, shared by
        the batch, as theirs)."""
        state = context.state
        x = state.new_zeros(state.shape[0], self.chunk_size, self.in_dim)  # (B, H, A*D)
        if noise and self.noise_std > 0:
            x = x + torch.randn(self.chunk_size, self.in_dim, device=x.device, dtype=x.dtype) * self.noise_std
        return self.model(x, self.streams(context))

    def forward(self, context: VLMContext) -> torch.Tensor:  # -> (B, H, A)
        return self.chunk(context, noise=self.training)

    def loss(self, context: VLMContext, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = l1_loss(self(context), batch[ACTION_KEY], batch[ACTION_PAD_KEY])
        return loss, {"l1_loss": loss.detach()}

    def sample(self, context: VLMContext, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Deterministic (and differentiable: CRaFT's actions target reads it): never the noise."""
        return self.chunk(context, noise=False)

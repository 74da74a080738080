"""`flow_matching`: pi0's continuous action head on the bridge architecture.

The bridge blocks (l1_bridge.py) act as the action expert: the latent of future step h starts from
the noisy action x_t[h] and the time t (pi0's action-time MLP over the action embedding and a
sinusoidal embedding of t) and attends to the VLM context like the bridge head; the output is the
velocity v(x_t, t). Conventions as openpi's pi0:

    x_t = t * noise + (1 - t) * actions,   target u = noise - actions,   t ~ Beta(1.5, 1) * 0.999 + 0.001
    sampling: x_1 = noise, then num_steps Euler steps x_{t + dt} = x_t + dt * v(x_t, t), dt = -1 / num_steps

The context's keys and values are projected once per observation and reused by every step.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from craftvla.config import FlowMatchingHeadConfig
from craftvla.keys import ACTION_KEY, ACTION_PAD_KEY
from craftvla.model.context import VLMContext
from craftvla.model.heads.l1_bridge import L1BridgeHead


def time_embedding(t: torch.Tensor, dim: int, min_period: float = 4e-3, max_period: float = 4.0) -> torch.Tensor:
    """t (B,) -> (B, dim): sines and cosines at periods spaced log-uniformly in [min, max] (pi0's)."""
    fraction = torch.linspace(0.0, 1.0, dim // 2, device=t.device, dtype=torch.float32)
    period = min_period * (max_period / min_period) ** fraction  # (dim / 2,)
    angle = 2 * math.pi * t.float()[:, None] / period[None, :]  # (B, dim / 2)
    return torch.cat([angle.sin(), angle.cos()], dim=-1)


def flow_loss(velocity: torch.Tensor, target: torch.Tensor, is_pad: torch.Tensor) -> torch.Tensor:
    """Mean squared error over real (non-padded) steps: velocity, target (B, H, A), is_pad (B, H)."""
    keep = (~is_pad).unsqueeze(-1).to(velocity.dtype)
    return ((velocity - target).pow(2) * keep).sum() / (keep.sum() * velocity.shape[-1]).clamp(min=1)


class FlowMatchingHead(L1BridgeHead):
    def __init__(
        self,
        cfg: FlowMatchingHeadConfig,
        llm_dim: int,
        num_layers: int,
        state_dim: int,
        action_dim: int,
        chunk_size: int,
        num_vision_tokens: int,
    ):
        super().__init__(cfg, llm_dim, num_layers, state_dim, action_dim, chunk_size, num_vision_tokens)
        self.cfg = cfg
        dim = cfg.hidden_dim or llm_dim
        self.action_in = nn.Linear(action_dim, dim)
        self.action_time = nn.Sequential(nn.Linear(2 * dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def velocity(self, x: torch.Tensor, t: torch.Tensor, conds: list[tuple]) -> torch.Tensor:
        """x_t (B, H, A), t (B,) -> v (B, H, A) under the context's `conditions`."""
        a = self.action_in(x)  # (B, H, d)
        tau = time_embedding(t, a.shape[-1]).to(a.dtype).unsqueeze(1).expand_as(a)  # (B, H, d)
        return self.trunk(self.chunk_embed + self.action_time(torch.cat([a, tau], dim=-1)), conds)

    def sample_time(self, batch_size: int, device) -> torch.Tensor:
        """Training times (B,): Beta(a, b) * (1 - time_min) + time_min; t = 1 is pure noise."""
        cfg = self.cfg
        beta = torch.distributions.Beta(torch.tensor(cfg.time_beta_a), torch.tensor(cfg.time_beta_b))
        return (beta.sample((batch_size,)) * (1 - cfg.time_min) + cfg.time_min).to(device)

    def loss(
        self, context: VLMContext, batch: dict, noise: Optional[torch.Tensor] = None, t: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        actions = batch[ACTION_KEY]  # (B, H, A)
        noise = torch.randn_like(actions) if noise is None else noise
        t = self.sample_time(actions.shape[0], actions.device) if t is None else t  # (B,)
        x_t = t[:, None, None] * noise + (1 - t[:, None, None]) * actions
        loss = flow_loss(self.velocity(x_t, t, self.conditions(context)), noise - actions, batch[ACTION_PAD_KEY])
        return loss, {"flow_loss": loss.detach()}

    def sample(
        self,
        context: VLMContext,
        noise: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
        num_steps: Optional[int] = None,
    ) -> torch.Tensor:
        """Euler integration from noise (t = 1) to an action chunk (t = 0): (B, H, A)."""
        conds = self.conditions(context)  # once per observation
        batch = context.state.shape[0]
        shape = (batch, self.chunk_embed.shape[0], self.out.out_features)
        if noise is None:
            noise = torch.randn(shape, generator=generator, device=context.state.device, dtype=context.state.dtype)
        steps = num_steps or self.cfg.num_steps
        x, dt = noise, -1.0 / steps
        for i in range(steps):
            t = torch.full((batch,), 1.0 - i / steps, device=x.device, dtype=x.dtype)
            x = x + dt * self.velocity(x, t, conds)
        return x

    def forward(self, context: VLMContext) -> torch.Tensor:
        return self.sample(context)

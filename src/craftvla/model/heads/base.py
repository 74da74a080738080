"""The action-head interface: a VLM context in, an action chunk out.

    loss, metrics = head.loss(context, batch)   # training; metrics are detached tensors (no host sync)
    actions = head.sample(context)              # inference: (B, H, A) in normalised units

The context (`model/context.py`) is computed once per observation by `VLAPolicy.encode`; a head
may read it as often as it needs (a flow-matching head's denoising steps reuse one encoding).
"""

from __future__ import annotations

import abc
from typing import Optional

import torch
from torch import nn

from craftvla.model.context import VLMContext


class ActionHead(nn.Module, abc.ABC):
    # Whether the head reads every patch position (`VLMContext.patch_tokens`), so that a policy that
    # merges vision tokens must hand it each position's stand-in.
    reads_patches: bool = False

    @abc.abstractmethod
    def loss(self, context: VLMContext, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Scalar training loss over the batch's non-padded action steps, and detached metrics."""

    @abc.abstractmethod
    def sample(self, context: VLMContext, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """An action chunk (B, H, A) in normalised units. Stochastic heads (flow matching) draw their
        noise from `generator` when given (a seeded one makes the chunk a function of the context)."""

    def target_actions(self, context: VLMContext, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """The chunk as a differentiable function of the context (CRaFT's `actions` target): `sample`
        for heads whose sampling is differentiable; a discrete head gives its expected action."""
        return self.sample(context, generator=generator)

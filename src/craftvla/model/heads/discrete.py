"""`discrete`: RT-2 / OpenVLA-style action tokens, decoded in parallel (OpenVLA-OFT).

Each of the chunk's H x A action values is binned (`num_bins` uniform bins per dimension between
the training data's normalised min and max, kept as buffers, so they save with the checkpoint).
The action queries are the action slots, one per (step, dimension) in step-major order; the last
LLM layer's state of slot j goes through the output layer to `num_bins` logits. That layer starts
from the LLM's own output embedding rows of the last `num_bins` token ids when the checkpoint has
an LM head (OpenVLA's choice of tokens), and fresh otherwise. Loss: cross-entropy over real steps.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from craftvla.config import DiscreteHeadConfig
from craftvla.keys import ACTION_KEY, ACTION_PAD_KEY
from craftvla.model.context import VLMContext
from craftvla.model.heads.base import ActionHead


class DiscreteHead(ActionHead):
    def __init__(
        self,
        cfg: DiscreteHeadConfig,
        llm_dim: int,
        num_layers: int,
        state_dim: int,
        action_dim: int,
        chunk_size: int,
        num_vision_tokens: int,
    ):
        super().__init__()
        self.num_bins, self.chunk_size, self.action_dim = cfg.num_bins, chunk_size, action_dim
        self.register_buffer("low", -torch.ones(action_dim))  # (A,) normalised range the bins span
        self.register_buffer("high", torch.ones(action_dim))
        self.out = nn.Linear(llm_dim, cfg.num_bins)
        self.autoregressive = cfg.decoding == "autoregressive"
        # Autoregressive: slot j's input adds the embedding of slot j - 1's bin (teacher-forced in training).
        self.token_in = nn.Embedding(cfg.num_bins, llm_dim) if self.autoregressive else None

    # ----- bins ---------------------------------------------------------------------------------
    def set_action_range(self, low: torch.Tensor, high: torch.Tensor) -> None:
        """The normalised min and max of the training actions per dimension (A,)."""
        self.low.copy_(torch.as_tensor(low, dtype=self.low.dtype))
        self.high.copy_(torch.maximum(torch.as_tensor(high, dtype=self.high.dtype), self.low + 1e-6))

    def to_bins(self, actions: torch.Tensor) -> torch.Tensor:  # (..., A) -> (..., A) long in [0, num_bins)
        width = (self.high - self.low) / self.num_bins
        return ((actions - self.low) / width).floor().clamp(0, self.num_bins - 1).long()

    def from_bins(self, bins: torch.Tensor) -> torch.Tensor:  # (..., A) long -> bin centres (..., A)
        width = (self.high - self.low) / self.num_bins
        return self.low + (bins.to(self.low.dtype) + 0.5) * width

    def init_output(self, rows: Optional[torch.Tensor], input_rows: Optional[torch.Tensor] = None) -> None:
        """Start the output layer from the LLM's output embedding rows (num_bins, D), if it has them,
        and the bin embeddings (autoregressive) from its input embedding rows of the same tokens."""
        with torch.no_grad():
            if rows is not None:
                self.out.weight.copy_(rows)
                self.out.bias.zero_()
            if input_rows is not None and self.token_in is not None:
                self.token_in.weight.copy_(input_rows)

    def slot_inputs(self, bins: torch.Tensor) -> torch.Tensor:
        """Bins of the chunk (B, H, A) -> what each slot adds to its query (B, H * A, D): slot j the
        embedding of bin j - 1 (step-major order), slot 0 nothing. Autoregressive decoding only."""
        flat = bins.flatten(1)  # (B, Q)
        shifted = self.token_in(flat[:, :-1])  # (B, Q - 1, D)
        return torch.cat([torch.zeros_like(shifted[:, :1]), shifted], dim=1)

    # ----- the head interface -------------------------------------------------------------------
    def logits(self, context: VLMContext) -> torch.Tensor:  # -> (B, H, A, num_bins)
        slots = context.queries(context.num_layers)  # (B, H * A, D), step-major
        return self.out(slots).view(slots.shape[0], self.chunk_size, self.action_dim, self.num_bins)

    def loss(self, context: VLMContext, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits, target = self.logits(context), self.to_bins(batch[ACTION_KEY])  # (B, H, A, K), (B, H, A)
        keep = (~batch[ACTION_PAD_KEY]).unsqueeze(-1).expand_as(target)  # (B, H, A)
        loss = F.cross_entropy(logits[keep], target[keep])
        accuracy = (logits.argmax(-1) == target)[keep].float().mean()
        return loss, {"ce_loss": loss.detach(), "token_accuracy": accuracy.detach()}

    def sample(self, context: VLMContext, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return self.from_bins(self.logits(context).argmax(-1))  # greedy: (B, H, A)

    def target_actions(self, context: VLMContext, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """The expected bin centre under the predicted distribution (B, H, A): differentiable, unlike argmax."""
        centres = self.from_bins(
            torch.arange(self.num_bins, device=self.low.device)[:, None].expand(-1, self.action_dim)
        )
        return torch.einsum("bhak,ka->bha", self.logits(context).softmax(-1), centres)  # centres (K, A)

"""Projectors from vision-token width to LLM width (Prismatic / OpenVLA names: fc1, fc2, fc3)."""

from __future__ import annotations

from torch import nn


class Projector(nn.Module):
    """`linear`: fc1. `mlp`: fc1-GELU-fc2. `fused_mlp`: fc1 (D_v -> 4 D_v)-GELU-fc2 (-> D_llm)-GELU-fc3."""

    def __init__(self, kind: str, vision_dim: int, llm_dim: int):
        super().__init__()
        self.kind = kind
        if kind == "linear":
            self.fc1 = nn.Linear(vision_dim, llm_dim)
        elif kind == "mlp":
            self.fc1, self.fc2 = nn.Linear(vision_dim, llm_dim), nn.Linear(llm_dim, llm_dim)
        elif kind == "fused_mlp":
            self.fc1 = nn.Linear(vision_dim, 4 * vision_dim)
            self.fc2, self.fc3 = nn.Linear(4 * vision_dim, llm_dim), nn.Linear(llm_dim, llm_dim)
        else:
            raise ValueError(f"unknown projector {kind!r}")
        self.act = nn.GELU()

    def forward(self, x):  # (B, N, D_v) -> (B, N, D_llm)
        x = self.fc1(x)
        if self.kind == "linear":
            return x
        x = self.fc2(self.act(x))
        return x if self.kind == "mlp" else self.fc3(self.act(x))

"""FLOPs counting: matmuls and attention against hand-computed counts."""

import torch
import torch.nn.functional as F
from torch import nn

from craftvla.model.speed import chunk_flops, chunk_latency


class _Attend(nn.Module):
    """q = x W (B, L, D); SDPA over H heads of width D / H, with an optional boolean mask."""

    def __init__(self, dim: int, heads: int, masked: bool):
        super().__init__()
        self.proj, self.heads, self.masked = nn.Linear(dim, dim, bias=False), heads, masked

    def predict_action_chunk(self, batch: dict) -> torch.Tensor:
        x = self.proj(batch["x"])  # (B, L, D)
        b, length, dim = x.shape
        q = x.view(b, length, self.heads, dim // self.heads).transpose(1, 2)  # (B, H, L, D/H)
        mask = torch.ones(b, 1, length, length, dtype=torch.bool).tril() if self.masked else None
        return F.scaled_dot_product_attention(q, q, q, attn_mask=mask)


def test_flops_count_attention_as_well_as_matmuls():
    b, length, dim, heads = 2, 10, 16, 4
    linear = 2 * b * length * dim * dim
    attention = 2 * (2 * b * heads * length * length * (dim // heads))  # q k^T, then p v
    for masked in (False, True):
        module = _Attend(dim, heads, masked)
        assert chunk_flops(module, {"x": torch.randn(b, length, dim)}) == linear + attention


def test_flops_leave_requires_grad_as_it_was():
    module = _Attend(8, 2, masked=False)
    module.proj.weight.requires_grad_(True)
    chunk_flops(module, {"x": torch.randn(1, 4, 8)})
    assert module.proj.weight.requires_grad


def test_latency_reports_ordered_percentiles():
    stats = chunk_latency(_Attend(8, 2, masked=False), {"x": torch.randn(1, 4, 8)}, warmup=1, repeats=5)
    assert 0 < stats["p10_ms"] <= stats["median_ms"] <= stats["p90_ms"]

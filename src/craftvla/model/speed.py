"""What a forward costs: analytic FLOPs (from the operators' shapes) and measured latency.

    flops = chunk_flops(policy, batch)              # torch's FlopCounterMode over predict_action_chunk
    stats = chunk_latency(policy, batch, repeats=20)  # {"median_ms", "p10_ms", "p90_ms", ...}

Latency runs `warmup` untimed calls, then times `repeats` calls one by one (synchronising CUDA
around each) at the torch thread count in effect; report it with `torch.get_num_threads()`.
"""

from __future__ import annotations

import statistics
import time

import torch


def chunk_flops(policy, batch: dict) -> int:
    """FLOPs of one `predict_action_chunk(batch)` (matmuls, convolutions, attention), counted by torch.

    Attention runs on SDPA's math backend here: torch's counter has no formula for the fused CPU
    kernel (`_scaled_dot_product_flash_attention_for_cpu` counts 0), while the math backend's
    matmuls are counted (4 B H L S D per call, masks included)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    for p in trainable:  # its module tracker trips over parameters that require grad under no_grad
        p.requires_grad_(False)
    try:
        with counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            policy.predict_action_chunk(batch)
    finally:
        for p in trainable:
            p.requires_grad_(True)
    return int(counter.get_total_flops())


def chunk_latency(policy, batch: dict, warmup: int = 5, repeats: int = 20) -> dict[str, float]:
    """Per-call wall-clock of `predict_action_chunk(batch)`: median, 10th and 90th percentile (ms)."""
    cuda = next(policy.parameters()).is_cuda
    return call_latency(lambda: policy.predict_action_chunk(batch), warmup, repeats, cuda)


def call_latency(call, warmup: int = 5, repeats: int = 20, cuda: bool = False) -> dict[str, float]:
    """Per-call wall-clock of `call()` without gradients (synchronised around each call on CUDA):
    median, 10th and 90th percentile (ms) of `repeats` calls after `warmup`."""
    times = []
    with torch.no_grad():
        for i in range(warmup + repeats):
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            call()
            if cuda:
                torch.cuda.synchronize()
            if i >= warmup:
                times.append(1000 * (time.perf_counter() - start))
    deciles = statistics.quantiles(times, n=10, method="inclusive")
    return {
        "median_ms": statistics.median(times),
        "p10_ms": deciles[0],
        "p90_ms": deciles[-1],
        "repeats": repeats,
        "threads": torch.get_num_threads(),
    }

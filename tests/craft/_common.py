"""Shared helpers for the CRaFT tests: a very small policy and batches (CPU, seconds)."""

import dataclasses

import torch

from craftvla.config import L1BridgeHeadConfig, LLMConfig, VisionConfig, VLAConfig


def small_config() -> VLAConfig:
    """Smaller than the tiny preset: 2-block ViT at 32 px, a 2-layer Qwen2 of width 64."""
    return dataclasses.replace(
        VLAConfig.preset("tiny"),
        vision=VisionConfig(backbone_id="tiny-vit", image_size=32, patch_size=8, width=32, depth=2, num_heads=2),
        llm=LLMConfig(family="qwen2", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128),
        head=L1BridgeHeadConfig(hidden_dim=32, num_heads=2),
        num_action_queries=4,
        chunk_size=4,
    )


def small_policy(seed: int = 0):
    from craftvla.model.policy import VLAPolicy

    torch.manual_seed(seed)
    policy = VLAPolicy(small_config())
    with torch.no_grad():  # queries start at zero in the model; give them values so they matter
        policy.action_queries.weight.normal_(0, 0.02)
    return policy


def batch(size: int, seed: int = 0, pad: bool = False) -> dict:
    """A fake batch; without padding so that micro-batch means average to the batch mean."""
    b = small_config().fake_batch(size, seed=seed)
    if not pad:
        b["action_is_pad"] = torch.zeros_like(b["action_is_pad"])
    return b


def split(b: dict, start: int, stop: int) -> dict:
    return {k: v[start:stop] for k, v in b.items()}


def train_steps(policy, plugin, batches, lr: float = 1e-2) -> list[dict]:
    """Plain loop around the plug-in, one micro-batch list per optimizer step; returns craft logs."""
    opt = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=lr)
    logs = []
    for micro in batches:
        for mb in micro:
            plugin.backward(policy, mb, scale=1.0 / len(micro))
        plugin.before_optimizer_step()
        opt.step()
        opt.zero_grad(set_to_none=True)
        logs.append(plugin.after_optimizer_step())
    return logs

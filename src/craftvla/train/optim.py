"""Optimizer and learning-rate schedule: AdamW (torch or bitsandbytes 8-bit) + warm-up + cosine."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from craftvla.errors import CraftVLAError
from craftvla.train.config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float, lr_by_prefix: Optional[dict[str, float]] = None) -> list[dict]:
    """Trainable parameters split into decayed (matrices) and undecayed (biases, norms, gates).

    nanoGPT's rule: weight decay only on tensors with >= 2 dims, so LayerNorm gains, biases and
    scalar gates are not pulled towards zero. `lr_by_prefix` {name prefix: lr} puts the parameters
    under each prefix into groups of their own with that peak LR (AdamW is per-parameter, so this is
    one optimizer per part); the rest take the optimizer's.
    """
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise CraftVLAError("no trainable parameters: everything is frozen (check --freeze.* and --lora.rank)")
    parts: dict[Optional[str], list] = {}
    for name, param in trainable:
        prefix = next((k for k in (lr_by_prefix or {}) if name.startswith(k)), None)
        parts.setdefault(prefix, []).append(param)
    groups = []
    for prefix, params in parts.items():
        lr = {} if prefix is None else {"lr": lr_by_prefix[prefix]}
        groups += [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay, **lr},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0, **lr},
        ]
    return groups


def build_optimizer(
    model: nn.Module, cfg: OptimConfig, lr_by_prefix: Optional[dict[str, float]] = None
) -> torch.optim.Optimizer:
    """AdamW over the model's trainable parameters; `adamw_8bit` needs bitsandbytes and CUDA."""
    groups = param_groups(model, cfg.weight_decay, lr_by_prefix)
    kwargs = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, **kwargs)
    if not torch.cuda.is_available():
        raise CraftVLAError(
            "optim.name='adamw_8bit' needs a CUDA GPU (bitsandbytes' 8-bit AdamW has no CPU "
            "kernels); use --optim.name adamw on this machine"
        )
    try:
        import bitsandbytes as bnb
    except ImportError as err:
        raise CraftVLAError("optim.name='adamw_8bit' needs bitsandbytes: pip install bitsandbytes") from err
    return bnb.optim.AdamW8bit(groups, **kwargs)


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float):
    """Linear warm-up to the peak LR once, then cosine decay to min_lr_ratio * peak at total_steps.

    Stepped once per optimizer step (not per micro-batch, and never reset: VLA-Adapter's
    per-step re-warm-up is the bug this avoids).
    """
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    return get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps, min_lr_rate=min_lr_ratio
    )

"""Optimizer and learning-rate schedule: AdamW (torch or bitsandbytes 8-bit) + warm-up + cosine."""

from __future__ import annotations

import torch
from torch import nn

from craftvla.errors import CraftVLAError
from craftvla.train.config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters split into decayed (matrices) and undecayed (biases, norms, gates).

    nanoGPT's rule: weight decay only on tensors with >= 2 dims, so LayerNorm gains, biases and
    scalar gates are not pulled towards zero.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise CraftVLAError("no trainable parameters: everything is frozen (check --freeze.* and --lora.rank)")
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW over the model's trainable parameters; `adamw_8bit` needs bitsandbytes and CUDA."""
    groups = param_groups(model, cfg.weight_decay)
    kwargs = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, **kwargs)
    if not torch.cuda.is_available():
        raise CraftVLAError("optim.name='adamw_8bit' needs a CUDA GPU (bitsandbytes' 8-bit AdamW has no CPU "
                            "kernels); use --optim.name adamw on this machine")
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

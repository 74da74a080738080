"""Partial and parameter-efficient training of a policy: which components train (`FreezeConfig`),
LoRA through PEFT (`LoraConfig`: on the LLM, optionally on the vision towers and the projector too,
as VLA-Adapter fine-tunes), and the adapters' bookkeeping.

`apply_lora` injects PEFT LoRA layers into those components in place (`peft.inject_adapter_in_model`),
so the policy's forward and module tree are unchanged except that each targeted Linear becomes
a `lora.Linear` wrapping the original as `base_layer`. For inference checkpoints,
`merged_copy` folds the adapters into the base weights (the plain `VLAPolicy` layout).
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Iterator, Optional

from torch import nn

from craftvla.errors import CraftVLAError, require

COMPONENTS = ("vision", "projector", "llm", "action_queries", "action_head")
LORA_COMPONENTS = ("llm", "vision", "projector")
ALL_LINEAR = "all-linear"


@dataclass
class LoraConfig:
    # LoRA rank on the LLM; 0 = no LoRA (full fine-tuning of whatever is not frozen).
    rank: int = 0
    # LoRA scaling numerator (the update is scaled by alpha / rank).
    alpha: float = 16.0
    # Dropout on the LoRA branch input.
    dropout: float = 0.0
    # Module names to adapt (e.g. [q_proj, v_proj]), or [all-linear]: every Linear of the component;
    # None = the LLM's attention and MLP projections (policy.lora_target_modules()), all-linear elsewhere.
    target_modules: Optional[list[str]] = None
    # The components that get adapters (their other weights freeze): llm, vision, projector.
    # VLA-Adapter's fine-tuning: --lora.rank 32 --lora.alpha 64 --lora.components [vision,projector,llm]
    # --lora.target_modules [all-linear] (its action head and proprio projector train in full).
    components: list[str] = field(default_factory=lambda: ["llm"])

    def __post_init__(self) -> None:
        require(self.rank >= 0, "lora.rank", self.rank, "must be >= 0 (0 disables LoRA)")
        require(0 <= self.dropout < 1, "lora.dropout", self.dropout, "must be in [0, 1)")
        require(
            bool(self.components) and set(self.components) <= set(LORA_COMPONENTS),
            "lora.components",
            self.components,
            f"choose among {LORA_COMPONENTS}",
        )
        require(len(set(self.components)) == len(self.components), "lora.components", self.components, "repeats")


@dataclass
class FreezeConfig:
    # Freeze the vision backbone (policy.vision).
    vision: bool = False
    # Freeze the vision-to-LLM projector (policy.projector).
    projector: bool = False
    # Freeze the LLM (policy.llm); with LoRA the LLM's base weights are frozen regardless.
    llm: bool = False
    # Freeze the learnable action queries (policy.action_queries).
    action_queries: bool = False
    # Freeze the action head (policy.action_head); only useful for probing experiments.
    action_head: bool = False


def apply_freeze(policy: nn.Module, cfg: FreezeConfig) -> list[str]:
    """Turn off gradients of the components named in `cfg`; returns the frozen names (for the log)."""
    frozen = [name for name in COMPONENTS if getattr(cfg, name)]
    for name in frozen:
        getattr(policy, name).requires_grad_(False)
    return frozen


def train_mode(model: nn.Module) -> nn.Module:
    """`model.train()`, except that BatchNorm layers whose parameters are frozen stay in eval mode.

    A frozen component must not change: in train mode BatchNorm would still overwrite its running
    statistics with every batch's (detectron2's FrozenBatchNorm semantics; the vision tower of the
    `small-pretrained` preset is a BatchNorm CNN). Dropout is left in train mode, as PEFT does."""
    model.train()
    for module in model.modules():
        if (
            isinstance(module, nn.modules.batchnorm._BatchNorm)
            and module.affine
            and not any(p.requires_grad for p in module.parameters(recurse=False))
        ):
            module.eval()
    return model


def apply_lora(policy: nn.Module, cfg: LoraConfig) -> list[str]:
    """Inject rank-`cfg.rank` LoRA adapters into each of `cfg.components`; within those components
    only the adapters train. Components without adapters keep their `requires_grad` (freeze them with
    FreezeConfig). Returns the targets used, as "component:module"."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    used = []
    for name in cfg.components:
        component = getattr(policy, name)
        targets = _lora_targets(policy, name, component, cfg.target_modules)
        peft_cfg = PeftLoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets)
        try:
            inject_adapter_in_model(peft_cfg, component)
        except ValueError as err:  # PEFT: "Target modules {...} not found in the base model"
            raise CraftVLAError(f"lora.target_modules={targets} in policy.{name}: {err}") from None
        for param_name, param in component.named_parameters():
            param.requires_grad_(is_lora_param(param_name))
        used += [f"{name}:{t}" for t in targets]
    return used


def _lora_targets(policy: nn.Module, name: str, component: nn.Module, wanted: Optional[list[str]]) -> list[str]:
    """Module names to adapt in one component: `wanted`, every Linear's name for all-linear (PEFT's own
    all-linear needs a transformers model; these components have no output layer to spare)."""
    if wanted == [ALL_LINEAR] or (wanted is None and name != "llm"):
        return sorted({n.rsplit(".", 1)[-1] for n, m in component.named_modules() if isinstance(m, nn.Linear)})
    return list(wanted or policy.lora_target_modules())


def is_lora_param(name: str) -> bool:
    """True for PEFT LoRA adapter tensors (lora_A / lora_B / magnitude vectors)."""
    return "lora_" in name


def lora_layers(model: nn.Module) -> Iterator[nn.Module]:
    """The PEFT tuner layers inside `model` (empty without LoRA)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return (m for m in model.modules() if isinstance(m, BaseTunerLayer))


def has_lora(model: nn.Module) -> bool:
    """Whether `apply_lora` has injected adapters into `model`."""
    return next(lora_layers(model), None) is not None


@contextlib.contextmanager
def lora_disabled(model: nn.Module) -> Iterator[None]:
    """Run `model` as its base weights (adapters bypassed), e.g. for CRaFT's anchor features."""
    layers = list(lora_layers(model))
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def merged_copy(policy: nn.Module) -> nn.Module:
    """A deep copy of `policy` with every LoRA adapter merged into its base Linear and removed.

    The original keeps its unmerged adapters (merging in place and unmerging again would change
    the weights by rounding and break exact resume).
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    merged = copy.deepcopy(policy)
    for name, module in list(merged.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(merged.get_submodule(parent_name) if parent_name else merged, child, module.get_base_layer())
    if has_lora(merged):
        raise CraftVLAError("could not merge every LoRA layer into its base layer")
    return merged

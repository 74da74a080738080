"""`craftvla prune train`: the two training stages of vision-token pruning, on a trained policy.

    craftvla prune train --init_from CKPT --dataset.root DIR --stage 1     # -> runs/prune/stage1
    craftvla prune train --dataset.root DIR --stage 2                      # reads runs/prune/stage1's last

Built on `craftvla train`'s loop, with its run flags (RunConfig: data, Accelerate, checkpoints,
resume, metrics, plots); only the new parts train, the policy itself stays frozen.
- Stage 1: the token merger, with the task loss + `merge_sparsity_weight` x merge sparsity.
- Stage 2: the pruner heads, with the task loss under straight-through soft masks (temperature
  annealed `temperature_start` -> `temperature_end` over the run) + an objective against the
  policy's states without selection (merged as stage 1 left it; fully unpruned with `train_merger`),
  on the instruction and action-query tokens at the layer after each pruning point: `distill` (MSE;
  the default), `adversarial` (a discriminator, trained alternately) or `task` (none).
Three optimizers, each with its own LR: merger (`merger_lr`) and pruners (`pruner_lr`) as parameter
groups of the loop's AdamW (AdamW is per-parameter: a group is an optimizer), and the
discriminator's own AdamW (`disc_lr`), stepped after the pruners' step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from craftvla.cli.parsing import number_list, parse_config
from craftvla.config import LEARNED_MERGERS, MERGERS, SCORERS, VISION_MERGERS, PruningConfig
from craftvla.errors import ConfigError, require
from craftvla.prune.discriminator import (
    Discriminator,
    adversarial_loss,
    discriminator_loss,
    distillation_loss,
    shared_mask,
    shared_tokens,
)
from craftvla.prune.gumbel import SCHEDULES, temperature_at
from craftvla.train.config import OptimConfig, RunConfig, TrainConfig

log = logging.getLogger("craftvla.prune")
OBJECTIVES = ("adversarial", "distill", "task")
LEARNED_SCORERS = ("attention", "mlp")


@dataclass
class PruneTrainConfig(RunConfig):
    """`craftvla prune train`: a run of the training loop (RunConfig's fields: --init_from the
    policy to prune, --dataset.root, --steps, --log.*, ...) and what the stage trains."""

    # 1 = train the merger; 2 = train the pruner heads.
    stage: int = 1
    # Merging inside the vision towers (one merge per policy: not with a merger before the LLM): the
    # fraction of each image's patches left; None = the checkpoint's.
    vision_merge_ratio: Optional[float] = None
    # The fraction of the towers' blocks that run before that pooling; None = the checkpoint's.
    vision_merge_depth: Optional[float] = None
    # How the towers merge: pool, tome, learned_window, learned_tome or learned_v2 (stage 1 trains the learned ones;
    # with --vision_merge_ratio they replace the merger before the LLM); None = the checkpoint's.
    vision_merger: Optional[str] = None
    # Merger: learned, learned_v2 (instruction-aware), learned_window or learned_tome (weights within pool's
    # windows or ToMe's sets); None = learned_v2 in stage 1, the checkpoint's in stage 2.
    merger: Optional[str] = None
    # Fraction of the vision tokens the merger keeps; None = 0.5, or the checkpoint's.
    merge_ratio: Optional[float] = None
    # Pruner heads for stage 2: attention (VisionPrunerHead) or mlp (VisionPrunerHeadSimple); None = attention.
    scorer: Optional[str] = None
    # LLM layers after which tokens are selected, comma-separated; None = a quarter and half way (1,2 of 4).
    layers: Optional[str] = None
    # Kept fraction of the LLM's input vision tokens after each selection, comma-separated; None = 0.5,0.25.
    keep: Optional[str] = None
    # Hidden width of the learned merger and heads.
    hidden_dim: int = 64
    # Stage 2's objective besides the task loss: distill (MSE to the unselected states), adversarial (a
    # discriminator; the design note's choice) or task (none). distill is the default: adversarial never
    # beat it (pruning benchmark ablations: tiny-256 held-out L1 0.1363 vs 0.1362; the generalist at b = 0.25:
    # 0.98 vs 0.98 success, L1 0.0846 vs 0.0847) and needs a second network and optimizer.
    objective: str = "distill"
    # Weight of the adversarial loss (non-saturating, -log D(pruned states)).
    adv_weight: float = 0.1
    # Weight of the feature-distillation loss (objective distill).
    distill_weight: float = 1.0
    # Weight of the merge-sparsity loss in stage 1 (normalised entropy of the merge weights).
    merge_sparsity_weight: float = 0.01
    # Stage 2: train the merger too (at merger_lr).
    train_merger: bool = False
    # Peak learning rate of the merger (stage 1, or stage 2 with train_merger).
    merger_lr: float = 1e-3
    # Peak learning rate of the pruner heads (stage 2).
    pruner_lr: float = 1e-3
    # Learning rate of the discriminator's own AdamW (stage 2, objective adversarial).
    disc_lr: float = 1e-4
    # Gumbel temperature at the first step; annealed to temperature_end over the run.
    temperature_start: float = 1.0
    # Gumbel temperature at the last step (<= temperature_start).
    temperature_end: float = 0.1
    # Temperature annealing: exponential, linear or cosine.
    temperature_schedule: str = "exponential"

    def __post_init__(self) -> None:
        require(self.stage in (1, 2), "stage", self.stage, "choose 1 (merger) or 2 (pruners)")
        require(
            self.merger is None or self.merger in LEARNED_MERGERS,
            "merger",
            self.merger,
            f"prune train learns one of {LEARNED_MERGERS} (baselines need no training: {MERGERS})",
        )
        require(
            self.vision_merger is None or self.vision_merger in VISION_MERGERS,
            "vision_merger",
            self.vision_merger,
            f"choose one of {VISION_MERGERS}",
        )
        require(
            self.scorer is None or self.scorer in LEARNED_SCORERS,
            "scorer",
            self.scorer,
            f"prune train learns one of {LEARNED_SCORERS} (baselines need no training: {SCORERS})",
        )
        require(self.objective in OBJECTIVES, "objective", self.objective, f"choose one of {OBJECTIVES}")
        require(
            self.temperature_schedule in SCHEDULES,
            "temperature_schedule",
            self.temperature_schedule,
            f"choose one of {SCHEDULES}",
        )
        require(
            0 < self.temperature_end <= self.temperature_start,
            "temperature_end",
            self.temperature_end,
            "must be in (0, temperature_start]",
        )
        for name in ("merger_lr", "pruner_lr", "disc_lr"):
            require(getattr(self, name) > 0, name, getattr(self, name), "must be > 0")
        for name in ("adv_weight", "distill_weight", "merge_sparsity_weight"):
            require(getattr(self, name) >= 0, name, getattr(self, name), "must be >= 0")
        super().__post_init__()
        if self.init_from is None:
            require(self.stage == 2, "init_from", None, "stage 1 needs --init_from (a trained policy)")
            self.init_from = str(Path("runs/prune/stage1/checkpoints/last"))
        if self.output_dir is None:
            self.output_dir = f"runs/prune/stage{self.stage}"


def resolve_pruning(cfg: PruneTrainConfig, current: PruningConfig) -> PruningConfig:
    """The pruning config to train: the checkpoint's, with this stage's parts and the flags. Stage 1
    trains a learned merger before the LLM, or (--vision_merger learned_*) inside the towers."""
    vision_ratio = cfg.vision_merge_ratio or current.vision_merge_ratio
    vision_depth = current.vision_merge_depth if cfg.vision_merge_depth is None else cfg.vision_merge_depth
    vision_merger = cfg.vision_merger or current.vision_merger
    in_towers = vision_ratio < 1.0
    fallback = "learned_v2" if cfg.stage == 1 and not in_towers else "none"
    merger = cfg.merger or (current.merger if current.merger != "none" else fallback)
    ratio = cfg.merge_ratio or (current.merge_ratio if current.merger != "none" else 0.5)
    scorer = current.scorer if cfg.stage == 1 else (cfg.scorer or "attention")
    learned_towers = in_towers and vision_merger in LEARNED_MERGERS
    if cfg.stage == 1 and merger not in LEARNED_MERGERS and not learned_towers:
        raise ConfigError(
            f"stage 1 trains a learned merger; the checkpoint has merger={merger!r} and vision_merger="
            f"{vision_merger!r} (use --merger {LEARNED_MERGERS[1]}, or --vision_merge_ratio with "
            "--vision_merger learned_window, learned_tome or learned_v2)"
        )
    layers = number_list(cfg.layers, "layers", int) or (list(current.layers) if cfg.stage == 1 else [])
    keep = number_list(cfg.keep, "keep") or (list(current.keep) if cfg.stage == 1 else [])
    return PruningConfig(
        vision_merge_ratio=vision_ratio,
        vision_merge_depth=vision_depth,
        vision_merger=vision_merger,
        merger=merger,
        merge_ratio=ratio,
        scorer=scorer,
        layers=layers,
        keep=keep,
        hidden_dim=cfg.hidden_dim,
    )


def prepare_policy(cfg: PruneTrainConfig):
    """The loop's PreparePolicy: add the pruning parts, freeze everything else, per-part LRs."""
    from craftvla.prune.module import apply_pruning

    def prepare(policy) -> dict[str, float]:
        apply_pruning(policy, resolve_pruning(cfg, policy.config.pruning))
        policy.requires_grad_(False)
        parts = policy.pruning
        if cfg.stage == 1 or cfg.train_merger:
            parts.learned_merge.requires_grad_(True)
        if cfg.stage == 2:
            parts.pruner.requires_grad_(True)
        log.info(
            "pruning %s; training %s",
            policy.config.pruning,
            "merger" if cfg.stage == 1 else "pruners" + (" + merger" if cfg.train_merger else ""),
        )
        return {
            "pruning.merger.": cfg.merger_lr,
            "pruning.tower_pool.": cfg.merger_lr,
            "pruning.pruner.": cfg.pruner_lr,
        }

    return prepare


def merge_sparsity_loss(weight: float):
    """Stage 1's auxiliary loss (registered with the policy): weight x the merger's merge sparsity
    (its unweighted value is logged as prune/merge_sparsity)."""

    def loss(context, batch) -> tuple[torch.Tensor, dict]:
        return weight * context.pruning["merge_sparsity"], {}

    return loss


class StagePlugin:
    """Stage 2's gradient plug-in for the loop: soft-masked forward with annealed temperature, the
    objective against the unpruned states, and the discriminator's alternating step."""

    def __init__(self, policy, cfg: PruneTrainConfig, accelerator):
        self.cfg, self.accelerator, self.step = cfg, accelerator, 0
        self.layers = [layer + 1 for layer in policy.pruning.pruner.schedule]  # first states after each selection
        self.disc, self.disc_opt = None, None
        if cfg.objective == "adversarial":
            self.disc = Discriminator(policy.llm.hidden_size, len(self.layers)).to(accelerator.device)
            from craftvla.train.optim import param_groups

            # betas (0.5, 0.999): the usual choice for GAN discriminators (DCGAN)
            self.disc_opt = torch.optim.AdamW(param_groups(self.disc, 0.01), lr=cfg.disc_lr, betas=(0.5, 0.999))
        self.pending: list[tuple] = []
        # The reference the objective compares against: the policy as stage 2 found it, i.e. merged
        # but unselected (a frozen merger is not the pruners' to undo), or fully unpruned when the
        # merger trains too.
        self.reference_off = ("vision", "merger", "pruner") if cfg.train_merger else ("pruner",)

    def temperature(self) -> float:
        cfg = self.cfg
        return temperature_at(
            self.step, cfg.steps, cfg.temperature_start, cfg.temperature_end, cfg.temperature_schedule
        )

    def backward(self, policy, batch: dict, scale: float) -> dict:
        tau = self.temperature()
        policy.pruning.set_soft(True, tau)
        with torch.no_grad(), policy.pruning.disabled(self.reference_off):
            reference = policy.encode(batch)
        out = policy.compute_loss(batch)
        real = [shared_tokens(reference, layer) for layer in self.layers]
        fake = [shared_tokens(out.context, layer) for layer in self.layers]
        masks = [shared_mask(out.context, layer) for layer in self.layers]
        loss, metrics = out.loss, {**out.metrics, "task_loss": out.loss.detach(), "temperature": tau}
        if self.cfg.objective == "adversarial":
            adv = adversarial_loss(self.disc, fake, masks)
            loss, metrics["adv_loss"] = loss + self.cfg.adv_weight * adv, adv.detach()
            self.pending.append((real, [f.detach() for f in fake], masks))
        elif self.cfg.objective == "distill":
            distill = distillation_loss(real, fake, masks)
            loss, metrics["distill_loss"] = loss + self.cfg.distill_weight * distill, distill.detach()
        (loss * scale).backward()
        metrics["loss"] = loss.detach()
        return metrics

    def before_optimizer_step(self, params: list) -> dict:
        _average_grads(params, self.accelerator)
        return {}

    def after_optimizer_step(self) -> dict:
        self.step += 1
        if self.disc is None:
            return {}
        self.disc_opt.zero_grad(set_to_none=True)
        losses = [discriminator_loss(self.disc, real, fake, masks) for real, fake, masks in self.pending]
        real_loss = sum(r for r, _ in losses) / len(losses)
        fake_loss = sum(f for _, f in losses) / len(losses)
        (real_loss + fake_loss).backward()
        _average_grads(list(self.disc.parameters()), self.accelerator)
        self.disc_opt.step()
        self.pending.clear()
        return {"disc/real_loss": real_loss.detach(), "disc/fake_loss": fake_loss.detach()}

    def state_dict(self) -> dict:
        state = {"step": self.step}
        if self.disc is not None:
            state.update(disc=self.disc.state_dict(), disc_opt=self.disc_opt.state_dict())
        return state

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        if self.disc is not None:
            self.disc.load_state_dict(state["disc"])
            self.disc_opt.load_state_dict(state["disc_opt"])


def _average_grads(params: list, accelerator) -> None:
    """Average gradients over processes (the plug-in path runs backward outside DDP)."""
    if accelerator.num_processes == 1:
        return
    for p in params:
        if p.grad is not None:
            p.grad = accelerator.reduce(p.grad, reduction="mean")


def train_config(cfg: PruneTrainConfig) -> TrainConfig:
    """The `craftvla train` config the loop runs with: this run, the checkpoint's policy, the stage's LR."""
    from craftvla.model.checkpoints import read_policy_config

    policy = read_policy_config(Path(cfg.init_from) / "config.json")  # chunk size etc. follow the checkpoint
    return TrainConfig(
        **cfg.run_fields(), policy=policy, optim=OptimConfig(lr=cfg.pruner_lr if cfg.stage == 2 else cfg.merger_lr)
    )


def run(cfg: PruneTrainConfig):
    from craftvla.train.loop import train

    if not Path(cfg.init_from).is_dir():
        raise ConfigError(
            f"init_from={cfg.init_from!r}: no such directory"
            + (" (run stage 1 first, or pass --init_from)" if cfg.stage == 2 else "")
        )
    if not cfg.dataset.paths():
        raise ConfigError("dataset.root: required (a LeRobot v3 dataset directory)")
    plugin = (lambda policy, _cfg, accelerator: StagePlugin(policy, cfg, accelerator)) if cfg.stage == 2 else None
    aux = {"merge_sparsity": merge_sparsity_loss(cfg.merge_sparsity_weight)} if cfg.stage == 1 else None
    return train(train_config(cfg), plugin, aux, prepare_policy(cfg))


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = parse_config(PruneTrainConfig, args=argv, prog="craftvla prune train")
    result = run(cfg)
    if result.accelerator.is_main_process:
        print(f"stage {cfg.stage} written to {cfg.output_dir} (checkpoints/last is a pruned policy)")
    result.accelerator.end_training()
    return 0

"""`craftvla train` configuration: one dataclass per concern, nested into `TrainConfig`.

Every field is overridable from the command line (`--optim.lr 1e-4`, `--lora.rank 8`,
`--policy.llm.num_layers 2`) or a YAML file (`--config f.yaml`); draccus does the parsing.
The policy section starts from a named preset (`--preset tiny`) or, with `--init_from`, from the
checkpoint's config.json, so a flag or YAML key overrides that rather than the dataclass default.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import draccus
import yaml

from craftvla.cli.parsing import (
    bare_bools,
    deep_merge,
    explicit_fields,
    flatten,
    number_list,
    parse_config,
    prescan,
    read_yaml,
)
from craftvla.config import HeadConfig, VLAConfig
from craftvla.craft.config import CraftConfig
from craftvla.errors import ConfigError, require
from craftvla.model.peft import FreezeConfig, LoraConfig

OPTIMIZERS = ("adamw", "adamw_8bit")
STRATEGIES = ("ddp", "fsdp")
PRECISIONS = ("auto", "no", "bf16")


@dataclass
class DatasetConfig:
    # LeRobot v3 dataset directory; None = fake batches from the policy config (smoke runs only).
    root: Optional[str] = None
    # Several LeRobot datasets mixed into one stream, comma-separated (instead of root), e.g.
    # "new_task,old_tasks" with --dataset.weights 0.98,0.02 for a 2 percent replay of old data.
    roots: Optional[str] = None
    # Mixing weights of --dataset.roots, comma-separated (normalised to sum to 1); None = in
    # proportion to the datasets' frame counts (a plain concatenation).
    weights: Optional[str] = None
    # DataLoader worker processes (0 = load in the training process).
    num_workers: int = 0
    # Decoded-video cache per worker, MiB (whole episodes are decoded once and reused).
    video_cache_mb: float = 512.0

    def __post_init__(self) -> None:
        require(self.num_workers >= 0, "dataset.num_workers", self.num_workers, "must be >= 0")
        require(
            not (self.root and self.roots),
            "dataset.roots",
            self.roots,
            f"conflicts with dataset.root={self.root!r} (give one of the two)",
        )
        require(
            self.weights is None or self.roots is not None,
            "dataset.weights",
            self.weights,
            "needs --dataset.roots (the datasets it weights)",
        )
        if self.weights is not None:
            weights = number_list(self.weights, "dataset.weights")
            require(
                len(weights) == len(self.paths()),
                "dataset.weights",
                self.weights,
                f"needs one weight per dataset in --dataset.roots ({len(self.paths())})",
            )
            require(
                all(w >= 0 for w in weights) and sum(weights) > 0,
                "dataset.weights",
                self.weights,
                "must be >= 0 and not all zero",
            )

    def paths(self) -> list[str]:
        """The dataset directories: [root], the roots, or [] (fake batches)."""
        if self.roots:
            return [p.strip() for p in self.roots.split(",") if p.strip()]
        return [self.root] if self.root else []

    def weight_list(self) -> Optional[list[float]]:
        """The mixing weights as floats, None when unset."""
        return None if self.weights is None else number_list(self.weights, "dataset.weights")


@dataclass
class OptimConfig:
    # "adamw" (torch) or "adamw_8bit" (bitsandbytes; needs CUDA).
    name: str = "adamw"
    # Peak learning rate (reached after the warm-up).
    lr: float = 3e-4
    # Decoupled weight decay, applied to matrices only (not to biases, norms, gates).
    weight_decay: float = 0.01
    # Adam moment coefficients.
    betas: tuple[float, float] = (0.9, 0.95)
    # Adam denominator epsilon.
    eps: float = 1e-8
    # Global gradient-norm clip; 0 = no clipping (the norm is still logged).
    grad_clip_norm: float = 1.0

    def __post_init__(self) -> None:
        require(self.name in OPTIMIZERS, "optim.name", self.name, f"choose one of {OPTIMIZERS}")
        require(self.lr > 0, "optim.lr", self.lr, "must be > 0")
        require(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, "must be >= 0")
        require(self.grad_clip_norm >= 0, "optim.grad_clip_norm", self.grad_clip_norm, "must be >= 0")


@dataclass
class ScheduleConfig:
    # Linear warm-up from 0 to optim.lr over this many optimizer steps (once, not per step);
    # None = 1/20 of the run's steps.
    warmup_steps: Optional[int] = None
    # Cosine decay ends at min_lr_ratio * optim.lr at the last step.
    min_lr_ratio: float = 0.1

    def __post_init__(self) -> None:
        require(
            self.warmup_steps is None or self.warmup_steps >= 0,
            "schedule.warmup_steps",
            self.warmup_steps,
            "must be >= 0",
        )
        require(0 <= self.min_lr_ratio <= 1, "schedule.min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")


@dataclass
class CheckpointConfig:
    # Save every this many optimizer steps (and always at the end); 0 = only at the end.
    save_freq: int = 500
    # Numbered checkpoints to keep (the newest K; `last` always points at the newest).
    keep_last: int = 2

    def __post_init__(self) -> None:
        require(self.save_freq >= 0, "checkpoint.save_freq", self.save_freq, "must be >= 0")
        require(self.keep_last >= 1, "checkpoint.keep_last", self.keep_last, "must be >= 1")


TRACKERS = ("tensorboard", "wandb")


@dataclass
class LogConfig:
    # Write one metrics.jsonl line (averaged over the interval) every this many steps.
    log_freq: int = 10
    # Show a tqdm progress bar on the main process; false = one log line per metrics line instead.
    progress: bool = True
    # Write PNG training curves (plots/): all of them at every checkpoint and at the end, and
    # overview.png at most every plot_interval_s seconds as metrics lines are written.
    plots: bool = True
    # Seconds between refreshes of plots/overview.png while training (drawing it takes ~0.4 s).
    plot_interval_s: float = 30.0
    # Experiment trackers, comma-separated, through Accelerate's tracker API (main process only):
    # "tensorboard" (event files in OUTPUT_DIR/tensorboard/), "wandb" (`pip install wandb`; set
    # WANDB_MODE=offline to run without a network). Every metrics.jsonl value is logged.
    trackers: Optional[str] = None
    # The trackers' project name (W&B project; TensorBoard sub-directory).
    project: str = "craftvla"

    def __post_init__(self) -> None:
        require(self.log_freq >= 1, "log.log_freq", self.log_freq, "must be >= 1")
        require(self.plot_interval_s >= 0, "log.plot_interval_s", self.plot_interval_s, "must be >= 0")
        unknown = [t for t in self.tracker_list() if t not in TRACKERS]
        require(not unknown, "log.trackers", self.trackers, f"choose from {TRACKERS}, comma-separated")

    def tracker_list(self) -> list[str]:
        """--log.trackers as a list ([] when unset)."""
        return [t.strip() for t in (self.trackers or "").split(",") if t.strip()]


@dataclass
class PeriodicEvalConfig:
    # Run closed-loop simulator evaluation every this many steps (on a saved checkpoint); 0 = off.
    freq: int = 0
    # Meta-World tasks, comma-separated; None = the dataset's tasks as `craftvla eval` infers them.
    tasks: Optional[str] = None
    # Episodes per task for each periodic evaluation.
    episodes: int = 5
    # First seed of the evaluation episodes (choose seeds the demonstrations did not use).
    seed: int = 10_000

    def __post_init__(self) -> None:
        require(self.freq >= 0, "eval.freq", self.freq, "must be >= 0")
        require(self.episodes >= 1, "eval.episodes", self.episodes, "must be >= 1")


@dataclass
class AccelConfig:
    # Multi-process strategy under `accelerate launch` / `torchrun`: "ddp" or "fsdp".
    strategy: str = "ddp"
    # "auto" = bf16 autocast on CUDA, fp32 on CPU; "no" = fp32 everywhere; "bf16" = force bf16.
    mixed_precision: str = "auto"
    # Wrap the policy with torch.compile (through Accelerate's dynamo plugin).
    compile: bool = False

    def __post_init__(self) -> None:
        require(self.strategy in STRATEGIES, "accel.strategy", self.strategy, f"choose one of {STRATEGIES}")
        require(
            self.mixed_precision in PRECISIONS,
            "accel.mixed_precision",
            self.mixed_precision,
            f"choose one of {PRECISIONS}",
        )


# Plug-in sections with an on-switch: section -> (switch field, an example value that turns it on).
# While the switch is off the section's other fields do nothing, so setting one is refused, never
# silently ignored.
SWITCHED_SECTIONS = {"craft": ("enabled", "true"), "lora": ("rank", "8"), "eval": ("freq", "500")}


def require_switched_on(section: str, cfg: Any, switch: tuple[str, str], explicit: Sequence[str] = ()) -> None:
    """Refuse the fields of `section` that are set (unlike their defaults, or named in `explicit`:
    flags given on the command line) while its switch field is off (false / 0)."""
    name, example = switch
    if getattr(cfg, name):
        return
    default = type(cfg)()
    changed = [f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(default, f.name)]
    changed += [field for field in explicit if field not in changed and field != name]
    if changed:
        flags = ", ".join(f"--{section}.{field}" for field in changed)
        raise ConfigError(
            f"{flags}: set while {section}.{name}={getattr(cfg, name)!r}, so it would do nothing; "
            f"turn the section on (--{section}.{name} {example}) or drop the flag"
        )


@dataclass
class RunConfig:
    """What every run of the training loop is given, whatever it trains (`craftvla train`, `craftvla
    prune train`): where it starts, its data and run directory, its length, checkpoints, logs, launch."""

    # A saved policy directory (save_pretrained layout) to start from. `craftvla train` fine-tunes
    # it: its config.json is then the policy (chunk size, head, layers, ...) and a --policy.* flag
    # that would change it is refused; what fine-tuning may change: --freeze.*, --lora.*,
    # --init_stats, --policy.action_clip and, for flow matching, --policy.head.num_steps. None = a
    # fresh policy from `policy`. (`craftvla prune train` adds its pruning parts to this policy.)
    init_from: Optional[str] = None
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    # Run directory: metrics.jsonl, checkpoints/, plots/, train_config.yaml; None = runs/train
    # (`craftvla prune train`: runs/prune/stage<N>).
    output_dir: Optional[str] = None
    # Optimizer steps in the whole run (the LR schedule spans exactly this many).
    steps: int = 1000
    # Samples per optimizer step, summed over processes and micro-batches: DDP and accumulation
    # split it, so neither changes the optimisation (only memory and speed).
    batch_size: int = 32
    # Micro-batches per optimizer step on each process (gradient accumulation).
    grad_accum_steps: int = 1
    # Seed of initialisation, data order and every RNG (the run is reproducible on CPU).
    seed: int = 0
    # Continue from output_dir/checkpoints/last (same config; the data order continues exactly).
    # `--resume` alone means true, as does any boolean flag given without a value.
    resume: bool = False
    # End this invocation after this step (a job time limit); the schedule still spans `steps`.
    stop_at_step: Optional[int] = None
    # End this invocation (with a checkpoint) once this many minutes of training have passed (checked
    # every step in one process, every log.log_freq steps across several).
    max_minutes: Optional[float] = None
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    accel: AccelConfig = field(default_factory=AccelConfig)

    def __post_init__(self) -> None:
        require(self.steps >= 1, "steps", self.steps, "must be >= 1")
        require(self.batch_size >= 1, "batch_size", self.batch_size, "must be >= 1")
        require(self.grad_accum_steps >= 1, "grad_accum_steps", self.grad_accum_steps, "must be >= 1")
        require(
            self.batch_size % self.grad_accum_steps == 0,
            "batch_size",
            self.batch_size,
            f"must be divisible by grad_accum_steps={self.grad_accum_steps}",
        )
        require(
            self.stop_at_step is None or 1 <= self.stop_at_step <= self.steps,
            "stop_at_step",
            self.stop_at_step,
            f"must be in [1, steps={self.steps}]",
        )

    def micro_batch_size(self, world_size: int) -> int:
        """Samples per forward on one process: batch_size / (world_size * grad_accum_steps)."""
        split = world_size * self.grad_accum_steps
        if self.batch_size % split:
            raise ConfigError(
                f"batch_size={self.batch_size}: must be divisible by processes ({world_size}) "
                f"x grad_accum_steps ({self.grad_accum_steps}) = {split}"
            )
        return self.batch_size // split

    def run_fields(self) -> dict[str, Any]:
        """This config's RunConfig fields by name (what a verb built on the loop hands it)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(RunConfig)}


@dataclass
class TrainConfig(RunConfig):
    """Everything `craftvla train` needs: the run (RunConfig's fields) and the policy, optimisation
    and plug-ins it trains."""

    # Policy preset the `policy` section starts from (craftvla.config.PRESETS); None = "tiny", or,
    # with --init_from, no preset: the policy is the checkpoint's.
    preset: Optional[str] = None
    # The policy; its camera/state/action sizes are replaced by the dataset's metadata.
    policy: VLAConfig = field(default_factory=lambda: VLAConfig.preset("tiny"))
    # With init_from: normalisation statistics to train with. "keep" = the checkpoint's (the policy's
    # learned action mapping stays valid), "dataset" = recompute from --dataset.root, "aggregate" =
    # both combined by frame counts. The choice is logged and saved with the checkpoint.
    init_stats: str = "keep"
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    eval: PeriodicEvalConfig = field(default_factory=PeriodicEvalConfig)
    # CRaFT (--craft.enabled true) and the retention baselines (--craft.mode); off = plain fine-tuning.
    craft: CraftConfig = field(default_factory=CraftConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.output_dir is None:
            self.output_dir = "runs/train"
        for section, switch in SWITCHED_SECTIONS.items():
            require_switched_on(section, getattr(self, section), switch)
        require(
            not (self.craft.enabled and self.accel.strategy == "fsdp"),
            "accel.strategy",
            self.accel.strategy,
            "CRaFT's gradient surgery needs whole (unsharded) gradients: use ddp with craft.enabled",
        )
        require(
            self.init_stats in ("keep", "dataset", "aggregate"),
            "init_stats",
            self.init_stats,
            "choose keep, dataset or aggregate",
        )
        require(
            self.warmup_steps() < self.steps,
            "schedule.warmup_steps",
            self.schedule.warmup_steps,
            f"must be < steps={self.steps}",
        )

    def warmup_steps(self) -> int:
        """schedule.warmup_steps, or 5% of `steps` when it is None (kept None so presets stay relative)."""
        return self.steps // 20 if self.schedule.warmup_steps is None else self.schedule.warmup_steps


def parse_train_config(argv: list[str]) -> TrainConfig:
    """TrainConfig from `--preset` (or `--init_from`'s config.json), an optional `--config f.yaml`,
    then command-line overrides.

    The preset's policy (or the checkpoint's) becomes the base, the YAML file is merged over it, and
    draccus applies the flags last, so each layer overrides the one before; unknown keys raise
    ConfigError. Flags that would change an `--init_from` policy, or that set a section whose
    on-switch is off (SWITCHED_SECTIONS), are refused.
    """
    argv = list(argv)
    config_path = prescan(argv, "--config")
    if config_path is not None:
        i = next(i for i, a in enumerate(argv) if a.startswith("--config"))
        del argv[i : i + (1 if "=" in argv[i] else 2)]
    user = read_yaml(config_path) if config_path else {}
    preset = prescan(argv, "--preset") or user.get("preset")
    init_from = prescan(argv, "--init_from") or user.get("init_from")
    start = init_policy_config(init_from, preset) if init_from else VLAConfig.preset(preset or "tiny")
    base = draccus.encode(TrainConfig(preset=None if init_from else preset or "tiny", policy=start))
    merged = deep_merge(base, user)
    head_type = prescan(argv, "--policy.head.type")
    if head_type is not None and head_type != merged["policy"]["head"].get("type"):
        # Another head type: keep the preset's head fields that the new type also has (width, heads, ...).
        try:
            valid = {f.name for f in dataclasses.fields(HeadConfig.get_choice_class(head_type))}
        except Exception:  # an unknown type: draccus names the valid ones when it parses the flag
            valid = {f.name for f in dataclasses.fields(HeadConfig)}
        merged["policy"]["head"] = {k: v for k, v in merged["policy"]["head"].items() if k in valid}
    argv = bare_bools(argv, merged)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(merged, f)
    origin = f"--init_from {init_from}" if init_from else f"preset {preset or 'tiny'!r}"
    source = origin + (f", {config_path}" if config_path else "") + " and the command line"
    try:
        cfg = parse_config(TrainConfig, config_path=f.name, args=argv, prog="craftvla train", source=source)
    finally:
        os.unlink(f.name)
    explicit = explicit_fields(argv)
    if init_from:
        policy_keys = explicit.get("policy", []) + list(flatten(user.get("policy") or {}))
        check_init_policy(cfg.policy, start, init_from, policy_keys)
    for section, switch in SWITCHED_SECTIONS.items():
        require_switched_on(section, getattr(cfg, section), switch, explicit.get(section, []))
    return cfg


# ----- fine-tuning a checkpoint (--init_from) ------------------------------------------------------

# Policy fields that fine-tuning may change: they alter neither the weights' shapes nor their meaning.
FINE_TUNE_POLICY_FIELDS = ("action_clip", "head.num_steps")
# Fields the dataset sets (checked against the checkpoint when the data is opened), and the name tag.
_DATASET_FIELDS = ("camera_keys", "state_dim", "action_dim", "preset_name")


def init_policy_config(init_from: str, preset: Optional[str] = None) -> VLAConfig:
    """The policy config of the checkpoint that `--init_from` names (its config.json), or of a
    VLA-Adapter release directory (model/released.py)."""
    from pathlib import Path

    from craftvla.model.checkpoints import read_policy_config
    from craftvla.model.released import VLA_ADAPTER, release_config, release_kind

    require(
        preset is None,
        "preset",
        preset,
        f"conflicts with init_from={init_from!r}: the policy is the checkpoint's (drop --preset)",
    )
    require(Path(init_from).is_dir(), "init_from", init_from, "no such checkpoint directory")
    if release_kind(Path(init_from)) == VLA_ADAPTER:
        return release_config(Path(init_from))
    return read_policy_config(Path(init_from) / "config.json")


def check_init_policy(
    policy: VLAConfig, start: VLAConfig, init_from: str, keys: Optional[Sequence[str]] = None
) -> None:
    """Refuse a policy field that differs from the `init_from` checkpoint's (`start`) and that
    fine-tuning cannot change. `keys`: the dotted fields the user set (flags, YAML); None = all but
    the dataset's."""
    have, want = flatten(start.to_dict()), flatten(policy.to_dict())
    keys = [k for k in want if k not in _DATASET_FIELDS] if keys is None else keys
    differ = [
        k
        for key in keys
        if key not in FINE_TUNE_POLICY_FIELDS
        for k in sorted({*have, *want})
        if (k == key or k.startswith(key + ".")) and have.get(k, "(absent)") != want.get(k, "(absent)")
    ]
    if differ:
        k = "head.type" if "head.type" in differ else differ[0]
        raise ConfigError(
            f"--policy.{k}={want.get(k, '(absent)')!r}: --init_from {init_from} fixes the policy's architecture "
            f"(its config.json has {k}={have.get(k, '(absent)')!r}); drop the flag, or train a fresh policy "
            "without --init_from. Fine-tuning may change --freeze.*, --lora.*, --init_stats, "
            + ", ".join(f"--policy.{f}" for f in FINE_TUNE_POLICY_FIELDS)
        )


def apply_fine_tune_fields(loaded: VLAConfig, wanted: VLAConfig) -> None:
    """Set FINE_TUNE_POLICY_FIELDS of a loaded checkpoint's config (in place: its processor and head
    read the same objects) to the run's values."""
    for key in FINE_TUNE_POLICY_FIELDS:
        *parents, name = key.split(".")
        have, want = loaded, wanted
        for part in parents:
            have, want = getattr(have, part), getattr(want, part)
        if hasattr(have, name) and hasattr(want, name):
            setattr(have, name, getattr(want, name))


def dump_train_config(cfg: TrainConfig, path: str) -> None:
    """Write the resolved config as YAML (atomically), e.g. RUN/train_config.yaml."""
    from craftvla.files import write_text_atomic

    write_text_atomic(path, yaml.safe_dump(draccus.encode(cfg), sort_keys=False))


def flat_train_config(cfg: TrainConfig) -> dict[str, Any]:
    """The resolved config as {"optim.lr": 3e-4, ...} (the trackers' hyper-parameters)."""
    return flatten(draccus.encode(cfg))


def replace(cfg: TrainConfig, **changes: Any) -> TrainConfig:
    """dataclasses.replace that re-runs validation (a convenience for tests and the demo)."""
    return dataclasses.replace(cfg, **changes)

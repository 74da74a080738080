"""`craftvla train`: the training loop — `train_step` and a short `main`.

    craftvla train --preset tiny --dataset.root DIR --output_dir RUN --steps 2000
    accelerate launch --multi_gpu --num_processes 2 -m craftvla train ...   (DDP: NCCL on GPUs, gloo on CPU)
    torchrun --nproc_per_node 2 -m craftvla train ...                      (the same)

On a machine without GPUs, `accelerate launch --num_processes 2` without `--multi_gpu` starts ONE
process (Accelerate's simple launcher); the "processes:" line at start-up says what ran.

Writes RUN/train_config.yaml, RUN/metrics.jsonl, RUN/checkpoints/<step>/ + last (see state.py)
and RUN/plots/*.png. Plug-ins attach here: a *gradient plug-in* (CRaFT and its retention baselines,
L2-to-init included: --craft.mode) takes over the backward pass and the final gradient; *auxiliary
losses* (e.g. `craftvla prune train`'s merge sparsity) add a term to the policy's own loss.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Protocol, Sequence

import torch
from torch import nn

from craftvla.data.loading import StepSampler, data_loader, fake_micro_batches, to_device
from craftvla.model.peft import train_mode
from craftvla.train import state as ckpt
from craftvla.train.config import (
    TrainConfig,
    apply_fine_tune_fields,
    check_init_policy,
    dump_train_config,
    flat_train_config,
    init_policy_config,
    parse_train_config,
)
from craftvla.train.metrics import MetricsLogger, start_trackers, tracker_settings, truncate_metrics
from craftvla.train.stop import EXIT_CODES, StopSignals, stop_reason

if TYPE_CHECKING:
    from craftvla.model.policy import AuxLoss

log = logging.getLogger("craftvla.train")


class GradPlugin(Protocol):
    """Takes over backward and the final gradient (CRaFT). See `train_step` for the call order.

    Optional: `log_freq` (the steps at which `after_optimizer_step` reports metrics; a metrics
    line is written then) and `flush_metrics()` (what is still pending, at the run's last step)."""

    def backward(self, model: nn.Module, batch: dict, scale: float) -> dict[str, float]: ...

    def before_optimizer_step(self, params: list[nn.Parameter]) -> Optional[dict[str, float]]: ...

    def after_optimizer_step(self) -> Optional[dict[str, float]]: ...


def train_step(
    model: nn.Module,
    micro_batches: Sequence[dict],
    optimizer,
    scheduler,
    accelerator,
    grad_clip_norm: float,
    grad_plugin: Optional[GradPlugin] = None,
) -> dict[str, Any]:
    """One optimizer step over the micro-batches of this process; returns averaged metrics
    (detached tensors or floats: nothing here waits for the device; the logger converts them when
    it writes a line). Auxiliary losses are part of the policy's own loss (`add_aux_loss`), so
    both paths below, and CRaFT's g_act, include them.

    Plain path: each micro-batch's loss (/ n) is backpropagated, with DDP's gradient all-reduce
    only on the last one (`no_sync` on the others), so accumulated gradients equal one big batch.
    Gradient plug-in path (CRaFT): `grad_plugin.backward` runs forward + backward on the unwrapped
    policy (no DDP hook fires), keeping g_act and g_ret apart over all micro-batches; then
    `before_optimizer_step` all-reduces them once, does the surgery on the rank-averaged sums and
    writes the final `.grad`; `after_optimizer_step` runs the dual update. Clipping and the
    optimizer see the final gradient either way.
    """
    n = len(micro_batches)
    policy = accelerator.unwrap_model(model)
    params = [p for p in policy.parameters() if p.requires_grad]
    totals: dict[str, Any] = {}
    for i, batch in enumerate(micro_batches):
        if grad_plugin is not None:
            with accelerator.autocast():  # what the wrapped model's forward would have applied
                metrics = grad_plugin.backward(policy, batch, scale=1.0 / n)
        else:
            with contextlib.nullcontext() if i == n - 1 else accelerator.no_sync(model):
                metrics = _plain_backward(model, batch, n, accelerator)
        for key, value in metrics.items():
            totals[key] = totals.get(key, 0.0) + value / n
    if grad_plugin is not None:
        totals.update(grad_plugin.before_optimizer_step(params) or {})
    norm = accelerator.clip_grad_norm_(params, grad_clip_norm if grad_clip_norm > 0 else math.inf)
    totals["grad_norm"] = norm.detach() if torch.is_tensor(norm) else norm
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    if grad_plugin is not None:
        totals.update(grad_plugin.after_optimizer_step() or {})
    return totals


def _plain_backward(model: nn.Module, batch: dict, n: int, accelerator) -> dict:
    """Forward through the (wrapped) model, backward loss / n."""
    loss, metrics = model(batch)
    accelerator.backward(loss / n)
    return {**metrics, "loss": loss.detach()}


# ----- wiring ---------------------------------------------------------------------------------------


@dataclass
class Run:
    """Everything `fit` needs, built once by `setup`; `policy` is the unwrapped model."""

    cfg: TrainConfig
    accelerator: Any
    policy: nn.Module
    model: nn.Module
    optimizer: Any
    scheduler: Any
    batches: Iterator[dict]
    run_dir: Path
    start_step: int = 0
    num_samples: Optional[int] = None  # dataset frames (None for fake batches)
    grad_plugin: Optional[GradPlugin] = None
    plugins: dict[str, ckpt.Stateful] = field(default_factory=dict)  # saved in training_state/
    mixture: Optional[Any] = None  # data.mixture.MixtureCounter of a --dataset.roots run
    step: int = 0  # the last step trained (set by fit)
    stopped_by: Optional[str] = None  # "SIGINT", "SIGTERM" or "max_minutes" when the run ended early


def make_accelerator(cfg: TrainConfig, find_unused_parameters: bool = False):
    """Device, precision and distribution in one place: DDP/FSDP from the launcher's environment
    (gloo on CPU, NCCL on CUDA), bf16 autocast on CUDA only unless configured otherwise."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, FullyShardedDataParallelPlugin, TorchDynamoPlugin

    precision = cfg.accel.mixed_precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() else "no"
    fsdp = FullyShardedDataParallelPlugin() if cfg.accel.strategy == "fsdp" else None
    dynamo = TorchDynamoPlugin(backend="inductor") if cfg.accel.compile else None
    ddp = DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)
    # cpu=True on CPU-only machines: without it Accelerate ignores torchrun's WORLD_SIZE there and
    # every process would silently train alone.
    trackers = tracker_settings(cfg.log.tracker_list(), Path(cfg.output_dir))
    return Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=precision,
        fsdp_plugin=fsdp,
        dynamo_plugin=dynamo,
        kwargs_handlers=[ddp],
        step_scheduler_with_optimizer=False,
        **trackers,
    )


def make_craft_plugin(policy: nn.Module, cfg: TrainConfig, accelerator, dataset=None) -> Optional[GradPlugin]:
    """CRaFT (or a retention baseline) when `--craft.enabled true`, else None (plain fine-tuning)."""
    if not cfg.craft.enabled:
        return None
    from craftvla.craft.plugin import build_craft_plugin

    return build_craft_plugin(
        policy,
        cfg.craft,
        seed=cfg.seed,
        log_freq=cfg.log.log_freq,
        micro_per_step=cfg.grad_accum_steps,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        num_workers=cfg.dataset.num_workers,
        task_dataset=dataset,
    )


def unused_trainable_parameters(policy: nn.Module) -> list[str]:
    """Trainable parameters that one forward/backward on a fake batch leaves without a gradient.

    DDP's reducer waits for every parameter's gradient: with unused ones (e.g. vision blocks after
    the feature layer) its last bucket is never all-reduced and ranks silently diverge, unless
    DDP is told to search for them (find_unused_parameters, a per-step cost we pay only then).
    """
    loss, _ = policy(policy.config.fake_batch(1))
    loss.backward()
    unused = [n for n, p in policy.named_parameters() if p.requires_grad and p.grad is None]
    policy.zero_grad(set_to_none=True)
    return unused


def build_policy(cfg: TrainConfig, dataset) -> nn.Module:
    """The policy to train: from `init_from` or fresh from `cfg.policy` sized by the dataset,
    then freezing and LoRA (imported only when enabled)."""
    from craftvla.model.peft import apply_freeze
    from craftvla.model.policy import VLAPolicy

    policy_cfg = cfg.policy
    if dataset is not None:
        m = dataset.meta
        policy_cfg = policy_cfg.for_dataset(camera_keys=m.camera_keys, state_dim=m.state_dim, action_dim=m.action_dim)
    policy = VLAPolicy.from_pretrained(cfg.init_from) if cfg.init_from else VLAPolicy(policy_cfg)
    if cfg.init_from:
        apply_fine_tune_fields(policy.config, cfg.policy)
    if cfg.init_from and dataset is not None:
        _check_compatible(policy.config, policy_cfg, cfg.init_from)
    if dataset is not None:
        policy.set_stats(*training_stats(policy, dataset, cfg))
        log.info("normalisation statistics: %s", policy.processor.stats_source)
        policy.processor.training_tasks = training_tasks(policy, dataset, cfg)
        dataset.transform = policy.processor.transform  # normalise + tokenise in the DataLoader workers
    frozen = apply_freeze(policy, cfg.freeze)
    if cfg.lora.rank > 0:
        from craftvla.model.peft import apply_lora

        apply_lora(policy, cfg.lora)
    trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    total = sum(p.numel() for p in policy.parameters())
    log.info(
        "policy: %.2fM parameters, %.2fM trainable; frozen: %s; LoRA rank %d",
        total / 1e6,
        trainable / 1e6,
        frozen or "none",
        cfg.lora.rank,
    )
    return policy


def _check_compatible(have, want, source: str) -> None:
    for name in ("camera_keys", "state_dim", "action_dim"):
        if getattr(have, name) != getattr(want, name):
            from craftvla.errors import ConfigError

            raise ConfigError(
                f"init_from={source!r}: {name}={getattr(have, name)!r} but the dataset needs {getattr(want, name)!r}"
            )


def training_tasks(policy: nn.Module, dataset, cfg: TrainConfig) -> Optional[list[str]]:
    """The instructions this run's policy will have been trained on: the dataset's (every source of
    a mixture) and, fine-tuning, the start's; None when the start's are unknown."""
    start = policy.processor.training_tasks if cfg.init_from else []
    if start is None:
        return None
    sources = getattr(dataset, "datasets", [dataset])  # a MixedDataset's sources, or the dataset
    return sorted({*start, *(task for source in sources for task in source.meta.tasks)})


def training_stats(policy: nn.Module, dataset, cfg: TrainConfig) -> tuple[dict, str]:
    """The normalisation statistics to train with, and where they came from.

    A fresh policy takes the dataset's. Fine-tuning (`--init_from`) keeps the initial checkpoint's
    by default (`--init_stats keep`): replacing them re-maps every action the policy learned.
    `dataset` recomputes them from the new data; `aggregate` combines old and new by frame counts
    (LeRobot's `aggregate_stats`: count-weighted mean and variance, min of mins, max of maxes)."""
    from craftvla.data.stats import aggregate

    new, where = dataset.stats, f"dataset {','.join(cfg.dataset.paths())}"
    old = policy.processor.stats if cfg.init_from else None
    if old is None or cfg.init_stats == "dataset":
        return new, where
    if cfg.init_stats == "keep":
        return old, f"kept from --init_from {cfg.init_from} ({policy.processor.stats_source})"
    merged = {
        key: aggregate([old[key], new[key]]) if key in old and key in new else (old.get(key) or new[key])
        for key in {*old, *new}
    }
    return merged, f"aggregate of --init_from {cfg.init_from} ({policy.processor.stats_source}) and {where}"


def open_dataset(cfg: TrainConfig):
    """The LeRobot dataset, a `MixedDataset` of several (--dataset.roots), or None for fake-batch
    smoke runs. Its transform is the policy's processor, set in build_policy."""
    paths = cfg.dataset.paths()
    if not paths:
        return None
    from craftvla.data import LeRobotDataset
    from craftvla.data.mixture import MixedDataset, source_names

    datasets = [
        LeRobotDataset(p, chunk_size=cfg.policy.chunk_size, video_cache_mb=cfg.dataset.video_cache_mb) for p in paths
    ]
    if cfg.dataset.roots is None:
        return datasets[0]
    mixed = MixedDataset(datasets, source_names(paths))
    weights = mixing_weights(cfg, mixed)
    log.info(
        "dataset mixture: %s",
        ", ".join(f"{n} ({s} frames, weight {w:.3g})" for n, s, w in zip(mixed.names, mixed.sizes, weights)),
    )
    return mixed


def mixing_weights(cfg: TrainConfig, dataset) -> list[float]:
    """--dataset.weights normalised, or the sources' frame counts' shares when unset."""
    weights = cfg.dataset.weight_list() or [float(n) for n in dataset.sizes]
    return [w / sum(weights) for w in weights]


def micro_batch_stream(cfg: TrainConfig, dataset, policy_cfg, accelerator, start_step: int) -> Iterator[dict]:
    """Endless micro-batches for this process, starting at `start_step` (see batches.py)."""
    micro = cfg.micro_batch_size(accelerator.num_processes)
    rank, world = accelerator.process_index, accelerator.num_processes
    if dataset is None:
        log.warning("no --dataset.root: training on FAKE batches (random images and actions; smoke runs only)")
        return fake_micro_batches(policy_cfg, cfg.seed, micro, cfg.batch_size, rank, world, start_step)
    index = None
    if getattr(dataset, "sizes", None) is not None:  # a MixedDataset
        from craftvla.data.mixture import MixtureIndex

        index = MixtureIndex(dataset.sizes, mixing_weights(cfg, dataset), cfg.seed)
    sampler = StepSampler(len(dataset), cfg.seed, cfg.batch_size, micro, rank, world, start_step, index=index)
    return iter(data_loader(dataset, sampler, cfg.dataset.num_workers, cfg.seed + rank))


# Called on the built policy (after init, freezing and LoRA) by verbs built on this loop (`craftvla
# prune train`): it may add parts and choose what trains; it returns {parameter-name prefix: peak LR}
# for parameters whose LR differs from optim.lr (each becomes its own parameter group).
PreparePolicy = Callable[[nn.Module], dict[str, float]]


def setup(
    cfg: TrainConfig,
    make_grad_plugin: Optional[Callable] = None,
    aux_losses: Optional[dict[str, AuxLoss]] = None,
    prepare_policy: Optional[PreparePolicy] = None,
) -> Run:
    """Build the accelerator, data, policy, optimizer and plug-ins; restore state on --resume."""
    from accelerate.utils import set_seed

    from craftvla.train.optim import build_optimizer, build_scheduler

    set_seed(cfg.seed)  # same initial weights on every rank
    run_dir = Path(cfg.output_dir)
    if cfg.init_from:  # a TrainConfig built in code: its policy section must be the checkpoint's
        check_init_policy(cfg.policy, init_policy_config(cfg.init_from), cfg.init_from)
    dataset = open_dataset(cfg)
    policy = build_policy(cfg, dataset)
    lr_by_prefix = prepare_policy(policy) if prepare_policy is not None else {}
    for name, fn in (aux_losses or {}).items():
        policy.add_aux_loss(name, fn)
    unused = unused_trainable_parameters(policy) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else []
    if unused:
        log.warning(
            "%d trainable parameters get no gradient (e.g. %s): DDP will search for unused "
            "parameters every step; freeze or remove them to avoid that cost",
            len(unused),
            unused[:3],
        )
    accelerator = make_accelerator(cfg, find_unused_parameters=bool(unused))
    if cfg.log.tracker_list():
        start_trackers(accelerator, cfg.log.project, run_dir, flat_train_config(cfg))
    log.info(
        "processes: %d (%s on %s), %d samples each per micro-batch",
        accelerator.num_processes,
        accelerator.distributed_type.value,
        accelerator.device,
        cfg.micro_batch_size(accelerator.num_processes),
    )
    optimizer = build_optimizer(policy, cfg.optim, lr_by_prefix)
    scheduler = build_scheduler(optimizer, cfg.warmup_steps(), cfg.steps, cfg.schedule.min_lr_ratio)
    model, optimizer = accelerator.prepare(policy, optimizer)
    policy = accelerator.unwrap_model(model)  # the one unwrap; the trainer never touches .module
    # Built on the device-resident policy while it still holds its initial weights (before a
    # resume loads trained ones): CRaFT's anchors and L2-to-init refer to those.
    grad_plugin = (
        make_grad_plugin(policy, cfg, accelerator)
        if make_grad_plugin
        else make_craft_plugin(policy, cfg, accelerator, dataset)
    )
    plugins = {"grad_plugin": grad_plugin} if hasattr(grad_plugin, "state_dict") else {}
    run = Run(
        cfg,
        accelerator,
        policy,
        model,
        optimizer,
        scheduler,
        iter(()),
        run_dir,
        num_samples=len(dataset) if dataset is not None else None,
        grad_plugin=grad_plugin,
        plugins=plugins,
    )
    if cfg.resume:
        run.start_step = resume(run)
    run.batches = micro_batch_stream(cfg, dataset, policy.config, accelerator, run.start_step)
    if getattr(dataset, "sizes", None) is not None:
        from craftvla.data.mixture import MixtureCounter

        run.mixture = MixtureCounter(dataset.names, mixing_weights(cfg, dataset), cfg.batch_size, run.start_step)
    return run


def resume(run: Run) -> int:
    """Load RUN/checkpoints/last into the run; returns the step it was saved at."""
    from craftvla.errors import ConfigError

    path = ckpt.last_checkpoint(run.run_dir)
    saved = ckpt.read_training_state(path, run.accelerator.process_index)
    for name in ("batch_size", "seed", "steps"):
        if saved["state"][name] != getattr(run.cfg, name):
            raise ConfigError(
                f"--resume: {name}={getattr(run.cfg, name)!r} but {path} was trained with "
                f"{saved['state'][name]!r}; an exact resume needs the same value"
            )
    ckpt.load_model_weights(path, run.policy)
    run.optimizer.load_state_dict(saved["optimizer"])
    run.scheduler.load_state_dict(saved["scheduler"])
    ckpt.load_plugins(run.plugins, saved["plugins"], path)
    ckpt.set_rng_state(saved["rng"])
    log.info("resumed from %s at step %d", path, saved["state"]["step"])
    return int(saved["state"]["step"])


def export_model(policy: nn.Module) -> nn.Module:
    """The inference model of a checkpoint: LoRA merged into a copy, else the policy itself."""
    from craftvla.model.peft import has_lora, merged_copy

    return merged_copy(policy) if has_lora(policy) else policy


def save(run: Run, step: int) -> Path:
    """Write checkpoint `step` (all ranks participate)."""
    from craftvla.model.peft import has_lora

    cfg = run.cfg
    state = {
        "step": step,
        "samples_seen": step * cfg.batch_size,
        "batch_size": cfg.batch_size,
        "seed": cfg.seed,
        "steps": cfg.steps,
        "world_size": run.accelerator.num_processes,
    }

    def write_main(ts: Path) -> None:
        training = {
            "state": state,
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "plugins": {name: p.state_dict() for name, p in run.plugins.items()},
        }
        ckpt.write_training_state(ts, training, run.policy if has_lora(run.policy) else None)

    export = export_model(run.policy) if run.accelerator.is_main_process else run.policy
    return ckpt.save_checkpoint(run.run_dir, step, run.accelerator, export, write_main, cfg.checkpoint.keep_last)


def periodic_eval(run: Run, step: int) -> dict[str, float]:
    """Closed-loop Meta-World evaluation of the current weights (main rank); RNG-neutral, so a
    run with evaluation trains exactly like one without."""
    from craftvla.sim.evaluate import evaluate
    from craftvla.sim.metaworld import DEFAULT_TASKS
    from craftvla.sim.policies import CheckpointPolicy

    record: dict[str, float] = {}
    if run.accelerator.is_main_process:
        saved = ckpt.rng_state()
        e = run.cfg.eval
        try:
            sim_policy = CheckpointPolicy(export_model(run.policy), device=str(run.accelerator.device))
            results = evaluate(
                sim_policy,
                e.tasks or list(DEFAULT_TASKS),
                e.episodes,
                seed=e.seed,
                out_dir=run.run_dir / "eval" / ckpt.step_dir_name(step),
                progress=False,
            )
        finally:
            train_mode(run.policy)
            ckpt.set_rng_state(saved)
        record = {
            "eval/mean_success_rate": results["mean_success_rate"],
            **{f"eval/{t}": r["success_rate"] for t, r in results["tasks"].items()},
        }
    run.accelerator.wait_for_everyone()
    return record


def fit(run: Run) -> dict[str, Any]:
    """Train from run.start_step to the end, or until stop_at_step, --max_minutes or SIGINT / SIGTERM
    (each of which ends with a checkpoint of the last step: see stop.py); returns the last logged metrics."""
    cfg, acc = run.cfg, run.accelerator
    end = cfg.stop_at_step or cfg.steps
    metrics_path = run.run_dir / "metrics.jsonl"
    logger = MetricsLogger(
        metrics_path,
        acc,
        cfg.log.log_freq,
        run.start_step,
        cfg.steps,
        cfg.log.progress,
        trackers=bool(cfg.log.tracker_list()),
    )
    plots = PlotRefresher(run, metrics_path)
    train_mode(run.model)
    last: dict[str, Any] = {}
    t0 = time.perf_counter()
    run.step = run.start_step
    with StopSignals() as signals:
        for step in range(run.start_step + 1, end + 1):
            run.step = step
            lr = run.scheduler.get_last_lr()[0]  # the LR this step's update uses
            micro = [to_device(next(run.batches), acc.device) for _ in range(cfg.grad_accum_steps)]
            last = train_step(
                run.model, micro, run.optimizer, run.scheduler, acc, cfg.optim.grad_clip_norm, run.grad_plugin
            )
            epoch = {"epoch": step * cfg.batch_size / run.num_samples} if run.num_samples else {}
            if run.mixture is not None:  # samples drawn per source so far (replay runs)
                epoch.update(run.mixture.update(step))
            run.stopped_by = (
                stop_reason(acc, t0, cfg.max_minutes, signals, step, cfg.log.log_freq) if step < end else None
            )
            final = step == end or run.stopped_by is not None
            if final and hasattr(run.grad_plugin, "flush_metrics"):  # a run shorter than its interval
                last.update(run.grad_plugin.flush_metrics())
            wrote = logger.update(
                step, {**last, "lr": lr}, cfg.batch_size, epoch, force=final or _plugin_logs(run, step)
            )
            _save_evaluate_plot(run, step, final, wrote, logger, plots)
            if run.stopped_by is not None:
                log.warning("%s: stopped at step %d of %d (checkpoint written)", run.stopped_by, step, cfg.steps)
                break
    logger.close(run.step)
    return last


def _save_evaluate_plot(run: Run, step: int, final: bool, wrote: bool, logger: MetricsLogger, plots) -> None:
    """After a step: the checkpoint (at the interval and at the end), periodic evaluation, the plots."""
    cfg = run.cfg
    saving = final or bool(cfg.checkpoint.save_freq and step % cfg.checkpoint.save_freq == 0)
    if saving:
        save(run, step)
    if cfg.eval.freq and step % cfg.eval.freq == 0 and run.stopped_by is None:
        logger.log({"step": step, **periodic_eval(run, step)})
    if saving:
        plots.all()
    elif wrote:
        plots.overview()


class PlotRefresher:
    """plots/*.png while training (main rank, --log.plots): every curve at each checkpoint, and
    overview.png as metrics lines arrive, at most every --log.plot_interval_s seconds."""

    def __init__(self, run: Run, metrics_path: Path) -> None:
        self.on = run.cfg.log.plots and run.accelerator.is_main_process
        self.metrics_path, self.out = metrics_path, run.run_dir / "plots"
        self.interval, self.last = run.cfg.log.plot_interval_s, time.perf_counter()

    def all(self) -> None:
        if self.on and self.metrics_path.is_file():
            from craftvla.train.plots import plot_metrics

            plot_metrics(self.metrics_path, self.out)
            self.last = time.perf_counter()

    def overview(self) -> None:
        if self.on and time.perf_counter() - self.last >= self.interval and self.metrics_path.is_file():
            from craftvla.train.plots import plot_overview

            plot_overview(self.metrics_path, self.out)
            self.last = time.perf_counter()


def _plugin_logs(run: Run, step: int) -> bool:
    """Whether the gradient plug-in reported its metrics at this step (its own log_freq may be
    finer than the run's: the line is written then, so its values are not averaged away)."""
    freq = getattr(run.grad_plugin, "log_freq", None)
    return bool(freq) and step % freq == 0


def train(
    cfg: TrainConfig,
    make_grad_plugin: Optional[Callable] = None,
    aux_losses: Optional[dict[str, AuxLoss]] = None,
    prepare_policy: Optional[PreparePolicy] = None,
) -> Run:
    """Set up and run training from a parsed config (the programmatic entry point)."""
    run_dir = Path(cfg.output_dir)
    if not cfg.resume and (run_dir / "checkpoints" / ckpt.LAST).exists():
        from craftvla.errors import CraftVLAError

        raise CraftVLAError(
            f"{run_dir}: already holds a run; pass --resume true to continue it, or choose another --output_dir"
        )
    run = setup(cfg, make_grad_plugin, aux_losses, prepare_policy)
    if run.accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_train_config(cfg, str(run_dir / "train_config.yaml"))
        truncate_metrics(run_dir / "metrics.jsonl", run.start_step)
    run.accelerator.wait_for_everyone()
    t0 = time.perf_counter()
    fit(run)  # the plots are drawn with the last checkpoint
    log.info("done in %.0f s: %s", time.perf_counter() - t0, run_dir)
    return run


def main(argv: list[str]) -> int:
    """CLI entry: `craftvla train [--flag value ...]` (see TrainConfig for every flag). Stopped by
    SIGINT / SIGTERM, it writes a checkpoint and exits with the signal's status (130 / 143)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = parse_train_config(argv)
    run = train(cfg)
    if run.accelerator.is_main_process:
        if run.stopped_by in EXIT_CODES:
            print(
                f"{run.stopped_by}: stopped at step {run.step} of {cfg.steps}; its checkpoint is "
                f"{cfg.output_dir}/checkpoints/last. Continue the run with the same command and --resume"
            )
        else:
            print(f"run written to {cfg.output_dir} (metrics.jsonl, checkpoints/last, plots/)")
    run.accelerator.end_training()
    return EXIT_CODES.get(run.stopped_by, 0)

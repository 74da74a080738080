"""Tasks learned one after another, as a user runs it: stage k fine-tunes stage k-1's policy on task k
while holding what the policy should still do, then every task seen so far is evaluated closed-loop.

    start = Source(Path("runs/data_A"), GENERALIST_TASKS)
    stages = plan_stages(["window-open-v3", "drawer-open-v3"], SHIPPED, start, data, Path("runs/seq/craft-s0"))
    records = run_sequence(stages, Method("craft", ("--craft.enabled", "true"), anchors=True), seed=0)

Stage k's *old data* is the start policy's demonstrations plus those of tasks 1..k-1: CRaFT's anchor
data (`Method.anchors`: `--craft.anchor_dataset` with every old source) and replay's mixture
(`Method.replay`). Each stage writes <out>/stage<k>/{run/, eval/, result.json}; a rerun skips finished
stages, and a stage whose predecessor's checkpoint is gone (a fresh machine: only results are kept)
retrains that predecessor first and records whether the weights came out identical.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from craftvla.errors import ConfigError, CraftVLAError
from craftvla.files import read_json, write_json_atomic

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Method:
    """How every stage fine-tunes: extra `craftvla train` flags, and what the old data is used for."""

    name: str
    flags: tuple[str, ...] = ()
    # Share of every batch drawn from the old data (replay), each old task getting an equal part; 0 = none.
    replay: float = 0.0
    # Hand the old data to CRaFT (or a distillation baseline) as --craft.anchor_dataset.
    anchors: bool = False

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ConfigError(f"method name {self.name!r}: must be a non-empty name without '/'")
        if not 0.0 <= self.replay < 1.0:
            raise ConfigError(f"method {self.name}: replay={self.replay} must be in [0, 1)")


@dataclass(frozen=True)
class Source:
    """A demonstration dataset and the tasks it holds."""

    root: Path
    tasks: tuple[str, ...]


@dataclass(frozen=True)
class Stage:
    index: int  # 1-based
    task: str  # the task this stage learns
    data: Path  # its demonstrations
    start: Path  # the checkpoint it fine-tunes: the start policy (stage 1) or stage k-1's
    old: tuple[Source, ...]  # what the policy should still do: the start's tasks, then tasks 1..k-1
    dir: Path  # <out>/stage<k>
    previous: Optional[Stage] = field(default=None, repr=False)

    @property
    def old_tasks(self) -> tuple[str, ...]:
        return tuple(t for source in self.old for t in source.tasks)

    @property
    def seen(self) -> tuple[str, ...]:
        """The tasks evaluated after this stage: every old task and this one."""
        return (*self.old_tasks, self.task)

    @property
    def checkpoint(self) -> Path:
        return self.dir / "run" / "checkpoints" / "last"

    @property
    def result(self) -> Path:
        return self.dir / "result.json"


def plan_stages(tasks: list[str], start: Path, start_data: Source, data: dict[str, Path], out: Path) -> list[Stage]:
    """The stages of learning `tasks` in order from the `start` policy (trained on `start_data`).
    data: task -> its demonstrations; out: the sequence's directory (one per method and seed)."""
    if not tasks:
        raise ConfigError("a task sequence needs at least one task")
    repeated = sorted({t for t in tasks if tasks.count(t) > 1 or t in start_data.tasks})
    if repeated:
        raise ConfigError(f"tasks {repeated}: each task of a sequence must be new (once, not a start task)")
    missing = [t for t in tasks if t not in data]
    if missing:
        raise ConfigError(f"no demonstrations given for tasks {missing}")
    stages: list[Stage] = []
    old = (start_data,)
    for k, task in enumerate(tasks, start=1):
        previous = stages[-1] if stages else None
        begin = previous.checkpoint if previous else Path(start)
        stages.append(Stage(k, task, Path(data[task]), begin, old, Path(out) / f"stage{k}", previous))
        old = (*old, Source(Path(data[task]), (task,)))
    return stages


def replay_weights(stage: Stage, share: float) -> list[float]:
    """Mixing weights of [new data, *old sources]: `share` for the old data, split equally per old task."""
    counts = [len(source.tasks) for source in stage.old]
    return [1.0 - share, *(share * n / sum(counts) for n in counts)]


def stage_flags(stage: Stage, method: Method, seed: int, train_flags: list[str]) -> list[str]:
    """The `craftvla train` command line of one stage (train_flags: steps, batch size, lr ...)."""
    old = [str(source.root) for source in stage.old]
    if method.replay:
        weights = ",".join(f"{w:.6g}" for w in replay_weights(stage, method.replay))
        data = ["--dataset.roots", ",".join([str(stage.data), *old]), "--dataset.weights", weights]
    else:
        data = ["--dataset.root", str(stage.data)]
    anchors = ["--craft.anchor_dataset", ",".join(old)] if method.anchors else []
    run = ["--init_from", str(stage.start), "--output_dir", str(stage.dir / "run"), "--seed", str(seed)]
    return [*run, *data, *train_flags, *method.flags, *anchors]


def weights_sha256(checkpoint: Path) -> str:
    """A hash of the checkpoint's tensors (names, dtypes, shapes, bytes in name order): equal weights
    hash equal even where the file's header lists them in another order."""
    from craftvla.files import read_safetensors

    digest = hashlib.sha256()
    for name, tensor in sorted(read_safetensors(checkpoint / "model.safetensors").items()):
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def train_stage(stage: Stage, method: Method, seed: int, train_flags: list[str]) -> Path:
    """Fine-tune one stage (skipped when its checkpoint exists); returns the checkpoint."""
    from craftvla.train.config import parse_train_config
    from craftvla.train.loop import train

    if stage.checkpoint.exists():
        return stage.checkpoint
    shutil.rmtree(stage.dir / "run", ignore_errors=True)  # an unfinished run
    print(f"  stage {stage.index} ({stage.task}): fine-tuning {method.name} from {stage.start}", flush=True)
    run = train(parse_train_config(stage_flags(stage, method, seed, train_flags)))
    if run.stopped_by is not None:
        raise CraftVLAError(f"{stage.dir / 'run'}: training stopped early ({run.stopped_by}); rerun to redo it")
    return stage.checkpoint


def ensure_start(stage: Stage, method: Method, seed: int, train_flags: list[str]) -> dict:
    """Make sure the stage's start checkpoint exists (retraining earlier stages whose checkpoints are
    gone); returns {"checkpoint", "sha256", "retrained", "matches_record"} for the stage's record."""
    prev = stage.previous
    retrained = prev is not None and not prev.checkpoint.exists()
    if retrained:
        ensure_start(prev, method, seed, train_flags)
        train_stage(prev, method, seed, train_flags)
    if not (stage.start / "config.json").is_file():
        raise CraftVLAError(f"{stage.start}: no checkpoint to start stage {stage.index} from (config.json missing)")
    sha = weights_sha256(stage.start)
    recorded = read_json(prev.result, dict).get("sha256") if prev is not None and prev.result.is_file() else None
    return {
        "checkpoint": str(stage.start),
        "sha256": sha,
        "retrained": retrained,
        "matches_record": None if recorded is None else sha == recorded,
    }


def evaluate_stage(stage: Stage, episodes: int, seed: int, num_videos: int = 1) -> dict:
    """Closed-loop success on every task seen so far (re-used when already evaluated)."""
    from craftvla.sim.evaluate import evaluate
    from craftvla.sim.policies import CheckpointPolicy

    out = stage.dir / "eval"
    if (out / "results.json").is_file():
        return read_json(out / "results.json", dict)
    print(f"  stage {stage.index} ({stage.task}): evaluating {len(stage.seen)} tasks x {episodes} episodes", flush=True)
    policy = CheckpointPolicy.from_pretrained(stage.checkpoint)
    return evaluate(policy, list(stage.seen), episodes, seed=seed, out_dir=out, num_videos=num_videos, overwrite=True)


def run_stage(
    stage: Stage, method: Method, seed: int, train_flags: list[str], episodes: int, eval_seed: int = 0
) -> dict:
    """Train and evaluate one stage; writes and returns its record (result.json)."""
    from craftvla.continual.metrics import run_summary

    start = ensure_start(stage, method, seed, train_flags)
    checkpoint = train_stage(stage, method, seed, train_flags)
    results = evaluate_stage(stage, episodes, eval_seed)
    record = {
        "method": method.name,
        "seed": seed,
        "stage": stage.index,
        "task": stage.task,
        "old_data": [str(s.root) for s in stage.old],
        "success": {t: r["success_rate"] for t, r in results["tasks"].items()},
        "episodes": episodes,
        "start": start,
        "sha256": weights_sha256(checkpoint),
        **run_summary(stage.dir / "run"),
    }
    write_json_atomic(stage.result, record)
    return record


def run_sequence(
    stages: list[Stage], method: Method, seed: int, train_flags: list[str], episodes: int, eval_seed: int = 0
) -> list[dict]:
    """Every stage in order (finished ones read back); returns their records."""
    records = []
    for stage in stages:
        if stage.result.is_file():
            print(f"  stage {stage.index} ({stage.task}): re-using {stage.result}", flush=True)
            records.append(read_json(stage.result, dict))
            continue
        records.append(run_stage(stage, method, seed, train_flags, episodes, eval_seed))
    return records

"""`craftvla demo`: teach the shipped generalist a new task, with and without CRaFT, and show
what each keeps. No arguments needed; 11-13 minutes on 2 CPU cores (benchmarks/demo/).

1. collect scripted-expert demonstrations of the new task (window-open), and a few episodes of
   the generalist's own five tasks (CRaFT's anchor data: what it should keep doing),
2. fine-tune the generalist (assets/generalist) twice per seed: plain, and with CRaFT,
3. evaluate the generalist and both fine-tuned policies closed-loop on the new task and on the
   generalist's tasks (unseen positions),
4. print a table and write a report directory: report.md, success.png, craft_curves.png and a
   rollout video per policy.
Flags scale it (`--steps`, `--episodes`, `--eval_episodes`, `--seeds`); every stage re-uses
what a previous demo run in the same --out already finished.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from craftvla.cli.parsing import parse_config
from craftvla.craft.config import CraftConfig
from craftvla.errors import ConfigError, CraftVLAError
from craftvla.sim.metaworld import GENERALIST_TASKS, NEW_TASK

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "assets" / "generalist" / "checkpoint"


@dataclass
class DemoConfig:
    # Directory for the datasets, runs, evaluations and reports (re-used across demo runs).
    out: str = "runs/demo"
    # The generalist to start from; None = the one shipped in assets/generalist/checkpoint.
    generalist: Optional[str] = None
    # The new task taught to the generalist.
    task: str = NEW_TASK
    # The generalist's tasks (evaluated for forgetting; CRaFT's anchor data comes from them).
    old_tasks: str = ",".join(GENERALIST_TASKS)
    # Expert demonstrations of the new task.
    episodes: int = 20
    # Expert episodes per old task for CRaFT's anchor data.
    anchor_episodes: int = 8
    # Fine-tuning steps of each run.
    steps: int = 300
    # Samples per optimizer step.
    batch_size: int = 32
    # Peak learning rate of the fine-tuning.
    lr: float = 3e-4
    # CRaFT's retention budget epsilon (a fraction of the retained targets' spread).
    retention_budget: float = 0.1
    # Closed-loop evaluation episodes per task (unseen positions: the evaluation seed stream).
    eval_episodes: int = 10
    # Fine-tuning seeds (each trains plain and CRaFT once).
    seeds: int = 1
    # Seed of collection and evaluation, and the first training seed.
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("episodes", "anchor_episodes", "steps", "batch_size", "eval_episodes", "seeds"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name}={getattr(self, name)}: must be >= 1")

    def generalist_path(self) -> Path:
        path = Path(self.generalist) if self.generalist else SHIPPED
        if not (path / "config.json").is_file():
            raise CraftVLAError(
                f"{path}: no generalist checkpoint there (config.json missing); pass --generalist DIR "
                "or rebuild the shipped one with assets/generalist/run.sh"
            )
        return path


def collect_once(root: Path, tasks: str, episodes: int, seed: int, label: str) -> Path:
    """A demonstration dataset: collected unless a finished one is already at `root`."""
    from craftvla.sim.collect import CollectConfig, collect

    if (root / "meta" / "info.json").is_file():
        print(f"  re-using {label} in {root}")
        return root
    print(f"  collecting {label}: {episodes} expert episodes per task into {root}")
    collect(CollectConfig(out=str(root), tasks=tasks, episodes=episodes, seed=seed))
    return root


def craft_config(cfg: DemoConfig, anchor_data: Path) -> CraftConfig:
    """CRaFT as the demo runs it: the policy's own action chunks (the default target with an
    anchor dataset) held on the generalist's tasks' frames, a budget relative to the targets'
    spread (benchmarks/retention), its metrics logged every step for the report's curves; the
    flags' defaults for that target otherwise (teacher chunks kept per frame of 1,024 anchor
    frames, an anchor batch of 8, the retention gradient every 2 steps: benchmarks/craft_step)."""
    return CraftConfig(
        enabled=True,
        anchor_dataset=str(anchor_data),
        retention_budget=cfg.retention_budget,
        log_freq=1,
    )


def fine_tune(cfg: DemoConfig, name: str, seed: int, data: Path, run_dir: Path, craft: CraftConfig) -> Path:
    """One fine-tuning run from the generalist (skipped when finished); returns the run directory."""
    from craftvla.train.config import CheckpointConfig, DatasetConfig, OptimConfig, TrainConfig, init_policy_config
    from craftvla.train.loop import train

    last = run_dir / "checkpoints" / "last"
    if last.exists():
        print(f"  re-using {name} (seed {seed}): {run_dir}")
        return run_dir
    shutil.rmtree(run_dir, ignore_errors=True)  # an unfinished run of an earlier demo
    print(f"  fine-tuning {name} (seed {seed}) for {cfg.steps} steps into {run_dir}")
    generalist = str(cfg.generalist_path())
    train(
        TrainConfig(
            init_from=generalist,
            policy=init_policy_config(generalist),
            dataset=DatasetConfig(root=str(data)),
            output_dir=str(run_dir),
            steps=cfg.steps,
            batch_size=cfg.batch_size,
            seed=seed,
            optim=OptimConfig(lr=cfg.lr),
            checkpoint=CheckpointConfig(save_freq=0),
            craft=craft,
        )
    )
    return run_dir


def evaluate_once(cfg: DemoConfig, checkpoint: Path, out: Path, label: str) -> dict:
    """Success on the new task and the old ones (re-used when already evaluated)."""
    from craftvla.sim.evaluate import evaluate
    from craftvla.sim.policies import CheckpointPolicy

    if (out / "results.json").is_file():
        return json.loads((out / "results.json").read_text())
    print(f"  evaluating {label}: {cfg.eval_episodes} episodes on each of {len(cfg.old_tasks.split(',')) + 1} tasks")
    return evaluate(
        CheckpointPolicy.from_pretrained(checkpoint),
        [cfg.task, *cfg.old_tasks.split(",")],
        cfg.eval_episodes,
        seed=cfg.seed,
        out_dir=out,
        num_videos=1,
        overwrite=True,
    )


def summarise(results: dict, new_task: str) -> dict:
    """{new: success on the new task, old: mean over the old tasks, tasks: per task}."""
    tasks = {t: r["success_rate"] for t, r in results["tasks"].items()}
    old = [v for t, v in tasks.items() if t != new_task]
    return {"new": tasks[new_task], "old": sum(old) / len(old), "tasks": tasks}


def run_demo(cfg: DemoConfig) -> Path:
    """Every stage of the demo; returns the report directory."""
    from craftvla.demo_report import write_demo_report

    out = Path(cfg.out)
    generalist = cfg.generalist_path()
    print(f"[1/4] data (starting from the generalist in {generalist})")
    new_data = collect_once(out / "data_new", cfg.task, cfg.episodes, cfg.seed + 1000, f"new task {cfg.task}")
    anchor_data = collect_once(
        out / "data_anchor",
        cfg.old_tasks,
        cfg.anchor_episodes,
        cfg.seed + 2000,
        "anchor data of the generalist's tasks",
    )
    print("[2/4] fine-tuning")
    runs: dict[str, list[Path]] = {"plain": [], "craft": []}
    for seed in range(cfg.seed, cfg.seed + cfg.seeds):
        runs["plain"].append(fine_tune(cfg, "plain", seed, new_data, out / f"plain-s{seed}", CraftConfig()))
        runs["craft"].append(
            fine_tune(cfg, "CRaFT", seed, new_data, out / f"craft-s{seed}", craft_config(cfg, anchor_data))
        )
    print("[3/4] closed-loop evaluation on unseen positions")
    evals = {"generalist": [evaluate_once(cfg, generalist, out / "eval-generalist", "the generalist")]}
    for name, run_dirs in runs.items():
        evals[name] = [
            evaluate_once(cfg, run / "checkpoints" / "last", run / "eval", f"{name} ({run.name})") for run in run_dirs
        ]
    print("[4/4] report")
    summary = {name: [summarise(r, cfg.task) for r in results] for name, results in evals.items()}
    report = out / time.strftime("report-%Y%m%d-%H%M%S")
    for n in range(2, 1000):  # never write into an earlier report
        if not report.exists():
            break
        report = out / time.strftime(f"report-%Y%m%d-%H%M%S-{n}")
    write_demo_report(
        report,
        cfg,
        summary,
        runs,
        evals_dirs={
            "generalist": [out / "eval-generalist"],
            **{n: [run / "eval" for run in rs] for n, rs in runs.items()},
        },
    )
    return report


def main(argv: list[str]) -> int:
    """CLI entry: `craftvla demo [--steps N] [--episodes N] [--seeds N] [--out DIR] ...`."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    cfg = parse_config(DemoConfig, args=argv, prog="craftvla demo")
    t0 = time.perf_counter()
    report = run_demo(cfg)
    print((report / "table.txt").read_text())
    print(f"done in {time.perf_counter() - t0:.0f} s; report: {report / 'report.md'}")
    return 0

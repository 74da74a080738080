"""`craftvla demo`: teach the shipped generalist a new task (or a sequence of them, `--tasks a,b,c`),
with and without CRaFT, and show what each keeps. No arguments needed; 11-13 minutes on 2 CPU cores
for the default single task (benchmarks/demo/).

1. collect scripted-expert demonstrations of each new task (default: window-open), and a few episodes
   of the generalist's own five tasks (CRaFT's anchor data: what it should keep doing),
2. fine-tune the generalist (assets/generalist) per seed, plain and with CRaFT, one stage per new task,
   each stage from the previous stage's policy; CRaFT's anchor data grows with the stages (the
   generalist's tasks, then each task learned before: craftvla.continual),
3. evaluate the generalist, and each policy after every stage, closed-loop on every task seen so far
   (unseen positions),
4. print a table and write a report directory: report.md, success.png, craft_curves.png, a rollout
   video per policy and, for a sequence, the accuracy matrices (matrices.png) with average accuracy
   and backward transfer.
Flags scale it (`--steps`, `--episodes`, `--eval_episodes`, `--seeds`); every stage re-uses
what a previous demo run in the same --out already finished.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from craftvla.cli.parsing import parse_config
from craftvla.continual import Method, Source, Stage, plan_stages, run_sequence
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
    # The new task taught to the generalist, or several, comma-separated: learned one after another.
    tasks: str = NEW_TASK
    # The generalist's tasks (evaluated for forgetting; CRaFT's anchor data comes from them).
    old_tasks: str = ",".join(GENERALIST_TASKS)
    # Expert demonstrations of each new task.
    episodes: int = 20
    # Expert episodes per old task for CRaFT's anchor data.
    anchor_episodes: int = 8
    # Fine-tuning steps of each run (of each stage, for a sequence of tasks).
    steps: int = 300
    # Samples per optimizer step.
    batch_size: int = 32
    # Peak learning rate of the fine-tuning.
    lr: float = 3e-4
    # CRaFT's retention budget epsilon (a fraction of the retained targets' spread). 0.03 with the dual
    # step measured in budgets kept the most over a 3-task sequence (benchmarks/continual, 3 seeds).
    retention_budget: float = 0.03
    # Move lambda by the violation in units of the budget (L_ret / epsilon - 1; --craft.dual_relative):
    # at 0.03 lambda then rises to about 2 and holds L_ret near the budget; the absolute step barely moves it.
    dual_relative: bool = True
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
        from craftvla.sim.metaworld import parse_tasks

        clash = sorted(set(parse_tasks(self.tasks)) & set(parse_tasks(self.old_tasks)))  # (each names a task once)
        if clash:
            raise ConfigError(f"--tasks={self.tasks}: {clash} among --old_tasks; a new task must be new")

    @property
    def sequence(self) -> list[str]:
        """The new tasks, in the order they are learned."""
        return [t.strip() for t in self.tasks.split(",") if t.strip()]

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


def methods(cfg: DemoConfig) -> dict[str, Method]:
    """Plain fine-tuning, and CRaFT as the demo runs it: the policy's own action chunks (the default
    target with an anchor dataset) held on the old tasks' frames, a budget relative to the targets'
    spread and a dual step relative to the budget (benchmarks/continual), its metrics logged every step
    for the report's curves; the flags' defaults for that target otherwise (teacher chunks kept per frame
    of 1,024 anchor frames, an anchor batch of 8, the retention gradient every 2 steps: benchmarks/craft_step)."""
    craft = (
        *("--craft.enabled", "true", "--craft.log_freq", "1"),
        *(
            "--craft.retention_budget",
            f"{cfg.retention_budget}",
            "--craft.dual_relative",
            str(cfg.dual_relative).lower(),
        ),
    )
    return {"plain": Method("plain"), "craft": Method("craft", craft, anchors=True)}


def train_flags(cfg: DemoConfig) -> list[str]:
    """The `craftvla train` flags every stage of every run shares."""
    return [
        *("--steps", str(cfg.steps), "--batch_size", str(cfg.batch_size), "--optim.lr", f"{cfg.lr}"),
        *("--checkpoint.save_freq", "0"),
    ]


def evaluate_once(cfg: DemoConfig, checkpoint: Path, out: Path, label: str) -> dict:
    """Success on every task of the demo (re-used when already evaluated)."""
    from craftvla.sim.evaluate import evaluate
    from craftvla.sim.policies import CheckpointPolicy

    if (out / "results.json").is_file():
        return json.loads((out / "results.json").read_text())
    tasks = [*cfg.sequence, *cfg.old_tasks.split(",")]
    print(f"  evaluating {label}: {cfg.eval_episodes} episodes on each of {len(tasks)} tasks")
    return evaluate(
        CheckpointPolicy.from_pretrained(checkpoint),
        tasks,
        cfg.eval_episodes,
        seed=cfg.seed,
        out_dir=out,
        num_videos=1,
        overwrite=True,
    )


def fine_tune_all(cfg: DemoConfig, data: dict[str, Path], anchor_data: Path) -> dict[str, list[list[Stage]]]:
    """Every method's sequence per seed, run (finished stages re-used): {name: [stages of each seed]}."""
    generalist = cfg.generalist_path()
    start = Source(anchor_data, tuple(cfg.old_tasks.split(",")))
    runs: dict[str, list[list[Stage]]] = {}
    for seed in range(cfg.seed, cfg.seed + cfg.seeds):
        for name, method in methods(cfg).items():
            stages = plan_stages(cfg.sequence, generalist, start, data, Path(cfg.out) / f"{name}-s{seed}")
            print(f"  {name} (seed {seed}): {len(stages)} stage(s) in {stages[0].dir.parent}")
            run_sequence(stages, method, seed, train_flags(cfg), cfg.eval_episodes, eval_seed=cfg.seed)
            runs.setdefault(name, []).append(stages)
    return runs


def run_demo(cfg: DemoConfig) -> Path:
    """Every stage of the demo; returns the report directory."""
    from craftvla.demo_report import write_demo_report

    out = Path(cfg.out)
    generalist = cfg.generalist_path()
    print(f"[1/4] data (starting from the generalist in {generalist})")
    data = {
        task: collect_once(out / f"data_{task}", task, cfg.episodes, cfg.seed + 1000, f"new task {task}")
        for task in cfg.sequence
    }
    anchor_data = collect_once(
        out / "data_anchor",
        cfg.old_tasks,
        cfg.anchor_episodes,
        cfg.seed + 2000,
        "anchor data of the generalist's tasks",
    )
    print(f"[2/4] fine-tuning ({len(cfg.sequence)} stage(s) per run), evaluating after each stage on unseen positions")
    runs = fine_tune_all(cfg, data, anchor_data)
    print("[3/4] the generalist's closed-loop evaluation")
    start = evaluate_once(cfg, generalist, out / "eval-generalist", "the generalist")
    print("[4/4] report")
    report = out / time.strftime("report-%Y%m%d-%H%M%S")
    for n in range(2, 1000):  # never write into an earlier report
        if not report.exists():
            break
        report = out / time.strftime(f"report-%Y%m%d-%H%M%S-{n}")
    write_demo_report(report, cfg, start, runs, out / "eval-generalist")
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

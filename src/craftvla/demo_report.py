"""The report `craftvla demo` writes: report.md, table.txt, success.png, craft_curves.png, videos/."""

from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path
from statistics import mean

from craftvla.files import write_json_atomic
from craftvla.train.metrics import read_metrics
from craftvla.train.plots import pyplot, save_figure

LABELS = {"generalist": "generalist (before)", "plain": "plain fine-tuning", "craft": "CRaFT"}


def table(summary: dict[str, list[dict]], new_task: str) -> str:
    """Plain-text table: success on the new task and on the old ones, mean over seeds."""
    lines = [f"{'policy':<22} {new_task:>16} {'old tasks (mean)':>18}  seeds"]
    for name, rows in summary.items():
        lines.append(
            f"{LABELS[name]:<22} {mean(r['new'] for r in rows):>16.0%} "
            f"{mean(r['old'] for r in rows):>18.0%}  {len(rows)}"
        )
    return "\n".join(lines) + "\n"


def training_seconds(runs: dict[str, list[Path]]) -> dict[str, float]:
    """{name: training wall-clock in s, mean over seeds}: the last `elapsed_s` of each run's metrics."""
    return {name: mean(read_metrics(run / "metrics.jsonl")[-1]["elapsed_s"] for run in rs) for name, rs in runs.items()}


def time_line(seconds: dict[str, float]) -> str:
    """'training time: plain 135 s, CRaFT 162 s (1.20x plain)'."""
    ratio = seconds["craft"] / seconds["plain"]
    return f"training time: plain {seconds['plain']:.0f} s, CRaFT {seconds['craft']:.0f} s ({ratio:.2f}x plain)\n"


def markdown_table(summary: dict[str, list[dict]], new_task: str) -> str:
    tasks = list(summary["generalist"][0]["tasks"])
    head = "| policy | " + " | ".join(t.removesuffix("-v3") for t in tasks) + " | old tasks (mean) |"
    lines = [head, "|---" * (len(tasks) + 2) + "|"]
    for name, rows in summary.items():
        cells = [f"{mean(r['tasks'][t] for r in rows):.0%}" for t in tasks]
        lines.append(f"| {LABELS[name]} | " + " | ".join(cells) + f" | {mean(r['old'] for r in rows):.0%} |")
    return "\n".join(lines) + "\n"


def success_plot(summary: dict[str, list[dict]], new_task: str, path: Path) -> None:
    """Grouped bars: success on the new task and on the old tasks, per policy (mean over seeds)."""
    plt = pyplot()

    names = list(summary)
    new = [mean(r["new"] for r in summary[n]) for n in names]
    old = [mean(r["old"] for r in summary[n]) for n in names]
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=110)
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], new, width=0.4, label=f"new task ({new_task})", color="#4c72b0")
    ax.bar([i + 0.2 for i in x], old, width=0.4, label="old tasks (mean of the generalist's)", color="#dd8452")
    for i, (a, b) in enumerate(zip(new, old)):
        ax.text(i - 0.2, a + 0.02, f"{a:.0%}", ha="center", fontsize=8)
        ax.text(i + 0.2, b + 0.02, f"{b:.0%}", ha="center", fontsize=8)
    ax.set_xticks(list(x), [LABELS[n] for n in names])
    ax.set_ylim(0, 1.3)
    ax.set_yticks([0, 0.25, 0.5, 0.75, 1.0])
    ax.set_ylabel("success rate")
    ax.legend(fontsize=8, loc="upper center", ncol=2, frameon=False)
    save_figure(fig, path)


def craft_plot(metrics_paths: list[Path], budget: float, path: Path) -> None:
    """lambda and the (scale-free) retention loss against the budget, per CRaFT seed."""
    plt = pyplot()

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4), dpi=110)
    for i, metrics in enumerate(metrics_paths):
        rows = [r for r in read_metrics(metrics) if "craft/lambda" in r]
        steps = [r["step"] for r in rows]
        ax1.plot(steps, [r["craft/retention_loss"] for r in rows], label=f"seed {i}", lw=1)
        ax2.plot(steps, [r["craft/lambda"] for r in rows], label=f"seed {i}", lw=1)
    ax1.axhline(budget, color="black", ls="--", lw=1, label=f"budget {budget:g}")
    ax1.set_yscale("log")
    ax1.set_title("retention loss (fraction of the targets' spread)")
    ax2.set_title("lambda (dual variable)")
    for ax in (ax1, ax2):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(fig, path)


def copy_videos(eval_dirs: dict[str, list[Path]], new_task: str, out: Path) -> dict[str, str]:
    """One rollout of the new task per policy (its first seed), copied to out/; name -> file."""
    out.mkdir(parents=True, exist_ok=True)
    picked = {}
    for name, dirs in eval_dirs.items():
        videos = sorted((dirs[0] / "videos").glob(f"{new_task}_*.mp4"))
        if videos:
            target = out / f"{name}_{videos[0].name}"
            shutil.copyfile(videos[0], target)
            picked[name] = target.name
    return picked


def write_demo_report(
    report: Path, cfg, summary: dict[str, list[dict]], runs: dict[str, list[Path]], evals_dirs: dict[str, list[Path]]
) -> None:
    report.mkdir(parents=True, exist_ok=True)
    text = table(summary, cfg.task) + time_line(training_seconds(runs))
    (report / "table.txt").write_text(text)
    success_plot(summary, cfg.task, report / "success.png")
    craft_metrics = [run / "metrics.jsonl" for run in runs["craft"]]
    craft_plot(craft_metrics, cfg.retention_budget, report / "craft_curves.png")
    videos = copy_videos(evals_dirs, cfg.task, report / "videos")
    write_json_atomic(report / "summary.json", {"config": asdict(cfg), "summary": summary}, indent=1)
    lines = [
        f"# craftvla demo: teaching the generalist {cfg.task}",
        "",
        f"Fine-tuned {cfg.steps} steps (batch {cfg.batch_size}, lr {cfg.lr:g}) on {cfg.episodes} expert "
        f"demonstrations, {cfg.seeds} seed(s); evaluated on {cfg.eval_episodes} unseen positions per task. "
        f"CRaFT holds the generalist's action chunks on {cfg.anchor_episodes} episodes per old task "
        f"(budget {cfg.retention_budget:g} of their spread).",
        "",
        "```",
        text.rstrip(),
        "```",
        "",
        markdown_table(summary, cfg.task),
        "![success](success.png)",
        "",
        "![CRaFT lambda and retention loss](craft_curves.png)",
        "",
        "Rollouts of the new task: " + ", ".join(f"[{LABELS[n]}](videos/{f})" for n, f in videos.items()),
        "",
        "Runs: " + ", ".join(str(run) for rs in runs.values() for run in rs),
        "",
    ]
    (report / "report.md").write_text("\n".join(lines))

"""The report `craftvla demo` writes: report.md, table.txt, success.png, craft_curves.png, videos/ and, for a
sequence of tasks, matrices.png (the accuracy matrices)."""

from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path
from statistics import mean

from craftvla.files import write_json_atomic
from craftvla.train.metrics import read_metrics
from craftvla.train.plots import pyplot, save_figure

LABELS = {"generalist": "generalist (before)", "plain": "plain fine-tuning", "craft": "CRaFT"}


def summarise(success: dict[str, float], new_tasks: list[str]) -> dict:
    """{new: mean success over the new tasks, old: mean over the old ones, tasks: per task}."""
    new = [v for t, v in success.items() if t in new_tasks]
    old = [v for t, v in success.items() if t not in new_tasks]
    return {"new": sum(new) / len(new), "old": sum(old) / len(old), "tasks": dict(success)}


def table(summary: dict[str, list[dict]], new_task: str) -> str:
    """Plain-text table: success on the new task and on the old ones, mean over seeds."""
    lines = [f"{'policy':<22} {new_task:>16} {'old tasks (mean)':>18}  seeds"]
    for name, rows in summary.items():
        lines.append(
            f"{LABELS[name]:<22} {mean(r['new'] for r in rows):>16.0%} "
            f"{mean(r['old'] for r in rows):>18.0%}  {len(rows)}"
        )
    return "\n".join(lines) + "\n"


def training_seconds(records: dict[str, list[list[dict]]]) -> dict[str, float]:
    """{name: training wall-clock in s (every stage's), mean over seeds}."""
    return {name: mean(sum(r["train_s"] for r in seq) for seq in seqs) for name, seqs in records.items()}


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


def craft_plot(runs: list[list[Path]], budget: float, path: Path) -> None:
    """lambda and the (scale-free) retention loss against the budget, per CRaFT seed (a sequence's
    stages one after another; a dotted line where each next stage starts)."""
    plt = pyplot()

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4), dpi=110)
    for i, stages in enumerate(runs):
        rows, offset = [], 0
        for k, run in enumerate(stages):
            part = [r for r in read_metrics(run / "metrics.jsonl") if "craft/lambda" in r]
            rows += [{**r, "step": r["step"] + offset} for r in part]
            offset += part[-1]["step"] if part else 0
            if i == 0 and k + 1 < len(stages):
                for ax in (ax1, ax2):
                    ax.axvline(offset, color="grey", ls=":", lw=0.8)
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


def sequence_figures(start: dict, records: dict[str, list[list[dict]]], cfg) -> tuple[dict, str]:
    """For a sequence: each policy's accuracy matrix (mean over seeds; the generalist's row 0) and a
    text block with its average accuracy and backward transfer."""
    import numpy as np

    from craftvla.continual import accuracy_matrix, average_accuracy, backward_transfer, learned_at

    columns = [*cfg.old_tasks.split(","), *cfg.sequence]
    learned = learned_at(columns, cfg.sequence)
    matrices, lines = {}, ["", "after the last stage      average accuracy   backward transfer (forgetting < 0)"]
    for name, seqs in records.items():
        per_seed = [accuracy_matrix(start, seq, columns) for seq in seqs]
        matrices[name] = np.mean(per_seed, axis=0)
        acc = mean(float(average_accuracy(m, learned)[-1]) for m in per_seed)
        bwt = mean(backward_transfer(m, learned) for m in per_seed)
        lines.append(f"{LABELS[name]:<26} {acc:>16.0%} {bwt:>+19.2f}")
    return matrices, "\n".join(lines) + "\n"


def write_demo_report(report: Path, cfg, start_results: dict, runs: dict[str, list[list]], start_eval: Path) -> None:
    """runs: {name: the stages (craftvla.continual.Stage) of each seed}, every stage finished."""
    from craftvla.continual.plots import matrices_plot
    from craftvla.files import read_json

    report.mkdir(parents=True, exist_ok=True)
    records = {name: [[read_json(st.result, dict) for st in seq] for seq in seqs] for name, seqs in runs.items()}
    start = {t: r["success_rate"] for t, r in start_results["tasks"].items()}
    summary = {"generalist": [summarise(start, cfg.sequence)]}
    summary.update({n: [summarise(seq[-1]["success"], cfg.sequence) for seq in seqs] for n, seqs in records.items()})
    label = cfg.sequence[0] if len(cfg.sequence) == 1 else "new tasks (mean)"
    text = table(summary, label) + time_line(training_seconds(records))
    matrices = {}
    if len(cfg.sequence) > 1:
        matrices, block = sequence_figures(start, records, cfg)
        text += block
        columns = [*cfg.old_tasks.split(","), *cfg.sequence]
        matrices_plot({LABELS[n]: m for n, m in matrices.items()}, columns, report / "matrices.png")
    (report / "table.txt").write_text(text)
    success_plot(summary, label, report / "success.png")
    craft_runs = [[st.dir / "run" for st in seq] for seq in runs["craft"]]
    craft_plot(craft_runs, cfg.retention_budget, report / "craft_curves.png")
    last = {n: [seq[-1].dir / "eval" for seq in seqs] for n, seqs in runs.items()}
    videos = copy_videos({"generalist": [start_eval], **last}, cfg.sequence[-1], report / "videos")
    write_json_atomic(report / "summary.json", {"config": asdict(cfg), "summary": summary}, indent=1)
    dirs = [seq[0].dir.parent for seqs in runs.values() for seq in seqs]
    (report / "report.md").write_text(report_markdown(cfg, text, summary, matrices, videos, dirs))


def report_markdown(cfg, text: str, summary: dict, matrices: dict, videos: dict[str, str], dirs: list[Path]) -> str:
    from craftvla.continual.metrics import matrix_markdown

    columns = [*cfg.old_tasks.split(","), *cfg.sequence]
    lines = [
        f"# craftvla demo: teaching the generalist {' then '.join(cfg.sequence)}",
        "",
        f"Fine-tuned {cfg.steps} steps per task (batch {cfg.batch_size}, lr {cfg.lr:g}) on {cfg.episodes} expert "
        f"demonstrations each, {cfg.seeds} seed(s); evaluated on {cfg.eval_episodes} unseen positions per task. "
        f"CRaFT holds the starting policy's action chunks on {cfg.anchor_episodes} episodes per generalist task "
        f"(and, in a sequence, on the demonstrations of the tasks learned before; budget {cfg.retention_budget:g} "
        f"of their spread, dual step {'relative to the budget' if cfg.dual_relative else 'absolute'}).",
        "",
        "```",
        text.rstrip(),
        "```",
        "",
        markdown_table(summary, cfg.sequence),
    ]
    for name, matrix in matrices.items():
        lines += [
            f"**{LABELS[name]}**, success after each stage (mean over seeds):",
            "",
            matrix_markdown(matrix, columns),
        ]
    lines += ["![accuracy matrices](matrices.png)", ""] if matrices else []
    lines += [
        "![success](success.png)",
        "",
        "![CRaFT lambda and retention loss](craft_curves.png)",
        "",
        f"Rollouts of {cfg.sequence[-1]}: " + ", ".join(f"[{LABELS[n]}](videos/{f})" for n, f in videos.items()),
        "",
        "Runs: " + ", ".join(map(str, dirs)),
        "",
    ]
    return "\n".join(lines)

"""results/*.json -> results.md (the figures per method, mean +- std over seeds; every cell's budget
record), matrices.png (the accuracy matrix of every method) and front.png (start tasks vs new tasks)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from statistics import mean, pstdev

import numpy as np

LABELS = {
    "plain": "plain fine-tuning",
    "replay2": "replay 2 %",
    "replay10": "replay 10 %",
    "replay50": "replay 50 %",
    "distill0.1": "distillation, weight 0.1",
    "distill1": "distillation of its actions, weight 1",
    "distill10": "distillation, weight 10",
    "l2_init": "L2-to-init (0.1)",
    "lora": "LoRA rank 16",
    "craft_eps0.03": "CRaFT actions, budget 0.03",
    "craft_eps0.1": "CRaFT actions, budget 0.1 (default)",
    "craft_eps0.3": "CRaFT actions, budget 0.3",
    "craft_noproj": "CRaFT actions 0.1, projection off",
    "craft_pooled": "CRaFT pooled features 0.1",
    "craft_rel_eps0.03": "CRaFT actions 0.03, dual step relative to the budget",
    "craft_rel_eps0.1": "CRaFT actions 0.1, dual step relative to the budget",
    "craft_rel_eps0.3": "CRaFT actions 0.3, dual step relative to the budget",
}
# The knobs a user tunes, one value per method: does one value serve every stage?
FAMILIES = {
    "distillation weight": {"0.1": "distill0.1", "1": "distill1", "10": "distill10"},
    "CRaFT budget, dual step 0.01": {"0.03": "craft_eps0.03", "0.1": "craft_eps0.1", "0.3": "craft_eps0.3"},
    "CRaFT budget, relative dual step": {
        "0.03": "craft_rel_eps0.03",
        "0.1": "craft_rel_eps0.1",
        "0.3": "craft_rel_eps0.3",
    },
    "replay share": {"2 %": "replay2", "10 %": "replay10", "50 %": "replay50"},
}


def load(results: Path, methods: list[str], stages: int) -> tuple[dict, dict]:
    """(start row, {method: {seed: [stage records 1..T]}}) for the sequences with every stage done."""
    start = json.loads((results / "start.json").read_text())
    runs: dict[str, dict[int, list[dict]]] = {}
    for path in sorted(results.glob("*__s*__stage*.json")):
        r = json.loads(path.read_text())
        runs.setdefault(r["method"], {}).setdefault(r["seed"], []).append(r)
    done = {
        m: {s: sorted(rs, key=lambda r: r["stage"]) for s, rs in seeds.items() if len(rs) == stages}
        for m, seeds in runs.items()
        if m in methods
    }
    return start, {m: seeds for m, seeds in done.items() if seeds}


def figures(start: dict, records: list[dict], columns: list[str], sequence: list[str], start_tasks) -> dict:
    """One sequence's figures: its matrix, ACC per stage, BWT (all / start tasks / sequence tasks)."""
    from craftvla.continual import accuracy_matrix, average_accuracy, backward_transfer, kept_accuracy, learned_at

    matrix = accuracy_matrix(start["success"], records, columns)
    learned = learned_at(columns, sequence)
    own = [j for j, t in enumerate(columns) if t in start_tasks]
    new = [j for j, t in enumerate(columns) if t in sequence]
    return {
        "matrix": matrix,
        "acc": average_accuracy(matrix, learned),
        "bwt": backward_transfer(matrix, learned),
        "bwt_start": backward_transfer(matrix, learned, own),
        "bwt_seq": backward_transfer(matrix, learned, new),
        "start_final": float(np.nanmean(matrix[-1, own])),
        "new_final": float(np.nanmean(matrix[-1, new])),
        "just_learned": [float(matrix[k, learned.index(k)]) for k in range(1, len(matrix))],
        "kept": kept_accuracy(matrix, learned).tolist(),
    }


def _ms(values: list[float], fmt: str = "{:.2f}") -> str:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "-"
    return fmt.format(mean(values)) + (f" ± {pstdev(values):.2f}" if len(values) > 1 else "")


def summary_table(per_method: dict[str, list[dict]], sequence: list[str]) -> list[str]:
    stages = range(1, len(sequence) + 1)
    head = ["method", *(f"{t.removesuffix('-v3')} just learned" for t in sequence), "ACC (final)"]
    head += ["BWT", "BWT start tasks", "BWT new tasks", "start tasks (final)", "new tasks (final)", "seeds"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for method, figs in per_method.items():
        cells = [_ms([f["just_learned"][k - 1] for f in figs]) for k in stages]
        cells += [_ms([f["acc"][-1] for f in figs])]
        cells += [_ms([f[k] for f in figs], "{:+.2f}") for k in ("bwt", "bwt_start", "bwt_seq")]
        cells += [_ms([f["start_final"] for f in figs]), _ms([f["new_final"] for f in figs]), str(len(figs))]
        lines.append(f"| {LABELS.get(method, method)} | " + " | ".join(cells) + " |")
    return lines


def family_table(per_method: dict[str, list[dict]], sequence: list[str]) -> list[str]:
    """Per knob value and stage: what the stage kept of the tasks before it / its new task / ACC after
    it (seeds' means); the best ACC of each family per stage in bold. One value that is bold in every
    stage serves the whole sequence."""
    stages = range(len(sequence))
    head = [
        "knob",
        "value",
        *(f"stage {k + 1} ({t.removesuffix('-v3')}): kept / new / ACC" for k, t in enumerate(sequence)),
    ]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for family, values in FAMILIES.items():
        figs = {v: per_method[m] for v, m in values.items() if m in per_method}
        if not figs:
            continue
        acc = {v: [mean(f["acc"][k + 1] for f in fs) for k in stages] for v, fs in figs.items()}
        best = [max(acc, key=lambda v: acc[v][k]) for k in stages]
        for value, fs in figs.items():
            cells = []
            for k in stages:
                kept, new = mean(f["kept"][k] for f in fs), mean(f["just_learned"][k] for f in fs)
                a = f"**{acc[value][k]:.2f}**" if best[k] == value else f"{acc[value][k]:.2f}"
                cells.append(f"{kept:.2f} / {new:.2f} / {a}")
            lines.append(f"| {family} | {value} ({len(fs)} seeds) | " + " | ".join(cells) + " |")
    return lines


def budget_table(runs: dict[str, dict[int, list[dict]]], start_tasks) -> list[str]:
    """Every cell: success on its new task, the start tasks' mean, the budget record and wall-clock."""
    head = "| method | seed | stage | new task | start tasks | within budget | final L_ret | final lambda | max lambda | train s |"
    lines = [head, "|---" * 10 + "|"]
    for method, seeds in runs.items():
        for seed, records in sorted(seeds.items()):
            for r in records:
                own = [v for t, v in r["success"].items() if t in start_tasks]
                cells = [f"{r['success'][r['task']]:.1f}", f"{mean(own):.2f}"]
                for key, fmt in (("within_budget", "{:.2f}"), ("final_retention_loss", "{:.3f}")):
                    cells.append(fmt.format(r[key]) if key in r else "-")
                for key in ("final_lambda", "max_lambda"):
                    cells.append(f"{r[key]:.2f}" if key in r else "-")
                cells.append(f"{r['train_s']:.0f}")
                lines.append(
                    f"| {method} | {seed} | {r['stage']} ({r['task'].removesuffix('-v3')}) | "
                    + " | ".join(cells)
                    + " |"
                )
    return lines


def write_report(results: Path, out: Path, methods: list[str], start_tasks, sequence) -> None:
    start, runs = load(results, methods, len(sequence))
    runs = {m: runs[m] for m in methods if m in runs}
    columns = [*start_tasks, *sequence]
    answer_file = out / "answer.md"  # the hand-written reading of these numbers, kept at the top
    answer = [*answer_file.read_text().rstrip().splitlines(), ""] if answer_file.is_file() else []
    per_method = {
        m: [figures(start, rs, columns, list(sequence), start_tasks) for _, rs in sorted(seeds.items())]
        for m, seeds in runs.items()
    }
    lines = [
        "# Continual study: results",
        "",
        f"Sequence: {' -> '.join(sequence)}, from the generalist ({', '.join(start_tasks)}).",
        "Mean ± std over seeds; success on 10 unseen positions per task after each stage.",
        "",
        *answer,
        "## One value per knob, stage by stage",
        "",
        "Kept = mean success after the stage on the tasks learned before it; new = its own task; ACC = the",
        "mean over every task learned so far. Bold: the family's best ACC at that stage. Stage 1's task has a",
        "scene of its own; stages 2 and 3 share the generalist's scenes (the instruction tells them apart).",
        "",
        *family_table(per_method, list(sequence)),
        "",
        "## Every method",
        "",
        *summary_table(per_method, list(sequence)),
        "",
        "## Every cell: did the budget bind?",
        "",
        *budget_table(runs, start_tasks),
        "",
    ]
    (out / "results.md").write_text("\n".join(lines))
    if per_method:
        from craftvla.continual.plots import matrices_plot

        matrices = {  # the seeds' mean (the not-evaluated cells are NaN in every seed)
            f"{LABELS.get(m, m)} ({len(figs)} seeds)": np.mean(np.stack([f["matrix"] for f in figs]), axis=0)
            for m, figs in per_method.items()
        }
        matrices_plot(matrices, columns, out / "matrices.png")
        front_plot(per_method, out / "front.png")


def front_plot(per_method: dict[str, list[dict]], path: Path) -> None:
    """After the last stage: the start tasks' mean success against the new tasks', every seed and the mean."""
    from craftvla.train.plots import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 5), dpi=110)
    for i, (method, figs) in enumerate(per_method.items()):
        xs, ys = [f["new_final"] for f in figs], [f["start_final"] for f in figs]
        color = plt.cm.tab20(i % 20)
        ax.scatter(xs, ys, s=12, alpha=0.4, color=color)
        ax.scatter([mean(xs)], [mean(ys)], s=50, color=color, edgecolor="k", label=LABELS.get(method, method))
    ax.set_xlabel("new tasks after the last stage (mean success)")
    ax.set_ylabel("the generalist's tasks after the last stage")
    ax.set_xlim(-0.05, 1.05)
    ax.set_ylim(-0.05, 1.05)
    ax.legend(fontsize=6, loc="lower left")
    ax.grid(alpha=0.3)
    save_figure(fig, path)

"""results/*.json + results/latency.json -> results.md and success_vs_latency.png."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _lib import wilson_interval  # noqa: E402


def load(results: Path) -> tuple[dict, list[dict], dict]:
    rows = [json.loads(p.read_text()) for p in sorted(results.glob("*__b*.json"))]
    unpruned = json.loads((results / "unpruned.json").read_text()) if (results / "unpruned.json").is_file() else {}
    latency = json.loads((results / "latency.json").read_text()) if (results / "latency.json").is_file() else {}
    return unpruned, rows, latency


def _success(row: dict) -> str:
    """'0.93 (0.84-0.97)': the rate and its 95% Wilson interval over the row's episodes."""
    if "episodes" not in row:
        return f"{row['success']:.2f}"
    low, high = wilson_interval(row["success"], row["episodes"])
    return f"{row['success']:.2f} ({low:.2f}-{high:.2f})"


def _timed_as(row: dict) -> str:
    """The latency entry of a row: its own cell's, or the identical cell's it repeats."""
    return row.get("same_as") or f"{row['method']}__b{row['budget']:g}"


def _ms(latency: dict, name: str, size: int) -> float | None:
    entry = latency.get(name, {}).get(f"batch_{size}")
    return None if entry is None else entry["median_ms"]


def write_report(results: Path, directory: Path, tokens: int, command: str = "bench.py run") -> None:
    """The table (`results.md`) and both plots from the cells in `results`, for a base of `tokens` vision tokens."""
    unpruned, rows, latency = load(results)
    base1, base8 = _ms(latency, "unpruned", 1), _ms(latency, "unpruned", 8)
    lines = [
        "# Vision-token pruning: learned two-stage pruner vs baselines",
        "",
        f"Command: `.venv/bin/python benchmarks/pruning/{command}`, then the same with `latency` on an idle "
        f"machine, then with `report`. Budget = fraction of the {tokens} vision tokens left after the last reduction.",
        "",
    ]
    if unpruned:
        lines.append(
            f"Unpruned: success {_success(unpruned)}, held-out L1 {unpruned['l1']:.4f}"
            + (f", {base1:.2f} ms (batch 1) / {base8:.2f} ms (batch 8)" if base1 else "")
            + "."
        )
        lines.append("")
    lines += [
        "Success: closed-loop rate over all episodes of the cell, with its 95% Wilson interval.",
        "",
        "| budget | method | success | L1 (hard) | vision tokens per layer | FLOPs | ms b1 | speed-up b1 | ms b8 | speed-up b8 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in sorted(rows, key=lambda r: (-r["budget"], r["method"])):
        name = _timed_as(row)
        b1, b8 = _ms(latency, name, 1), _ms(latency, name, 8)
        method = row["method"] + (f" (= {row['same_as']})" if "same_as" in row else "")
        speed = [
            f"{x:.2f}" if x else "-"
            for x in (b1, base1 / b1 if b1 and base1 else None, b8, base8 / b8 if b8 and base8 else None)
        ]
        lines.append(
            f"| {row['budget']:g} | {method} | {_success(row)} | {row['l1']:.4f} | "
            f"{row['vision_tokens_per_layer']} | x{row['flops'] / row['flops_unpruned']:.2f} | "
            + " | ".join(speed)
            + " |"
        )
    (directory / "results.md").write_text("\n".join(lines) + "\n")
    plot(unpruned, rows, latency, directory / "success_vs_latency.png", tokens)
    budget_plot(unpruned, rows, directory / "success_vs_budget.png")


def budget_plot(unpruned: dict, rows: list[dict], path: Path) -> None:
    """Per method, success (95% Wilson bars) and held-out L1 against the budget (log scale): where the
    curves bend is where the kept tokens start to matter."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_s, ax_l) = plt.subplots(1, 2, figsize=(13, 5))
    methods = sorted({r["method"] for r in rows})
    colour = _colours(plt, methods)
    for method in methods:
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["budget"])
        if len(mine) < 2:
            continue  # an ablation at one budget is a point, not a curve (it is in the table)
        xs = [r["budget"] for r in mine]
        bounds = [wilson_interval(r["success"], r["episodes"]) for r in mine]
        ys = [r["success"] for r in mine]
        yerr = [[y - lo for y, (lo, _) in zip(ys, bounds)], [hi - y for y, (_, hi) in zip(ys, bounds)]]
        style = {"color": colour[method], "marker": "o", "ls": "--" if method.endswith("_vit") else "-"}
        ax_s.errorbar(xs, ys, yerr=yerr, capsize=3, label=method, **style)  # dashed: inside the towers
        ax_l.plot(xs, [r["l1"] for r in mine], label=method, **style)
    if unpruned:
        ax_s.axhline(unpruned["success"], color="black", ls="--", lw=1, label="unpruned")
        ax_l.axhline(unpruned["l1"], color="black", ls="--", lw=1, label="unpruned")
    ax_s.set_xscale("log", base=2)
    ax_l.set_xscale("log", base=2)
    title = "Vision-token pruning: success and action error against the token budget"
    _finish(fig, (ax_s, ax_l), "budget: fraction of the vision tokens kept", title, path)


def _colours(plt, methods: list[str]) -> dict:
    """One distinct colour per method (tab20 once there are more than ten)."""
    cmap = plt.get_cmap("tab20" if len(methods) > 10 else "tab10")
    return {method: cmap(i % cmap.N) for i, method in enumerate(methods)}


def _finish(fig, axes, xlabel: str, title: str, path: Path) -> None:
    """Label the (success, L1) panels, legend the first beside them, save the figure and close it."""
    import matplotlib.pyplot as plt

    for ax, ylabel in zip(axes, ("closed-loop success (bars: 95% CI)", "held-out action L1 (lower is better)")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="center right")  # beside the panels, off the curves
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0, 0.86, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot(unpruned: dict, rows: list[dict], latency: dict, path: Path, tokens: int, size: int = 8) -> None:
    """Success and held-out L1 against latency at batch `size` (FLOPs where no latency was measured).

    Batch 8 by default: at batch 1 this tiny policy's 15-25 ms calls vary by about 20 % from one
    round to the next, at batch 8 by about 10 %. The L1 panel is there because closed-loop success
    can tie across methods (it did: 47/60 nearly everywhere) while the actions still differ."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_s, ax_l) = plt.subplots(1, 2, figsize=(13, 5))
    markers = {0.5: "o", 0.25: "s", 0.125: "^", 0.0625: "v", 0.03125: "D"}
    colour = _colours(plt, sorted({r["method"] for r in rows}))

    def x_of(name: str, row: dict) -> float:
        ms = _ms(latency, name, size)
        return ms if ms is not None else row["flops"] / 1e6

    for method in colour:
        for row in (r for r in rows if r["method"] == method):
            x = x_of(_timed_as(row), row)
            low, high = wilson_interval(row["success"], row["episodes"]) if "episodes" in row else (row["success"],) * 2
            ax_s.errorbar(
                [x],
                [row["success"]],
                yerr=[[row["success"] - low], [high - row["success"]]],
                color=colour[method],
                alpha=0.35,
                capsize=2,
                fmt="none",
            )
            for ax, y in ((ax_s, row["success"]), (ax_l, row["l1"])):
                ax.scatter(
                    [x],
                    [y],
                    color=colour[method],
                    marker=markers.get(row["budget"], "x"),
                    s=50,
                    label=method if row["budget"] == 0.25 and ax is ax_s else None,
                )
    if unpruned and _ms(latency, "unpruned", size):
        for ax, y in ((ax_s, unpruned["success"]), (ax_l, unpruned["l1"])):
            ax.scatter(
                [_ms(latency, "unpruned", size)],
                [y],
                color="black",
                marker="*",
                s=120,
                label="unpruned" if ax is ax_s else None,
            )
    xlabel = f"predict_action_chunk latency, batch {size} (ms)" if latency else "MFLOPs per chunk"
    shown = sorted({r["budget"] for r in rows}, reverse=True)
    title = "Vision-token pruning: " + ", ".join(f"{markers.get(b, 'x')} {100 * b:g} %" for b in shown)
    title += f" of the {tokens} vision tokens"
    _finish(fig, (ax_s, ax_l), xlabel, title, path)

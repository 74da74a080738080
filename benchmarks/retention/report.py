"""results/*.json -> results.md (per-method means over seeds) and tradeoff.png (A vs B, every seed)."""

from __future__ import annotations

import json
from pathlib import Path
from statistics import mean, pstdev

COLUMNS = [  # (key, header, format)
    ("success_B", "B success", "{:.2f}"),
    ("success_A", "A success", "{:.2f}"),
    ("drift_pooled", "feature drift", "{:.3f}"),
    ("drift_actions", "action drift", "{:.3f}"),
    ("l1_A_tuned", "A L1", "{:.3f}"),
    ("l1_A_refit", "A L1 after head re-fit", "{:.3f}"),
    ("within_budget", "steps within budget", "{:.2f}"),
    ("final_lambda", "final lambda", "{:.2f}"),
    ("train_s", "train s", "{:.0f}"),
]


# The README's short table: each method in words (the flags are in study.py's METHODS).
LABELS = {
    "plain": "plain fine-tuning",
    "frozen_vlm": "frozen VLM (head only)",
    "lora": "LoRA rank 16",
    "l2_init": "L2-to-init (0.1)",
    "distill_fixed": "fixed-weight distillation of its actions on A's frames",
    "replay2": "replay 2 %",
    "replay10": "replay 10 %",
    "replay50": "replay 50 %",
    "craft_dual_only": "CRaFT dual-only (actions on A, no projection)",
    "craft_pooled_B": "CRaFT pooled features on B's frames (the design note's)",
    "craft_actions_B": "CRaFT actions on B's frames",
    "craft_pooled_A": "CRaFT pooled features on A's frames",
    "craft_tokens_A": "CRaFT per-token features on A's frames",
    "craft_actions_A": "CRaFT actions on A's frames (budget 0.1, dual step 0.1)",
    "craft_demo": "the same with dual step 0.01 (`craftvla demo` until issue 33: online teacher, anchor 16)",
    "craft_demo_a8": "... anchor batch 8",
    "craft_demo_a4": "... anchor batch 4",
    "craft_demo_every2": "... retention gradient every 2 steps",
    "craft_demo_every4": "... retention gradient every 4 steps",
    "craft_demo_memo": "... teacher chunks memoised on 1,024 A frames",
    "craft_demo_memo_a8_every2": "... memo, anchor batch 8, every 2 steps (1.13x plain)",
    "craft_demo_memo_every4": "... memo, anchor batch 16, every 4 steps (1.12x plain)",
    "craft_all_A": "CRaFT pooled + tokens + actions on A",
    "craft_actions_cacheA": "CRaFT actions from an offline A cache",
    "craft_actions_A_replay2": "CRaFT actions on A + 2 % replay",
    "craft_actions_A_eps0.01": "CRaFT actions on A, budget 0.01",
    "craft_actions_A_eps0.03": "... budget 0.03",
    "craft_actions_A_eps0.3": "... budget 0.3",
    "craft_actions_A_eps1": "... budget 1.0",
}


def load(results: Path) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {}
    for path in sorted(results.glob("*.json")):
        record = json.loads(path.read_text())
        rows.setdefault(record["method"], []).append(record)
    return rows


def cell(records: list[dict], key: str, fmt: str) -> str:
    values = [r[key] for r in records if r.get(key) is not None]
    if not values:
        return "-"
    text = fmt.format(mean(values))
    return text + (f" ± {fmt.format(pstdev(values))}" if len(values) > 1 else "")


def write_report(results: Path, directory: Path, order: list[str] = ()) -> None:
    """results/*.json -> directory/results.md and directory/tradeoff.png (methods in `order` first)."""
    found = load(results)
    rows = {m: found.pop(m) for m in ["generalist", *order] if m in found} | found
    gen = rows.pop("generalist", [{}])[0]
    lines = [
        "# Retention study: fine-tuning the generalist on window-open",
        "",
        "Command: `.venv/bin/python benchmarks/retention/study.py run` then `... report`; "
        "mean ± std over seeds (population std); seeds per row in the last column.",
        "",
        f"Generalist before fine-tuning: B (window-open) {gen.get('success_B', float('nan')):.2f}, "
        f"A (5 tasks) {gen.get('success_A', float('nan')):.2f}.",
        "",
        "| method | " + " | ".join(h for _, h, _ in COLUMNS) + " | seeds |",
        "|---" * (len(COLUMNS) + 2) + "|",
    ]
    for method, records in rows.items():
        lines.append(f"| {method} | " + " | ".join(cell(records, k, f) for k, _, f in COLUMNS) + f" | {len(records)} |")
    (directory / "results.md").write_text("\n".join(lines) + "\n")
    (directory / "summary.md").write_text(summary(rows, gen))
    plot(rows, gen, directory / "tradeoff.png")


def summary(rows: dict[str, list[dict]], gen: dict) -> str:
    """The README's table: success on B and A, action drift, final lambda, seeds (mean ± std)."""
    short = lambda records, key: cell(records, key, "{:.2f}")  # noqa: E731
    lines = [
        "| method | window-open (B) | old tasks (A) | action drift on A | final lambda | seeds |",
        "|---|---|---|---|---|---|",
        f"| generalist (start) | {gen.get('success_B', 0):.2f} | {gen.get('success_A', 0):.2f} | 0 | - | - |",
    ]
    for method, records in rows.items():
        lines.append(
            f"| {LABELS.get(method, method)} | {short(records, 'success_B')} | {short(records, 'success_A')} | "
            f"{short(records, 'drift_actions')} | {short(records, 'final_lambda')} | {len(records)} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: dict[str, list[dict]], gen: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 6))
    cmap = plt.get_cmap("tab20")
    for i, (method, records) in enumerate(rows.items()):
        xs, ys = [r["success_B"] for r in records], [r["success_A"] for r in records]
        ax.scatter(xs, ys, color=cmap(i % 20), alpha=0.35, s=18)
        ax.scatter(
            [mean(xs)],
            [mean(ys)],
            color=cmap(i % 20),
            s=70,
            edgecolor="black",
            label=method,
            marker="*" if method.startswith("craft") else "o",
        )
    if gen:
        ax.scatter([gen["success_B"]], [gen["success_A"]], color="black", marker="X", s=90, label="generalist")
    ax.set_xlabel("success on B (new task)")
    ax.set_ylabel("success on A (old tasks)")
    ax.set_xlim(-0.03, 1.03)
    ax.set_ylim(-0.03, 1.03)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    ax.set_title("Forgetting vs learning: every method and seed (big marker: mean)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

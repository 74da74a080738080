"""Why does the tiny preset plateau on Meta-World? One variant = one set of `craftvla train` flags,
trained on the same demonstrations and evaluated closed-loop on the same unseen positions.

    .venv/bin/python benchmarks/train_metaworld/ablate.py [--variants base,gate1,...] [--steps 600]

Resumable: each finished variant writes `results/<name>.json` (under this folder) and a rerun
skips it; `ablations.md` is rewritten from every result after each variant. Data: `craftvla
collect`, 50 episodes per task (kept in WORK/data, collected once). Needs a quiet CPU for the
timings; the success rates do not depend on it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TASKS = "drawer-close-v3,button-press-topdown-v3,door-open-v3"
BASE = [
    "--preset",
    "tiny",
    "--batch_size",
    "32",
    "--optim.lr",
    "1e-3",
    "--checkpoint.save_freq",
    "0",
    "--log.log_freq",
    "20",
    "--log.progress",
    "false",
    "--seed",
    "0",
]
# name -> (extra train flags, what the variant tests)
VARIANTS: dict[str, tuple[list[str], str]] = {
    "base": ([], "the tiny preset as committed"),
    "gate1": (["--policy.head.gate_init", "1.0"], "the head's vision gate open from the start"),
    "head_reads_projector": (
        ["--policy.head.vision_source", "projector"],
        "every bridge block reads the vision tokens entering the LLM, not LLM layer l's",
    ),
    "head_reads_projector_gate1": (
        ["--policy.head.vision_source", "projector", "--policy.head.gate_init", "1.0"],
        "both of the above",
    ),
    "lr3e-3": (["--optim.lr", "3e-3"], "3x the learning rate"),
    "action_min_max": (
        ["--policy.normalization", "{observation.state: mean_std, action: min_max}"],
        "actions scaled to [-1, 1] by min/max instead of mean/std",
    ),
    "causal": (["--policy.llm.attention", "causal"], "causal LLM attention (what released VLA-Adapter runs)"),
    "patch16": (["--policy.vision.patch_size", "16"], "a 4x4 patch grid (16 vision tokens) instead of 8x8"),
    "flat_readout8": (
        ["--policy.head.flat_readout", "8"],
        "a position-preserving vision token (8 channels per patch, flattened) beside proprio",
    ),
}


def run(cmd: list[str], log: Path) -> None:
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "MUJOCO_GL": "egl"})


def collect(work: Path, bin_dir: Path) -> Path:
    data = work / "data"
    if not (data / "meta/info.json").is_file():
        run(
            [
                str(bin_dir / "craftvla"),
                "collect",
                "--out",
                str(data),
                "--tasks",
                TASKS,
                "--episodes",
                "50",
                "--image_size",
                "64",
                "--cameras",
                "corner",
                "--seed",
                "0",
            ],
            work / "collect.log",
        )
    return data


def variant(name: str, work: Path, data: Path, steps: int, episodes: int, bin_dir: Path) -> dict:
    flags, why = VARIANTS[name]
    out = work / name
    if out.exists():
        import shutil

        shutil.rmtree(out)  # an unfinished earlier attempt (finished ones have a results file)
    out.mkdir(parents=True)
    t0 = time.perf_counter()
    run(
        [
            str(bin_dir / "craftvla"),
            "train",
            *BASE,
            "--dataset.root",
            str(data),
            "--output_dir",
            str(out / "run"),
            "--steps",
            str(steps),
            *flags,
        ],
        out / "log.txt",
    )
    train_s = time.perf_counter() - t0
    run(
        [
            str(bin_dir / "craftvla"),
            "eval",
            "--checkpoint",
            str(out / "run/checkpoints/last"),
            "--tasks",
            TASKS,
            "--episodes",
            str(episodes),
            "--seed",
            "0",
            "--num_videos",
            "0",
            "--out",
            str(out / "eval"),
        ],
        out / "log.txt",
    )
    results = json.loads((out / "eval/results.json").read_text())
    metrics = [json.loads(line) for line in (out / "run/metrics.jsonl").read_text().splitlines() if line.strip()]
    return {
        "name": name,
        "why": why,
        "flags": flags,
        "steps": steps,
        "train_s": round(train_s, 1),
        "final_l1": metrics[-1].get("l1_loss"),
        "episodes": episodes,
        "torch_threads": os.environ.get("OMP_NUM_THREADS", "all cores"),
        "success": {t: r["success_rate"] for t, r in results["tasks"].items()},
        "mean_success": results["mean_success_rate"],
    }


def write_table(results_dir: Path) -> None:
    rows = [json.loads(p.read_text()) for p in sorted(results_dir.glob("*.json"))]
    tasks = TASKS.split(",")
    lines = [
        "# Tiny-preset ablations (written by ablate.py; one row per results/*.json)",
        "",
        "| variant | what it tests | steps | train s | final L1 | " + " | ".join(tasks) + " | mean |",
        "|---|---|---|---|---|" + "---|" * len(tasks) + "---|",
    ]
    for r in sorted(rows, key=lambda r: list(VARIANTS).index(r["name"]) if r["name"] in VARIANTS else 99):
        cells = [f"{round(r['success'][t] * r['episodes'])}/{r['episodes']}" for t in tasks]
        lines.append(
            f"| {r['name']} | {r['why']} | {r['steps']} | {r['train_s']:.0f} | {r['final_l1']:.3f} | "
            + " | ".join(cells)
            + f" | {r['mean_success']:.0%} |"
        )
    (results_dir.parent / "ablations.md").write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="runs/ablate_metaworld", help="data and runs (not committed)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {list(VARIANTS)}")
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps per variant (batch 32)")
    parser.add_argument("--episodes", type=int, default=20, help="evaluation episodes per task")
    parser.add_argument("--bin", default=".venv/bin", help="directory holding the craftvla command")
    args = parser.parse_args()
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    work, results_dir, bin_dir = Path(args.work), HERE / "results", Path(args.bin)
    work.mkdir(parents=True, exist_ok=True)
    results_dir.mkdir(exist_ok=True)
    data = collect(work, bin_dir)
    for name in names:
        path = results_dir / f"{name}_{args.steps}.json"
        if path.is_file():
            print(f"{name}: done earlier ({path})")
            continue
        row = variant(name, work, data, args.steps, args.episodes, bin_dir)
        path.write_text(json.dumps(row, indent=1) + "\n")
        write_table(results_dir)
        print(f"{name}: mean success {row['mean_success']:.0%} {row['success']} in {row['train_s']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

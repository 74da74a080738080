"""What pruning buys at the shapes users run: every method at 50 / 25 / 12.5 % on the
`vla-adapter-qwen2.5-0.5b` preset (DINOv2 + SigLIP at 224 px, 2 cameras: 512 vision tokens; Qwen2.5-0.5B,
24 layers; VLA-Adapter's Pro head), random weights, `predict_action_chunk` at batch 1.

    .venv/bin/python benchmarks/pruning/real_shapes.py               # this CPU, 2 threads (run it idle, ~40 min)
    .venv/bin/python benchmarks/pruning/real_shapes.py --device cuda --dtype bfloat16 --repeats 20 --warmup 5

One policy is built and each method's pruning part is swapped onto it in turn (`apply_pruning`), so
every row shares the same weights; learned parts are freshly initialised (with fixed per-layer
budgets their values do not change what is computed). Per row: FLOPs per chunk (torch's
FlopCounterMode, attention included) split into vision towers / projector / merger / LLM (with any
in-LLM scoring) / the rest (the action head), and latency: `--rounds` rounds, each timing every row
(median of `--repeats` calls after `--warmup`) in an order rotated by one place per round; a row's
latency is the median of its round medians. FLOPs and every round are written as they finish
(results/real_shapes_<device>.json); a rerun goes on from there.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
from _lib import write_json  # noqa: E402
from methods import METHODS, recipe  # noqa: E402

PRESET = "vla-adapter-qwen2.5-0.5b"
BUDGETS = (0.5, 0.25, 0.125)


def rows(methods: list[str] | None = None) -> dict[str, dict | None]:
    """name -> PruningConfig kwargs (None: unpruned) for `methods` (default: all); a recipe met by an
    earlier row is not repeated."""
    out: dict[str, dict | None] = {"unpruned": None}
    for budget in BUDGETS:
        for method in methods or METHODS:
            cfg = recipe(method, budget).pruning()
            if cfg not in out.values():
                out[f"{method}__b{budget:g}"] = cfg
    return out


def build(args):
    import torch

    from craftvla import VLAConfig, VLAPolicy

    torch.manual_seed(0)
    cfg = VLAConfig.preset(args.preset)
    policy = VLAPolicy(cfg).eval().to(args.device)
    for p in policy.parameters():
        p.requires_grad_(False)
    batch = {k: v.to(args.device) if hasattr(v, "to") else v for k, v in cfg.fake_batch(args.batch, seed=0).items()}
    return policy, batch


def configure(policy, pruning: dict | None, attention: str) -> None:
    """Give `policy` this row's pruning part (none: the unpruned policy, with its own attention)."""
    from craftvla.config import PruningConfig
    from craftvla.prune.module import apply_pruning

    policy.llm.model.set_attn_implementation(attention)  # apply_pruning switches it when it selects
    apply_pruning(policy, PruningConfig(**(pruning or {})))
    if policy.pruning is not None:
        policy.pruning.to(next(policy.llm.parameters()).dtype)


def token_schedule(policy) -> list[list[int]]:
    """[[0, vision tokens entering the LLM], [layer, tokens after selecting there], ...]."""
    tokens = policy.vision.num_patches * len(policy.config.camera_keys)
    pruning = policy.pruning
    if pruning is None:
        return [[0, tokens]]
    tokens = pruning.num_llm_tokens
    pruner = pruning.pruner
    after = [[layer, pruner.budget(layer, tokens)] for layer in sorted(pruner.schedule)] if pruner else []
    return [[0, tokens], *after]


def flop_split(policy, batch) -> dict[str, int]:
    """FLOPs of one chunk by part: vision, projector, merger, llm (with any in-LLM scoring); the rest
    of `total` is the action head."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False, depth=1)
    with counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        policy.predict_action_chunk(batch)
    counts = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    merger = getattr(policy.pruning, "merger", None)
    return {
        "total": counts["Global"],
        "vision": counts.get("VisionBackbone", 0),
        "projector": counts.get("Projector", 0),
        "merger": counts.get(type(merger).__name__, 0) if merger is not None else 0,
        "llm": counts.get("LanguageBackbone", 0),
    }  # the rest is the action head's (its parts run outside its own forward, so the counter cannot name it)


def timed(policy, batch, args) -> float:
    """Median ms of `args.repeats` calls after `args.warmup` (autocast to `args.dtype` on CUDA)."""
    import contextlib

    import torch

    from craftvla.model.speed import chunk_latency

    cast = torch.autocast("cuda", dtype=getattr(torch, args.dtype)) if args.device == "cuda" else None
    with cast or contextlib.nullcontext():
        return chunk_latency(policy, batch, args.warmup, args.repeats)["median_ms"]


def resume(out: Path, setup: dict, methods: list[str] | None = None) -> dict:
    """The record to go on from: `out`'s if made with this set-up and these rows; else a fresh one that
    keeps the FLOPs of every row measured before at the same preset and batch (timing rounds are only
    comparable within one set-up, so they start over)."""
    fresh = {"setup": setup, "rows": {name: {"pruning": cfg} for name, cfg in rows(methods).items()}, "rounds": []}
    old = json.loads(out.read_text()) if out.is_file() else {"setup": {}, "rows": {}}
    if old["setup"] == setup and [(n, r["pruning"]) for n, r in old["rows"].items()] == [
        (n, r["pruning"]) for n, r in fresh["rows"].items()
    ]:
        return old
    if all(old["setup"].get(k) == setup[k] for k in ("preset", "batch")):
        for name, row in fresh["rows"].items():
            before = old["rows"].get(name, {})
            if before.get("pruning") == row["pruning"] and "flops" in before:
                row.update(flops=before["flops"], vision_tokens=before["vision_tokens"])
    return fresh


def measure(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out or HERE / "results" / f"real_shapes_{args.device}.json")
    setup = {k: getattr(args, k) for k in ("preset", "device", "dtype", "batch", "threads", "repeats", "warmup")}
    record = resume(out, setup, args.methods.split(",") if args.methods else None)
    policy, batch = build(args)
    attention = policy.llm.model.config._attn_implementation
    for name, row in record["rows"].items():
        if "flops" not in row:
            configure(policy, row["pruning"], attention)
            row["flops"] = flop_split(policy, batch)
            row["vision_tokens"] = token_schedule(policy)
            write_json(out, record)
            print(f"{name}: {row['flops']['total'] / 1e9:.0f} GFLOPs", flush=True)
    names = list(record["rows"])
    for r in range(len(record["rounds"]), args.rounds):
        times = {}
        for name in names[r % len(names) :] + names[: r % len(names)]:
            configure(policy, record["rows"][name]["pruning"], attention)
            times[name] = timed(policy, batch, args)
        record["rounds"].append(times)
        write_json(out, record)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {t:.0f} ms" for n, t in times.items()), flush=True)
    return summarise(record, out)


def summarise(record: dict, out: Path) -> dict:
    """Each row's latency (median of its round medians), speed-up and FLOPs ratio to unpruned."""
    for name, row in record["rows"].items():
        row["round_ms"] = [r[name] for r in record["rounds"]]
        row["ms"] = statistics.median(row["round_ms"]) if record["rounds"] else None
    base = record["rows"]["unpruned"]
    for row in record["rows"].values():
        row["speed_up"] = base["ms"] / row["ms"] if row["ms"] else None
        row["flops_ratio"] = row["flops"]["total"] / base["flops"]["total"]
    write_json(out, record)
    return record


def table(record: dict) -> str:
    """The markdown table of a finished record."""
    setup = record["setup"]
    lines = [
        f"{setup['preset']}, {setup['device']} ({setup['dtype'] if setup['device'] == 'cuda' else 'float32'}, "
        f"{setup['threads']} threads), batch {setup['batch']}; median of {len(record['rounds'])} rounds x "
        f"{setup['repeats']} calls.",
        "",
        "| row | vision tokens into the LLM (after layer: kept) | GFLOPs | vision / LLM / head share | FLOPs | ms | speed-up |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in record["rows"].items():
        f = row["flops"]
        head = f["total"] - sum(f[k] for k in ("vision", "projector", "merger", "llm"))
        shares = " / ".join(f"{100 * part / f['total']:.0f} %" for part in (f["vision"], f["llm"], head))
        tokens = ", ".join([str(row["vision_tokens"][0][1]), *(f"{a}: {k}" for a, k in row["vision_tokens"][1:])])
        lines.append(
            f"| {name} | {tokens} | {f['total'] / 1e9:.1f} | {shares} | x{row['flops_ratio']:.2f} "
            + (f"| {row['ms']:.0f} | {row['speed_up']:.2f}x |" if row["ms"] else "| - | - |")
        )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="real_shapes.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default=PRESET, help="a craftvla preset (tiny for a smoke run)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default="bfloat16", help="CUDA autocast dtype (CPU runs float32)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--rounds", type=int, default=3, help="latency rounds (0: FLOPs only)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--out", help="results file (default: results/real_shapes_<device>.json; required off the real preset)"
    )
    parser.add_argument(
        "--methods", help=f"comma-separated rows beside unpruned (default: all of {', '.join(METHODS)}; needs --out)"
    )
    args = parser.parse_args(argv)
    unknown = [m for m in (args.methods or "").split(",") if m and m not in METHODS]
    if unknown:
        parser.error(f"--methods: unknown {unknown}")
    if args.methods and not args.out:
        parser.error("--methods: pass --out (the default file holds every method)")
    if args.repeats < 2:
        parser.error("--repeats must be at least 2 (a round's median and spread)")
    if args.preset != PRESET and not args.out:
        parser.error(f"--preset {args.preset}: pass --out (results/ holds the {PRESET} numbers)")
    print(table(measure(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

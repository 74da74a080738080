"""What does the retention that works cost? CRaFT-actions and its alternatives, side by side.

    .venv/bin/python benchmarks/craft_step/actions.py                    # both shapes; resumable
    .venv/bin/python benchmarks/craft_step/actions.py --configs demo --rounds 3 --skip-memory

Every variant takes one optimizer step per round (`everyK`: K steps, one whole retention cycle, timed
together and divided by K) on its own copy of the same start policy, in a shuffled order, on the same
task batch (32 frames); medians after two warm-up rounds. Variants:

- `plain`: forward, backward, AdamW. `replay50`: the same step on a batch half old-task frames
  (replay at any ratio is a plain step on a mixed batch: same shape, same cost).
- `distill_fixed_aN`: the start policy's action chunks on an anchor batch of N, fixed weight 1, no
  projection, no dual update (online teacher).
- `craft_online_aN`: CRaFT with the actions target (the demo's): online teacher on every anchor batch.
- `craft_cache_a16`: the teacher's chunks read from an offline actions cache (`craftvla cache build`).
- `craft_memo_aN`: the teacher's chunk kept per anchor frame (`--craft.anchor_source memo`), timed in
  the steady state (every anchor frame met once before timing: a run pays the teacher once per frame,
  `--craft.anchor_frames` bounds how many).
- `..._everyK`: the retention gradient recomputed every K steps (`--craft.retention_every K`).

FLOP floor: the FLOPs one step must do (torch.utils.flop_counter) as a ratio to plain's: task
forward + backward at 32, plus the student's anchor forward + backward (divided by K) and the
teacher's forward (online only). Memory (CPU): each variant's 3 steps in a fresh interpreter with
RSS sampled (peak minus the RSS before the first step; coarse), and the exact bytes the plug-in
holds between steps (gradient buffer, initial-weight copies, memo).

Configs: `demo` (the shipped generalist, `craftvla demo`'s start) and `larger` (the old benchmark's
larger CPU shape: Qwen2 512 wide, 8 layers, random weights). Each config's timings are written to
results_actions.json as they finish, each memory cell too; a rerun skips what is there.
"""

from __future__ import annotations

import argparse
import copy
import functools
import itertools
import json
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench  # noqa: E402
from bench import build_anchor_cache, configs, peak_rss_growth, timed  # noqa: E402

from craftvla.craft.config import CraftConfig  # noqa: E402
from craftvla.craft.plugin import CraftPlugin  # noqa: E402
from craftvla.model.policy import VLAPolicy  # noqa: E402

GENERALIST = HERE.parents[1] / "assets" / "generalist" / "checkpoint"
RESULTS = HERE / "results_actions.json"
BATCH, POOL = 32, 64  # task batch; anchor frames the streams cycle through
ACTIONS = dict(targets="actions", dual_lr=0.01)  # the demo's CRaFT: budget 0.1, lambda 1, dual step 0.01


def variants(cache: str) -> dict[str, dict | None]:
    """name -> CraftConfig keywords (None: a plain step); each option spelled out, so a change of the
    flags' defaults leaves a named variant as it was (`craft_defaults`: what the defaults are now)."""
    out: dict[str, dict | None] = {"plain": None, "replay50": None}
    out["distill_fixed_a16"] = dict(mode="distill_fixed", targets="actions", anchor_batch_size=16)
    for source in ("online", "memo"):
        for n, k in ((16, 1), (8, 1), (4, 1), (16, 2), (16, 4), (8, 2), (8, 4)):
            if source == "online" and (n, k) in ((16, 2), (8, 4)):
                continue
            name = f"craft_{source}_a{n}" + (f"_every{k}" if k > 1 else "")
            out[name] = dict(ACTIONS, anchor_source=source, anchor_batch_size=n, retention_every=k)
        if source == "online":
            out["craft_cache_a16"] = dict(dual_lr=0.01, anchor_cache=cache, anchor_batch_size=16)
    out["craft_defaults"] = dict(dual_lr=0.01)  # --craft.enabled true --craft.anchor_dataset DIR, nothing else
    return out


def start_policy(config: str) -> VLAPolicy:
    torch.manual_seed(0)
    if config == "demo":
        return VLAPolicy.from_pretrained(GENERALIST).train()
    return VLAPolicy(configs()["larger-cpu (LLM 512 wide, 8 layers)"]).train()


def task_batch(policy: VLAPolicy, size: int, seed: int) -> dict:
    batch = policy.config.fake_batch(size, seed=seed)
    batch["action_is_pad"] = torch.zeros_like(batch["action_is_pad"])
    return batch


def anchor_pool(policy: VLAPolicy) -> list[dict]:
    """POOL anchor frames as single-frame batches carrying their frame `index`."""
    frames = []
    for i in range(POOL):
        frame = task_batch(policy, 1, seed=1000 + i)
        frame["index"] = torch.tensor([i])
        frames.append(frame)
    return frames


def chunks(pool: list[dict], size: int) -> list[dict]:
    """The pool as consecutive anchor batches of `size` (collated like a DataLoader's)."""
    out = []
    for first in range(0, len(pool), size):
        part = pool[first : first + size]
        out.append(
            {
                k: torch.cat([p[k] for p in part]) if torch.is_tensor(v) else sum((p[k] for p in part), [])
                for k, v in part[0].items()
            }
        )
    return out


class Runner(bench.Runner):
    """One variant: its policy, AdamW, and plug-in; `step(batch)` (bench.Runner's) is one optimizer step."""

    def __init__(self, policy: VLAPolicy, kwargs: dict | None, pool: list[dict]):
        self.policy = policy
        self.opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-4)
        self.plugin = None
        if kwargs is not None:
            kwargs = dict(kwargs)
            if "anchor_cache" not in kwargs:
                kwargs["anchor_dataset"] = "(the benchmark's anchor pool)"  # the stream below is its data
            cfg = CraftConfig(enabled=True, **kwargs)
            stream = chunks(pool, cfg.anchor_batch_size)
            self.plugin = CraftPlugin(policy, cfg, anchor_batches=lambda step: itertools.cycle(stream))
            if cfg.source == "memo":  # the steady state: every anchor frame met once
                for anchor in stream:
                    self.plugin.anchors.memo_targets(policy, anchor)

    @property
    def cycle(self) -> int:
        """Steps per timing: a whole retention cycle (k steps: one that recomputes g_ret, k - 1 that reuse it)."""
        return self.plugin.cfg.every if self.plugin is not None else 1

    def steps(self, batch: dict) -> None:
        for _ in range(self.cycle):
            self.step(batch)

    def held_mib(self) -> float:
        """What the plug-in keeps between steps: gradient buffer, initial copies, memo."""
        if self.plugin is None:
            return 0.0
        tensors = [self.plugin._buf, *getattr(self.plugin.anchors, "initial", {}).values()]
        tensors += [t for row in (getattr(self.plugin.anchors, "memo", None) or {}).values() for t in row.values()]
        return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def flops(policy: VLAPolicy, batch: dict, backward: bool) -> int:
    """FLOPs of the policy's loss forward (and backward) on `batch`."""
    policy = copy.deepcopy(policy)
    with FlopCounterMode(display=False) as counter:
        loss = policy(batch)[0]  # (the forward is counted with autograd on: its FLOPs do not change)
        if backward:
            loss.backward()
    return counter.get_total_flops()


def flop_floors(policy: VLAPolicy, runners: dict) -> dict[str, float]:
    """Each variant's FLOPs per step as a ratio to plain's (see the module docstring)."""
    sizes = {r.plugin.cfg.anchor_batch_size for r in runners.values() if r.plugin is not None}
    train = {n: flops(policy, task_batch(policy, n, 0), True) for n in {BATCH, *sizes}}
    teacher = {n: flops(policy, task_batch(policy, n, 0), False) for n in sizes}
    out = {}
    for name, runner in runners.items():
        extra = 0.0
        if runner.plugin is not None:
            cfg = runner.plugin.cfg
            n = cfg.anchor_batch_size
            extra = (train[n] + (teacher[n] if cfg.source == "online" else 0)) / cfg.every
        out[name] = (train[BATCH] + extra) / train[BATCH]
    return out


def time_config(config: str, rounds: int, cache: str) -> dict:
    base = start_policy(config)
    pool = anchor_pool(base)
    table = variants(cache)
    runners = {name: Runner(copy.deepcopy(base), kwargs, pool) for name, kwargs in table.items()}
    batches = {"plain": task_batch(base, BATCH, 0)}
    half = chunks(pool[: BATCH // 2], BATCH // 2)[0]
    replay = task_batch(base, BATCH // 2, 0)
    batches["replay50"] = {
        k: torch.cat([replay[k], half[k]]) if torch.is_tensor(v) and k != "index" else v for k, v in replay.items()
    }
    batches["replay50"]["task"] = replay["task"] + half["task"]
    times = {name: [] for name in table}
    order = list(table)
    cpu = torch.device("cpu")
    for r in range(rounds + 2):
        random.Random(r).shuffle(order)
        for name in order:
            runner = runners[name]
            seconds = timed(functools.partial(runner.steps, batches.get(name, batches["plain"])), cpu) / runner.cycle
            if r >= 2:
                times[name].append(seconds)
            print(f"{config} round {r} {name}: {seconds:.3f} s", flush=True)
    floors = flop_floors(base, runners)
    return {
        "trainable": sum(p.numel() for p in base.parameters() if p.requires_grad),
        "seconds": {name: statistics.median(v) for name, v in times.items()},
        "all_seconds": times,
        "flop_ratio": floors,
        "held_mib": {name: r.held_mib() for name, r in runners.items()},
        "rounds": rounds,
    }


def memory_child(config: str, name: str, cache: str) -> None:
    """Print the peak RSS growth (MiB) over 3 steps of one variant (run in a fresh interpreter)."""
    torch.set_num_threads(2)
    base = start_policy(config)
    runner = Runner(base, variants(cache)[name], anchor_pool(base))
    batch = task_batch(base, BATCH, 0)
    print(peak_rss_growth(lambda: [runner.step(batch) for _ in range(3)]))


def actions_cache(config: str, work: Path) -> str:
    """An actions cache of the config's start policy on synthetic frames (for `craft_cache_a16`)."""
    policy = start_policy(config)
    return str(build_anchor_cache(policy.config, work, samples=64, target="actions", policy=policy))


def load() -> dict:
    return json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}


def save(results: dict) -> None:
    tmp = RESULTS.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(RESULTS)


def report(results: dict) -> str:
    lines = [
        "# The retention that works, and what it costs (`actions.py`)",
        "",
        "Command: `.venv/bin/python benchmarks/craft_step/actions.py`; "
        f"batch {BATCH}, full fine-tuning, AdamW, fp32, 2 threads, {platform.machine()} CPU; "
        f"torch {torch.__version__}. Medians of one step per round, all variants in the same rounds.",
        "",
    ]
    for config, res in results.items():
        if "seconds" not in res:
            continue
        sec, plain = res["seconds"], res["seconds"]["plain"]
        mem = res.get("peak_mib", {})
        lines += [
            f"## {config} ({res['trainable']:,} trainable parameters; {res['rounds']} rounds; {res.get('date', '')})",
            "",
            "| variant | s/step | x plain | FLOP floor x plain | held by the plug-in MiB | peak RSS growth MiB |",
            "|---|---|---|---|---|---|",
        ]
        for name, s in sec.items():
            peak = f"{mem[name]:.0f}" if name in mem else "-"
            lines.append(
                f"| {name} | {s:.3f} | {s / plain:.2f} | {res['flop_ratio'][name]:.2f} | "
                f"{res['held_mib'][name]:.0f} | {peak} |"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="demo,larger")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--force", action="store_true", help="re-time configs already in results_actions.json")
    parser.add_argument("--memory-child", nargs=3, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        return memory_child(*args.memory_child)
    torch.set_num_threads(2)
    results = load()
    with tempfile.TemporaryDirectory() as tmp:
        for config in args.configs.split(","):
            cache = actions_cache(config, Path(tmp) / config)
            if args.force or "seconds" not in results.get(config, {}):
                results[config] = {**time_config(config, args.rounds, cache), "date": time.strftime("%Y-%m-%d")}
                save(results)
            if args.skip_memory:
                continue
            peaks = results[config].setdefault("peak_mib", {})
            for name in variants(cache):
                if name not in peaks:
                    cmd = [sys.executable, __file__, "--memory-child", config, name, cache]
                    peaks[name] = float(
                        subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split()[-1]
                    )
                    save(results)
    (HERE / "actions.md").write_text(report(results))
    print(report(results))


if __name__ == "__main__":
    main()

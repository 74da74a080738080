"""Where does a CRaFT-actions step's time go? torch.profiler over the demo's configuration.

    .venv/bin/python benchmarks/craft_step/profile_actions.py [--batch 32] [--anchor_batch 16] [--steps 3]

The shipped generalist (the demo's start policy), full fine-tuning with AdamW, batch 32; CRaFT with
the actions target (the start policy's own chunks), an anchor batch of 16 from a separate stream
(online teacher), projection and dual variable -- `craftvla demo`'s CRaFT. Plain steps and CRaFT
steps are profiled alike after two warm-up steps each; the CRaFT step's phases are labelled by
wrapping the plug-in's pieces in `record_function` here (the library is not changed):
`task forward` / `anchor forward (student)` (policy.encode), `teacher forward` (the initial weights on
the anchor batch), `retention backward` / `task backward` (the plug-in's two backwards), `projection`
(the gradient surgery on the flat buffers), `optimizer`. Writes profile_actions.md: per-phase ms per
step, and the top operators by self CPU time.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import platform
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from craftvla.craft import functional as CF
from craftvla.craft.config import CraftConfig
from craftvla.craft.plugin import CraftPlugin
from craftvla.model.policy import VLAPolicy

HERE = Path(__file__).resolve().parent
GENERALIST = HERE.parents[1] / "assets" / "generalist" / "checkpoint"


def labelled(name: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with record_function(name):
            return fn(*args, **kwargs)

    return wrapper


def fake_batch(policy, size: int, seed: int) -> dict:
    batch = policy.config.fake_batch(size, seed=seed)
    batch["action_is_pad"] = torch.zeros_like(batch["action_is_pad"])
    return batch


def plain_step(policy, optimizer):
    def step(batch):
        with record_function("task forward"):
            loss, _ = policy(batch)
        with record_function("task backward"):
            loss.backward()
        with record_function("optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return step


def craft_step(policy, optimizer, anchor_batch: int):
    anchors = [fake_batch(policy, anchor_batch, seed) for seed in (10, 11)]
    plugin = CraftPlugin(
        policy,
        CraftConfig(enabled=True, targets="actions", anchor_batch_size=anchor_batch),
        anchor_batches=lambda start: itertools.cycle(anchors),
    )
    calls = {"n": 0, "teacher": False}
    encode, features = policy.encode, plugin.anchors.features

    def encode_labelled(*args, **kwargs):  # per step: the task's encode, then the anchors' (the student's)
        if calls["teacher"]:  # the teacher's encode runs inside `teacher forward`
            return encode(*args, **kwargs)
        calls["n"] += 1
        with record_function("task forward" if calls["n"] % 2 else "anchor forward (student)"):
            return encode(*args, **kwargs)

    def features_labelled(*args, **kwargs):
        calls["teacher"] = True
        try:
            with record_function("teacher forward"):
                return features(*args, **kwargs)
        finally:
            calls["teacher"] = False

    policy.encode = encode_labelled
    plugin.anchors.features = features_labelled
    accumulate = plugin._accumulate

    def accumulate_labelled(loss, views, retain_graph):
        with record_function("retention backward" if retain_graph else "task backward"):
            return accumulate(loss, views, retain_graph)

    plugin._accumulate = accumulate_labelled
    CF.project_flat = labelled("projection", CF.project_flat)

    def step(batch):
        plugin.backward(policy, batch)
        plugin.before_optimizer_step()
        with record_function("optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        plugin.after_optimizer_step()

    return step


def profiled(step, batch, steps: int) -> tuple[float, object]:
    for _ in range(2):
        step(batch)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step(batch)
        wall = (time.perf_counter() - start) / steps
    return wall, prof


PHASES = (
    "task forward",
    "anchor forward (student)",
    "teacher forward",
    "retention backward",
    "task backward",
    "projection",
    "optimizer",
)


def phase_ms(prof, steps: int) -> dict[str, float]:
    totals = {e.key: e.cpu_time_total / 1000 / steps for e in prof.key_averages() if e.key in PHASES}
    return {p: totals.get(p, 0.0) for p in PHASES}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--anchor_batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", default="profile_actions.md", help="file name in benchmarks/craft_step/")
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = {}
    for name in ("plain", "craft_actions"):
        torch.manual_seed(0)
        policy = VLAPolicy.from_pretrained(GENERALIST).train()
        optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-4)
        step = plain_step(policy, optimizer) if name == "plain" else craft_step(policy, optimizer, args.anchor_batch)
        wall, prof = profiled(step, fake_batch(policy, args.batch, 0), args.steps)
        rows[name] = (wall, phase_ms(prof, args.steps), prof)
    plain_wall, craft_wall = rows["plain"][0], rows["craft_actions"][0]
    lines = [
        "# Where a CRaFT-actions step's time goes (`profile_actions.py`)",
        "",
        f"`.venv/bin/python benchmarks/craft_step/profile_actions.py --batch {args.batch} --anchor_batch "
        f"{args.anchor_batch} --steps {args.steps}`; the shipped generalist, full fine-tuning, AdamW, 2 threads, "
        f"{platform.machine()}; {time.strftime('%Y-%m-%d')}. Wall-clock under the profiler (which adds overhead).",
        "",
        f"Step: plain {plain_wall * 1000:.0f} ms, CRaFT actions {craft_wall * 1000:.0f} ms "
        f"({craft_wall / plain_wall:.2f}x).",
        "",
        "| phase (ms per step, inclusive CPU time) | plain | CRaFT actions |",
        "|---|---|---|",
    ]
    for phase in PHASES:
        lines.append(f"| {phase} | {rows['plain'][1][phase]:.0f} | {rows['craft_actions'][1][phase]:.0f} |")
    table = rows["craft_actions"][2].key_averages().table(sort_by="self_cpu_time_total", row_limit=20)
    lines += ["", "Top operators of the CRaFT-actions steps by self CPU time:", "", "```", table, "```", ""]
    (HERE / args.out).write_text("\n".join(lines))
    print("\n".join(lines[:20]))


if __name__ == "__main__":
    main()

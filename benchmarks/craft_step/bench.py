"""Step time and peak memory: plain fine-tuning vs CRaFT online vs CRaFT from an anchor cache vs the
straightforward reference (reference.py: CPU weight swap + per-tensor surgery loop).

    .venv/bin/python benchmarks/craft_step/bench.py [--rounds 12] [--batch 4] [--out benchmarks/craft_step]

Times: every variant steps once per round, in a shuffled order, on its own copy of the same
initial policy (AdamW, full fine-tuning of the trainable parts); medians over the rounds after
two warm-up rounds. The cache variant reads a pooled-features cache built (once per config, by
`craft.cache_build.build_cache`) from the same initial policy on a small synthetic LeRobot dataset; it
keeps the vision bridge feature only (C_R: `--craft.anchor_type vision`), one anchor batch of `--batch`
samples per step. The FLOP-model floor of exact online CRaFT = plain step + one no-grad
encoder forward (the anchor) + one backward of L_ret alone (the second backward through the
retention subgraph), each component timed in the same rounds. Peak memory: on CUDA
max_memory_allocated per variant; on CPU each variant runs 3 steps in a fresh subprocess while
a thread samples the RSS every millisecond (peak minus the RSS before the first step).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from reference import ReferenceCraftPlugin

from craftvla.config import LLMConfig, VLAConfig
from craftvla.craft.config import CraftConfig
from craftvla.craft.functional import retention_loss
from craftvla.craft.plugin import CraftPlugin
from craftvla.model.context import bridge_features
from craftvla.model.policy import VLAPolicy

VARIANTS = ("plain", "craft_online", "craft_cache", "craft_swap")


def configs() -> dict[str, VLAConfig]:
    tiny = VLAConfig.preset("tiny")
    larger = dataclasses.replace(
        tiny,
        llm=LLMConfig(
            family="qwen2", hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=2, intermediate_size=1408
        ),
        preset_name="larger-cpu",
    )
    return {"tiny": tiny, "larger-cpu (LLM 512 wide, 8 layers)": larger}


def craft_cfg(variant: str, cache: Path | None, batch_size: int) -> CraftConfig | None:
    if variant == "craft_online":
        return CraftConfig(enabled=True)
    if variant == "craft_cache":  # a cache holds the vision feature (C_R) of the middle layer
        return CraftConfig(
            enabled=True,
            anchor_source="cache",
            anchor_cache=str(cache),
            anchor_type="vision",
            anchor_batch_size=batch_size,
        )
    if variant == "craft_swap":  # reference.py: CPU weight swap + per-tensor loop
        return CraftConfig(enabled=True, projection_scope="per_tensor")
    return None


def initial_policy(cfg: VLAConfig) -> VLAPolicy:
    torch.manual_seed(0)  # every variant, the cache's teacher and the memory children start here
    return VLAPolicy(cfg)


def build_anchor_cache(
    cfg: VLAConfig, work: Path, samples: int = 32, target: str = "pooled", policy: VLAPolicy | None = None
) -> Path:
    """A `target` cache (pooled: C_R, mean) of `policy` (default: the initial policy) on a
    synthetic dataset of random frames."""
    from craftvla.craft.cache_build import CacheBuildConfig, build_cache
    from craftvla.data import LeRobotDatasetWriter

    (policy or initial_policy(cfg)).save_pretrained(work / "ckpt")
    size, rng = cfg.vision.image_size, np.random.default_rng(0)
    features = {
        k: {"dtype": "video", "shape": (size, size, 3), "names": ["height", "width", "channels"]}
        for k in cfg.camera_keys
    }
    features.update(
        {
            "observation.state": {"dtype": "float32", "shape": (cfg.state_dim,), "names": None},
            "action": {"dtype": "float32", "shape": (cfg.action_dim,), "names": None},
        }
    )
    writer = LeRobotDatasetWriter(work / "data", fps=10, features=features)
    for f in range(samples):
        writer.add_frame(
            {
                **{k: rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for k in cfg.camera_keys},
                "observation.state": rng.normal(size=cfg.state_dim).astype(np.float32),
                "action": rng.normal(size=cfg.action_dim).astype(np.float32),
            },
            task="close the drawer",
        )
        if f % 8 == 7:
            writer.save_episode()
    build_cache(
        CacheBuildConfig(
            checkpoint=str(work / "ckpt"),
            dataset=str(writer.finalize()),
            out=str(work / "cache"),
            target=target,
            layer=cfg.llm.num_layers // 2 if target != "actions" else None,
            dtype="float32",
            image_dtype="float32",
            device="cpu",
        )
    )
    return work / "cache"


class Runner:
    """One variant's policy, optimizer and plug-in; `step(batch)` is one optimizer step."""

    def __init__(self, policy: VLAPolicy, variant: str, cache: Path | None, batch_size: int):
        self.policy, self.variant = policy, variant
        self.opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-4)
        cfg = craft_cfg(variant, cache, batch_size)
        plugin_cls = ReferenceCraftPlugin if variant == "craft_swap" else CraftPlugin
        self.plugin = plugin_cls(policy, cfg) if cfg else None

    def step(self, batch: dict) -> None:
        if self.plugin is None:
            self.policy(batch)[0].backward()
        else:
            self.plugin.backward(self.policy, batch, 1.0)
            self.plugin.before_optimizer_step()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.plugin is not None:
            self.plugin.after_optimizer_step()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def floor_components(policy: VLAPolicy, batch: dict, device) -> dict[str, float]:
    """The two extra pieces exact CRaFT cannot avoid, timed alone on `policy`."""
    params = [p for p in policy.parameters() if p.requires_grad]

    def anchor_forward():
        with torch.no_grad():
            bridge_features(policy.encode(batch))

    f = bridge_features(policy.compute_loss(batch).context)
    loss = retention_loss(f, f.detach() + 0.1)
    ret_bwd = timed(lambda: torch.autograd.grad(loss, params, allow_unused=True), device)
    return {"anchor_forward": timed(anchor_forward, device), "retention_backward": ret_bwd}


def time_config(cfg: VLAConfig, rounds: int, batch_size: int, device, cache: Path) -> dict:
    base = initial_policy(cfg).to(device)
    runners = {v: Runner(copy.deepcopy(base), v, cache, batch_size) for v in VARIANTS}
    probe = copy.deepcopy(base)
    batch = _to(cfg.fake_batch(batch_size), device)
    times = {k: [] for k in [*VARIANTS, "anchor_forward", "retention_backward"]}
    order = [*VARIANTS, "floor"]
    for r in range(rounds + 2):
        random.Random(r).shuffle(order)
        for name in order:
            if name == "floor":
                parts = floor_components(probe, batch, device)
            else:
                parts = {name: timed(functools.partial(runners[name].step, batch), device)}
            if r >= 2:  # two warm-up rounds
                for k, v in parts.items():
                    times[k].append(v)
    med = {k: statistics.median(v) for k, v in times.items()}
    med["floor"] = med["plain"] + med["anchor_forward"] + med["retention_backward"]
    med["anchors"] = runners["craft_online"].plugin.anchors.description
    med["trainable"] = sum(p.numel() for p in base.parameters() if p.requires_grad)
    med["extra_mib"] = {v: _plugin_bytes(runners[v].plugin) / 2**20 for v in VARIANTS[1:]}
    med["cache"] = runners["craft_cache"].plugin.anchors.description
    return med


def _plugin_bytes(plugin) -> int:
    """Memory the plug-in holds between steps: its gradient buffer and its copies of initial weights
    (on the device for online, in host memory for swap)."""
    held = plugin._buf.numel() * plugin._buf.element_size()
    initial = getattr(plugin.anchors, "initial", {})  # the cache provider keeps no weights
    return held + sum(t.numel() * t.element_size() for t in initial.values())


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def peak_memory_cpu(cfg_name: str, variant: str, batch_size: int, cache: Path) -> float:
    """MiB: run 3 steps of `variant` in a fresh interpreter, sampling RSS (see module docstring)."""
    cmd = [sys.executable, __file__, "--memory-child", cfg_name, variant, str(cache), "--batch", str(batch_size)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[-1])


def _rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096 / 2**20


def peak_rss_growth(run) -> float:
    """MiB: the peak RSS while `run()` runs (sampled every 1 ms: coarse) minus the RSS before it."""
    start, peak, done = _rss_mib(), [0.0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mib())
            time.sleep(0.001)

    thread = threading.Thread(target=sample)
    thread.start()
    try:
        run()
    finally:
        done.set()
        thread.join()
    return peak[0] - start


def memory_child(cfg_name: str, variant: str, cache: str, batch_size: int) -> None:
    cfg = configs()[cfg_name]
    runner = Runner(initial_policy(cfg), variant, Path(cache), batch_size)
    batch = cfg.fake_batch(batch_size)
    print(peak_rss_growth(lambda: [runner.step(batch) for _ in range(3)]))


def table(results: dict, memory: dict, device) -> str:
    lines = [
        f"device: {device}; torch {torch.__version__}; threads {torch.get_num_threads()}",
        "",
        "| config | trainable | plain s/step | CRaFT online | floor (exact CRaFT) | CRaFT cache | swap (seed) "
        "| online/floor | online/swap | online/plain | cache/plain |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in results.items():
        lines.append(
            f"| {name} | {m['trainable']:,} | {m['plain']:.3f} | {m['craft_online']:.3f} | {m['floor']:.3f} | "
            f"{m['craft_cache']:.3f} | {m['craft_swap']:.3f} | {m['craft_online'] / m['floor']:.3f} | "
            f"{m['craft_online'] / m['craft_swap']:.3f} | {m['craft_online'] / m['plain']:.3f} | "
            f"{m['craft_cache'] / m['plain']:.3f} |"
        )
    lines += [
        "",
        "floor components (medians, s): "
        + "; ".join(
            f"{n}: anchor forward {m['anchor_forward']:.3f}, retention backward {m['retention_backward']:.3f}"
            for n, m in results.items()
        ),
        "",
        "online anchors: " + "; ".join(f"{n}: {m['anchors']}" for n, m in results.items()),
    ]
    lines += [
        "",
        "held between steps by the plug-in (gradient buffer + initial-weight copies), MiB: "
        + "; ".join(
            f"{n}: online {m['extra_mib']['craft_online']:.0f}, cache {m['extra_mib']['craft_cache']:.0f}, "
            f"swap {m['extra_mib']['craft_swap']:.0f} (host)"
            for n, m in results.items()
        ),
    ]
    if memory:
        lines += [
            "",
            "| config | " + " | ".join(f"{v} peak MiB" for v in VARIANTS) + " |",
            "|---|" + "---|" * len(VARIANTS),
        ]
        for name, row in memory.items():
            lines.append(f"| {name} | " + " | ".join(f"{row[v]:.0f}" for v in VARIANTS) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--out", default=None)
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--memory-child", nargs=3, default=None)
    args = ap.parse_args()
    if args.memory_child:
        return memory_child(*args.memory_child, args.batch)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    work = Path(tempfile.mkdtemp(prefix="craft_step_"))
    caches = {name: build_anchor_cache(cfg, work / str(i)) for i, (name, cfg) in enumerate(configs().items())}
    results = {name: time_config(cfg, args.rounds, args.batch, device, caches[name]) for name, cfg in configs().items()}
    memory = (
        {}
        if args.skip_memory or device.type == "cuda"
        else {name: {v: peak_memory_cpu(name, v, args.batch, caches[name]) for v in VARIANTS} for name in configs()}
    )
    shutil.rmtree(work)
    text = table(results, memory, device)
    print(text)
    if args.out:
        Path(args.out, "results.json").write_text(json.dumps({"timing": results, "memory_mib": memory}, indent=2))


if __name__ == "__main__":
    main()

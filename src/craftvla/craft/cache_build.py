"""`craftvla cache build`: a frozen checkpoint's retention targets over an anchor dataset, computed once.

    craftvla cache build --checkpoint CKPT --dataset DIR --out CACHE [--target actions] \
        [--anchor_type vision] [--pooling mean] [--layer L] [--dtype float16] [--num_samples N] [--shard_size 1000]

The default target is the one that works: the teacher's own action chunks on the anchor data
(the old tasks' frames), which kept 0.99 of the old tasks in the retention study
(benchmarks/retention). `--target pooled` stores the design note's pooled bridge features (C_R:
the middle layer's vision tokens, mean-pooled), which the same study found keeps 0.17-0.23;
`--target tokens` the same states token by token. `craftvla train --craft.anchor_cache CACHE`
adopts the cache's target, layer, token set and pooling for every --craft.* flag left unset, so
the two verbs compose without flags. The format is craft/cache.py's.

Each shard is written to a dot-prefixed temporary name and renamed when complete, so a shard
file is either whole or absent. An interrupted build leaves no meta.json: the reader refuses
the directory, and re-running the same build *resumes* (keeps the complete shards, rebuilds the
rest) when build.json matches; `--overwrite true` starts clean.

Token positions follow the *unpadded* sequence [BOS, vision, text (T_i real tokens), queries,
STOP], right-padded to L_max = 1 + N_vis + T_max + Q + 1, so a sample's targets do not depend on
which other instructions shared its batch. The teacher runs on the images *as stored* (rounded to
`image_dtype`), so a student with the teacher's weights reproduces the targets from the cache's
own inputs up to the target dtype's rounding.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from craftvla.cli.parsing import parse_config
from craftvla.craft.cache import (
    FORMAT_VERSION,
    IDS_KEY,
    MASK_KEY,
    META_FILE,
    PLAN_FILE,
    TOKEN_MASK_KEY,
    model_fingerprint,
    shard_name,
    target_key,
)
from craftvla.craft.data import open_anchor_dataset
from craftvla.craft.targets import CACHE_TOKEN_SETS, TARGETS, Extraction, absolute_layer
from craftvla.errors import CraftVLAError, require
from craftvla.files import atomic_path, read_json, write_json_atomic
from craftvla.keys import STATE_KEY, TASK_KEY
from craftvla.model.context import POOLING_MODES

log = logging.getLogger(__name__)

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
IMAGE_DTYPES = ("float16", "float32")  # [0, 1] pixels: float16 keeps 11 bits, bfloat16 only 8


@dataclass
class CacheBuildConfig:
    # Teacher: a craftvla checkpoint directory (the frozen initial model of the fine-tuning run).
    checkpoint: Optional[str] = None
    # Anchor dataset: a LeRobot v3 directory (may differ from the task data); its cameras must be the policy's.
    dataset: Optional[str] = None
    # Output cache directory.
    out: Optional[str] = None
    # The CRaFT retention target stored (the words of --craft.targets): actions (the teacher's own
    # action chunks: the retention study's one target that kept the old tasks, 0.99), pooled (the
    # design note's pooled bridge features, which kept only 0.17-0.23 there) or tokens (the same
    # states token by token).
    target: str = "actions"
    # pooled / tokens: the token set (the words of --craft.anchor_type): vision (C_R), text (the
    # instruction), all (every real token) or last (the last real token); None = vision.
    anchor_type: Optional[str] = None
    # pooled: mean or max over the token set (the words of --craft.pooling); None = mean.
    pooling: Optional[str] = None
    # pooled / tokens: hidden_states index (0 = embeddings; negative counts from the end, -2 =
    # hidden_states[-2]); None = CRaFT's default anchor layer, the middle one (num_layers // 2).
    layer: Optional[int] = None
    # tokens only: several layers, e.g. "[-2,-1]"; None = [layer].
    layers: Optional[list[int]] = None
    # Storage dtype of the targets: float16, bfloat16 or float32.
    dtype: str = "float16"
    # Storage dtype of the images (float in [0, 1]); the teacher sees the stored values.
    image_dtype: str = "float16"
    # Number of anchor samples (a seeded random subset of the frames); None = every frame.
    num_samples: Optional[int] = None
    # Samples per shard file.
    shard_size: int = 1000
    # Teacher forward batch size.
    batch_size: int = 16
    # Seed of the sample subset.
    seed: int = 0
    # "auto" (cuda if available), "cpu", "cuda", ...
    device: str = "auto"
    # true: delete an existing (complete or partial) cache at `out` and start clean;
    # false: resume a partial build with the same plan, refuse anything else.
    overwrite: bool = False

    def __post_init__(self) -> None:
        require(self.target in TARGETS, "target", self.target, f"choose one of {tuple(TARGETS)}")
        require(
            self.anchor_type is None or self.anchor_type in CACHE_TOKEN_SETS,
            "anchor_type",
            self.anchor_type,
            f"choose one of {CACHE_TOKEN_SETS}",
        )
        require(
            self.pooling is None or self.pooling in POOLING_MODES,
            "pooling",
            self.pooling,
            f"choose one of {POOLING_MODES}",
        )
        reads = {"actions": (), "tokens": ("anchor_type", "layer", "layers")}.get(
            self.target, ("anchor_type", "pooling", "layer")
        )
        for name in ("anchor_type", "pooling", "layer", "layers"):
            require(
                getattr(self, name) is None or name in reads,
                name,
                getattr(self, name),
                f"a cache of the {self.target} target does not read it (drop the flag)",
            )
        require(self.layers is None or len(self.layers) >= 1, "layers", self.layers, "give at least one layer")
        require(self.dtype in DTYPES, "dtype", self.dtype, f"choose one of {tuple(DTYPES)}")
        require(self.image_dtype in IMAGE_DTYPES, "image_dtype", self.image_dtype, f"choose one of {IMAGE_DTYPES}")
        require(self.num_samples is None or self.num_samples >= 1, "num_samples", self.num_samples, "must be >= 1")
        require(self.shard_size >= 1, "shard_size", self.shard_size, "must be >= 1")
        require(self.batch_size >= 1, "batch_size", self.batch_size, "must be >= 1")

    def extraction(self, policy) -> Extraction:
        """What the teacher extracts, with the defaults resolved against `policy`."""
        if self.target == "actions":
            return Extraction("actions")
        layer = policy.anchor_layer() if self.layer is None else self.layer
        layers = tuple(absolute_layer(i, policy.llm.num_layers) for i in (self.layers or [layer]))
        pooling = (self.pooling or "mean") if self.target == "pooled" else None
        return Extraction(self.target, layers, self.anchor_type or "vision", pooling)


def _is_main_process() -> bool:
    """Rank 0 of an initialised torch.distributed group, else of the launcher's RANK variable."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def _plan(cfg: CacheBuildConfig, policy, num_frames: int) -> dict:
    """Everything that determines the cache's bytes: compared on resume, published as meta.json."""
    extraction = cfg.extraction(policy)
    count = num_frames if cfg.num_samples is None else min(cfg.num_samples, num_frames)
    gen = torch.Generator().manual_seed(cfg.seed)
    indices = torch.randperm(num_frames, generator=gen)[:count].sort().values.tolist()
    return {
        "format": FORMAT_VERSION,
        "target": extraction.target,
        "layers": None if extraction.layers is None else list(extraction.layers),
        "anchor_type": extraction.anchor_type,
        "pooling": extraction.pooling,
        "dtype": cfg.dtype,
        "image_dtype": cfg.image_dtype,
        "feature_width": None if cfg.target == "actions" else policy.llm.hidden_size,
        "max_text_tokens": policy.config.llm.max_text_tokens,
        "camera_keys": list(policy.config.camera_keys),
        "model_fingerprint": model_fingerprint(policy),
        "checkpoint": str(cfg.checkpoint),
        "dataset": str(cfg.dataset),
        "num_samples": count,
        "shard_size": cfg.shard_size,
        "num_shards": -(-count // cfg.shard_size),
        "seed": cfg.seed,
        "indices": indices,
    }


def _prepare_out(out: Path, plan: dict, overwrite: bool) -> set[int]:
    """Create / validate the output directory; returns the indices of complete shards to keep."""
    is_cache = (out / META_FILE).is_file() or (out / PLAN_FILE).is_file()
    if out.exists() and not is_cache and (not out.is_dir() or any(out.iterdir())):
        raise CraftVLAError(f"{out} exists and is not an anchor cache; choose another --out")  # never deleted
    if overwrite and is_cache:
        shutil.rmtree(out)
    if (out / META_FILE).is_file():
        raise CraftVLAError(f"{out} is already a complete cache; pass --overwrite true to rebuild it")
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".*.tmp*"):  # a shard interrupted mid-write (killed before atomic_path cleaned up)
        stale.unlink()
    if (out / PLAN_FILE).is_file():
        old = read_json(out / PLAN_FILE, expect=dict)
        diff = sorted(k for k in set(old) | set(plan) if old.get(k) != plan.get(k))
        if diff:
            raise CraftVLAError(
                f"{out}: a partial build with other settings ({diff}) is there; pass --overwrite true to start clean"
            )
        done = {i for i in range(plan["num_shards"]) if (out / shard_name(i)).is_file()}
        log.info("resuming %s: %d of %d shards complete", out, len(done), plan["num_shards"])
        return done
    write_json_atomic(out / PLAN_FILE, plan, indent=1)
    return set()


def _write_shard(path: Path, tensors: dict[str, torch.Tensor], tasks: list[str]) -> None:
    """Atomic: a dot-prefixed temporary file, fsynced, then renamed over the final name."""
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"tasks": json.dumps(tasks)})


@torch.no_grad()
def teacher_batch(policy, batch: dict, plan: dict) -> dict[str, torch.Tensor]:
    """One collated batch -> the per-sample tensors a shard stores (inputs + target), on the CPU."""
    cams, max_text = plan["camera_keys"], plan["max_text_tokens"]
    device = policy.action_queries.weight.device
    inputs = {k: batch[k].to(DTYPES[plan["image_dtype"]]) for k in cams}  # rounded as stored
    model_batch = {k: v.to(device, torch.float32) for k, v in inputs.items()}
    model_batch.update({STATE_KEY: batch[STATE_KEY].to(device), TASK_KEY: list(batch[TASK_KEY])})
    context = policy.encode(model_batch)
    ids, mask = policy.tokenize(model_batch[TASK_KEY])  # (B, T) as the model saw them
    pad = max_text - ids.shape[1]
    pad_id = policy.tokenizer.pad_token_id or 0
    out = {
        **inputs,
        STATE_KEY: batch[STATE_KEY].float(),
        IDS_KEY: F.pad(ids, (0, pad), value=pad_id),
        MASK_KEY: F.pad(mask.to(torch.uint8), (0, pad)).bool(),
    }
    layers = None if plan["layers"] is None else tuple(plan["layers"])
    extraction = Extraction(plan["target"], layers, plan["anchor_type"], plan["pooling"])
    target, token_mask = extraction(policy, context, max_text)
    out[target_key(plan["target"])] = target.to(DTYPES[plan["dtype"]])
    if token_mask is not None:
        out[TOKEN_MASK_KEY] = token_mask
    return {k: v.cpu() for k, v in out.items()}


def _shard_samples(policy, dataset, indices: list[int], batch_size: int, plan: dict, progress) -> tuple[dict, list]:
    """The stacked tensors and instruction strings of one shard's samples."""
    from torch.utils.data import DataLoader, Subset

    keep = [*plan["camera_keys"], STATE_KEY, TASK_KEY]
    collate = lambda items: {
        k: ([it[k] for it in items] if k == TASK_KEY else torch.stack([it[k] for it in items])) for k in keep
    }
    parts, tasks = [], []
    for batch in DataLoader(Subset(dataset, indices), batch_size=batch_size, collate_fn=collate):
        parts.append(teacher_batch(policy, batch, plan))
        tasks += batch[TASK_KEY]
        progress.update(len(batch[TASK_KEY]))
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}, tasks


def build_cache(cfg: CacheBuildConfig) -> Path:
    """Build (or resume) the cache described by `cfg`; returns its directory."""
    from tqdm.auto import tqdm

    from craftvla.model.policy import VLAPolicy

    for name in ("checkpoint", "dataset", "out"):
        require(getattr(cfg, name) is not None, name, None, "required")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    policy = VLAPolicy.from_pretrained(cfg.checkpoint, map_location=device).eval()
    dataset = open_anchor_dataset(cfg.dataset, policy)
    plan = _plan(cfg, policy, len(dataset))
    out = Path(cfg.out)
    done = _prepare_out(out, plan, cfg.overwrite)
    size, indices = plan["shard_size"], plan["indices"]
    todo = [i for i in range(plan["num_shards"]) if i not in done]
    with tqdm(
        total=plan["num_samples"],
        initial=plan["num_samples"] - sum(len(indices[i * size : (i + 1) * size]) for i in todo),
        desc="anchor cache",
        unit="sample",
    ) as bar:
        for shard in todo:
            tensors, tasks = _shard_samples(
                policy, dataset, indices[shard * size : (shard + 1) * size], cfg.batch_size, plan, bar
            )
            _write_shard(out / shard_name(shard), tensors, tasks)
    meta = {k: v for k, v in plan.items() if k != "indices"}
    write_json_atomic(out / META_FILE, meta, indent=1)  # last: publishes the cache
    log.info("anchor cache complete: %s (%d samples, %d shards)", out, meta["num_samples"], meta["num_shards"])
    return out


def main(argv: list[str]) -> int:
    """`craftvla cache build ...` (see the module docstring)."""
    from craftvla.cli import run_sub_verb

    return run_sub_verb(
        "cache", argv, {"build": (_build_main, "compute a frozen checkpoint's anchor targets over a LeRobot dataset")}
    )


def _build_main(argv: list[str]) -> int:
    cfg = parse_config(CacheBuildConfig, args=argv, prog="craftvla cache build")
    if not _is_main_process():
        log.info("not the main process: rank 0 builds the cache")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    build_cache(cfg)
    return 0

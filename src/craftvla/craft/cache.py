"""Offline anchor caches: the frozen model's targets, computed once.

    craftvla cache build --checkpoint CKPT --dataset DIR --out CACHE [--type action_chunk] \
        [--pooling mean_image_tokens] [--layer L] [--dtype float16] [--num_samples N] [--shard_size 1000]

The default type is the retention target that works: the teacher's own action chunks on the
anchor data (the old tasks' frames), which kept 0.99 of the old tasks in the retention study
(benchmarks/retention). `--type hidden_feature` stores the design note's pooled bridge features
(C_R: the middle layer's image tokens, mean-pooled), which the same study found keeps 0.17-0.23.
`craftvla train --craft.anchor_cache CACHE` adopts the cache's target, layer, pooling and feature
type for every --craft.* flag left unset, so the two verbs compose without flags.

A cache directory holds
    build.json                      the build plan (settings + sample indices), written first
    shard-00000.safetensors ...     `shard_size` samples each, tensors stacked on axis 0
    meta.json                       written last: its presence is what makes the cache complete
Each shard is written to a dot-prefixed temporary name and renamed when complete, so a shard
file is either whole or absent. An interrupted build leaves no meta.json: the loader refuses
the directory, and re-running the same build *resumes* (keeps the complete shards, rebuilds the
rest) when build.json matches; `--overwrite true` starts clean. No pickle anywhere.

Per sample: the model inputs (each camera image (3, H, W) float in [0, 1] stored at
`image_dtype`, "observation.state" normalised as the model takes it, the instruction's
`input_ids` / `attention_mask` (T_max,) right-padded to `llm.max_text_tokens`, the instruction
string in the shard's metadata) and one teacher target:

| type           | key               | shape                      |
|----------------|-------------------|----------------------------|
| token_level    | `labels`          | (L_max,) int64             |
| hidden_state   | `teacher_hidden`  | (n_layers, n_vecs, D) + `token_mask` (n_vecs,) bool |
| hidden_feature | `target_features` | (D,) pooled                |
| action_chunk   | `teacher_actions` | (H, A) the teacher's chunk, normalised units |

Token positions follow the *unpadded* sequence [BOS, vision, text (T_i real tokens), queries,
STOP], right-padded to L_max = 1 + N_vis + T_max + Q + 1, so a sample's targets do not depend on
which other instructions shared its batch. Image / text / query positions come from the model's
`TokenLayout`, never from constants. The teacher runs on the images *as stored* (rounded to
`image_dtype`), so a student with the teacher's weights reproduces the targets from the cache's
own inputs up to the target dtype's rounding.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from craftvla.config import parse_config
from craftvla.errors import ConfigError, CraftVLAError, require
from craftvla.files import atomic_path, read_json, read_safetensors, safetensors_header, write_json_atomic
from craftvla.keys import STATE_KEY, TASK_KEY
from craftvla.craft.anchors import open_anchor_dataset
from craftvla.craft.targets import action_target
from craftvla.model.context import VLMContext, bridge_features, pool_tokens

log = logging.getLogger(__name__)

CACHE_TYPES = ("token_level", "hidden_state", "hidden_feature", "action_chunk")
POOLINGS = ("mean_image_tokens", "mean_all_tokens", "mean_text_tokens", "last_token")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
IMAGE_DTYPES = ("float16", "float32")  # [0, 1] pixels: float16 keeps 11 bits, bfloat16 only 8
TARGET_KEYS = {"token_level": "labels", "hidden_state": "teacher_hidden", "hidden_feature": "target_features",
               "action_chunk": "teacher_actions"}
# The CRaFT retention target (craft/targets.py) each cache type feeds.
CACHE_TARGETS = {"hidden_feature": "pooled", "hidden_state": "tokens", "action_chunk": "actions"}
IDS_KEY, MASK_KEY, TOKEN_MASK_KEY = "input_ids", "attention_mask", "token_mask"
IGNORE_INDEX = -100  # PyTorch cross-entropy's ignore_index, as Prismatic's label masking uses
META_FILE, PLAN_FILE = "meta.json", "build.json"
FORMAT_VERSION = 1



@dataclass
class CacheBuildConfig:
    # Teacher: a craftvla checkpoint directory (the frozen initial model of the fine-tuning run).
    checkpoint: Optional[str] = None
    # Anchor dataset: a LeRobot v3 directory (may differ from the task data); its cameras must be the policy's.
    dataset: Optional[str] = None
    # Output cache directory.
    out: Optional[str] = None
    # Target kind: action_chunk (teacher_actions: the teacher's own action chunks; the retention
    # study's one target that kept the old tasks, 0.99), hidden_feature (target_features: the design
    # note's pooled bridge features, which kept only 0.17-0.23 there), hidden_state (teacher_hidden),
    # token_level (labels).
    type: str = "action_chunk"
    # Token set pooled (hidden_feature) or kept (hidden_state): mean_image_tokens, mean_all_tokens,
    # mean_text_tokens, last_token.
    pooling: str = "mean_image_tokens"
    # hidden_states index (0 = embeddings; negative counts from the end, -2 = hidden_states[-2]);
    # None = CRaFT's default anchor layer, the middle one (num_layers // 2).
    layer: Optional[int] = None
    # hidden_state only: several layers, e.g. "[-2,-1]"; None = [layer].
    layers: Optional[list[int]] = None
    # Storage dtype of the targets: float16, bfloat16 or float32 (labels are always int64).
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
        require(self.type in CACHE_TYPES, "type", self.type, f"choose one of {CACHE_TYPES}")
        require(self.pooling in POOLINGS, "pooling", self.pooling, f"choose one of {POOLINGS}")
        require(self.dtype in DTYPES, "dtype", self.dtype, f"choose one of {tuple(DTYPES)}")
        require(self.image_dtype in IMAGE_DTYPES, "image_dtype", self.image_dtype, f"choose one of {IMAGE_DTYPES}")
        require(self.layers is None or self.type == "hidden_state", "layers", self.layers,
                 "only a hidden_state cache keeps several layers (use --layer)")
        require(self.layers is None or len(self.layers) >= 1, "layers", self.layers, "give at least one layer")
        require(self.num_samples is None or self.num_samples >= 1, "num_samples", self.num_samples, "must be >= 1")
        require(self.shard_size >= 1, "shard_size", self.shard_size, "must be >= 1")
        require(self.batch_size >= 1, "batch_size", self.batch_size, "must be >= 1")


@dataclass(frozen=True)
class ExtractionSettings:
    """What the student extracts; a cache is usable only when its meta agrees on every field."""

    layers: tuple[int, ...]  # absolute hidden_states indices (0 = embeddings)
    pooling: str  # one of POOLINGS
    width: int  # D of one token state / pooled feature
    fingerprint: Optional[str]  # of the initial model; None = not checked


# ----- extraction: hidden states + layout -> targets (pure tensor functions) ---------------------


def absolute_layer(layer: int, num_layers: int) -> int:
    """hidden_states index in [0, num_layers] from a possibly negative one (-1 = the last)."""
    n = num_layers + 1
    if not -n <= layer < n:
        raise ConfigError(f"layer={layer}: the model has hidden_states[0..{num_layers}]")
    return layer % n


def _compact(hidden: torch.Tensor, keep: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept tokens moved to the front in order, padded/cut to `length`: (B, L, D), (B, L) ->
    (B, length, D) with padding zeroed, and (B, length) bool."""
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)  # (B, L): kept first
    count = keep.sum(dim=1, keepdim=True)  # (B, 1)
    if order.shape[1] < length:
        order = torch.cat([order, order[:, :1].expand(-1, length - order.shape[1])], dim=1)
    order = order[:, :length]  # (B, length)
    mask = torch.arange(length, device=hidden.device) < count  # (B, length)
    picked = hidden.gather(1, order.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))  # (B, length, D)
    return picked * mask.unsqueeze(-1).to(picked.dtype), mask


def token_set(context: VLMContext, layer: int, pooling: str, max_text: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens of hidden_states[layer] a pooling reads, at fixed length -> (B, n_vecs, D), (B, n_vecs) bool.

    n_vecs: N_vis (image), T_max (text), L_max = 1 + N_vis + T_max + Q + 1 (all), 1 (last)."""
    hidden, layout = context.hidden_states[layer], context.layouts[layer]
    batch = hidden.shape[0]
    if pooling == "mean_image_tokens":
        vis, mask = context.vision(layer), context.vision_mask(layer)  # (B, N_vis, D), (B, N_vis) | None
        return vis, torch.ones(vis.shape[:2], dtype=torch.bool, device=hidden.device) if mask is None else mask
    if pooling == "mean_text_tokens":
        text, mask = layout.text(hidden)  # (B, T, D), (B, T)
        return _compact(text, mask, max_text)
    if pooling == "mean_all_tokens":
        length = hidden.shape[1] - layout.text_index.shape[1] + max_text
        return _compact(hidden, layout.attention_mask.bool(), length)
    if pooling == "last_token":
        last = layout.last_token_index()  # (B,)
        vec = hidden[torch.arange(batch, device=hidden.device), last].unsqueeze(1)  # (B, 1, D)
        return vec, torch.ones(batch, 1, dtype=torch.bool, device=hidden.device)
    raise ConfigError(f"pooling={pooling!r}: choose one of {POOLINGS}")


def pooled_features(context: VLMContext, layer: int, pooling: str, max_text: int) -> torch.Tensor:
    """The hidden_feature target: hidden_states[layer] pooled over the pooling's tokens -> (B, D).
    Image tokens are CRaFT's C_R, so that pooling is exactly the bridge feature CRaFT constrains."""
    if pooling == "mean_image_tokens":
        return bridge_features(context, layer, pooling="mean", anchor_type="vision")
    vecs, mask = token_set(context, layer, pooling, max_text)
    return pool_tokens(vecs, mask, "mean")


def hidden_targets(context: VLMContext, layers, pooling: str, max_text: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The hidden_state target: (B, n_layers, n_vecs, D) and its token mask (B, n_vecs)."""
    sets = [token_set(context, i, pooling, max_text) for i in layers]
    return torch.stack([s for s, _ in sets], dim=1), sets[0][1]


def token_labels(ids: torch.Tensor, layout, max_text: int) -> torch.Tensor:
    """The token_level target (B, L_max) int64: the instruction's token ids at its positions in the
    unpadded sequence, IGNORE_INDEX everywhere else (vision, queries, specials, padding).

    Why input ids and not the teacher's argmax: our LLM is a backbone without an LM head (the
    VLA's output is continuous actions), so the teacher has no token distribution to take an
    argmax of; the instruction tokens are the sequence's only discrete targets. This is the label
    convention of Prismatic's token-level training (labels = input ids, -100 where not supervised),
    usable for next-token retention by any student that has (or ties) an LM head.
    """
    full = torch.full(layout.attention_mask.shape, IGNORE_INDEX, dtype=torch.long, device=ids.device)  # (B, L)
    full.scatter_(1, layout.text_index, torch.where(layout.text_mask, ids, IGNORE_INDEX))
    length = full.shape[1] - layout.text_index.shape[1] + max_text
    picked, mask = _compact(full.unsqueeze(-1), layout.attention_mask.bool(), length)  # (B, L_max, 1)
    return torch.where(mask, picked.squeeze(-1), IGNORE_INDEX)


# ----- model identity ------------------------------------------------------------------------------


def model_fingerprint(policy) -> str:
    """sha256 over the policy's config and every weight (as float32 bytes, in key order).

    Computed from the weights themselves (a safetensors header only records shapes). LoRA
    adapters are left out and PEFT's `base_layer` names mapped back, so a student with freshly
    injected adapters (which start as the identity) matches the checkpoint it was loaded from.
    """
    from craftvla.model.checkpoints import portable_config

    config = portable_config(policy.config)
    config.pop("preset_name", None)
    if not policy.config.pruning.enabled:  # off: the same model as before the section existed
        config.pop("pruning", None)
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    state = {k.replace(".base_layer.", "."): v for k, v in policy.state_dict().items() if "lora_" not in k}
    for key in sorted(state):
        tensor = state[key].detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{key}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


# ----- build ---------------------------------------------------------------------------------------


def _is_main_process() -> bool:
    """Rank 0 of an initialised torch.distributed group, else of the launcher's RANK variable."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def _plan(cfg: CacheBuildConfig, policy, num_frames: int) -> dict:
    """Everything that determines the cache's bytes: compared on resume, published as meta.json."""
    num_layers = policy.llm.num_layers
    layer = policy.anchor_layer() if cfg.layer is None else cfg.layer
    layers = [absolute_layer(i, num_layers) for i in (cfg.layers or [layer])]
    count = num_frames if cfg.num_samples is None else min(cfg.num_samples, num_frames)
    gen = torch.Generator().manual_seed(cfg.seed)
    indices = torch.randperm(num_frames, generator=gen)[:count].sort().values.tolist()
    return {
        "format": FORMAT_VERSION, "cache_type": cfg.type, "target_key": TARGET_KEYS[cfg.type],
        "hidden_layer": layer if cfg.layers is None else cfg.layers[0], "hidden_layer_index": layers[0],
        "hidden_layers": layers, "pooling": cfg.pooling, "dtype": cfg.dtype, "image_dtype": cfg.image_dtype,
        "feature_width": policy.llm.hidden_size, "max_text_tokens": policy.config.llm.max_text_tokens,
        "camera_keys": list(policy.config.camera_keys), "model_fingerprint": model_fingerprint(policy),
        "checkpoint": str(cfg.checkpoint), "dataset": str(cfg.dataset), "num_samples": count,
        "shard_size": cfg.shard_size, "num_shards": -(-count // cfg.shard_size), "seed": cfg.seed,
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
            raise CraftVLAError(f"{out}: a partial build with other settings ({diff}) is there; "
                                "pass --overwrite true to start clean")
        done = {i for i in range(plan["num_shards"]) if (out / shard_name(i)).is_file()}
        log.info("resuming %s: %d of %d shards complete", out, len(done), plan["num_shards"])
        return done
    write_json_atomic(out / PLAN_FILE, plan, indent=1)
    return set()


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


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
    out = {**inputs, STATE_KEY: batch[STATE_KEY].float(), IDS_KEY: F.pad(ids, (0, pad), value=pad_id),
           MASK_KEY: F.pad(mask.to(torch.uint8), (0, pad)).bool()}
    dtype, kind = DTYPES[plan["dtype"]], plan["cache_type"]
    if kind == "token_level":
        out["labels"] = token_labels(ids, context.layouts[0], max_text)
    elif kind == "hidden_state":
        states, token_mask = hidden_targets(context, plan["hidden_layers"], plan["pooling"], max_text)
        out.update(teacher_hidden=states.to(dtype), token_mask=token_mask)
    elif kind == "action_chunk":
        out["teacher_actions"] = action_target(policy, context, None).to(dtype)  # (B, H, A)
    else:
        out["target_features"] = pooled_features(context, plan["hidden_layer_index"], plan["pooling"],
                                                 max_text).to(dtype)
    return {k: v.cpu() for k, v in out.items()}


def _shard_samples(policy, dataset, indices: list[int], batch_size: int, plan: dict, progress) -> tuple[dict, list]:
    """The stacked tensors and instruction strings of one shard's samples."""
    from torch.utils.data import DataLoader, Subset

    keep = [*plan["camera_keys"], STATE_KEY, TASK_KEY]
    collate = lambda items: {k: ([it[k] for it in items] if k == TASK_KEY else torch.stack([it[k] for it in items]))
                             for k in keep}
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
    with tqdm(total=plan["num_samples"], initial=plan["num_samples"] - sum(
            len(indices[i * size:(i + 1) * size]) for i in todo), desc="anchor cache", unit="sample") as bar:
        for shard in todo:
            tensors, tasks = _shard_samples(policy, dataset, indices[shard * size:(shard + 1) * size],
                                            cfg.batch_size, plan, bar)
            _write_shard(out / shard_name(shard), tensors, tasks)
    meta = {k: v for k, v in plan.items() if k != "indices"}
    write_json_atomic(out / META_FILE, meta, indent=1)  # last: publishes the cache
    log.info("anchor cache complete: %s (%d samples, %d shards)", out, meta["num_samples"], meta["num_shards"])
    return out


# ----- load ----------------------------------------------------------------------------------------


def _check(name: str, cache_value, student_value, path: Path, hint: str = "") -> None:
    if cache_value != student_value:
        raise CraftVLAError(f"anchor cache {path}: {name} is {cache_value!r} in the cache but the student "
                            f"extracts {student_value!r}{hint}")


META_KEYS = ("hidden_layer_index", "hidden_layers", "pooling", "feature_width", "max_text_tokens",
             "camera_keys", "model_fingerprint", "num_samples", "shard_size", "num_shards")


def _read_meta(path: Path) -> dict:
    """meta.json, checked for the format version and the keys the loader reads."""
    meta = read_json(path, expect=dict)
    if meta.get("format") != FORMAT_VERSION:
        newer = isinstance(meta.get("format"), int) and meta["format"] > FORMAT_VERSION
        raise CraftVLAError(f"{path}: anchor-cache format {meta.get('format')!r}; this craftvla reads format "
                            f"{FORMAT_VERSION}" + (" (upgrade craftvla)" if newer else " (rebuild the cache)"))
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise CraftVLAError(f"{path}: missing keys {missing}")
    return meta


class AnchorCache:
    """A complete cache directory: meta, type detection, samples by index, endless batches."""

    def __init__(self, path):
        self.path = Path(path)
        if not (self.path / META_FILE).is_file():
            partial = (self.path / PLAN_FILE).is_file()
            raise CraftVLAError(f"anchor cache {self.path}: no {META_FILE} ("
                                + ("an interrupted build: re-run `craftvla cache build` with the same flags "
                                   "to resume it" if partial else "not an anchor cache") + ")")
        self.meta = _read_meta(self.path / META_FILE)
        self.files = [self.path / shard_name(i) for i in range(self.meta["num_shards"])]
        absent = [f.name for f in self.files if not f.is_file()]
        if absent:
            raise CraftVLAError(f"anchor cache {self.path}: shard files missing: {absent[:3]}")
        self.cache_type = self.meta["cache_type"] = self._detect_type()  # meta's, if any, must agree
        self._loaded: tuple[int, dict, list[str]] | None = None  # the one shard held in memory

    def _detect_type(self) -> str:
        """From the target tensor present in the first shard (meta's cache_type must agree)."""
        keys = set(safetensors_header(self.files[0])[0])
        found = [kind for kind, key in TARGET_KEYS.items() if key in keys]
        if len(found) != 1:
            raise CraftVLAError(f"anchor cache {self.path}: expected one of {sorted(TARGET_KEYS.values())} "
                                f"in {self.files[0].name}, found keys {sorted(keys)}")
        _check("cache type", self.meta.get("cache_type", found[0]), found[0], self.path, " (meta.json vs shard keys)")
        return found[0]

    def __len__(self) -> int:
        return self.meta["num_samples"]

    def check(self, expected: ExtractionSettings) -> None:
        """Refuse (CraftVLAError naming both values) a cache that does not match the student."""
        meta = self.meta
        layers = tuple(meta["hidden_layers"]) if self.cache_type == "hidden_state" else (meta["hidden_layer_index"],)
        if self.cache_type not in ("token_level", "action_chunk"):
            _check("hidden layer", layers, expected.layers, self.path,
                   f" (leave craft.anchor_layer_idx unset to adopt the cache's, or rebuild the cache with "
                   f"--layer {expected.layers[0]})")
            _check("pooling", meta["pooling"], expected.pooling, self.path)
            _check("feature width", meta["feature_width"], expected.width, self.path)
        if expected.fingerprint is not None:
            _check("model fingerprint", meta["model_fingerprint"], expected.fingerprint, self.path,
                   " (the cache was built from another initial model)")

    def _shard(self, index: int) -> tuple[dict, list[str]]:
        if self._loaded is None or self._loaded[0] != index:
            path = self.files[index]
            tensors, (_, metadata) = read_safetensors(path), safetensors_header(path)
            try:
                tasks = json.loads(metadata["tasks"])
            except (KeyError, json.JSONDecodeError):
                raise CraftVLAError(f"{path}: no readable 'tasks' list in the shard's metadata") from None
            lengths = {k: len(v) for k, v in tensors.items()} | {"tasks": len(tasks)}
            expected = min(self.meta["shard_size"], len(self) - index * self.meta["shard_size"])
            if set(lengths.values()) != {expected}:
                raise CraftVLAError(f"{path}: expected {expected} samples per tensor, found {lengths}")
            self._loaded = (index, tensors, tasks)
        return self._loaded[1], self._loaded[2]

    def samples(self, indices: list[int]) -> dict:
        """Collated samples by global index: images as float32, targets in their stored dtype."""
        size, parts, tasks = self.meta["shard_size"], [], []
        for i in indices:
            tensors, shard_tasks = self._shard(i // size)
            parts.append({k: v[i % size] for k, v in tensors.items()})
            tasks.append(shard_tasks[i % size])
        batch = {k: torch.stack([p[k] for p in parts]) for k in parts[0]}
        for key in self.meta["camera_keys"]:
            batch[key] = batch[key].float()
        batch[TASK_KEY] = tasks
        return batch

    def epoch_order(self, epoch: int, seed: int, shuffle: bool = True) -> list[int]:
        """Shard order shuffled, then samples within each shard: each shard is read once per epoch."""
        if not shuffle:
            return list(range(len(self)))
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        size, order = self.meta["shard_size"], []
        for shard in torch.randperm(len(self.files), generator=gen).tolist():
            count = min(size, len(self) - shard * size)
            order += (shard * size + torch.randperm(count, generator=gen)).tolist()
        return order

    def batches(self, batch_size: int, seed: int = 0, shuffle: bool = True, device=None) -> Iterator[dict]:
        """Endless collated batches, reshuffled every epoch; a batch may span two epochs."""
        epoch, pending = 0, []
        while True:
            while len(pending) < batch_size:
                pending += self.epoch_order(epoch, seed, shuffle)
                epoch += 1
            batch = self.samples(pending[:batch_size])
            pending = pending[batch_size:]
            yield batch if device is None else {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


# ----- training: the student side ------------------------------------------------------------------


def student_targets(cache_type: str, meta: dict, context: VLMContext, policy=None
                    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The student's counterpart of the cached target, from its forward on the cache's inputs:
    hidden_feature -> (B, D); hidden_state -> (B, n_layers, n_vecs, D) with padding zeroed;
    action_chunk -> (B, H, A), the student's own chunk (needs `policy`, for its action head)."""
    max_text = meta["max_text_tokens"]
    if cache_type == "action_chunk":
        return action_target(policy, context, None), None
    if cache_type == "hidden_feature":
        return pooled_features(context, meta["hidden_layer_index"], meta["pooling"], max_text), None
    if cache_type == "hidden_state":
        return hidden_targets(context, meta["hidden_layers"], meta["pooling"], max_text)
    raise CraftVLAError(
        "a token_level anchor cache cannot feed CRaFT's retention loss: the retention loss is a feature MSE and "
        "the policy's LLM has no LM head to score token labels with; build a hidden_feature or hidden_state cache")


def student_settings(policy, craft_cfg, meta: dict) -> tuple[ExtractionSettings, dict]:
    """What CRaFT's config makes the student extract against a cache with `meta`, and what it
    adopted from the cache. Each of anchor_layer_idx / anchor_type / pooling left unset (None)
    takes the cache's value; one that is set must match (else `AnchorCache.check` refuses).

    A cache holds one pooled vision-side feature (C_R) of width D, so anchor_type "both" or
    "action_query" never matches (its pooling name is one no cache has: refused, with both names)."""
    num_layers, width = policy.llm.num_layers, policy.llm.hidden_size
    cached = tuple(meta["hidden_layers"]) if meta["cache_type"] == "hidden_state" else (meta["hidden_layer_index"],)
    adopted: dict = {}
    if craft_cfg.anchor_layer_idx is None:
        layers, adopted["anchor_layer_idx"] = cached, cached[0]
    else:
        layer = absolute_layer(policy.anchor_layer(craft_cfg.anchor_layer_idx), num_layers)
        layers = cached if cached[0] == layer else (layer,)  # a hidden_state cache matches on its first layer
    anchor_type = craft_cfg.anchor_type or "vision"
    if craft_cfg.anchor_type is None:
        adopted["anchor_type"] = anchor_type
    if anchor_type != "vision":
        width *= 2 if anchor_type == "both" else 1
        tokens = "image_and_query_tokens" if anchor_type == "both" else "query_tokens"
        pooling = f"{craft_cfg.pooling or 'mean'}_{tokens}"
    elif craft_cfg.pooling is None:
        pooling = adopted["pooling"] = meta["pooling"]
    else:
        pooling = f"{craft_cfg.pooling}_image_tokens"
    return ExtractionSettings(layers, pooling, width, model_fingerprint(policy)), adopted


def checked_cache(path, policy, craft_cfg, settings: Optional[ExtractionSettings] = None) -> AnchorCache:
    """Open the cache and refuse it unless it matches the student (`student_settings` by default,
    logging what was adopted from the cache) and can feed a feature MSE."""
    cache = AnchorCache(path)
    if cache.cache_type == "token_level":
        student_targets("token_level", cache.meta, None)  # raises, with the reason
    if settings is None:
        settings, adopted = student_settings(policy, craft_cfg, cache.meta)
        if adopted:
            log.info("CRaFT: adopted from anchor cache %s (flags left unset): %s", cache.path,
                     ", ".join(f"craft.{k}={v}" for k, v in adopted.items()))
    cache.check(settings)
    return cache


class CacheAnchorProvider:
    """A `retention_pairs` provider for anchor_source="cache" (the contract of craft/anchors.py's
    providers): each call draws one anchor batch from the cache, runs the student on the cache's
    own inputs (with gradient) and returns {target: (student, cached target)}: the pooled
    feature (hidden_feature -> "pooled"), every cached token state (hidden_state -> "tokens";
    padded tokens are zero on both sides) or the action chunk (action_chunk -> "actions").

    `settings` overrides what the craft config implies (e.g. another pooling: the craft config
    can only express mean-pooled image tokens)."""

    def __init__(self, policy, craft_cfg, batch_size: int = 8, seed: int = 0,
                 settings: Optional[ExtractionSettings] = None):
        self.cache = checked_cache(craft_cfg.anchor_cache, policy, craft_cfg, settings)
        self.target = CACHE_TARGETS[self.cache.cache_type]
        if craft_cfg.targets is not None and craft_cfg.target_names != [self.target]:
            raise CraftVLAError(f"anchor cache {self.cache.path}: a {self.cache.cache_type} cache feeds the "
                                f"'{self.target}' target only, but craft.targets={craft_cfg.targets!r} "
                                "(leave it unset to adopt the cache's)")
        self.scale_samples = craft_cfg.scale_samples
        self.device = policy.action_queries.weight.device
        self.stream = self.cache.batches(batch_size, seed=seed, device=self.device)
        self.description = f"offline {self.cache.cache_type} cache {self.cache.path} ({len(self.cache)} samples)"

    def retention_pairs(self, policy, batch: dict, context: VLMContext) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        anchor = next(self.stream)
        target = anchor.pop(TARGET_KEYS[self.cache.cache_type])
        student, _ = student_targets(self.cache.cache_type, self.cache.meta, policy.encode(anchor), policy)
        return {self.target: (student, target.to(student.dtype))}

    def measure_targets(self, policy, batches=None) -> dict[str, torch.Tensor]:
        """{target: (N, ...)}: the cached (teacher's) targets of the first `craft.scale_samples`
        samples; `batches` is not read: the cache is the anchor data."""
        count = min(self.scale_samples, len(self.cache))
        target = self.cache.samples(list(range(count)))[TARGET_KEYS[self.cache.cache_type]]
        return {self.target: target.float()}


# ----- CLI -----------------------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    """`craftvla cache build ...` (see the module docstring)."""
    from craftvla.cli import run_sub_verb

    return run_sub_verb("cache", argv, {"build": (_build_main, "compute a frozen checkpoint's anchor targets over a "
                                                              "LeRobot dataset")})


def _build_main(argv: list[str]) -> int:
    cfg = parse_config(CacheBuildConfig, args=argv, prog="craftvla cache build")
    if not _is_main_process():
        log.info("not the main process: rank 0 builds the cache")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    build_cache(cfg)
    return 0

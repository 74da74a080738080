"""The anchor cache on disk: its layout, its metadata, the model identity it is tied to, and the
reader training uses. `craftvla cache build` (craft/cache_build.py) writes it.

A cache directory holds
    build.json                      the build plan (settings + sample indices), written first
    shard-00000.safetensors ...     `shard_size` samples each, tensors stacked on axis 0
    meta.json                       written last: its presence is what makes the cache complete

Per sample: the model inputs (each camera image (3, H, W) float in [0, 1] stored at
`image_dtype`, "observation.state" normalised as the model takes it, the instruction's
`input_ids` / `attention_mask` (T_max,) right-padded to `llm.max_text_tokens`, the instruction
string in the shard's metadata) and the teacher's value of one CRaFT retention target
(craft/targets.py), stored under `target.<name>`:

| target    | key                                           | shape                               |
|-----------|-----------------------------------------------|-------------------------------------|
| `pooled`  | `target.pooled`                               | (D,): the token set pooled          |
| `tokens`  | `target.tokens` + `target.tokens.mask` (bool) | (n_layers, n, D) + (n,)             |
| `actions` | `target.actions`                              | (H, A): the chunk, normalised units |

meta.json records the target and how it was extracted (`layers`, `anchor_type` = the token set,
`pooling`), in the words `--craft.*` uses, so training adopts what it leaves unset and refuses what
differs. Format 1 (craftvla before the re-cut: `cache_type` hidden_feature / hidden_state /
action_chunk / token_level) is refused with a request to rebuild. No pickle anywhere.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterator, Optional

import torch

from craftvla.craft.targets import Extraction
from craftvla.errors import CraftVLAError
from craftvla.files import read_json, read_safetensors, safetensors_header
from craftvla.keys import TASK_KEY

FORMAT_VERSION = 2
META_FILE, PLAN_FILE = "meta.json", "build.json"
TARGET_PREFIX = "target."
TOKEN_MASK_KEY = "target.tokens.mask"
IDS_KEY, MASK_KEY = "input_ids", "attention_mask"
META_KEYS = (
    "target",
    "layers",
    "anchor_type",
    "pooling",
    "feature_width",
    "max_text_tokens",
    "camera_keys",
    "model_fingerprint",
    "num_samples",
    "shard_size",
    "num_shards",
)
# The --craft.* flag that, left unset, adopts each extraction field from the cache.
ADOPTING_FLAGS = {
    "target": "craft.targets",
    "layers": "craft.anchor_layer_idx",
    "anchor_type": "craft.anchor_type",
    "pooling": "craft.pooling",
}


def target_key(target: str) -> str:
    """The shard key of a target's teacher values: "target.pooled", "target.tokens", "target.actions"."""
    return TARGET_PREFIX + target


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


# Config fields added after anchor caches were first built, with their defaults (see model_fingerprint).
LATER_FIELDS = (
    ("llm", "prompt", None),
    ("llm", "lowercase_task", False),
    ("llm", "stop_token_id", None),
    (None, "image_resize", "bilinear"),
)


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
    for section, name, default in LATER_FIELDS:  # at their defaults: the same model as before they existed
        holder = config if section is None else config.get(section, {})
        if holder.get(name, default) == default:
            holder.pop(name, None)
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    state = {k.replace(".base_layer.", "."): v for k, v in policy.state_dict().items() if "lora_" not in k}
    for key in sorted(state):
        tensor = state[key].detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{key}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def read_meta(path: Path) -> dict:
    """meta.json, checked for the format version and the keys the reader uses."""
    meta = read_json(path, expect=dict)
    if meta.get("format") != FORMAT_VERSION:
        newer = isinstance(meta.get("format"), int) and meta["format"] > FORMAT_VERSION
        raise CraftVLAError(
            f"{path}: anchor-cache format {meta.get('format')!r}; this craftvla reads format "
            f"{FORMAT_VERSION}"
            + (
                " (upgrade craftvla)"
                if newer
                else " (built by an older craftvla: rebuild it with `craftvla cache build`)"
            )
        )
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise CraftVLAError(f"{path}: missing keys {missing}")
    return meta


def _check(name: str, cache_value, student_value, path: Path, hint: str = "") -> None:
    if cache_value != student_value:
        raise CraftVLAError(
            f"anchor cache {path}: {name} is {cache_value!r} in the cache but the student "
            f"extracts {student_value!r}{hint}"
        )


class AnchorCache:
    """A complete cache directory: meta, the target found in the shards, samples by index, endless batches."""

    def __init__(self, path):
        self.path = Path(path)
        if not (self.path / META_FILE).is_file():
            partial = (self.path / PLAN_FILE).is_file()
            raise CraftVLAError(
                f"anchor cache {self.path}: no {META_FILE} ("
                + (
                    "an interrupted build: re-run `craftvla cache build` with the same flags to resume it"
                    if partial
                    else "not an anchor cache"
                )
                + ")"
            )
        self.meta = read_meta(self.path / META_FILE)
        self.files = [self.path / shard_name(i) for i in range(self.meta["num_shards"])]
        absent = [f.name for f in self.files if not f.is_file()]
        if absent:
            raise CraftVLAError(f"anchor cache {self.path}: shard files missing: {absent[:3]}")
        self.target = self._detect_target()
        self.extraction = Extraction(
            self.target,
            None if self.meta["layers"] is None else tuple(self.meta["layers"]),
            self.meta["anchor_type"],
            self.meta["pooling"],
        )
        self._loaded: tuple[int, dict, list[str]] | None = None  # the one shard held in memory

    def _detect_target(self) -> str:
        """The target whose key the first shard holds (meta.json's must agree)."""
        keys = set(safetensors_header(self.files[0])[0])
        found = [k[len(TARGET_PREFIX) :] for k in keys if k.startswith(TARGET_PREFIX) and k != TOKEN_MASK_KEY]
        if len(found) != 1:
            raise CraftVLAError(
                f"anchor cache {self.path}: expected one 'target.<name>' tensor in "
                f"{self.files[0].name}, found keys {sorted(keys)}"
            )
        _check("target", self.meta["target"], found[0], self.path, " (meta.json vs the shard's keys)")
        return found[0]

    def __len__(self) -> int:
        return self.meta["num_samples"]

    def check(self, student: Extraction, width: int, fingerprint: Optional[str]) -> None:
        """Refuse (CraftVLAError naming both values) a cache whose target differs from what the
        student extracts, or whose teacher is not the student's initial model (`fingerprint`;
        None = not checked)."""
        for name, flag in ADOPTING_FLAGS.items():
            _check(
                name.replace("_", " "),
                getattr(self.extraction, name),
                getattr(student, name),
                self.path,
                f" (leave {flag} unset to adopt the cache's)",
            )
        if self.target != "actions":
            _check("feature width", self.meta["feature_width"], width, self.path)
        if fingerprint is not None:
            _check(
                "model fingerprint",
                self.meta["model_fingerprint"],
                fingerprint,
                self.path,
                " (the cache was built from another initial model)",
            )

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

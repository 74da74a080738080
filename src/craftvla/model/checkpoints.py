"""Checkpoints: our own save/load, and loading real VLA-Adapter / Prismatic-style parts.

craftvla checkpoint (`save_pretrained`), a Hugging Face-style directory:
    config.json         the VLAConfig (draccus encoding) + {"craftvla_format": 2}
    llm_config.json     the transformers config of the LLM (so no original weights dir is needed)
    model.safetensors   every weight, keys as in `VLAPolicy.state_dict()`
    tokenizer/          the tokenizer (save_pretrained)
    stats.json          the processor's normalisation statistics (LeRobot stats.json format; absent
                        for a policy never trained on a dataset)
    processor.json      where those statistics came from, and the training data's instructions
                        (`model/processor.py`)
Format 2 (the head as a draccus choice type, the processor files) replaced format 1; format-1
checkpoints are refused with a message.
Saves are atomic: written to a temporary sibling directory, then swapped in by rename.

Released VLA-Adapter / Prismatic directories are read by model/released.py. craftvla's own parts
layout for `VLAConfig.weights_dir` (pretrained parts gathered by hand):
    llm/                              transformers save_pretrained (Qwen2ForCausalLM or Qwen2Model) + tokenizer
    vision/featurizer.safetensors     timm state dict of tower 0 (DINOv2 in fused mode, SigLIP alone)
    vision/fused_featurizer.safetensors  timm state dict of tower 1 (SigLIP in fused mode)
    projector.safetensors             optional; keys mapped by PROJECTOR_KEY_MAP
    action_head.safetensors           optional; craftvla head keys (`action_head.*` prefix stripped)
Any weight file may also be `.pt`/`.pth`/`.bin`, read with `torch.load(weights_only=True)` (no pickle code).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from craftvla.config import VLAConfig
from craftvla.data.stats import from_jsonable, to_jsonable
from craftvla.errors import CraftVLAError
from craftvla.files import fsync_tree, publish_dir, read_json, read_safetensors, read_torch
from craftvla.model.processor import PROCESSOR_FILE
from craftvla.model.released import load_release

FORMAT_VERSION = 2
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")

# Projector key names in the wild -> ours. OpenVLA's HF export uses fc1/fc2/fc3 (ours too);
# Prismatic's FusedMLPProjector / MLPProjector is an nn.Sequential: Linear(0) GELU(1) Linear(2) GELU(3) Linear(4).
PROJECTOR_KEY_MAP = {
    "projector.0.": "fc1.",
    "projector.2.": "fc2.",
    "projector.4.": "fc3.",
    "0.": "fc1.",
    "2.": "fc2.",
    "4.": "fc3.",
    "projector.fc": "fc",
}


def read_state_dict(path: Path, mmap: bool = False) -> dict[str, torch.Tensor]:
    """A weight file as a flat dict of tensors, never unpickling code (`mmap`: see files.read_torch)."""
    data = read_safetensors(path) if path.suffix == ".safetensors" else read_torch(path, mmap=mmap)
    data = data.get("state_dict", data.get("model", data)) if isinstance(data, dict) else data
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CraftVLAError(f"{path} is not a flat tensor state dict")
    return data


def find_weight_file(directory: Path, stem: str, required: bool = True) -> Path | None:
    for suffix in WEIGHT_SUFFIXES:
        if (directory / f"{stem}{suffix}").is_file():
            return directory / f"{stem}{suffix}"
    if required:
        raise CraftVLAError(f"missing {stem}{{{','.join(WEIGHT_SUFFIXES)}}} in {directory}")
    return None


def load_into(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Strict load with one readable error listing missing / unexpected / mis-shaped keys."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        parts = [
            f"{len(missing)} missing (e.g. {missing[:3]})" if missing else "",
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})" if unexpected else "",
            f"{len(shapes)} mis-shaped (e.g. {shapes[:2]})" if shapes else "",
        ]
        raise CraftVLAError(f"{source} does not match the model: " + "; ".join(p for p in parts if p))
    module.load_state_dict(state, strict=True)


def map_keys(state: dict[str, torch.Tensor], key_map: dict[str, str]) -> dict[str, torch.Tensor]:
    """Rename keys by the first matching prefix in key_map (longest prefixes listed first)."""
    out = {}
    for key, value in state.items():
        prefix = next((p for p in key_map if key.startswith(p)), None)
        out[key if prefix is None else key_map[prefix] + key[len(prefix) :]] = value
    return out


# ----- pretrained parts ---------------------------------------------------------------------------


def load_pretrained_parts(policy, release=None) -> None:
    """Load the vision towers, projector and head named by the config (the LLM loads itself), or
    every part of a VLA-Adapter / Prismatic `release` (model/released.py)."""
    cfg: VLAConfig = policy.config
    if release is not None:
        if cfg.vision.weights_dir is not None:  # a Prismatic run without its (frozen) vision backbone
            _load_towers(policy, Path(cfg.vision.weights_dir))
        load_release(policy, release, cfg.load_action_head)
        return
    if cfg.vision.weights_dir is not None:
        _load_towers(policy, Path(cfg.vision.weights_dir))
    elif cfg.vision.backbone_id == "mobilenet_v2":
        _load_packaged_mobilenet(policy)
    if cfg.weights_dir is not None:
        root = Path(cfg.weights_dir)
        projector = find_weight_file(root, "projector", required=False)
        if projector is not None:
            load_into(policy.projector, map_keys(read_state_dict(projector), PROJECTOR_KEY_MAP), str(projector))
        head = find_weight_file(root, "action_head", required=False)
        if head is not None and cfg.load_action_head:
            load_into(policy.action_head, map_keys(read_state_dict(head), {"action_head.": ""}), str(head))


def _load_towers(policy, directory: Path) -> None:
    from craftvla.model.vision import TOWER_NAMES

    if not directory.is_dir():
        raise CraftVLAError(f"vision.weights_dir={str(directory)!r}: no such directory")
    for name, tower in zip(TOWER_NAMES, policy.vision.towers):
        path = find_weight_file(directory, name)
        load_into(tower.model, tower.pretrained_state(read_state_dict(path)), str(path))


def _load_packaged_mobilenet(policy) -> None:
    from craftvla.model.vision import packaged_mobilenet_v2_weights

    path = packaged_mobilenet_v2_weights()
    tower = policy.vision.towers[0]
    keep = {k[len("features.") :]: v for k, v in read_state_dict(path).items() if k.startswith("features.")}
    kept_blocks = {str(i) for i in range(len(tower.model))}  # we drop the final block(s)
    load_into(tower.model, {k: v for k, v in keep.items() if k.split(".")[0] in kept_blocks}, str(path))


# ----- craftvla checkpoints -------------------------------------------------------------------------


def save_policy(policy, directory) -> None:
    """Write a checkpoint directory atomically (a crash leaves the previous one intact)."""
    final = Path(directory)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        _write_files(policy, tmp)
        fsync_tree(tmp)  # the bytes are durable before the rename publishes them
        publish_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def portable_config(config: VLAConfig) -> dict:
    """The config as saved: pretrained-source paths move to "pretrained_from" (the checkpoint holds
    every weight, so loading it must not need, or check, the original directories)."""
    data = config.to_dict()
    data.pop("load_action_head")  # a loading option of weights_dir, meaningless once the checkpoint holds every weight
    sources = {
        "weights_dir": data.pop("weights_dir"),
        "llm.weights_dir": data["llm"]["weights_dir"],
        "vision.weights_dir": data["vision"]["weights_dir"],
    }
    data["llm"]["weights_dir"] = data["vision"]["weights_dir"] = None
    return {"craftvla_format": FORMAT_VERSION, "pretrained_from": sources, **data}


def _write_files(policy, out: Path) -> None:
    config = portable_config(policy.config)
    (out / "config.json").write_text(json.dumps(config, indent=2))  # the directory is swapped in whole
    (out / "llm_config.json").write_text(policy.llm.model.config.to_json_string())
    state = {k: v.detach().contiguous().cpu() for k, v in policy.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt", "craftvla_format": str(FORMAT_VERSION)})
    policy.tokenizer.save_pretrained(str(out / "tokenizer"))
    if policy.processor.stats is not None:
        (out / "stats.json").write_text(json.dumps(to_jsonable(policy.processor.stats), indent=2))
    (out / PROCESSOR_FILE).write_text(json.dumps(policy.processor.metadata(), indent=2))


def load_policy(cls, directory, map_location="cpu"):
    """Rebuild a policy from a craftvla checkpoint directory or a VLA-Adapter release (no network, no
    pickle); any missing,
    truncated or mismatched file is one CraftVLAError naming it."""
    from craftvla.model.released import VLA_ADAPTER, load_release_policy, release_kind

    root = Path(directory)
    if not root.is_dir():
        raise CraftVLAError(f"{root}: checkpoint directory not found")
    if release_kind(root) == VLA_ADAPTER:  # a VLA-Adapter release acts as released
        return load_release_policy(cls, root).to(map_location)
    config = read_policy_config(root / "config.json")
    llm_config = _read_llm_config(root / "llm_config.json")
    tokenizer = _read_tokenizer(config, root / "tokenizer")
    weights = read_safetensors(root / "model.safetensors")
    policy = cls(config, load_weights=False, llm_config=llm_config, tokenizer=tokenizer)
    load_into(policy, weights, f"{root / 'model.safetensors'} (written for another config.json?)")
    _read_processor(policy.processor, root)
    return policy.to(map_location)


def _read_processor(processor, root: Path) -> None:
    """stats.json + processor.json into the policy's processor (a missing processor.json: no stats)."""
    meta = read_json(root / PROCESSOR_FILE, expect=dict)
    if not isinstance(meta.get("stats_source"), str):
        raise CraftVLAError(f"{root / PROCESSOR_FILE}: no 'stats_source' string")
    stats = None
    if (root / "stats.json").is_file():
        stats = from_jsonable(read_json(root / "stats.json", expect=dict), str(root / "stats.json"))
    processor.set_stats(stats, meta["stats_source"])
    tasks = meta.get("training_tasks")
    if tasks is not None and not (isinstance(tasks, list) and all(isinstance(t, str) for t in tasks)):
        raise CraftVLAError(f"{root / PROCESSOR_FILE}: 'training_tasks' must be a list of instruction strings or null")
    processor.training_tasks = tasks


def read_policy_config(path: Path) -> VLAConfig:
    """config.json -> VLAConfig; refuses other formats and unknown or mistyped keys."""
    raw = read_json(path, expect=dict)
    raw.pop("pretrained_from", None)
    version = raw.pop("craftvla_format", None)
    if version is None:
        raise CraftVLAError(f"{path}: no 'craftvla_format' key; not a craftvla checkpoint config")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CraftVLAError(
            f"{path}: craftvla_format {version!r} was written by a newer craftvla (this one "
            f"reads format {FORMAT_VERSION}); upgrade craftvla to load it"
        )
    if version != FORMAT_VERSION:
        raise CraftVLAError(
            f"{path}: craftvla_format {version!r} was written before the model-core rebuild (this "
            f"craftvla reads format {FORMAT_VERSION}: action heads as choice types, a saved processor); "
            "train it again with this version"
        )
    try:
        return VLAConfig.from_dict(raw)
    except CraftVLAError as err:
        raise CraftVLAError(f"{path}: {err}") from None


def _read_llm_config(path: Path):
    """llm_config.json -> the transformers config it describes (offline)."""
    from transformers import AutoConfig

    raw = read_json(path, expect=dict)
    model_type = raw.pop("model_type", None)
    try:
        return AutoConfig.for_model(model_type, **raw)
    except (ValueError, TypeError, KeyError) as err:
        raise CraftVLAError(
            f"{path}: not a transformers config (model_type={model_type!r}: {' '.join(str(err).split())})"
        ) from None


def _read_tokenizer(config: VLAConfig, directory: Path):
    """The tokenizer saved beside the weights; a broken one names its file."""
    from craftvla.model.language import load_tokenizer

    if not directory.is_dir():
        raise CraftVLAError(f"{directory}: tokenizer directory missing from the checkpoint")
    try:
        return load_tokenizer(config.llm, saved=directory)
    except (OSError, ValueError, json.JSONDecodeError) as err:
        raise CraftVLAError(f"{directory}: cannot load the tokenizer ({' '.join(str(err).split())})") from None

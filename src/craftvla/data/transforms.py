"""Small composable transforms over item or batch dicts (pure: they return a new dict).

Normalisation lives here, outside the model, and is driven by the dataset's stats (which a
checkpoint stores with it). Image transforms act on every "observation.images.*" tensor of
shape (..., 3, H, W) float in [0, 1]. Augmentations follow VLA-Adapter / OpenVLA training:
a random crop of 90% of the area resized back to the original size, and colour jitter
(brightness 0.2, contrast 0.2, saturation 0.2, hue 0.05).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torchvision.transforms import v2

from craftvla.config import NORM_MODES
from craftvla.errors import ConfigError, CraftVLAError
from craftvla.keys import IMAGE_PREFIX

MODES = NORM_MODES
# The statistics each mode reads; q01_q99 also reads "mask" (dims left as they are) and "min"/"max"
# (dims where min == max normalise to 0) when present (OpenVLA / VLA-Adapter's BOUNDS_Q99).
NEEDED = {"mean_std": ("mean", "std"), "min_max": ("min", "max"), "q01_q99": ("q01", "q99")}
OPTIONAL = {"q01_q99": ("mask", "min", "max")}
EPS = 1e-8  # keeps constant features (std = 0 or max = min) finite


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence[Callable[[dict], dict]]) -> None:
        self.transforms = list(transforms)

    def __call__(self, item: dict[str, Any]) -> dict[str, Any]:
        for t in self.transforms:
            item = t(item)
        return item

    def __repr__(self) -> str:
        return f"Compose({self.transforms})"


class _StatsTransform:
    """Shared set-up of Normalize / Unnormalize: validated mapping and stats as tensors."""

    def __init__(self, stats: Mapping[str, Mapping[str, Any]], mapping: Mapping[str, str]) -> None:
        self.mapping = dict(mapping)
        self.stats: dict[str, dict[str, torch.Tensor]] = {}
        for key, mode in self.mapping.items():
            if mode not in MODES:
                raise ConfigError(f"normalization mapping[{key!r}]={mode!r}: expected one of {MODES}")
            if mode == "identity":
                continue
            needed = NEEDED[mode]
            if key not in stats or any(n not in stats[key] for n in needed):
                raise CraftVLAError(f"stats: no {'/'.join(needed)} for {key!r} (needed by mode {mode!r})")
            names = needed + tuple(n for n in OPTIONAL.get(mode, ()) if n in stats[key])
            self.stats[key] = {n: torch.as_tensor(np.asarray(stats[key][n]), dtype=torch.float32) for n in names}

    def _apply(self, item: dict[str, Any], fn: Callable) -> dict[str, Any]:
        out = dict(item)
        for key, st in self.stats.items():
            if key in out:
                x = out[key]
                out[key] = fn(x, {n: v.to(device=x.device, dtype=x.dtype) for n, v in st.items()}, self.mapping[key])
        return out


class Normalize(_StatsTransform):
    """mean_std: (x - mean) / std; min_max: to [-1, 1]; identity: unchanged. Any leading dims."""

    def __call__(self, item: dict[str, Any]) -> dict[str, Any]:
        return self._apply(item, _normalize)


class Unnormalize(_StatsTransform):
    """The inverse of `Normalize` with the same stats and mapping (e.g. on predicted actions)."""

    def __call__(self, item: dict[str, Any]) -> dict[str, Any]:
        return self._apply(item, _unnormalize)


def _normalize(x: torch.Tensor, st: dict[str, torch.Tensor], mode: str) -> torch.Tensor:
    if mode == "mean_std":
        return (x - st["mean"]) / (st["std"] + EPS)
    if mode == "q01_q99":  # [q01, q99] -> [-1, 1], clipped; masked-off dims as they are; constant dims 0
        scaled = (2.0 * (x - st["q01"]) / (st["q99"] - st["q01"] + EPS) - 1.0).clamp(-1.0, 1.0)
        out = torch.where(_mask(st, x), scaled, x)
        return torch.where(st["min"] == st["max"], 0.0, out) if "min" in st and "max" in st else out
    return 2.0 * (x - st["min"]) / (st["max"] - st["min"] + EPS) - 1.0


def _unnormalize(x: torch.Tensor, st: dict[str, torch.Tensor], mode: str) -> torch.Tensor:
    if mode == "mean_std":
        return x * (st["std"] + EPS) + st["mean"]
    if mode == "q01_q99":  # not clipped, as theirs
        return torch.where(_mask(st, x), 0.5 * (x + 1.0) * (st["q99"] - st["q01"] + EPS) + st["q01"], x)
    return (x + 1.0) / 2.0 * (st["max"] - st["min"] + EPS) + st["min"]


def _mask(st: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:  # (A,) bool: dims normalised
    return st["mask"] > 0.5 if "mask" in st else torch.ones(x.shape[-1], dtype=torch.bool, device=x.device)


class _ImageTransform:
    """Applies `self.fn` to each camera image tensor (..., 3, H, W), returning a new dict."""

    def fn(self, image: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, item: dict[str, Any]) -> dict[str, Any]:
        return {k: self.fn(v) if k.startswith(IMAGE_PREFIX) else v for k, v in item.items()}


class ResizeImages(_ImageTransform):
    """Resize every camera image to `size` (int for square, or (H, W)), bilinear with antialias."""

    def __init__(self, size: int | tuple[int, int]) -> None:
        self.size = [size, size] if isinstance(size, int) else list(size)

    def fn(self, image: torch.Tensor) -> torch.Tensor:
        return v2.functional.resize(image, self.size, antialias=True)

    def __repr__(self) -> str:
        return f"ResizeImages({self.size})"


class RandomCropResize(_ImageTransform):
    """Random crop of `scale` of the area (same aspect ratio), resized back to the input size.

    OpenVLA / VLA-Adapter: `RandomResizedCrop(scale=(0.9, 0.9), ratio=(1, 1))` at train time.
    """

    def __init__(self, scale: float = 0.9) -> None:
        if not 0.0 < scale <= 1.0:
            raise ConfigError(f"RandomCropResize scale={scale}: must be in (0, 1]")
        self.scale = scale

    def fn(self, image: torch.Tensor) -> torch.Tensor:
        h, w = image.shape[-2:]
        ch, cw = max(1, round(h * self.scale**0.5)), max(1, round(w * self.scale**0.5))
        top = int(torch.randint(0, h - ch + 1, ()))
        left = int(torch.randint(0, w - cw + 1, ()))
        return v2.functional.resized_crop(image, top, left, ch, cw, [h, w], antialias=True)

    def __repr__(self) -> str:
        return f"RandomCropResize(scale={self.scale})"


class ColorJitter(_ImageTransform):
    """Random brightness / contrast / saturation / hue (torchvision v2), output clamped to [0, 1]."""

    def __init__(self, brightness: float = 0.2, contrast: float = 0.2, saturation: float = 0.2, hue: float = 0.05):
        self.jitter = v2.ColorJitter(brightness=brightness, contrast=contrast, saturation=saturation, hue=hue)

    def fn(self, image: torch.Tensor) -> torch.Tensor:
        return self.jitter(image).clamp(0.0, 1.0)

    def __repr__(self) -> str:
        return f"ColorJitter({self.jitter})"

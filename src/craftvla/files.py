"""Reading and writing the small files users hand us or we hand back (JSON, safetensors, torch
`.pt`): every failure a user can cause — a missing, truncated or malformed file — is one
`CraftVLAError` naming the file and what is wrong with it; writes are atomic (temp file in the
same directory, fsync, rename), so a crash never leaves a half-written file under the real name.
Nothing here unpickles code: `.pt` files load with `weights_only=True`.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from craftvla.errors import CraftVLAError


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def read_json(path: str | os.PathLike, expect: type | None = None) -> Any:
    """A JSON file's content; missing, unreadable or invalid JSON (or not of type `expect`) -> CraftVLAError."""
    path = Path(path)
    if not path.is_file():
        raise CraftVLAError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CraftVLAError(f"{path}: not valid JSON ({_one_line(err)})") from None
    except OSError as err:
        raise CraftVLAError(f"{path}: cannot read ({_one_line(err)})") from None
    if expect is not None and not isinstance(data, expect):
        raise CraftVLAError(f"{path}: expected a JSON {expect.__name__}, got {type(data).__name__}")
    return data


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int = 2) -> None:
    """Write `obj` as JSON under `path` atomically (the parent directory is created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=indent, ensure_ascii=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_safetensors(path: str | os.PathLike, device: str = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a .safetensors file; missing, truncated or not safetensors -> CraftVLAError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CraftVLAError(f"{path}: file not found")
    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CraftVLAError(f"{path}: not a readable safetensors file, truncated or corrupt? "
                            f"({_one_line(err)})") from None


def safetensors_header(path: str | os.PathLike) -> tuple[list[str], dict[str, str]]:
    """(tensor names, metadata) of a .safetensors file without loading the tensors."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise CraftVLAError(f"{path}: file not found")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys()), dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CraftVLAError(f"{path}: not a readable safetensors file, truncated or corrupt? "
                            f"({_one_line(err)})") from None


def read_torch(path: str | os.PathLike) -> Any:
    """A torch.save file loaded with weights_only=True (tensors and plain containers, no code)."""
    path = Path(path)
    if not path.is_file():
        raise CraftVLAError(f"{path}: file not found")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError, ...
        raise CraftVLAError(f"{path}: cannot load with torch.load(weights_only=True), truncated or not a "
                            f"tensor file? ({_one_line(err)})") from None

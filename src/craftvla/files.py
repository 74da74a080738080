"""Reading and writing the small files users hand us or we hand back (JSON, safetensors, torch
`.pt`): every failure a user can cause — a missing, truncated or malformed file — is one
`CraftVLAError` naming the file and what is wrong with it; writes are atomic (temp file in the
same directory, fsync, rename), so a crash never leaves a half-written file under the real name.
Nothing here unpickles code: `.pt` files load with `weights_only=True`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

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


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """The one way a file is written here: yields a temporary sibling of `path` to write (dot-prefixed,
    `.tmp<pid>` before the real suffix, so writers that read the extension — matplotlib, PyAV — still
    see it); when the block ends it is fsynced and renamed onto `path`, and on any error removed. The
    parent directory is created. A crash never leaves a half-written file under the real name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a directory's entries (a rename inside it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike) -> None:
    """Flush every file and directory under `root` to disk (before the rename that publishes it)."""
    for dirpath, _, names in os.walk(root):
        for name in names:
            with open(os.path.join(dirpath, name), "rb") as handle:
                os.fsync(handle.fileno())
        fsync_dir(dirpath)


def publish_dir(tmp: Path, final: Path) -> None:
    """The one way a directory (a checkpoint) is published: a finished, fsynced `tmp` is renamed onto
    `final`; a previous `final` is first moved aside to `.trash-<name>` and removed last, so at every
    moment `final` is either the old directory or the new one, whole."""
    if not final.exists():
        os.replace(tmp, final)
        return
    trash = final.with_name(f".trash-{final.name}")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(final, trash)
    os.replace(tmp, final)
    shutil.rmtree(trash, ignore_errors=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` under `path` atomically (see atomic_path)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int = 2) -> None:
    """Write `obj` as JSON under `path` atomically (see atomic_path)."""
    write_text_atomic(path, json.dumps(obj, indent=indent, ensure_ascii=False))


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
        raise CraftVLAError(
            f"{path}: not a readable safetensors file, truncated or corrupt? ({_one_line(err)})"
        ) from None


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
        raise CraftVLAError(
            f"{path}: not a readable safetensors file, truncated or corrupt? ({_one_line(err)})"
        ) from None


def read_torch(path: str | os.PathLike, mmap: bool = False) -> Any:
    """A torch.save file loaded with weights_only=True (tensors and plain containers, no code);
    `mmap`: tensors map the file and are read only when touched (listing keys costs no tensor reads)."""
    path = Path(path)
    if not path.is_file():
        raise CraftVLAError(f"{path}: file not found")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError, ...
        raise CraftVLAError(
            f"{path}: cannot load with torch.load(weights_only=True), truncated or not a "
            f"tensor file? ({_one_line(err)})"
        ) from None

"""Checkpoints: atomic save, keep-last-K, and exact resume.

Layout of `RUN/checkpoints/`:

    000500/                  the policy's save_pretrained layout (config.json, model.safetensors,
      config.json ...        stats.json), loadable by `VLAPolicy.from_pretrained` / `craftvla eval`
      training_state/
        state.json           step, samples seen, world size, batch size, seed
        optimizer.pt         optimizer state_dict
        scheduler.pt         LR scheduler state_dict
        rng_state_<rank>.pt  torch / CUDA / numpy / python RNG states of each process
        plugins.pt           state of registered plug-ins (e.g. CRaFT's lambda), by name
        model.safetensors    the unmerged training weights (LoRA runs only; the top level is merged)
    last -> 000500           a symlink, swapped atomically

A save is built in `.tmp-<step>/`, fsynced, renamed into place, and only then does `last` move,
so a kill at any moment leaves the previous `last` complete. `.pt` files hold only tensors and
plain containers and are read back with `torch.load(weights_only=True)` (no arbitrary pickle).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Mapping, Protocol

import numpy as np
import torch
from torch import nn

from craftvla.errors import CraftVLAError
from craftvla.files import fsync_dir, fsync_tree, publish_dir, read_json, read_safetensors, read_torch

TRAINING_STATE = "training_state"
LAST = "last"


class Stateful(Protocol):
    """Anything with state_dict / load_state_dict (optimizer, scheduler, CRaFT's dual variable)."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> Any: ...


def step_dir_name(step: int) -> str:
    """Zero-padded so that checkpoint directories sort by step."""
    return f"{step:06d}"


# ----- RNG ------------------------------------------------------------------------------------------


def rng_state() -> dict:
    """Every RNG a training step can draw from, in a weights_only-loadable form."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": pos,
            "has_gauss": has_gauss,
            "gauss": gauss,
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Inverse of `rng_state`."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----- files ----------------------------------------------------------------------------------------


def _point_last(ckpt_root: Path, name: str) -> None:
    """Atomically re-point `last` (a relative symlink) at checkpoint `name`."""
    tmp_link = ckpt_root / ".last.tmp"
    if tmp_link.is_symlink() or tmp_link.exists():
        tmp_link.unlink()
    os.symlink(name, tmp_link)
    os.replace(tmp_link, ckpt_root / LAST)
    fsync_dir(ckpt_root)


def numbered_checkpoints(ckpt_root: Path) -> list[Path]:
    """Published checkpoint directories, oldest first."""
    if not ckpt_root.is_dir():
        return []
    return sorted(p for p in ckpt_root.iterdir() if p.name.isdigit() and p.is_dir() and not p.is_symlink())


def _prune(ckpt_root: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` numbered checkpoints (never the one `last` names)."""
    keep = os.path.realpath(ckpt_root / LAST)
    for path in numbered_checkpoints(ckpt_root)[:-keep_last]:
        if os.path.realpath(path) != keep:
            shutil.rmtree(path)


def clean_stale(ckpt_root: Path) -> None:
    """Remove leftovers of interrupted saves (`.tmp-*`, `.trash-*`, `.last.tmp`)."""
    if ckpt_root.is_dir():
        for path in ckpt_root.iterdir():
            if path.name.startswith((".tmp-", ".trash-")):
                shutil.rmtree(path, ignore_errors=True)
            elif path.name == ".last.tmp":
                path.unlink()


# ----- save / load ----------------------------------------------------------------------------------


def write_training_state(ts: Path, training: Mapping[str, Any], lora_model: nn.Module | None) -> None:
    """Write the main process's training_state/ files into `ts`.

    `training` maps file stems to state objects: "optimizer", "scheduler", "plugins" (saved with
    torch.save) and "state" (JSON); `lora_model` is the unmerged training model of a LoRA run.
    """
    from safetensors.torch import save_file

    for stem, obj in training.items():
        if stem == "state":
            (ts / "state.json").write_text(json.dumps(obj, indent=2))
        else:
            torch.save(obj, ts / f"{stem}.pt")
    if lora_model is not None:
        state = {k: v.detach().contiguous().cpu() for k, v in lora_model.state_dict().items()}
        save_file(state, str(ts / "model.safetensors"))


def save_checkpoint(run_dir: Path, step: int, accelerator, export: nn.Module, write_main, keep_last: int) -> Path:
    """Collectively save checkpoint `step` (call on all ranks).

    The main rank writes `export.save_pretrained` into a temporary directory, every rank adds its
    RNG state, the main rank calls `write_main(training_state_dir)` for the rest, fsyncs, renames
    the directory into place, re-points `last` and prunes to the newest `keep_last`.
    """
    ckpt_root = Path(run_dir) / "checkpoints"
    tmp = ckpt_root / f".tmp-{step_dir_name(step)}"
    if accelerator.is_main_process:
        clean_stale(ckpt_root)
        export.save_pretrained(tmp)  # creates tmp (the policy's own writer is atomic too)
        (tmp / TRAINING_STATE).mkdir()
    accelerator.wait_for_everyone()
    torch.save(rng_state(), tmp / TRAINING_STATE / f"rng_state_{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    final = ckpt_root / step_dir_name(step)
    if accelerator.is_main_process:
        write_main(tmp / TRAINING_STATE)
        fsync_tree(tmp)
        publish_dir(tmp, final)
        _point_last(ckpt_root, final.name)
        _prune(ckpt_root, keep_last)
    accelerator.wait_for_everyone()
    return final


def _load_pt(path: Path) -> Any:
    if not path.is_file():
        raise CraftVLAError(f"{path}: missing from the checkpoint (was the save interrupted?)")
    return read_torch(path)


def read_training_state(ckpt: Path, rank: int) -> dict[str, Any]:
    """The training_state/ files of checkpoint `ckpt` for process `rank` (see module docstring)."""
    ts = Path(ckpt) / TRAINING_STATE
    if not (ts / "state.json").is_file():
        raise CraftVLAError(f"{ts / 'state.json'}: not found; {ckpt} is not a resumable checkpoint")
    out = {"state": read_json(ts / "state.json", expect=dict)}
    for stem in ("optimizer", "scheduler", "plugins"):
        out[stem] = _load_pt(ts / f"{stem}.pt")
    out["rng"] = _load_pt(ts / f"rng_state_{rank}.pt")
    return out


def load_model_weights(ckpt: Path, model: nn.Module) -> None:
    """Load the training weights into `model` (unwrapped): the unmerged LoRA file when present,
    else the exported policy's model.safetensors (identical to the training model without LoRA)."""
    from craftvla.model.checkpoints import load_into

    lora_file = Path(ckpt) / TRAINING_STATE / "model.safetensors"
    path = lora_file if lora_file.is_file() else Path(ckpt) / "model.safetensors"
    if not path.is_file():
        raise CraftVLAError(f"{path}: not found in checkpoint {ckpt}")
    load_into(model, read_safetensors(path), f"{path} (resume with the same --policy / --lora settings)")


def last_checkpoint(run_dir: Path) -> Path:
    """RUN/checkpoints/last resolved to its numbered directory, or a clear error."""
    last = Path(run_dir) / "checkpoints" / LAST
    if not last.exists():
        raise CraftVLAError(f"{last}: no checkpoint to resume from (train without --resume first)")
    return last.resolve()


def load_plugins(plugins: Mapping[str, Stateful], states: Mapping[str, dict], ckpt: Path) -> None:
    """Restore each registered plug-in from the saved `plugins.pt` mapping; the saved and the
    registered plug-ins must be the same set (a dropped one would silently lose its state)."""
    if set(plugins) != set(states):
        raise CraftVLAError(
            f"{ckpt}/{TRAINING_STATE}/plugins.pt: saved plug-in state {sorted(states)} but this run "
            f"has {sorted(plugins)}; resume with the same plug-ins enabled (e.g. --craft.enabled)"
        )
    for name, plugin in plugins.items():
        plugin.load_state_dict(states[name])

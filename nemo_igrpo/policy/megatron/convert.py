"""Hugging Face ↔ Megatron-Core GPTModel: config and weight mapping for Llama / Qwen2 / Qwen3 / Mistral.

Pure torch: nothing here imports megatron, so the export command can use it on any machine.

Layout (measured against transformers logits, see docs/megatron.md):

- ``linear_qkv`` fuses q, k and v *per KV group*: for each group, its ``heads / groups`` query heads, then its key
  head, then its value head. Tensor parallelism splits the groups, so rank r holds whole groups.
- ``linear_fc1`` is [gate; up]; on TP rank r it is [gate_r; up_r] (each half split on dim 0 separately).
- ``linear_qkv``, ``linear_fc1``, the embedding and the output layer split on dim 0; ``linear_proj`` and
  ``linear_fc2`` on dim 1; norms (and Qwen3's per-head q/k norms) are replicated.
- Names are the local (non-Transformer-Engine) layer spec's; :func:`to_te_names` renames for the TE spec, whose
  fused layer-norm linears hold the input norms.
- Layer indices are global (0 … num_layers−1); a pipeline stage renumbers its own layers from 0 (see policy.py).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")



class UnsupportedArchitectureError(ValueError):
    """The HF model type has no hand-written mapping here."""


def _text_config(hf_config: Any) -> Any:
    get = getattr(hf_config, "get_text_config", None)
    return get() if callable(get) else hf_config


def check_supported(hf_config: Any) -> None:
    """Raise :class:`UnsupportedArchitectureError` (suggesting Megatron-Bridge) for unmapped model types."""
    config = _text_config(hf_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedArchitectureError(
            f"policy.backend=megatron: model_type {model_type!r} has no built-in HF↔Megatron mapping "
            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)}). Other architectures (e.g. Nemotron-H hybrids) need "
            "Megatron-Bridge (`pip install megatron-bridge`, which provides `megatron.bridge.AutoBridge`; it "
            "needs Transformer Engine and ships in the NGC NeMo container)."
        )


def head_dim(hf_config: Any) -> int:
    config = _text_config(hf_config)
    value = getattr(config, "head_dim", None)
    return int(value) if value else config.hidden_size // config.num_attention_heads


def num_kv_heads(hf_config: Any) -> int:
    config = _text_config(hf_config)
    return int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)


def rope_settings(hf_config: Any) -> dict[str, Any]:
    """GPTModel rope kwargs (``rotary_base``, ``rope_scaling``, ``rope_scaling_factor``) from the HF config.

    transformers 5 keeps the rope settings in ``rope_parameters``; older configs have ``rope_theta`` and
    ``rope_scaling``. Megatron's rotary embedding is HF's rotate-half form; its only scaling is Llama 3.1's, with
    low/high frequency factors 1/4 and an original context of 8192 fixed, so anything else is refused.
    """
    config = _text_config(hf_config)
    params = dict(getattr(config, "rope_parameters", None) or {})
    legacy = getattr(config, "rope_scaling", None)
    if legacy and not params.get("rope_type"):
        params.update(legacy)
    theta = params.get("rope_theta", getattr(config, "rope_theta", None) or 10000.0)
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    settings: dict[str, Any] = {"rotary_base": float(theta), "rope_scaling": False}
    if rope_type == "default":
        return settings
    if rope_type == "llama3":
        fixed = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        for key, expected in fixed.items():
            if key in params and float(params[key]) != expected:
                raise UnsupportedArchitectureError(
                    f"policy.backend=megatron: llama3 rope scaling with {key}={params[key]} (Megatron-Core fixes it "
                    f"to {expected})")
        settings.update(rope_scaling=True, rope_scaling_factor=float(params.get("factor", 8.0)))
        return settings
    raise UnsupportedArchitectureError(
        f"policy.backend=megatron: rope_type {rope_type!r} is not supported by the built-in mapping (default and "
        "llama3 are); use Megatron-Bridge for other rope scalings")


def gpt_config_kwargs(hf_config: Any) -> dict[str, Any]:
    """``TransformerConfig`` keyword arguments that reproduce the HF model (parallel sizes and dtypes excluded)."""
    check_supported(hf_config)
    config = _text_config(hf_config)
    act = getattr(config, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise UnsupportedArchitectureError(f"policy.backend=megatron: hidden_act {act!r} (only silu/SwiGLU mapped)")
    if getattr(config, "mlp_bias", False):
        raise UnsupportedArchitectureError("policy.backend=megatron: mlp_bias=True is not mapped")
    model_type = config.model_type
    window = getattr(config, "sliding_window", None)
    uses_window = window is not None and (model_type == "mistral" or getattr(config, "use_sliding_window", False))
    if uses_window and window < getattr(config, "max_position_embeddings", 0):
        # The local/SDPA spec attends causally over the whole sequence: identical to HF while sequences fit the window.
        warnings.warn(f"sliding_window={window} is not applied by the Megatron backend: sequences longer than "
                      "it score differently from the HF model", stacklevel=2)
    # Llama/Mistral put a bias on q/k/v only when attention_bias is set; Qwen2 always has one.
    qkv_bias = model_type == "qwen2" or bool(getattr(config, "attention_bias", False))
    return {
        "num_layers": int(config.num_hidden_layers),
        "hidden_size": int(config.hidden_size),
        "ffn_hidden_size": int(config.intermediate_size),
        "num_attention_heads": int(config.num_attention_heads),
        "num_query_groups": num_kv_heads(config),
        "kv_channels": head_dim(config),
        "normalization": "RMSNorm",
        "layernorm_epsilon": float(config.rms_norm_eps),
        "gated_linear_unit": True,
        "activation_func": torch.nn.functional.silu,
        "add_bias_linear": False,
        "add_qkv_bias": qkv_bias,
        "qk_layernorm": model_type == "qwen3",
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
        # Fusions that need Apex/TE or CUDA kernels; the TE spec fuses what matters itself.
        "bias_activation_fusion": False,
        "bias_dropout_fusion": False,
        "masked_softmax_fusion": False,
        "apply_rope_fusion": False,
        "persist_layer_norm": False,
        "gradient_accumulation_fusion": False,
    }


def gpt_model_kwargs(hf_config: Any) -> dict[str, Any]:
    """``GPTModel`` keyword arguments beyond the config and layer spec (vocab, positions, rope, tying)."""
    check_supported(hf_config)
    config = _text_config(hf_config)
    return {
        "vocab_size": int(config.vocab_size),
        "max_sequence_length": int(getattr(config, "max_position_embeddings", 4096)),
        "position_embedding_type": "rope",
        "rotary_percent": 1.0,
        "share_embeddings_and_output_weights": bool(getattr(config, "tie_word_embeddings", False)),
        **rope_settings(config),
    }


def padded_vocab_size(vocab_size: int, tp_size: int, divisible_by: int = 1) -> int:
    """Megatron's rule: the embedding / output rows are padded to a multiple of ``divisible_by × TP`` so that every
    tensor-parallel rank holds an equal vocab slice. The padded rows are zero, masked out of every softmax (see
    ``logprobs.vocab_parallel_stats``) so they are never scored or trained, and stripped on the way back to HF."""
    multiple = max(1, int(divisible_by)) * max(1, int(tp_size))
    return -(-int(vocab_size) // multiple) * multiple


def _pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    if tensor.shape[0] >= rows:
        return tensor
    return torch.cat([tensor, tensor.new_zeros(rows - tensor.shape[0], *tensor.shape[1:])], dim=0)


# ---------------------------------------------------------------------------------------------- HF → Megatron


def _split(tensor: torch.Tensor, dim: int, rank: int, size: int, what: str) -> torch.Tensor:
    if tensor.shape[dim] % size:
        raise ValueError(f"{what}: dim {dim} of size {tensor.shape[dim]} does not divide by tensor parallel size {size}")
    return tensor.chunk(size, dim=dim)[rank].clone()


def _fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, groups: int, dim: int, rank: int,
              size: int) -> torch.Tensor:
    """[q; k; v] (HF, heads-major) → Megatron's per-group [q_g…; k_g; v_g] rows of TP rank ``rank``."""
    trailing = q.shape[1:]  # (hidden,) for weights, () for biases
    if q.shape[0] != heads * dim or k.shape[0] != groups * dim or v.shape[0] != groups * dim:
        raise ValueError(f"q/k/v projections have {q.shape[0]}/{k.shape[0]}/{v.shape[0]} rows; the config says "
                         f"{heads}×{dim} / {groups}×{dim} (checkpoint from a different model?)")
    q = q.reshape(groups, heads // groups * dim, *trailing)
    k = k.reshape(groups, dim, *trailing)
    v = v.reshape(groups, dim, *trailing)
    fused = torch.cat([q, k, v], dim=1)
    local = groups // size
    return fused[rank * local:(rank + 1) * local].reshape(-1, *trailing).clone()


def hf_to_mcore(hf_state: Mapping[str, torch.Tensor], hf_config: Any, tp_rank: int = 0,
                tp_size: int = 1, padded_vocab: int | None = None) -> dict[str, torch.Tensor]:
    """The GPTModel (local spec) state dict of TP rank ``tp_rank`` of ``tp_size``, all layers, global indices.

    ``padded_vocab``: rows of the embedding / output layer in the Megatron model (zero rows appended to the HF
    vocabulary, see :func:`padded_vocab_size`); None = the HF vocabulary size.
    Accepts keys with or without the ``model.`` prefix. Raises naming the missing/unexpected HF key.
    """
    kwargs = gpt_config_kwargs(hf_config)
    heads, groups, dim = kwargs["num_attention_heads"], kwargs["num_query_groups"], kwargs["kv_channels"]
    tied = gpt_model_kwargs(hf_config)["share_embeddings_and_output_weights"]
    if groups % tp_size:
        raise ValueError(f"num_key_value_heads={groups} does not divide by tensor parallel size {tp_size}")
    state = {(k.removeprefix("model.")): v for k, v in hf_state.items()}
    used: set[str] = set()

    def take(name: str) -> torch.Tensor:
        if name not in state:
            raise KeyError(f"HF state dict has no {name!r} (nor 'model.{name}'): not a "
                           f"{_text_config(hf_config).model_type} checkpoint of this config?")
        used.add(name)
        return state[name]

    rows = padded_vocab or 0

    def vocab_split(name: str, what: str) -> torch.Tensor:
        return _split(_pad_rows(take(name), rows), 0, tp_rank, tp_size, what)

    out: dict[str, torch.Tensor] = {
        "embedding.word_embeddings.weight": vocab_split("embed_tokens.weight", "embedding"),
        "decoder.final_layernorm.weight": take("norm.weight").clone(),
    }
    if not tied:
        out["output_layer.weight"] = vocab_split("lm_head.weight", "lm_head")
    elif "lm_head.weight" in state:
        used.add("lm_head.weight")  # a tied copy, saved by some exporters
    for i in range(kwargs["num_layers"]):
        hf, mc = f"layers.{i}.", f"decoder.layers.{i}."
        attn = hf + "self_attn."
        qkv = [take(attn + f"{p}_proj.weight") for p in "qkv"]
        out[mc + "self_attention.linear_qkv.weight"] = _fuse_qkv(*qkv, heads, groups, dim, tp_rank, tp_size)
        if kwargs["add_qkv_bias"]:
            biases = [take(attn + f"{p}_proj.bias") for p in "qkv"]
            out[mc + "self_attention.linear_qkv.bias"] = _fuse_qkv(*biases, heads, groups, dim, tp_rank, tp_size)
        out[mc + "self_attention.linear_proj.weight"] = _split(take(attn + "o_proj.weight"), 1, tp_rank, tp_size,
                                                               "o_proj")
        if kwargs["qk_layernorm"]:
            out[mc + "self_attention.q_layernorm.weight"] = take(attn + "q_norm.weight").clone()
            out[mc + "self_attention.k_layernorm.weight"] = take(attn + "k_norm.weight").clone()
        gate = _split(take(hf + "mlp.gate_proj.weight"), 0, tp_rank, tp_size, "gate_proj")
        up = _split(take(hf + "mlp.up_proj.weight"), 0, tp_rank, tp_size, "up_proj")
        out[mc + "mlp.linear_fc1.weight"] = torch.cat([gate, up], dim=0)
        out[mc + "mlp.linear_fc2.weight"] = _split(take(hf + "mlp.down_proj.weight"), 1, tp_rank, tp_size,
                                                   "down_proj")
        out[mc + "input_layernorm.weight"] = take(hf + "input_layernorm.weight").clone()
        out[mc + "pre_mlp_layernorm.weight"] = take(hf + "post_attention_layernorm.weight").clone()
    unexpected = sorted(k for k in state if k not in used and not k.endswith("rotary_emb.inv_freq"))
    if unexpected:
        raise KeyError(f"HF state dict has keys the {_text_config(hf_config).model_type} mapping does not use "
                       f"(different model or config?): {unexpected[:5]}")
    return out


# ---------------------------------------------------------------------------------------------- Megatron → HF


def mcore_to_hf(tp_shards: Sequence[Mapping[str, torch.Tensor]], hf_config: Any,
                partial: bool = False) -> dict[str, torch.Tensor]:
    """Full HF-named tensors from the local-spec state dicts of every TP rank (in rank order, global layer indices).

    ``_extra_state`` entries are ignored; TE-spec names are accepted too (see :func:`to_local_names`). Vocabulary
    padding rows (:func:`padded_vocab_size`) are stripped: the result always has the HF ``vocab_size`` rows.
    ``partial=True`` converts whatever the shards hold (one pipeline stage, one layer) instead of requiring all.
    With tied embeddings ``lm_head.weight`` is emitted with the embedding (an output-layer copy is skipped).
    """
    kwargs = gpt_config_kwargs(hf_config)
    heads, groups, dim = kwargs["num_attention_heads"], kwargs["num_query_groups"], kwargs["kv_channels"]
    tied = gpt_model_kwargs(hf_config)["share_embeddings_and_output_weights"]
    vocab = gpt_model_kwargs(hf_config)["vocab_size"]
    shards = [to_local_names(s) for s in tp_shards]
    size = len(shards)
    if not size:
        raise ValueError("mcore_to_hf: no tensor-parallel shards given")

    def cat(name: str, dim_: int) -> torch.Tensor:
        try:
            return torch.cat([s[name] for s in shards], dim=dim_)
        except KeyError:
            raise KeyError(f"Megatron state dict has no {name!r} (not a checkpoint of this model config?)") from None

    def first(name: str) -> torch.Tensor:
        if name not in shards[0]:
            raise KeyError(f"Megatron state dict has no {name!r} (not a checkpoint of this model config?)")
        return shards[0][name]

    def unfuse(name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        parts = []
        for s in shards:
            t = s[name] if name in s else first(name)
            trailing = t.shape[1:]
            parts.append(t.reshape(groups // size, (heads // groups + 2) * dim, *trailing))
        fused = torch.cat(parts, dim=0)
        q_rows = heads // groups * dim
        q, k, v = fused.split([q_rows, dim, dim], dim=1)
        return tuple(x.reshape(-1, *x.shape[2:]).contiguous() for x in (q, k, v))  # type: ignore[return-value]

    present = shards[0]
    out: dict[str, torch.Tensor] = {}
    if not partial or "embedding.word_embeddings.weight" in present:
        out["model.embed_tokens.weight"] = cat("embedding.word_embeddings.weight", 0)[:vocab]
        if tied:
            out["lm_head.weight"] = out["model.embed_tokens.weight"]
    if not partial or "decoder.final_layernorm.weight" in present:
        out["model.norm.weight"] = first("decoder.final_layernorm.weight")
    if not tied and (not partial or "output_layer.weight" in present):
        out["lm_head.weight"] = cat("output_layer.weight", 0)[:vocab]
    layers = range(kwargs["num_layers"])
    if partial:
        layers = sorted({int(m.group(1)) for k in present if (m := re.match(r"^decoder\.layers\.(\d+)\.", k))})
    for i in layers:
        hf, mc = f"model.layers.{i}.", f"decoder.layers.{i}."
        attn = hf + "self_attn."
        for p, t in zip("qkv", unfuse(mc + "self_attention.linear_qkv.weight")):
            out[attn + f"{p}_proj.weight"] = t
        if kwargs["add_qkv_bias"]:
            for p, t in zip("qkv", unfuse(mc + "self_attention.linear_qkv.bias")):
                out[attn + f"{p}_proj.bias"] = t
        out[attn + "o_proj.weight"] = cat(mc + "self_attention.linear_proj.weight", 1)
        if kwargs["qk_layernorm"]:
            out[attn + "q_norm.weight"] = first(mc + "self_attention.q_layernorm.weight")
            out[attn + "k_norm.weight"] = first(mc + "self_attention.k_layernorm.weight")
        gates, ups = zip(*(s[mc + "mlp.linear_fc1.weight"].chunk(2, dim=0) for s in shards))
        out[hf + "mlp.gate_proj.weight"] = torch.cat(gates, dim=0)
        out[hf + "mlp.up_proj.weight"] = torch.cat(ups, dim=0)
        out[hf + "mlp.down_proj.weight"] = cat(mc + "mlp.linear_fc2.weight", 1)
        out[hf + "input_layernorm.weight"] = first(mc + "input_layernorm.weight")
        out[hf + "post_attention_layernorm.weight"] = first(mc + "pre_mlp_layernorm.weight")
    return {k: v.contiguous() for k, v in out.items()}


# ---------------------------------------------------------------------------------------------- spec names

# Local spec name → Transformer Engine spec name (TE fuses the input norms into the following linear layer).
_TE_RENAMES = (
    ("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight"),
    ("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight"),
)


def to_te_names(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in state.items():
        for local, te in _TE_RENAMES:
            if name.endswith("." + local):
                name = name[: -len(local)] + te
                break
        out[name] = tensor
    return out


def to_local_names(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in state.items():
        if name.endswith("_extra_state"):
            continue
        for local, te in _TE_RENAMES:
            if name.endswith("." + te):
                name = name[: -len(te)] + local
                break
        out[name] = tensor
    return out


def shift_layers(state: Mapping[str, torch.Tensor], offset: int) -> dict[str, torch.Tensor]:
    """Renumber ``decoder.layers.N.`` by ``offset`` (pipeline stage local ↔ global indices)."""
    def rename(name: str) -> str:
        match = re.match(r"^decoder\.layers\.(\d+)\.(.*)$", name)
        return f"decoder.layers.{int(match.group(1)) + offset}.{match.group(2)}" if match else name
    return {rename(k): v for k, v in state.items()}

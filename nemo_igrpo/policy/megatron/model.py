"""GPTModel for this rank's pipeline stage, built from an HF config and loaded with HF weights."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from nemo_igrpo.policy.megatron.convert import (
    gpt_config_kwargs,
    gpt_model_kwargs,
    hf_to_mcore,
    padded_vocab_size,
    shift_layers,
    to_te_names,
)
from nemo_igrpo.policy.megatron.parallel import ParallelSizes
from nemo_igrpo.policy.megatron.spec import layer_spec

_FP8_RECIPES = {"delayed": "delayed", "current": "tensorwise"}  # config name → megatron's Fp8Recipe


def transformer_config(hf_config: Any, sizes: ParallelSizes, megatron: Any, bf16: bool, on_gpu: bool):
    from megatron.core.transformer.transformer_config import TransformerConfig

    dtype = torch.bfloat16 if bf16 else torch.float32
    recompute: dict[str, Any] = {}
    if megatron.recompute == "selective":
        recompute = {"recompute_granularity": "selective"}  # core attention only (its default module list)
    elif megatron.recompute == "full":
        recompute = {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
    fp8: dict[str, Any] = {}
    if megatron.fp8 != "none":
        fp8 = {"fp8": megatron.fp8, "fp8_recipe": _FP8_RECIPES[megatron.fp8_recipe]}
    return TransformerConfig(
        **gpt_config_kwargs(hf_config),
        tensor_model_parallel_size=sizes.tp,
        pipeline_model_parallel_size=sizes.pp,
        context_parallel_size=sizes.cp,
        sequence_parallel=sizes.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=bf16,
        # The HF weights overwrite the random init, but megatron-core 0.16 tags tensor-parallel weights
        # (`tensor_model_parallel`, used by the grad norm and the optimizer) only inside its init functions.
        perform_initialization=True,
        use_cpu_initialization=not on_gpu,
        **recompute,
        **fp8,
    )


def model_vocab_size(hf_config: Any, config: Any, divisible_by: int = 1) -> int:
    """Rows of the Megatron embedding / output layer: the HF vocabulary padded for the TP size."""
    return padded_vocab_size(gpt_model_kwargs(hf_config)["vocab_size"], config.tensor_model_parallel_size,
                             divisible_by)


def build_model(hf_config: Any, config: Any, impl: str, vocab_divisible_by: int = 1):
    """This pipeline stage's GPTModel (unwrapped, not yet holding the HF weights)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(config, impl, qk_layernorm=config.qk_layernorm),
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        parallel_output=True,  # logits stay split over the vocab: log-probs are computed vocab-parallel
        **{**gpt_model_kwargs(hf_config), "vocab_size": model_vocab_size(hf_config, config, vocab_divisible_by)},
    )
    return model


def stage_state_from_hf(model: torch.nn.Module, hf_state: Mapping[str, torch.Tensor], hf_config: Any,
                        impl: str) -> dict[str, torch.Tensor]:
    """The HF weights mapped onto this rank's parameter names (TP shard, stage-local layer indices)."""
    from megatron.core import parallel_state
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    tp_rank, tp_size = (parallel_state.get_tensor_model_parallel_rank(),
                        parallel_state.get_tensor_model_parallel_world_size())
    full = hf_to_mcore(hf_state, hf_config, tp_rank, tp_size, padded_vocab=model.vocab_size)
    if "output_layer.weight" not in full:  # tied: the last stage's output layer starts as a copy of the embedding
        full["output_layer.weight"] = full["embedding.word_embeddings.weight"]
    if impl == "transformer_engine":
        full = to_te_names(full)
    offset = get_transformer_layer_offset(model.config)
    local = shift_layers(full, -offset)
    wanted = {k for k in model.state_dict() if not k.endswith("_extra_state")}
    return {k: v for k, v in local.items() if k in wanted}


@torch.no_grad()
def load_hf_weights(model: torch.nn.Module, hf_state: Mapping[str, torch.Tensor], hf_config: Any, impl: str) -> None:
    state = stage_state_from_hf(model, hf_state, hf_config, impl)
    own = model.state_dict()
    missing = sorted(k for k in own if not k.endswith("_extra_state") and k not in state)
    if missing:
        raise KeyError(f"HF weights do not cover Megatron parameters {missing[:5]} (model shape mismatch?)")
    for name, tensor in state.items():
        target = own[name]
        if target.shape != tensor.shape:
            raise ValueError(f"{name}: HF weight maps to shape {tuple(tensor.shape)}, the Megatron model expects "
                             f"{tuple(target.shape)} (checkpoint from a different model?)")
        target.copy_(tensor.to(target.dtype))

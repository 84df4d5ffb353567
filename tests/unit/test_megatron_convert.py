"""HF ↔ Megatron weight mapping and parallel-size validation (pure torch; no megatron import, no processes)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from nemo_igrpo.policy.megatron.convert import (
    UnsupportedArchitectureError,
    gpt_config_kwargs,
    gpt_model_kwargs,
    hf_to_mcore,
    mcore_to_hf,
    to_local_names,
    to_te_names,
)
from nemo_igrpo.policy.megatron.parallel import validate_sizes

SMALL = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "max_position_embeddings": 64}
CONFIGS = {
    "llama_untied": LlamaConfig(**SMALL, tie_word_embeddings=False),
    "qwen2_bias": Qwen2Config(**SMALL, tie_word_embeddings=True),
    "qwen3_qknorm": Qwen3Config(**SMALL, head_dim=16),
    "mistral": MistralConfig(**SMALL, sliding_window=None),
}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("tp", [1, 2])
def test_round_trip_is_exact(name, tp):
    config = CONFIGS[name]
    torch.manual_seed(0)
    state = AutoModelForCausalLM.from_config(config).state_dict()
    shards = [hf_to_mcore(state, config, rank, tp) for rank in range(tp)]
    back = mcore_to_hf([to_te_names(s) for s in shards], config)  # TE names convert back too
    for key, tensor in state.items():
        assert torch.equal(back[key], tensor), key
    assert not any(k.endswith("_extra_state") for k in shards[0])


def test_fused_qkv_is_ordered_per_kv_group_and_split_by_group():
    config = CONFIGS["qwen2_bias"]
    dim = config.hidden_size // config.num_attention_heads  # 8; 4 heads, 2 groups → 2 q heads per group
    state = AutoModelForCausalLM.from_config(config).state_dict()
    for p, base in (("q", 0), ("k", 100), ("v", 200)):
        rows = state[f"model.layers.0.self_attn.{p}_proj.bias"].numel()
        state[f"model.layers.0.self_attn.{p}_proj.bias"] = base + torch.arange(rows, dtype=torch.float32)
    rank1 = hf_to_mcore(state, config, tp_rank=1, tp_size=2)["decoder.layers.0.self_attention.linear_qkv.bias"]
    # group 1 (on TP rank 1): q heads 2,3 (rows 16..31), k head 1 (rows 8..15), v head 1
    expected = torch.cat([torch.arange(16, 32), 100 + torch.arange(8, 16), 200 + torch.arange(8, 16)]).float()
    assert torch.equal(rank1, expected)
    assert rank1.numel() == (2 + 2) * dim


def test_swiglu_fc1_is_gate_then_up_per_rank():
    config = CONFIGS["llama_untied"]
    state = AutoModelForCausalLM.from_config(config).state_dict()
    state["model.layers.1.mlp.gate_proj.weight"] = torch.zeros(48, 32)
    state["model.layers.1.mlp.up_proj.weight"] = torch.ones(48, 32)
    fc1 = hf_to_mcore(state, config, tp_rank=0, tp_size=2)["decoder.layers.1.mlp.linear_fc1.weight"]
    assert fc1.shape == (48, 32) and fc1[:24].eq(0).all() and fc1[24:].eq(1).all()


def test_config_kwargs_follow_the_model_family():
    qwen2, qwen3 = gpt_config_kwargs(CONFIGS["qwen2_bias"]), gpt_config_kwargs(CONFIGS["qwen3_qknorm"])
    assert qwen2["add_qkv_bias"] and not qwen2["qk_layernorm"] and qwen2["num_query_groups"] == 2
    assert qwen3["qk_layernorm"] and not qwen3["add_qkv_bias"] and qwen3["kv_channels"] == 16
    llama = LlamaConfig(**SMALL, rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0,
                                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                  "original_max_position_embeddings": 8192})
    rope = gpt_model_kwargs(llama)
    assert rope["rotary_base"] == 5e5 and rope["rope_scaling"] and rope["rope_scaling_factor"] == 8.0
    assert gpt_model_kwargs(CONFIGS["qwen2_bias"])["share_embeddings_and_output_weights"] is True


def test_unsupported_architectures_point_to_megatron_bridge():
    from transformers import GPT2Config

    with pytest.raises(UnsupportedArchitectureError, match="Megatron-Bridge.*AutoBridge"):
        gpt_config_kwargs(GPT2Config())
    yarn = Qwen2Config(**SMALL, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0})
    with pytest.raises(UnsupportedArchitectureError, match="rope_type 'yarn'"):
        gpt_model_kwargs(yarn)


def test_a_checkpoint_of_another_model_is_refused_by_name():
    state = AutoModelForCausalLM.from_config(CONFIGS["llama_untied"]).state_dict()
    with pytest.raises(ValueError, match="different model"):
        hf_to_mcore(state, CONFIGS["qwen3_qknorm"])  # head_dim 16 vs 8
    with pytest.raises(KeyError, match="q_proj.bias"):
        hf_to_mcore(state, Qwen2Config(**SMALL, tie_word_embeddings=False))
    with pytest.raises(KeyError, match="Megatron state dict has no"):
        mcore_to_hf([{"embedding.word_embeddings.weight": torch.zeros(64, 32)}], CONFIGS["llama_untied"])


def test_local_and_te_names():
    state = {"decoder.layers.0.input_layernorm.weight": 1, "decoder.layers.0.pre_mlp_layernorm.weight": 2,
             "decoder.layers.0.mlp.linear_fc1._extra_state": 3}
    te = to_te_names(state)
    assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in te
    assert "decoder.layers.0.mlp.linear_fc1.layer_norm_weight" in te
    assert to_local_names(te) == {k: v for k, v in state.items() if "extra" not in k}


def sizes(**overrides):
    values = {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1, "context_parallel_size": 1,
                  "sequence_parallel": False, "fp8": "none"}
    return SimpleNamespace(**{**values, **overrides})


@pytest.mark.parametrize(("overrides", "world", "message"), [
    ({"tensor_model_parallel_size": 3}, 3, ("tensor_model_parallel_size=3 does not divide the model's "
                                           "num_attention_heads=4")),
    ({"tensor_model_parallel_size": 4}, 4, "num_key_value_heads=2"),
    ({"pipeline_model_parallel_size": 4}, 4, ("pipeline_model_parallel_size=4 does not divide the model's "
                                             "num_hidden_layers=2")),
    ({"tensor_model_parallel_size": 2}, 3, "does not divide the world size 3"),
    ({"context_parallel_size": 2}, 2, "context_parallel_size=2 needs Transformer Engine"),
    ({"fp8": "hybrid"}, 1, "policy.megatron.fp8=hybrid needs Transformer Engine"),
    ({"tensor_model_parallel_size": 0}, 1, "tensor_model_parallel_size=0: must be >= 1"),
])
def test_bad_parallel_sizes_name_the_key(overrides, world, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate_sizes(sizes(**overrides), world, CONFIGS["qwen2_bias"], impl="local")


def test_valid_sizes_give_the_data_parallel_size():
    got = validate_sizes(sizes(tensor_model_parallel_size=2, sequence_parallel=True), 8, CONFIGS["qwen2_bias"],
                         impl="local")
    assert (got.tp, got.pp, got.dp, got.sequence_parallel) == (2, 1, 4, True)
    assert validate_sizes(sizes(sequence_parallel=True), 1, CONFIGS["qwen2_bias"], "local").sequence_parallel is False

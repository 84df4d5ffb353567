"""Export as a NeMo 2 checkpoint directory or a NeMo 1 style ``.nemo`` archive, and read both back.

NeMo 2 directory::

    OUTPUT/context/model.yaml         the GPT model config (Megatron-Core TransformerConfig fields)
    OUTPUT/context/hf_config.json     the Hugging Face config the weights map back to
    OUTPUT/context/nemo_tokenizer/    the tokenizer (Hugging Face files)
    OUTPUT/weights/                   Megatron-Core distributed checkpoint, ``torch_dist`` format

``.nemo`` archive: an uncompressed tar with ``model_config.yaml`` (NeMo 1 ``megatron_gpt`` fields, ``mcore_gpt:
true``), ``hf_config.json``, ``tokenizer/`` and ``model_weights/`` (the same distributed-checkpoint format).

Megatron-Core's ``torch_dist`` format is a PyTorch Distributed Checkpoint (``.metadata`` + ``__0_0.distcp``) plus
``metadata.json`` naming the backend and ``common.pt`` (non-tensor state). Tensors are keyed as a GPTModel's
``sharded_state_dict`` keys them: the per-layer weights of all layers stacked on a leading layer axis
(``decoder.layers.self_attention.linear_qkv.weight`` of shape [num_layers, ...]), the input norms under their
Transformer Engine names (``linear_qkv.layer_norm_weight``), prefixed ``module.`` (NeMo 2) or ``model.`` (NeMo 1).
It is written by ``torch.distributed.checkpoint`` in one process with no process group and no GPU; megatron-core is
not needed to write or to read it here. Layer-level ``_extra_state`` (Transformer Engine FP8 metadata) is not
written: load with a non-strict setting that tolerates it (megatron-core ``strict="log_unexpected"``, NeMo
``ckpt_load_strictness``). The HF ↔ Megatron weight layout comes from ``nemo_igrpo.policy.megatron.convert``.
"""

from __future__ import annotations

import json
import re
import tarfile
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml

from nemo_igrpo.export.source import ExportError, SourceModel
from nemo_igrpo.export.target import staged

NEMO2_PREFIX = "module."  # NeMo 2 wraps the GPTModel in MegatronParallel
NEMO1_PREFIX = "model."  # NeMo 1 MegatronGPTModel.model
HF_CONFIG = "hf_config.json"
DIST_CONFIG = {"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch",
               "common_backend_version": 1}
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


# ---------------------------------------------------------------------------------------------- writing


def export_nemo2(source: SourceModel, output: Path, overwrite: bool = False) -> None:
    hf_config = _supported_config(source)
    with staged(output, "nemo2", overwrite) as staging:
        context = staging / "context"
        context.mkdir(parents=True)
        (context / "model.yaml").write_text(yaml.safe_dump(_nemo2_model_yaml(hf_config, source), sort_keys=False))
        (context / HF_CONFIG).write_text(hf_config.to_json_string())
        source.tokenizer.save_pretrained(context / "nemo_tokenizer")
        write_dist_checkpoint(_mcore_state(source), staging / "weights", NEMO2_PREFIX)


def export_nemo_archive(source: SourceModel, output: Path, overwrite: bool = False) -> None:
    hf_config = _supported_config(source)
    with tempfile.TemporaryDirectory(prefix="nemo-export-") as tmp:
        root = Path(tmp)
        (root / "model_config.yaml").write_text(yaml.safe_dump(_nemo1_model_config(hf_config, source),
                                                               sort_keys=False))
        (root / HF_CONFIG).write_text(hf_config.to_json_string())
        source.tokenizer.save_pretrained(root / "tokenizer")
        write_dist_checkpoint(_mcore_state(source), root / "model_weights", NEMO1_PREFIX)
        with staged(output, "nemo", overwrite) as staging, tarfile.open(staging, "w") as archive:
            for member in sorted(root.iterdir()):
                archive.add(member, arcname=f"./{member.name}")  # uncompressed, as NeMo writes them


def write_dist_checkpoint(mcore_state: dict[str, torch.Tensor], directory: Path, prefix: str) -> None:
    """Write a GPTModel state dict (local-spec names, ``decoder.layers.<i>.`` per layer) in megatron-core's
    ``torch_dist`` format to ``directory`` (which must not exist)."""
    import torch.distributed.checkpoint as dcp

    from nemo_igrpo.policy.megatron.convert import to_te_names

    directory.mkdir(parents=True)
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.filterwarnings("ignore", message=".*single process")
        dcp.save(_stack_layers(to_te_names(mcore_state), prefix),
                 storage_writer=dcp.FileSystemWriter(str(directory)), no_dist=True)
    torch.save({}, directory / "common.pt")  # no non-tensor state in a weights-only checkpoint
    (directory / "metadata.json").write_text(json.dumps(DIST_CONFIG))


def _supported_config(source: SourceModel) -> Any:
    """The source's HF config, or ExportError when the Megatron layout has no mapping for its architecture."""
    from nemo_igrpo.policy.megatron.convert import UnsupportedArchitectureError, gpt_config_kwargs, gpt_model_kwargs

    try:
        gpt_config_kwargs(source.model.config)
        gpt_model_kwargs(source.model.config)
    except UnsupportedArchitectureError as error:
        raise ExportError(f"{source.origin}: cannot export to NeMo: {error}; --format hf still works") from None
    return source.model.config


def _mcore_state(source: SourceModel) -> dict[str, torch.Tensor]:
    from nemo_igrpo.policy.megatron.convert import hf_to_mcore

    return hf_to_mcore(source.model.state_dict(), source.model.config)


def _stack_layers(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """``decoder.layers.<i>.X`` → ``<prefix>decoder.layers.X`` stacked over i (megatron's layer axis)."""
    layers: dict[str, dict[int, torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        match = _LAYER.match(name)
        if match:
            layers.setdefault(match.group(2), {})[int(match.group(1))] = tensor
        else:
            out[prefix + name] = tensor.contiguous()
    for name, by_index in layers.items():
        out[f"{prefix}decoder.layers.{name}"] = torch.stack([by_index[i] for i in sorted(by_index)])
    return out


def _vocab_divisor(vocab_size: int) -> int:
    """The ``make_vocab_size_divisible_by`` that leaves the vocabulary unpadded (NeMo pads to a multiple of it)."""
    return next(d for d in (128, 64, 32, 16, 8, 4, 2, 1) if vocab_size % d == 0)


def _gpt_fields(hf_config: Any, source: SourceModel) -> dict[str, Any]:
    from nemo_igrpo.policy.megatron.convert import gpt_config_kwargs, gpt_model_kwargs

    config = dict(gpt_config_kwargs(hf_config))
    config.pop("activation_func")  # a callable: written as its name below
    model = gpt_model_kwargs(hf_config)
    dtype = str(source.model.dtype).removeprefix("torch.")
    # A callable as NeMo's config serialisation writes one: the function itself, not its result.
    silu = {"_target_": "torch.nn.functional.silu", "_call_": False}
    return {**config, "activation_func": silu, "position_embedding_type": "rope",
            "rotary_base": model["rotary_base"], "rotary_percent": model["rotary_percent"],
            "seq_length": model["max_sequence_length"], "vocab_size": model["vocab_size"],
            "make_vocab_size_divisible_by": _vocab_divisor(model["vocab_size"]),
            "share_embeddings_and_output_weights": model["share_embeddings_and_output_weights"],
            "params_dtype": dtype, "bf16": dtype == "bfloat16", "fp16": dtype == "float16"}


def _nemo2_model_yaml(hf_config: Any, source: SourceModel) -> dict[str, Any]:
    return {
        "_target_": "nemo.collections.llm.gpt.model.base.GPTModel",
        "config": {"_target_": "nemo.collections.llm.gpt.model.base.GPTConfig", **_gpt_fields(hf_config, source)},
        "tokenizer": {"_target_": "nemo.collections.common.tokenizers.huggingface.auto_tokenizer.AutoTokenizer",
                      "pretrained_model_name": "nemo_tokenizer"},
        "hf_model_type": hf_config.model_type,
    }


def _nemo1_model_config(hf_config: Any, source: SourceModel) -> dict[str, Any]:
    fields = _gpt_fields(hf_config, source)
    return {
        "mcore_gpt": True,
        "num_layers": fields["num_layers"],
        "hidden_size": fields["hidden_size"],
        "ffn_hidden_size": fields["ffn_hidden_size"],
        "num_attention_heads": fields["num_attention_heads"],
        "num_query_groups": fields["num_query_groups"],
        "kv_channels": fields["kv_channels"],
        "encoder_seq_length": fields["seq_length"],
        "max_position_embeddings": fields["seq_length"],
        "normalization": "rmsnorm",
        "layernorm_epsilon": fields["layernorm_epsilon"],
        "activation": "fast-swiglu",
        "bias": False,
        "qkv_bias": fields["add_qkv_bias"],
        "qk_layernorm": fields["qk_layernorm"],
        "position_embedding_type": "rope",
        "rotary_base": fields["rotary_base"],
        "share_embeddings_and_output_weights": fields["share_embeddings_and_output_weights"],
        "make_vocab_size_divisible_by": fields["make_vocab_size_divisible_by"],
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
        "precision": {"bfloat16": "bf16", "float16": 16}.get(fields["params_dtype"], 32),
        "tokenizer": {"library": "huggingface", "type": "nemo:tokenizer", "use_fast": True},
        "dist_ckpt_format": "torch_dist",
        "hf_model_type": hf_config.model_type,
    }


# ---------------------------------------------------------------------------------------------- reading


def read_dist_checkpoint(directory: Path, prefix: str) -> dict[str, torch.Tensor]:
    """A ``torch_dist`` checkpoint written by :func:`write_dist_checkpoint` (or by megatron-core for a TP=PP=1
    model) as a GPTModel state dict with per-layer local-spec names. Plain DCP: no megatron-core, no process group."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from nemo_igrpo.policy.megatron.convert import to_local_names

    if not (directory / "metadata.json").is_file() or not (directory / ".metadata").is_file():
        raise ExportError(f"{directory}: not a distributed checkpoint (needs metadata.json and .metadata)")
    reader = dcp.FileSystemReader(str(directory))
    metadata = reader.read_metadata()
    state = {key: torch.empty(meta.size, dtype=meta.properties.dtype)
             for key, meta in metadata.state_dict_metadata.items()
             if isinstance(meta, TensorStorageMetadata) and key.startswith(prefix)}
    if not state:
        raise ExportError(f"{directory}: no tensors under the {prefix!r} prefix")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*single process")
        dcp.load(state, storage_reader=reader, no_dist=True)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        name = key[len(prefix):]
        if name.startswith("decoder.layers.") and not _LAYER.match(name):  # stacked: split the layer axis
            rest = name[len("decoder.layers."):]
            for i, layer in enumerate(tensor.unbind(0)):
                out[f"decoder.layers.{i}.{rest}"] = layer.clone()
        else:
            out[name] = tensor
    return to_local_names(out)


def read_nemo2(directory: Path):
    """A NeMo 2 export as (HF config, HF state dict)."""
    return _read(directory / "context" / HF_CONFIG, directory / "weights", NEMO2_PREFIX)


def read_nemo_archive(path: Path):
    """A ``.nemo`` export as (HF config, HF state dict)."""
    with tempfile.TemporaryDirectory(prefix="nemo-read-") as tmp:
        with tarfile.open(path) as archive:
            archive.extractall(tmp, filter="data")
        return _read(Path(tmp) / HF_CONFIG, Path(tmp) / "model_weights", NEMO1_PREFIX)


def _read(config_file: Path, weights: Path, prefix: str):
    from transformers import AutoConfig

    from nemo_igrpo.policy.megatron.convert import mcore_to_hf

    if not config_file.is_file():
        raise ExportError(f"{config_file}: missing (not written by nemo-igrpo export?)")
    hf_config = AutoConfig.for_model(**json.loads(config_file.read_text()))
    return hf_config, mcore_to_hf([read_dist_checkpoint(weights, prefix)], hf_config)


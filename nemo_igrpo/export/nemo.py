"""Export as a NeMo 2 checkpoint directory or a ``.nemo`` archive of one, and read both back.

NeMo 2 directory (the layout NeMo's own ``HFLlamaImporter`` writes; checked against NeMo 2.7.3 by
``tests/integration/test_nemo_oracle.py``)::

    OUTPUT/context/io.json            the trainer context as Fiddle JSON: what ``nemo.lightning.io.load_context``
                                      rebuilds (the Llama/Qwen2/Qwen3/Mistral model with its NeMo config class and
                                      the tokenizer, plus a CPU trainer)
    OUTPUT/context/model.yaml         the same model with every config default spelled out, as NeMo renders it
    OUTPUT/context/hf_config.json     the Hugging Face config the weights map back to
    OUTPUT/context/nemo_tokenizer/    the tokenizer (Hugging Face files readable by transformers 4.57 and 5.x)
    OUTPUT/weights/                   Megatron-Core distributed checkpoint, ``torch_dist`` format

``.nemo`` archive: the same directory as an uncompressed tar (``./context``, ``./weights``), the NeMo 2 layout
NeMo's export readers (``nemo.export...nemo_file.load_nemo_model``, ``get_model_type``, ``get_weights_dtype``) accept
in a ``.nemo``. (A NeMo 1 layout, ``model_config.yaml`` + ``model_weights/``, cannot carry a local Hugging Face
tokenizer for those readers: they pass ``tokenizer.type`` straight to ``AutoTokenizer.from_pretrained``, i.e. a
hub id.)

Megatron-Core's ``torch_dist`` format is a PyTorch Distributed Checkpoint (``.metadata`` + ``__0_0.distcp``) plus
``metadata.json`` naming the backend and ``common.pt`` (non-tensor state). Tensors are keyed as a GPTModel's
``sharded_state_dict`` keys them: the per-layer weights of all layers stacked on a leading layer axis
(``decoder.layers.self_attention.linear_qkv.weight`` of shape [num_layers, ...]), the input norms under their
Transformer Engine names (``linear_qkv.layer_norm_weight``), prefixed ``module.`` (NeMo 2's MegatronParallel).
Each layer's linear layers also carry ``_extra_state`` (Transformer Engine FP8 metadata; ``None`` without FP8),
stored as Megatron-Core stores a ShardedObject: key ``<name>._extra_state/shard_<layer>_<num_layers>``, value the
``torch.save`` bytes of the list of the shard's objects (``[None]``). NeMo requests these keys, and its default load
(``StrictHandling.ASSUME_OK_UNEXPECTED``) fails on any it does not find. The checkpoint is written by
``torch.distributed.checkpoint`` in one process with no process group and no GPU; megatron-core is not needed to
write or to read it here. The HF ↔ Megatron weight layout comes from ``nemo_igrpo.policy.megatron.convert``.
"""

from __future__ import annotations

import json
import re
import tarfile
import tempfile
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import yaml

from nemo_igrpo.export.fiddle_json import Config, PyRef, dumps
from nemo_igrpo.export.source import ExportError, SourceModel
from nemo_igrpo.export.target import staged

NEMO2_PREFIX = "module."  # NeMo 2 wraps the GPTModel in MegatronParallel
HF_CONFIG = "hf_config.json"
TOKENIZER_DIR = "nemo_tokenizer"
DIST_CONFIG = {"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch",
               "common_backend_version": 1}
# Layer modules whose _extra_state NeMo requests: the four linears of the local and the TE layer spec, and the TE
# spec's core attention (extra keys are ignored by a default-strictness load, missing ones are fatal).
EXTRA_STATE_MODULES = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2",
                       "self_attention.core_attention")
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_AUTO_TOKENIZER = "nemo.collections.common.tokenizers.huggingface.auto_tokenizer"


# ---------------------------------------------------------------------------------------------- writing


def export_nemo2(source: SourceModel, output: Path, overwrite: bool = False) -> None:
    _supported_config(source)
    with staged(output, "nemo2", overwrite) as staging:
        staging.mkdir()
        _write_nemo2(source, staging)


def export_nemo_archive(source: SourceModel, output: Path, overwrite: bool = False) -> None:
    _supported_config(source)
    with tempfile.TemporaryDirectory(prefix="nemo-export-") as tmp:
        root = Path(tmp)
        _write_nemo2(source, root)
        with staged(output, "nemo", overwrite) as staging, tarfile.open(staging, "w") as archive:
            for member in sorted(root.iterdir()):
                archive.add(member, arcname=f"./{member.name}")  # uncompressed, as NeMo writes them


def _write_nemo2(source: SourceModel, root: Path) -> None:
    hf_config = source.model.config
    context = root / "context"
    context.mkdir(parents=True)
    model = nemo_model(hf_config, source.model.dtype)
    (context / "io.json").write_text(dumps(trainer_context(model)))
    (context / "model.yaml").write_text(yaml.safe_dump(model_yaml(model), sort_keys=True))
    (context / HF_CONFIG).write_text(hf_config.to_json_string())
    save_tokenizer(source.tokenizer, context / TOKENIZER_DIR)
    write_dist_checkpoint(_mcore_state(source), root / "weights", NEMO2_PREFIX)


def write_dist_checkpoint(mcore_state: dict[str, torch.Tensor], directory: Path, prefix: str) -> None:
    """Write a GPTModel state dict (local-spec names, ``decoder.layers.<i>.`` per layer) in megatron-core's
    ``torch_dist`` format to ``directory`` (which must not exist), with the layers' ``_extra_state`` entries."""
    import torch.distributed.checkpoint as dcp

    from nemo_igrpo.policy.megatron.convert import to_te_names

    directory.mkdir(parents=True)
    state: dict[str, Any] = _stack_layers(to_te_names(mcore_state), prefix)
    num_layers = 1 + max(int(m.group(1)) for m in map(_LAYER.match, mcore_state) if m)
    for module in EXTRA_STATE_MODULES:
        for layer in range(num_layers):
            # The shard's objects (a linear without FP8 has extra state None); DCP stores a non-tensor value as
            # its torch.save bytes, which is what megatron-core writes for a ShardedObject.
            state[f"{prefix}decoder.layers.{module}._extra_state/shard_{layer}_{num_layers}"] = [None]
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.filterwarnings("ignore", message=".*single process")
        dcp.save(state, storage_writer=dcp.FileSystemWriter(str(directory)), no_dist=True)
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
    """NeMo's importers' ``make_vocab_size_divisible_by``: the largest of 128, 64, … 1 dividing the vocabulary, so
    NeMo's padding leaves the embedding unpadded."""
    return next(d for d in (128, 64, 32, 16, 8, 4, 2, 1) if vocab_size % d == 0)


# ---------------------------------------------------------------------------------------------- NeMo model context


@lru_cache(maxsize=1)
def _defaults() -> dict[str, Any]:
    """NeMo 2.7.3's model/config/tokenizer argument defaults (generated by scripts/nemo_config_defaults.py)."""
    return json.loads((Path(__file__).with_name("nemo_defaults.json")).read_text())


def _dtype_ref(dtype: torch.dtype) -> PyRef:
    return PyRef("torch", str(dtype).removeprefix("torch."))


def _nemo_class(hf_config: Any) -> str:
    """The key of NeMo's model/config class pair its HF importer picks for this model (see nemo_defaults.json)."""
    from nemo_igrpo.policy.megatron.convert import rope_settings

    model_type = hf_config.model_type
    if model_type == "llama" and rope_settings(hf_config)["rope_scaling"]:
        return "llama31"
    return model_type


def nemo_model(hf_config: Any, dtype: torch.dtype) -> Config:
    """The NeMo ``<Arch>Model(config=<Arch>Config(...), tokenizer=AutoTokenizer("nemo_tokenizer"))`` of the export.

    The config arguments are those NeMo's HF importer passes, plus everything the architecture needs spelled out
    (so a class default can never differ from the weights). Fusions that need Transformer Engine or Apex kernels are
    off: NeMo refuses to even build the config without TE when ``apply_rope_fusion`` is on, and they change speed,
    not results; a GPU run may turn them back on.
    """
    from nemo_igrpo.policy.megatron.convert import gpt_config_kwargs, gpt_model_kwargs

    kind = _nemo_class(hf_config)
    target = _defaults()["classes"][kind]
    config_target = target["set"]["_target_"] if "_target_" in target["set"] else \
        _defaults()["model"]["config"]["_target_"]
    gpt = gpt_config_kwargs(hf_config)
    model = gpt_model_kwargs(hf_config)
    arguments: dict[str, Any] = {
        "num_layers": gpt["num_layers"],
        "hidden_size": gpt["hidden_size"],
        "ffn_hidden_size": gpt["ffn_hidden_size"],
        "num_attention_heads": gpt["num_attention_heads"],
        "num_query_groups": gpt["num_query_groups"],
        "kv_channels": gpt["kv_channels"],
        "init_method_std": float(getattr(hf_config, "initializer_range", 0.02)),
        "layernorm_epsilon": gpt["layernorm_epsilon"],
        "normalization": "RMSNorm",
        "activation_func": PyRef("torch.nn.functional", "silu"),
        "gated_linear_unit": True,
        "add_bias_linear": False,
        "add_qkv_bias": gpt["add_qkv_bias"],
        "qk_layernorm": gpt["qk_layernorm"],
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
        "position_embedding_type": "rope",
        "rotary_base": model["rotary_base"],
        "rotary_percent": model["rotary_percent"],
        "seq_length": model["max_sequence_length"],
        "vocab_size": model["vocab_size"],
        "make_vocab_size_divisible_by": _vocab_divisor(model["vocab_size"]),
        "share_embeddings_and_output_weights": model["share_embeddings_and_output_weights"],
        "fp16": dtype == torch.float16,
        "bf16": dtype == torch.bfloat16,
        "params_dtype": _dtype_ref(dtype),
        "bias_activation_fusion": False,
        "masked_softmax_fusion": False,
        "persist_layer_norm": False,
        "bias_dropout_fusion": False,
        "apply_rope_fusion": False,
        "gradient_accumulation_fusion": False,
    }
    if kind == "llama31":
        arguments["scale_factor"] = model["rope_scaling_factor"]
    if kind == "mistral":  # as NeMo's Mistral importer: the window as [left, right], or none
        window = getattr(hf_config, "sliding_window", None)
        arguments["window_size"] = [int(window), 0] if window else None
    module, name = config_target.rsplit(".", 1)
    model_module, model_name = target["model"].rsplit(".", 1)
    tokenizer = Config(_AUTO_TOKENIZER, "AutoTokenizer", {"pretrained_model_name": TOKENIZER_DIR})
    return Config(model_module, model_name, {"config": Config(module, name, arguments), "tokenizer": tokenizer})


def trainer_context(model: Config) -> Config:
    """NeMo's ``TrainerContext(model, trainer, extra)``; the trainer is the one-device CPU trainer NeMo's importers
    save with (``ModelConnector.nemo_setup``)."""
    strategy = Config("nemo.lightning.pytorch.strategies.megatron_strategy", "MegatronStrategy",
                      {"ckpt_save_optimizer": False})
    trainer = Config("nemo.lightning.pytorch.trainer", "Trainer",
                     {"accelerator": "cpu", "strategy": strategy, "devices": 1})
    return Config("nemo.lightning.io.pl", "TrainerContext", {"model": model, "trainer": trainer, "extra": {}})


def _yaml_value(value: Any) -> Any:
    """A value as NeMo's model.yaml renders it: callables and dtypes as ``{_target_, _call_: false}``."""
    if isinstance(value, PyRef):
        return {"_call_": False, "_target_": f"{value.module}.{value.name}"}
    if isinstance(value, Config):
        return {"_target_": f"{value.module}.{value.name}", **{k: _yaml_value(v) for k, v in value.arguments.items()}}
    return value


def model_yaml(model: Config) -> dict[str, Any]:
    """``context/model.yaml``: the model with every argument of its class, its config class and its tokenizer,
    defaults included, as NeMo's ``IOMixin._io_dump_yaml`` writes it (NeMo's export readers take the model type
    from its ``_target_`` and the weights dtype from ``config.params_dtype._target_``)."""
    defaults = _defaults()
    kind = next(k for k, v in defaults["classes"].items() if v["model"] == f"{model.module}.{model.name}"
                and v["set"].get("_target_", defaults["model"]["config"]["_target_"]) ==
                f"{model.arguments['config'].module}.{model.arguments['config'].name}")
    target = defaults["classes"][kind]
    config = {k: v for k, v in defaults["model"]["config"].items() if k not in target["drop"]}
    config.update(target["set"])
    config.update({k: _yaml_value(v) for k, v in model.arguments["config"].arguments.items()})
    tokenizer = {**defaults["model"]["tokenizer"], **_yaml_value(model.arguments["tokenizer"])}
    return {**defaults["model"], "_target_": target["model"], "config": config, "tokenizer": tokenizer}


# ---------------------------------------------------------------------------------------------- tokenizer


def save_tokenizer(tokenizer: Any, directory: Path) -> None:
    """``save_pretrained``, then make ``tokenizer_config.json`` readable by transformers 4.57 (what NeMo 2.7.3 pins)
    as well as 5.x: transformers 5 writes the generic class as ``TokenizersBackend`` (4.57 has no such class; its
    name for the same thing is ``PreTrainedTokenizerFast``, which 5.x still resolves) and the extra special tokens
    as a list under ``extra_special_tokens`` (4.57 wants a name → token dict there; both read the list under
    ``additional_special_tokens``)."""
    tokenizer.save_pretrained(directory)
    path = directory / "tokenizer_config.json"
    config = json.loads(path.read_text())
    if config.get("tokenizer_class") in (None, "TokenizersBackend"):
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    extra = config.get("extra_special_tokens")
    if isinstance(extra, list):
        del config["extra_special_tokens"]
        config["additional_special_tokens"] = list(dict.fromkeys([*config.get("additional_special_tokens", []),
                                                                  *extra]))
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


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
        return read_nemo2(Path(tmp))


def _read(config_file: Path, weights: Path, prefix: str):
    from transformers import AutoConfig

    from nemo_igrpo.policy.megatron.convert import mcore_to_hf

    if not config_file.is_file():
        raise ExportError(f"{config_file}: missing (not written by nemo-igrpo export?)")
    hf_config = AutoConfig.for_model(**json.loads(config_file.read_text()))
    return hf_config, mcore_to_hf([read_dist_checkpoint(weights, prefix)], hf_config)


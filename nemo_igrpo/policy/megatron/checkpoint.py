"""Megatron policy checkpoints: dist_checkpointing (torch_dist) files plus a small JSON of the model's shape.

:func:`save_policy` (``MegatronPolicy.save``) writes the sharded model and optimizer state with
``megatron.core.dist_checkpointing`` (any TP/PP layout loads at any other) and ``META_FILE``; :func:`load_policy`
reads it back, patching two megatron-core 0.16 gaps in loading torch Adam state. :func:`read_checkpoint_as_hf` turns
the model part back into full HF-named tensors in one CPU process: it reads the torch.distributed.checkpoint files
directly (``no_dist``), so it needs neither megatron-core nor an initialised process group.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from nemo_igrpo.policy.megatron import convert
from nemo_igrpo.policy.megatron.safe_load import no_code_unpickling

META_FILE = "nemo_igrpo_megatron.json"
_SHAPE_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                 "kv_channels", "add_qkv_bias", "qk_layernorm")


def model_meta(hf_config: Any) -> dict[str, Any]:
    kwargs = convert.gpt_config_kwargs(hf_config)
    shape = {k: kwargs[k] for k in _SHAPE_FIELDS}
    model = convert.gpt_model_kwargs(hf_config)
    return {"model_type": hf_config.model_type, **shape, "vocab_size": model["vocab_size"],
            "tie_word_embeddings": model["share_embeddings_and_output_weights"]}


def check_meta(directory: Path, hf_config: Any) -> dict[str, Any]:
    """The checkpoint's metadata; raises if it belongs to a different model (before any tensor is read)."""
    path = Path(directory) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing — not a checkpoint written by the Megatron policy backend")
    saved = json.loads(path.read_text())
    expected = model_meta(hf_config)
    wrong = {k: (saved.get(k), v) for k, v in expected.items() if saved.get(k) != v}
    if wrong:
        details = ", ".join(f"{k}: checkpoint {a!r} vs model {b!r}" for k, (a, b) in wrong.items())
        raise ValueError(f"{directory}: checkpoint of a different model ({details})")
    return saved


def save_policy(directory: Path, model: Any, optimizer: Any, step: int, hf_config: Any, sizes: Any) -> None:
    """Every rank writes its shards of ``model`` (Megatron DDP) and ``optimizer``; rank 0 adds ``META_FILE``."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    directory = Path(directory)
    state = _sharded_state(model, optimizer, is_loading=False)
    state["step"] = step
    dist_checkpointing.save(state, str(directory))
    if dist.get_rank() == 0:
        meta = {**model_meta(hf_config), "step": step, "tensor_model_parallel_size": sizes.tp,
                "pipeline_model_parallel_size": sizes.pp, "data_parallel_size": sizes.dp}
        (directory / META_FILE).write_text(json.dumps(meta, indent=1))
    dist.barrier()


def load_policy(directory: Path, model: Any, optimizer: Any, hf_config: Any) -> int:
    """Load model and optimizer state saved by :func:`save_policy` (any layout); returns the saved step."""
    from megatron.core import dist_checkpointing

    directory = Path(directory)
    check_meta(directory, hf_config)  # a different model fails here, before any tensor is read
    _init_torch_adam_state(optimizer)
    state = _sharded_state(model, optimizer, is_loading=True)
    state["step"] = 0
    with no_code_unpickling():  # a run folder must not run code on resume
        loaded = dist_checkpointing.load(state, str(directory))
    model.module.load_state_dict(loaded["model"])
    with _keep_adam_step(optimizer):
        optimizer.load_state_dict(loaded["optimizer"])
    return int(loaded["step"])


def _sharded_state(model: Any, optimizer: Any, is_loading: bool) -> dict[str, Any]:
    model_state = model.module.sharded_state_dict()
    return {
        "model": model_state,
        # fully_reshardable: the optimizer state is stored per model parameter, so another TP/PP/DP layout can
        # load it (megatron-core 0.16's default, fully_sharded_model_space, rejects its own flattened ranges).
        "optimizer": optimizer.sharded_state_dict(
            model_state, is_loading=is_loading, metadata={"distrib_optim_sharding_type": "fully_reshardable"}),
    }


def _init_torch_adam_state(optimizer) -> None:
    """Give a torch Adam(W) that has not stepped yet its zero state (incl. ``step``) before a load.

    Without Apex/TE, megatron-core 0.16's DistributedOptimizer.state_dict() reads every parameter's ``step`` and
    fails on a fresh optimizer (resume right after start-up); the loaded checkpoint then overwrites these zeros.
    """
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        torch_optimizer = getattr(inner, "optimizer", None)
        if not isinstance(torch_optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        for group in torch_optimizer.param_groups:
            for param in group["params"]:
                state = torch_optimizer.state[param]
                if not state:
                    state["exp_avg"] = torch.zeros_like(param.data)
                    state["exp_avg_sq"] = torch.zeros_like(param.data)
                    state["step"] = torch.zeros((), dtype=torch.float32)


@contextlib.contextmanager
def _keep_adam_step(optimizer) -> Iterator[None]:
    """Work around megatron-core 0.16 loading a fully_reshardable distributed-optimizer state into torch AdamW.

    It restores torch AdamW's per-parameter ``step`` from the param groups first, then copies every per-parameter
    state key from the checkpoint, which never holds ``step`` (KeyError). Feed the restored ``step`` back in.
    """
    patched = []
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        setter = getattr(inner, "_set_main_param_and_optimizer_states", None)
        if setter is None:
            continue

        def with_step(model_param, tensors, _inner=inner, _setter=setter):
            group, order = _inner.model_param_group_index_map[model_param]
            main_param = _inner.optimizer.param_groups[group]["params"][order]
            state = _inner.optimizer.state.get(main_param, {})
            if "step" in state and "step" not in tensors:
                tensors = {**tensors, "step": state["step"].clone()}
            _setter(model_param, tensors)

        inner._set_main_param_and_optimizer_states = with_step
        patched.append(inner)
    try:
        yield
    finally:
        for inner in patched:
            del inner._set_main_param_and_optimizer_states  # back to the class method


def read_checkpoint_as_hf(directory: str | Path, hf_config: Any) -> dict[str, torch.Tensor]:
    """Full HF-named CPU tensors of the policy saved in ``directory`` (whatever TP/PP/DP it was saved with).

    Single process, no torch.distributed process group, no megatron import.
    """
    directory = Path(directory)
    check_meta(directory, hf_config)
    stored = _read_dcp(directory)
    return convert.mcore_to_hf([_unstack(stored, hf_config)], hf_config)


def _read_dcp(directory: Path) -> dict[str, torch.Tensor]:
    """Every model tensor of a torch_dist checkpoint, full size, without a process group."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    reader = FileSystemReader(str(directory))
    with no_code_unpickling():
        metadata = reader.read_metadata()
    wanted = {}
    for key, item in metadata.state_dict_metadata.items():
        if isinstance(item, TensorStorageMetadata) and _is_model_key(key):
            wanted[key] = torch.empty(item.size, dtype=item.properties.dtype)
    if not wanted:
        raise ValueError(f"{directory}: no model tensors in the distributed checkpoint")
    with no_code_unpickling():
        _load_state_dict(wanted, storage_reader=reader, no_dist=True)
    return wanted


def _is_model_key(key: str) -> bool:
    return not key.startswith("optimizer.") and "_extra_state" not in key and (
        key.startswith(("embedding.", "decoder.", "output_layer.")))


def _unstack(stored: dict[str, torch.Tensor], hf_config: Any) -> dict[str, torch.Tensor]:
    """Megatron stores per-layer tensors stacked along a leading layer axis (``decoder.layers.X``); split it.

    The swiglu ``linear_fc1`` is stored as its [gate; up] halves under ``…linear_fc1.weight`` with a leading axis
    of 2 inserted after the layer axis when written by a TP>1 job; both layouts are handled.
    """
    layers = convert.gpt_config_kwargs(hf_config)["num_layers"]
    out: dict[str, torch.Tensor] = {}
    for key, tensor in stored.items():
        if key.startswith("decoder.layers."):
            rest = key[len("decoder.layers."):]
            if tensor.shape[0] != layers:
                raise ValueError(f"{key}: leading axis {tensor.shape[0]} is not num_layers={layers}")
            for i in range(layers):
                value = tensor[i]
                if rest == "mlp.linear_fc1.weight" and value.dim() == 3:
                    value = value.reshape(-1, value.shape[-1])
                out[f"decoder.layers.{i}.{rest}"] = value
        else:
            out[key] = tensor
    return out

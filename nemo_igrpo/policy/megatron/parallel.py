"""Parallel sizes: validation against world size and model shape, then process-group initialisation."""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass
from typing import Any

import torch

from nemo_igrpo.errors import ConfigError
from nemo_igrpo.policy.megatron.convert import gpt_config_kwargs

KEY = "policy.megatron"


@dataclass(frozen=True)
class ParallelSizes:
    tp: int
    pp: int
    cp: int
    dp: int
    sequence_parallel: bool


def validate_sizes(megatron: Any, world_size: int, hf_config: Any, impl: str) -> ParallelSizes:
    """Check every size before anything is allocated; errors name the ``policy.megatron.*`` key at fault."""
    tp, pp, cp = (int(megatron.tensor_model_parallel_size), int(megatron.pipeline_model_parallel_size),
                  int(megatron.context_parallel_size))
    for name, value in (("tensor_model_parallel_size", tp), ("pipeline_model_parallel_size", pp),
                        ("context_parallel_size", cp)):
        if value < 1:
            raise ConfigError(f"{KEY}.{name}={value}: must be >= 1")
    model_parallel = tp * pp * cp
    if world_size % model_parallel:
        raise ConfigError(f"{KEY}: tensor_model_parallel_size × pipeline_model_parallel_size × context_parallel_size "
                         f"= {tp}×{pp}×{cp} = {model_parallel} does not divide the world size {world_size}")
    shape = gpt_config_kwargs(hf_config)
    checks = (
        ("tensor_model_parallel_size", tp, "num_attention_heads", shape["num_attention_heads"]),
        ("tensor_model_parallel_size", tp, "num_key_value_heads", shape["num_query_groups"]),
        ("tensor_model_parallel_size", tp, "intermediate_size", shape["ffn_hidden_size"]),
        ("pipeline_model_parallel_size", pp, "num_hidden_layers", shape["num_layers"]),
    )
    for key, size, field, value in checks:
        if value % size:
            raise ConfigError(f"{KEY}.{key}={size} does not divide the model's {field}={value}")
    # Any vocabulary works at any TP: it is padded (convert.padded_vocab_size), not required to divide.
    if cp > 1:
        if impl != "transformer_engine":
            raise ConfigError(f"{KEY}.context_parallel_size={cp} needs Transformer Engine (megatron-core only supports "
                             "context parallelism in TEDotProductAttention); it is not importable here")
        raise ConfigError(f"{KEY}.context_parallel_size={cp}: the per-token log-prob gather across the "
                                  "context-parallel group is not implemented yet; use 1")
    if megatron.fp8 != "none" and impl != "transformer_engine":
        raise ConfigError(f"{KEY}.fp8={megatron.fp8} needs Transformer Engine ({KEY}.transformer_impl resolved to "
                         f"{impl!r})")
    return ParallelSizes(tp=tp, pp=pp, cp=cp, dp=world_size // model_parallel,
                         sequence_parallel=bool(megatron.sequence_parallel) and tp > 1)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ensure_process_group(timeout_s: float = 600.0) -> None:
    """A world-1 group for single-process runs (gloo on CPU, nccl on GPU); launched jobs bring their own."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
        init = "env://"
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    else:
        init, rank, world = f"tcp://127.0.0.1:{_free_port()}", 0, 1
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, init_method=init, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))


def initialize(sizes: ParallelSizes, seed: int) -> None:
    """megatron-core's model-parallel groups (once per process) and its RNG tracker."""
    from megatron.core import parallel_state, tensor_parallel

    if parallel_state.model_parallel_is_initialized() and not _groups_alive(parallel_state):
        # The process group they were made from was destroyed (e.g. a previous train() in this process ended).
        parallel_state.destroy_model_parallel()
    if parallel_state.model_parallel_is_initialized():
        current = (parallel_state.get_tensor_model_parallel_world_size(),
                   parallel_state.get_pipeline_model_parallel_world_size(),
                   parallel_state.get_context_parallel_world_size())
        if current != (sizes.tp, sizes.pp, sizes.cp):
            raise RuntimeError(f"megatron model parallel already initialised with (TP, PP, CP) = {current}; "
                               f"{KEY} asks for {(sizes.tp, sizes.pp, sizes.cp)}")
    else:
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=sizes.tp, pipeline_model_parallel_size=sizes.pp,
            context_parallel_size=sizes.cp)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def _groups_alive(parallel_state) -> bool:
    import torch.distributed as dist

    try:
        dist.get_rank(group=parallel_state.get_tensor_model_parallel_group())
    except (ValueError, RuntimeError):
        return False
    return True

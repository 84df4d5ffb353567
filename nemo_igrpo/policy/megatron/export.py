"""Megatron weights (or gradients) out as full HF-named tensors: TP shards gathered, PP stages broadcast.

Every rank of the job iterates :meth:`HFExporter.hf_tensors` together (collectives inside) and receives every tensor.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from nemo_igrpo.policy.megatron import convert
from nemo_igrpo.policy.megatron.parallel import ParallelSizes

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


class HFExporter:
    """``named_params``: this rank's (stage's, TP shard's) Megatron parameters, by Megatron name."""

    def __init__(self, named_params: Callable[[], Iterator[tuple[str, torch.nn.Parameter]]], *, config: Any,
                 hf_config: Any, hf_dtype: torch.dtype, sizes: ParallelSizes, device: torch.device,
                 pp_group: Any) -> None:
        self.named_params = named_params
        self.config = config
        self.hf_config = hf_config
        self.hf_dtype = hf_dtype
        self.sizes = sizes
        self.device = device
        self.pp_group = pp_group

    def _gather_tp(self, names: list[str], source: Callable[[str], torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Per-TP-rank copies of ``names`` (this stage), gathered to every TP rank."""
        import torch.distributed as dist
        from megatron.core import parallel_state

        local = {n: source(n).detach() for n in names}
        if self.sizes.tp == 1:
            return [local]
        group = parallel_state.get_tensor_model_parallel_group()
        shards: list[dict[str, torch.Tensor]] = [{} for _ in range(self.sizes.tp)]
        for name, tensor in local.items():
            pieces = [torch.empty_like(tensor) for _ in range(self.sizes.tp)]
            dist.all_gather(pieces, tensor.contiguous(), group=group)
            for rank, piece in enumerate(pieces):
                shards[rank][name] = piece
        return shards

    def hf_tensors(self, source: Callable[[str], torch.Tensor] | None = None,
                   names: list[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """HF-named full tensors, one pipeline stage and one layer (or the embedding / head) at a time."""
        import torch.distributed as dist
        from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

        params = dict(self.named_params())
        source = source or (lambda n: params[n])
        names = names if names is not None else list(params)
        offset = get_transformer_layer_offset(self.config)
        groups: dict[str, list[str]] = {}
        for name in names:
            match = _LAYER.match(name)
            key = f"layer{int(match.group(1)) + offset}" if match else "edges"
            groups.setdefault(key, []).append(name)
        for stage in range(self.sizes.pp):
            keys = self._broadcast_stage_object(sorted(groups), stage)
            for key in keys:
                hf = None
                if self._stage() == stage:
                    shards = self._gather_tp(groups[key], source)
                    hf = convert.mcore_to_hf([convert.shift_layers(s, offset) for s in shards], self.hf_config,
                                             partial=True)
                hf = self._broadcast_stage_tensors(hf, stage)
                for name, tensor in hf.items():
                    yield name, tensor.to(self.hf_dtype)
        if self.sizes.pp > 1:
            dist.barrier(group=self.pp_group)

    def _stage(self) -> int:
        from megatron.core import parallel_state

        return parallel_state.get_pipeline_model_parallel_rank()

    def _broadcast_stage_object(self, obj: Any, stage: int) -> Any:
        import torch.distributed as dist

        if self.sizes.pp == 1:
            return obj
        holder = [obj if self._stage() == stage else None]
        dist.broadcast_object_list(holder, src=dist.get_global_rank(self.pp_group, stage), group=self.pp_group)
        return holder[0]

    def _broadcast_stage_tensors(self, tensors: dict[str, torch.Tensor] | None, stage: int) -> dict:
        import torch.distributed as dist

        if self.sizes.pp == 1:
            return tensors or {}
        meta = self._broadcast_stage_object(
            None if tensors is None else [(n, t.shape, t.dtype) for n, t in tensors.items()], stage)
        out = {}
        for name, shape, dtype in meta:
            buffer = tensors[name].contiguous() if tensors is not None else torch.empty(shape, dtype=dtype,
                                                                                         device=self.device)
            dist.broadcast(buffer, src=dist.get_global_rank(self.pp_group, stage), group=self.pp_group)
            out[name] = buffer
        return out

    def gradients(self) -> dict[str, torch.Tensor]:
        """The accumulated gradients under HF names (TP-gathered, PP-broadcast); exact only without DP sharding
        of the gradient buffer (DP=1 or no distributed optimizer). For tests and debugging."""
        params = dict(self.named_params())

        def grad(name: str) -> torch.Tensor:
            param = params[name]
            value = getattr(param, "main_grad", None)
            return (value if value is not None else param.grad).float()

        # clone: replicated tensors (norms) come back as the gradient buffer itself, which the step then clips
        return {n: t.detach().float().cpu().clone() for n, t in self.hf_tensors(grad)}

    def save_pretrained(self, directory: Path) -> None:
        """A plain HF model folder, written by global rank 0 (every rank must call this)."""
        import torch.distributed as dist
        from transformers import AutoModelForCausalLM

        with torch.no_grad():
            tensors = {n: t.cpu() for n, t in self.hf_tensors()}
        if dist.get_rank() == 0:
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(self.hf_config, dtype=self.hf_dtype)
            model.load_state_dict(tensors, strict=False, assign=True)
            if self.hf_config.tie_word_embeddings:
                model.tie_weights()
            missing = [n for n, p in model.named_parameters() if p.is_meta]
            if missing:
                raise RuntimeError(f"save_pretrained: no exported tensor for {missing[:5]}")
            model.save_pretrained(directory)
        dist.barrier()

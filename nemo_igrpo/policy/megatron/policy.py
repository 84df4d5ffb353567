"""The Megatron-Core policy backend: TP/PP/SP/DP GPTModel, Megatron DDP + distributed optimizer, vocab-parallel
log-probs, HF-named weight export, dist_checkpointing state.

One instance per process; every rank of the job calls every method (collectives inside). Rollouts are sharded over
:attr:`data_parallel_group`; the tensor/pipeline peers of a rank receive the same rows.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from nemo_igrpo import faults
from nemo_igrpo.algorithms.batch import RolloutBatch
from nemo_igrpo.policy.base import LossFn, PolicyBackend, TokenStats
from nemo_igrpo.policy.hf import warmup_cosine
from nemo_igrpo.policy.megatron import convert
from nemo_igrpo.policy.megatron.checkpoint import META_FILE, check_meta, model_meta
from nemo_igrpo.policy.microbatch import row_lengths, token_budget_groups

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def vocab_parallel_stats(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor,
                         temperature: float, vocab_size: int | None = None) -> TokenStats:
    """Log-probs and entropy [B, L] from vocab-split logits [B, L, V/TP], never gathering the vocab.

    ``vocab_size``: the real vocabulary; columns at or beyond it are Megatron's padding rows and are excluded from
    the softmax (probability 0, no gradient), so log-probs and entropy are those of the unpadded model.

    Position t scores token t with the logits of position t−1 (the alignment of ``algorithms.batch``); values are 0
    where ``mask`` is 0. Cross-rank sums go through ``reduce_from_tensor_model_parallel_region`` (all-reduce forward,
    identity backward): every TP rank computes the same loss, so each keeps its own copy of the upstream gradient.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

    z = logits[:, :-1].float() / temperature  # [B, L-1, V/TP]
    targets = input_ids[:, 1:]
    width = z.shape[-1]
    start = parallel_state.get_tensor_model_parallel_rank() * width
    valid = None  # padded vocab columns on this rank, if any
    if vocab_size is not None and start + width > vocab_size:
        valid = torch.arange(start, start + width, device=z.device) < vocab_size
        # a finite stand-in (not -inf): where() then gives padding exactly 0 probability and 0 gradient, no NaN
        z = torch.where(valid, z, 0.0)
    with torch.no_grad():  # the max cancels out of every formula; it only keeps exp() finite
        top = (z if valid is None else z.masked_fill(~valid, -torch.inf)).max(dim=-1).values
        if parallel_state.get_tensor_model_parallel_world_size() > 1:
            dist.all_reduce(top, op=dist.ReduceOp.MAX, group=parallel_state.get_tensor_model_parallel_group())
    shifted = z - top.unsqueeze(-1)
    exp = shifted.exp()
    if valid is not None:
        exp = torch.where(valid, exp, 0.0)
    sum_exp = reduce_from_tensor_model_parallel_region(exp.sum(dim=-1))
    local = targets - start
    here = (local >= 0) & (local < width)
    picked = shifted.gather(-1, local.clamp(0, width - 1).unsqueeze(-1)).squeeze(-1) * here
    picked = reduce_from_tensor_model_parallel_region(picked)
    log_norm = sum_exp.log()
    # H = log Σe^z − Σ softmax(z)·z (with z shifted by the max on both sides)
    expected = reduce_from_tensor_model_parallel_region((exp * shifted).sum(dim=-1)) / sum_exp
    on = mask[:, 1:] > 0
    zero = torch.zeros_like(log_norm[:, :1])
    logprobs = torch.cat([zero, torch.where(on, picked - log_norm, 0.0)], dim=1)
    entropy = torch.cat([zero, torch.where(on, log_norm - expected, 0.0)], dim=1)
    return TokenStats(logprobs, entropy)


class MegatronPolicy(PolicyBackend):
    def __init__(
        self,
        hf_model: torch.nn.Module,
        *,
        megatron: Any,
        lr: float,
        weight_decay: float,
        betas: tuple[float, float],
        max_grad_norm: float | None,
        warmup_steps: int,
        total_steps: int,
        min_lr_ratio: float,
        micro_batch_size: int,
        temperature: float,
        use_reference: bool,
        bf16: bool,
        seed: int = 0,
        max_tokens_per_micro_batch: int | None = None,
        sequence_packing: bool = False,
    ) -> None:
        import torch.distributed as dist
        from megatron.core import parallel_state
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.distributed.finalize_model_grads import finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        from nemo_igrpo.policy.megatron import model as model_lib
        from nemo_igrpo.policy.megatron import parallel
        from nemo_igrpo.policy.megatron.spec import resolve_impl

        if megatron.async_save:
            # The trainer renames a finished checkpoint directory into place; a background writer would race it.
            raise ValueError("policy.megatron.async_save=true is not supported with the trainer's atomic "
                             "checkpoints yet; set it to false")
        self.hf_config = hf_model.config
        convert.check_supported(self.hf_config)  # before any process group or memory
        _check_packing(sequence_packing, megatron.transformer_impl)
        self.impl = resolve_impl(megatron.transformer_impl)
        parallel.ensure_process_group()
        self.sizes = parallel.validate_sizes(megatron, dist.get_world_size(), self.hf_config, self.impl)
        # Seeding megatron's RNG tracker and the random init must not move the trainer's CPU RNG (rollouts).
        with torch.random.fork_rng(devices=[]):
            parallel.initialize(self.sizes, seed)

        self.on_gpu = torch.cuda.is_available()
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.on_gpu else torch.device("cpu")
        self.hf_dtype = next(hf_model.parameters()).dtype
        self.micro_batch_size = micro_batch_size
        self.max_tokens = max_tokens_per_micro_batch  # None: row micro-batches (see policy.microbatch)
        self.temperature = temperature if temperature > 0 else 1.0  # greedy rollouts are scored untempered
        self.max_grad_norm = math.inf if max_grad_norm is None else float(max_grad_norm)
        self.base_lr = lr
        self.schedule: Callable[[int], float] = warmup_cosine(warmup_steps, total_steps, min_lr_ratio)
        self.step = 0  # training steps taken (the LR schedule's clock)

        self.config = model_lib.transformer_config(self.hf_config, self.sizes, megatron, bf16, self.on_gpu)
        if self.max_tokens is not None and self.sizes.pp > 1:
            # Token-budget micro-batches differ in rows and length: pipeline stages exchange each one's shape first.
            # Set after construction: __post_init__ would demand the MoE all-to-all dispatcher, unused by dense models.
            self.config.variable_seq_lengths = True
        with torch.random.fork_rng(devices=[]):
            module = model_lib.build_model(self.hf_config, self.config, self.impl,
                                           int(getattr(megatron, "make_vocab_size_divisible_by", 1)))
        self.vocab_size = convert.gpt_model_kwargs(self.hf_config)["vocab_size"]  # real rows; the rest is padding
        hf_state = {k: v.detach().cpu() for k, v in hf_model.state_dict().items()}
        model_lib.load_hf_weights(module, hf_state, self.hf_config, self.impl)
        del hf_state
        module.to(self.device)
        padding_idx = getattr(hf_model.get_input_embeddings(), "padding_idx", None)
        if padding_idx is not None and module.pre_process:
            module.embedding.register_forward_hook(_padding_row_hook(padding_idx), with_kwargs=True)
        if bf16:
            from megatron.core.transformer.module import Float16Module

            module = Float16Module(self.config, module)
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False,
            use_distributed_optimizer=bool(megatron.use_distributed_optimizer))
        with torch.enable_grad():  # DDP finds each parameter's grad accumulator through a differentiable view
            self.model = DistributedDataParallel(self.config, ddp_config, module)
        self.model.train()  # dropout is 0; training mode keeps scoring and training on one code path
        self.config.finalize_model_grads_func = finalize_model_grads

        optim_config = OptimizerConfig(
            optimizer="adam", lr=lr, weight_decay=weight_decay, adam_beta1=betas[0], adam_beta2=betas[1],
            adam_eps=1e-8, clip_grad=0.0,  # clipping is done here, after the non-finite check
            bf16=bf16, params_dtype=self.config.params_dtype,
            use_distributed_optimizer=bool(megatron.use_distributed_optimizer))
        # {} = no parameter-group overrides: weight decay on every parameter, as the HF backend's AdamW does.
        self.optimizer = get_megatron_optimizer(optim_config, [self.model], config_overrides={})
        self._set_lr()

        # The reference policy lives on the CPU as this rank's shard and is swapped in only while it scores.
        self.reference = ({n: p.detach().to("cpu", copy=True) for n, p in self._named_params()}
                          if use_reference else None)
        self._pp_group = parallel_state.get_pipeline_model_parallel_group()
        self._is_last_stage = parallel_state.is_pipeline_last_stage()

    # ------------------------------------------------------------------ helpers

    @property
    def data_parallel_group(self):
        from megatron.core import parallel_state

        return parallel_state.get_data_parallel_group()

    @property
    def model_parallel_group(self):
        from megatron.core import parallel_state

        # megatron-core 0.16.1: the 'tp-pp' ranks (context-parallel peers are not in it; CP needs Transformer Engine)
        return parallel_state.get_model_parallel_group() if self.sizes.tp * self.sizes.pp > 1 else None

    @property
    def unwrapped(self) -> torch.nn.Module:
        module = self.model.module
        return getattr(module, "module", module)  # Float16Module → GPTModel

    def _named_params(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        return iter(self.unwrapped.named_parameters())

    def _set_lr(self) -> None:
        lr = self.base_lr * self.schedule(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)

    def _micro_batches(self, batch: RolloutBatch) -> tuple[list[torch.Tensor], list[RolloutBatch]]:
        """(rows of ``batch`` in each micro-batch, the micro-batches); a micro-batch may end in padding rows.

        Row micro-batches have exactly ``micro_batch_size`` rows (padding rows have an empty loss mask); with
        pipeline parallelism they share one shape (the P2P buffers are fixed), otherwise each is trimmed to its own
        longest row. Token-budget micro-batches (``policy.microbatch``) each have their own rows and length (stages
        exchange shapes). Lengths are rounded up to the TP size when sequence parallel splits them. Right padding
        never changes the scores of real tokens under causal attention.
        """
        multiple = self.sizes.tp if self.sizes.sequence_parallel else 1
        if self.max_tokens is not None and batch.size:  # (an empty batch still runs one padding row below)
            groups = [torch.tensor(g) for g in token_budget_groups(row_lengths(batch), self.max_tokens)]
            return groups, [_pad_length(batch.select(g).trim(), multiple) for g in groups]
        size = self.micro_batch_size
        rows = math.ceil(max(batch.size, 1) / size) * size
        groups = [torch.arange(i, min(i + size, batch.size)) for i in range(0, rows, size)]
        batch = _pad_rows(batch, rows)
        if self.sizes.pp > 1:
            batch = _pad_length(batch.trim(), multiple)
            return groups, [batch.select(slice(i, i + size)) for i in range(0, rows, size)]
        return groups, [_pad_length(part, multiple) for part in batch.split(size)]

    def _run(self, parts: list[RolloutBatch], loss: Callable[[TokenStats, RolloutBatch], torch.Tensor | None],
             forward_only: bool) -> None:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        iterator = iter(parts)
        device = self.device

        def forward_step(data_iterator, model):
            part = next(data_iterator)
            ids = part.input_ids.to(device)
            positions = torch.arange(ids.shape[1], device=device).unsqueeze(0).expand_as(ids)
            output = model(ids, positions, None)

            def loss_func(logits):
                stats = vocab_parallel_stats(logits, ids, part.loss_mask.to(device), self.temperature,
                                             self.vocab_size)
                value = loss(stats, part.to(device))
                if value is None:
                    value = logits.new_zeros(())
                return value, {}

            return output, loss_func

        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iterator, model=[self.model], num_microbatches=len(parts),
            seq_length=parts[0].input_ids.shape[1], micro_batch_size=parts[0].input_ids.shape[0],
            forward_only=forward_only)

    def _broadcast_from_last_stage(self, obj: Any) -> Any:
        """Results exist on the last pipeline stage; every stage returns them."""
        import torch.distributed as dist

        if self.sizes.pp == 1:
            return obj
        holder = [obj]
        source = dist.get_global_rank(self._pp_group, self.sizes.pp - 1)
        dist.broadcast_object_list(holder, src=source, group=self._pp_group)
        return holder[0]

    # ------------------------------------------------------------------ scoring

    @torch.no_grad()
    def compute_logprobs(self, batch: RolloutBatch, reference: bool = False) -> TokenStats:
        if reference and self.reference is None:
            raise RuntimeError("no reference policy: MegatronPolicy was built with use_reference=False")
        groups, parts = self._micro_batches(batch)
        results: list[TokenStats] = []

        def keep(stats: TokenStats, part: RolloutBatch) -> None:
            results.append(TokenStats(stats.logprobs.cpu(), stats.entropy.cpu()))

        if reference:
            with self._reference_weights():
                self._run(parts, keep, forward_only=True)
        else:
            self._run(parts, keep, forward_only=True)
        results = self._broadcast_from_last_stage(results)
        logprobs = torch.zeros(batch.input_ids.shape, dtype=torch.float32)
        entropy = torch.zeros_like(logprobs)
        for index, stats in zip(groups, results):
            rows = len(index)  # the rest are padding rows
            width = min(stats.logprobs.shape[1], logprobs.shape[1])
            logprobs[index, :width] = stats.logprobs[:rows, :width]
            entropy[index, :width] = stats.entropy[:rows, :width]
        device = batch.input_ids.device
        return TokenStats(logprobs.to(device), entropy.to(device))

    class _Swap:
        def __init__(self, policy: MegatronPolicy) -> None:
            self.policy = policy
            self.saved: dict[str, torch.Tensor] = {}

        def __enter__(self):
            for name, param in self.policy._named_params():
                self.saved[name] = param.detach().to("cpu", copy=True)
                param.data.copy_(self.policy.reference[name])

        def __exit__(self, *exc):
            for name, param in self.policy._named_params():
                param.data.copy_(self.saved[name])

    def _reference_weights(self) -> _Swap:
        return MegatronPolicy._Swap(self)

    # ------------------------------------------------------------------ training

    def accumulate_gradients(self, batch: RolloutBatch, loss_fn: LossFn) -> tuple[float, dict[str, float]]:
        """Zero, then forward/backward all micro-batches; gradients end reduced over DP in the DDP buffers.

        ``loss_fn`` returns step-normalised values, so the step's loss is the *sum* over micro-batches and DP ranks.
        Megatron divides each micro-batch loss by the micro-batch count and DDP averages over DP; both are undone
        here by scaling the backward loss.
        """
        import torch.distributed as dist
        from megatron.core import parallel_state

        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        _, parts = self._micro_batches(batch)
        totals: dict[str, float] = {}
        loss_sum = [0.0]
        scale = len(parts) * self.sizes.dp

        def loss(stats: TokenStats, part: RolloutBatch) -> torch.Tensor:
            value, metrics = loss_fn(stats, part)
            loss_sum[0] += float(value.detach())
            for name, metric in metrics.items():
                totals[name] = totals.get(name, 0.0) + float(metric)
            # Keep the graph even for a micro-batch without completion tokens (its loss is a constant 0).
            return value * scale + stats.logprobs.sum() * 0.0

        self._run(parts, loss, forward_only=False)
        names = sorted(totals)
        packed = torch.tensor([loss_sum[0], *(totals[n] for n in names)], dtype=torch.float64, device=self.device)
        if self.sizes.dp > 1:
            dist.all_reduce(packed, group=parallel_state.get_data_parallel_group())
        # Only the last pipeline stage ran loss_fn: it tells the other stages the metric names and values.
        names, packed = self._broadcast_from_last_stage((names, packed.cpu()))
        return float(packed[0]), {n: float(v) for n, v in zip(names, packed[1:])}

    def train_step(self, batch: RolloutBatch, loss_fn: LossFn) -> dict[str, float]:
        from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

        loss, metrics = self.accumulate_gradients(batch, loss_fn)
        faults.point("policy.gradients")
        lr = self.base_lr * self.schedule(self.step)
        self.optimizer.prepare_grads()
        grad_norm = float(self.optimizer.get_grad_norm())  # global over DP/TP/PP, before clipping
        skipped = not (math.isfinite(loss) and math.isfinite(grad_norm))
        if not skipped:
            if math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0:
                for optimizer in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
                    parameters = optimizer.get_parameters()
                    if parameters:
                        clip_grad_by_total_norm_fp32(parameters, max_norm=self.max_grad_norm, total_norm=grad_norm)
            self.optimizer.step_with_ready_grads()
        # A skipped step leaves weights and Adam moments untouched (gradients are zeroed at the next step); the
        # schedule still advances, as in the HF backend.
        self.step += 1
        self._set_lr()
        return {**metrics, "loss": loss, "grad_norm": grad_norm, "lr": lr, "skipped": float(skipped)}

    # ------------------------------------------------------------------ weights out

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

    def _hf_tensors(self, source: Callable[[str], torch.Tensor] | None = None,
                    names: list[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """HF-named full tensors, one pipeline stage and one layer (or the embedding / head) at a time."""
        import torch.distributed as dist
        from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

        params = dict(self._named_params())
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
            dist.barrier(group=self._pp_group)

    def _stage(self) -> int:
        from megatron.core import parallel_state

        return parallel_state.get_pipeline_model_parallel_rank()

    def _broadcast_stage_object(self, obj: Any, stage: int) -> Any:
        import torch.distributed as dist

        if self.sizes.pp == 1:
            return obj
        holder = [obj if self._stage() == stage else None]
        dist.broadcast_object_list(holder, src=dist.get_global_rank(self._pp_group, stage), group=self._pp_group)
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
            dist.broadcast(buffer, src=dist.get_global_rank(self._pp_group, stage), group=self._pp_group)
            out[name] = buffer
        return out

    def export_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        with torch.no_grad():
            yield from self._hf_tensors()

    def gradients_as_hf(self) -> dict[str, torch.Tensor]:
        """The accumulated gradients under HF names (TP-gathered, PP-broadcast); exact only without DP sharding
        of the gradient buffer (DP=1 or no distributed optimizer). For tests and debugging."""
        params = dict(self._named_params())

        def grad(name: str) -> torch.Tensor:
            param = params[name]
            value = getattr(param, "main_grad", None)
            return (value if value is not None else param.grad).float()

        # clone: replicated tensors (norms) come back as the gradient buffer itself, which the step then clips
        return {n: t.detach().float().cpu().clone() for n, t in self._hf_tensors(grad)}

    def save_pretrained(self, directory: Path) -> None:
        import torch.distributed as dist
        from transformers import AutoModelForCausalLM

        tensors = {n: t.cpu() for n, t in self.export_weights()}
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

    # ------------------------------------------------------------------ checkpoints

    def _sharded_state(self, is_loading: bool) -> dict[str, Any]:
        model_state = self.model.module.sharded_state_dict()
        return {
            "model": model_state,
            # fully_reshardable: the optimizer state is stored per model parameter, so another TP/PP/DP layout can
            # load it (megatron-core 0.16's default, fully_sharded_model_space, rejects its own flattened ranges).
            "optimizer": self.optimizer.sharded_state_dict(
                model_state, is_loading=is_loading, metadata={"distrib_optim_sharding_type": "fully_reshardable"}),
        }

    def save(self, directory: Path) -> None:
        import torch.distributed as dist
        from megatron.core import dist_checkpointing

        directory = Path(directory)
        state = self._sharded_state(is_loading=False)
        state["step"] = self.step
        dist_checkpointing.save(state, str(directory))
        if dist.get_rank() == 0:
            meta = {**model_meta(self.hf_config), "step": self.step, "tensor_model_parallel_size": self.sizes.tp,
                    "pipeline_model_parallel_size": self.sizes.pp, "data_parallel_size": self.sizes.dp}
            (directory / META_FILE).write_text(json.dumps(meta, indent=1))
        dist.barrier()

    def load(self, directory: Path) -> None:
        from megatron.core import dist_checkpointing

        directory = Path(directory)
        check_meta(directory, self.hf_config)  # a different model fails here, before any tensor is read
        _init_torch_adam_state(self.optimizer)
        state = self._sharded_state(is_loading=True)
        state["step"] = 0
        loaded = dist_checkpointing.load(state, str(directory))
        self.model.module.load_state_dict(loaded["model"])
        with _keep_adam_step(self.optimizer):
            self.optimizer.load_state_dict(loaded["optimizer"])
        self.step = int(loaded["step"])
        self._set_lr()



def _check_packing(sequence_packing: bool, transformer_impl: str) -> None:
    """Packed (THD) sequences need Transformer Engine's varlen attention; not wired up in this backend yet."""
    from nemo_igrpo.errors import ConfigError
    from nemo_igrpo.policy.megatron.spec import resolve_impl

    if not sequence_packing:
        return
    if resolve_impl(transformer_impl) != "transformer_engine":
        raise ConfigError("policy.sequence_packing=true with policy.backend=megatron needs Transformer Engine (packed "
                          "THD sequences), which is not importable here; set policy.sequence_packing=false "
                          "(policy.max_tokens_per_micro_batch still batches by tokens)")
    raise ConfigError("policy.sequence_packing=true with policy.backend=megatron: packed THD sequences are not "
                      "implemented yet; set policy.sequence_packing=false (policy.max_tokens_per_micro_batch still "
                      "batches by tokens)")


def _padding_row_hook(padding_idx: int):
    """Match ``nn.Embedding(padding_idx=…)`` of the HF model: the padding row gets no gradient from the input side.

    The embedding output is detached wherever the input token is the padding id; under sequence parallelism the
    output holds only this TP rank's slice of the sequence.
    """

    def hook(module, args, kwargs, output):
        from megatron.core import parallel_state

        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = (ids == padding_idx).transpose(0, 1).contiguous()  # [s, b], the layout of the embedding output
        if output.shape[0] != mask.shape[0]:
            rows = output.shape[0]
            start = parallel_state.get_tensor_model_parallel_rank() * rows
            mask = mask[start:start + rows]
        # contiguous: pipeline P2P sends need it, and where() may take the mask's strides
        return torch.where(mask.unsqueeze(-1), output.detach(), output).contiguous()

    return hook


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


def _pad_rows(batch: RolloutBatch, rows: int) -> RolloutBatch:
    extra = rows - batch.size
    if extra <= 0:
        return batch
    from dataclasses import fields, replace

    def pad(value):
        if value is None:
            return None
        filler = torch.zeros((extra, *value.shape[1:]), dtype=value.dtype, device=value.device)
        return torch.cat([value, filler])

    padded = replace(batch, **{f.name: pad(getattr(batch, f.name)) for f in fields(batch)})
    padded.attention_mask[batch.size:, 0] = 1  # one dummy token so that trimming keeps a column
    return padded


def _pad_length(batch: RolloutBatch, multiple: int) -> RolloutBatch:
    length = batch.input_ids.shape[1]
    target = max(2, math.ceil(length / multiple) * multiple)
    if target == length:
        return batch
    from dataclasses import fields, replace

    def pad(value):
        if value is None or value.dim() != 2:
            return value
        return torch.nn.functional.pad(value, (0, target - length))

    return replace(batch, **{f.name: pad(getattr(batch, f.name)) for f in fields(batch)})

"""Micro-batched forward/backward through Megatron's pipeline schedule, and the optimizer step's Megatron hooks.

:class:`MicroBatchRunner` cuts a batch into micro-batches and runs them through ``get_forward_backward_func``
(scoring and training alike); :func:`accumulate_gradients` turns its backward into the step's summed gradients;
:class:`MegatronOptimizerHooks` lets the shared ``policy.optimizer_step`` drive megatron-core's optimizer.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import fields, replace
from typing import Any

import torch

from nemo_igrpo.algorithms.batch import RolloutBatch
from nemo_igrpo.policy.base import LossFn, TokenStats
from nemo_igrpo.policy.megatron.logprobs import vocab_parallel_stats
from nemo_igrpo.policy.megatron.parallel import ParallelSizes
from nemo_igrpo.policy.microbatch import row_lengths, token_budget_groups


class MicroBatchRunner:
    """Runs micro-batches of a batch through this rank's model stage; every rank of the job calls it together."""

    def __init__(self, model: Any, sizes: ParallelSizes, device: torch.device, *, temperature: float, vocab_size: int,
                 micro_batch_size: int, max_tokens: int | None, pp_group: Any) -> None:
        self.model = model
        self.sizes = sizes
        self.device = device
        self.temperature = temperature
        self.vocab_size = vocab_size
        self.micro_batch_size = micro_batch_size
        self.max_tokens = max_tokens  # None: row micro-batches (see policy.microbatch)
        self.pp_group = pp_group

    def micro_batches(self, batch: RolloutBatch) -> tuple[list[torch.Tensor], list[RolloutBatch]]:
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

    def run(self, parts: list[RolloutBatch], loss: Callable[[TokenStats, RolloutBatch], torch.Tensor | None],
            forward_only: bool) -> None:
        """Forward (and unless ``forward_only``, backward) of every part; ``loss`` sees each part's token stats on
        the last pipeline stage."""
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

    def broadcast_from_last_stage(self, obj: Any) -> Any:
        """Results exist on the last pipeline stage; every stage returns them."""
        import torch.distributed as dist

        if self.sizes.pp == 1:
            return obj
        holder = [obj]
        source = dist.get_global_rank(self.pp_group, self.sizes.pp - 1)
        dist.broadcast_object_list(holder, src=source, group=self.pp_group)
        return holder[0]


def accumulate_gradients(runner: MicroBatchRunner, optimizer: Any, batch: RolloutBatch,
                         loss_fn: LossFn) -> tuple[float, dict[str, float]]:
    """Zero, then forward/backward all micro-batches; gradients end reduced over DP in the DDP buffers.

    ``loss_fn`` returns step-normalised values, so the step's loss is the *sum* over micro-batches and DP ranks.
    Megatron divides each micro-batch loss by the micro-batch count and DDP averages over DP; both are undone
    here by scaling the backward loss.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state

    runner.model.zero_grad_buffer()
    optimizer.zero_grad()
    _, parts = runner.micro_batches(batch)
    totals: dict[str, float] = {}
    loss_sum = [0.0]
    scale = len(parts) * runner.sizes.dp

    def loss(stats: TokenStats, part: RolloutBatch) -> torch.Tensor:
        value, metrics = loss_fn(stats, part)
        loss_sum[0] += float(value.detach())
        for name, metric in metrics.items():
            totals[name] = totals.get(name, 0.0) + float(metric)
        # Keep the graph even for a micro-batch without completion tokens (its loss is a constant 0).
        return value * scale + stats.logprobs.sum() * 0.0

    runner.run(parts, loss, forward_only=False)
    names = sorted(totals)
    packed = torch.tensor([loss_sum[0], *(totals[n] for n in names)], dtype=torch.float64, device=runner.device)
    if runner.sizes.dp > 1:
        dist.all_reduce(packed, group=parallel_state.get_data_parallel_group())
    # Only the last pipeline stage ran loss_fn: it tells the other stages the metric names and values.
    names, packed = runner.broadcast_from_last_stage((names, packed.cpu()))
    return float(packed[0]), {n: float(v) for n, v in zip(names, packed[1:])}


class StepLR:
    """The LR schedule of a megatron-core optimizer: ``base_lr × multiplier(step)`` written into its param groups.

    Megatron's optimizer is not a ``torch.optim.Optimizer``, so torch's LambdaLR (the HF backend's) cannot drive it;
    ``step`` (training steps taken) is the schedule's clock and is saved in checkpoints.
    """

    def __init__(self, optimizer: Any, base_lr: float, multiplier: Callable[[int], float]) -> None:
        self.optimizer = optimizer
        self.base_lr = base_lr
        self.multiplier = multiplier
        self.step = 0
        self.apply()

    def lr(self) -> float:
        return self.base_lr * self.multiplier(self.step)

    def apply(self) -> None:
        lr = self.lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)

    def advance(self) -> None:
        self.step += 1
        self.apply()


class MegatronOptimizerHooks:
    """``policy.optimizer_step``'s hooks for a megatron-core optimizer.

    The optimizer must measure, clip and apply itself: its gradients live in Megatron's fp32 main-grad buffers,
    sharded over DP by the distributed optimizer and split over TP/PP, so only ``get_grad_norm`` knows the global
    norm and only its own clipping reaches every shard (its ``clip_grad`` is 0, so the step never clips twice).
    """

    def __init__(self, optimizer: Any, schedule: StepLR) -> None:
        self.optimizer = optimizer
        self.schedule = schedule

    def lr(self) -> float:
        return self.schedule.lr()

    def grad_norm(self) -> float:
        self.optimizer.prepare_grads()  # model grads → main grads (fp32), before measuring them
        return float(self.optimizer.get_grad_norm())  # global over DP/TP/PP, before clipping

    def clip(self, max_norm: float, total_norm: float) -> None:
        from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

        for optimizer in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            parameters = optimizer.get_parameters()
            if parameters:
                clip_grad_by_total_norm_fp32(parameters, max_norm=max_norm, total_norm=total_norm)

    def apply(self) -> None:
        self.optimizer.step_with_ready_grads()

    def discard(self) -> None:
        pass  # nothing to undo: the DDP grad buffers are zeroed when the next step accumulates

    def advance_schedule(self) -> None:
        self.schedule.advance()


def _pad_rows(batch: RolloutBatch, rows: int) -> RolloutBatch:
    extra = rows - batch.size
    if extra <= 0:
        return batch

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

    def pad(value):
        if value is None or value.dim() != 2:
            return value
        return torch.nn.functional.pad(value, (0, target - length))

    return replace(batch, **{f.name: pad(getattr(batch, f.name)) for f in fields(batch)})

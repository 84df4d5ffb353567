"""What each data-parallel rank holds, and how the ranks' numbers combine.

Every rank draws the same global prompt batch and keeps its slice (rows re-dealt by tokens under a token budget);
loss denominators and metrics are reduced over the policy's data-parallel group so that every rank ends a step with
the same numbers (evaluation's share: ``evaluation.run.sharded_eval``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import fields, replace

import torch

from nemo_igrpo import distributed
from nemo_igrpo.algorithms.aggregation import LossNormalizer
from nemo_igrpo.algorithms.batch import RolloutBatch, row_lengths
from nemo_igrpo.algorithms.prefix_groups import units
from nemo_igrpo.algorithms.refinement_metrics import WEIGHT  # weighted means (e.g. per-token entropy)
from nemo_igrpo.data.dataset import Example, PromptSampler
from nemo_igrpo.errors import ConfigError


# Rollout and timing metrics are per rank; these say how ranks combine (anything else: mean over ranks, which is
# the global mean because every rank holds the same number of prompts and samples).
_SUMMED = ("batch/sequences", "reward/count/", "throughput/", "rollout/skipped_solved")
_MAXED = ("time/", "response_length/refinement_max", "sampling_rounds")


def reduce_metrics(metrics: dict[str, float], group) -> dict[str, float]:
    """Combine one step's per-rank metrics over the data-parallel group (identical on every rank afterwards)."""
    weights = {name[len(WEIGHT):]: value for name, value in metrics.items() if name.startswith(WEIGHT)}
    size = distributed.world_size(group)
    if group is None or size == 1:
        return {name: value for name, value in metrics.items()
                if not name.startswith(WEIGHT) and weights.get(name, 1.0) > 0}
    reduced = _reduce({name: value * weights.get(name, 1.0) for name, value in metrics.items()}, group, size)
    for name in weights:  # sums of value × weight over the ranks, divided by the summed weight
        weight, total = reduced.pop(WEIGHT + name), reduced.pop(name)
        if weight > 0:
            reduced[name] = total / weight
    return reduced


def _reduce(metrics: dict[str, float], group, size: int) -> dict[str, float]:
    names = sorted(metrics)
    if distributed.all_gather_objects(names, group) != [names] * size:
        raise RuntimeError(f"ranks report different metric names; this rank: {names}")
    summed = distributed.all_reduce_values([float(metrics[n]) for n in names], "sum", group)
    maxed = distributed.all_reduce_values([float(metrics[n]) for n in names], "max", group)
    reduced = {}
    for name, total, largest in zip(names, summed, maxed):
        if name.startswith(_SUMMED + (WEIGHT,)) or WEIGHT + name in metrics:  # weighted ones: sums
            reduced[name] = total
        elif name.startswith(_MAXED):
            reduced[name] = largest
        else:
            reduced[name] = total / size
    return reduced


class ShardedSource:
    """This rank's slice of each global prompt draw, with every rank's sampler kept in the same state.

    A draw of the global batch (``prompts_per_step``) is identical on all ranks (same seed, same state); rank r keeps
    prompts ``[r·p, r·p + n)`` with p = prompts per rank. Dynamic sampling may draw again a different number of
    times on different ranks; ``synchronize`` then moves every sampler to the furthest position reached, so the
    checkpointed sampler state is every rank's state. ``prompts_per_step`` must split evenly over the ranks.
    """

    def __init__(self, sampler: PromptSampler, prompts_per_step: int, group) -> None:
        self.sampler = sampler
        self.group = group
        self.world = distributed.world_size(group)
        if prompts_per_step % self.world:
            raise ConfigError(f"trainer.prompts_per_step: {prompts_per_step} prompts cannot be split evenly "
                              f"over {self.world} data-parallel ranks; use a multiple of {self.world}")
        self.rank = distributed.rank(group) if group is not None else 0
        self.per_rank = prompts_per_step // self.world

    def draw(self, n: int) -> list[Example]:
        if self.world == 1:
            return self.sampler.next_batch(n)  # single process: exactly the prompts asked for, as always
        start = self.rank * self.per_rank
        return self.sampler.next_batch(self.per_rank * self.world)[start : start + n]

    def synchronize(self) -> None:
        if self.world == 1:
            return
        states = distributed.all_gather_objects(self.sampler.state_dict(), self.group)
        furthest = max(states, key=lambda s: (s["epoch"], s["position"]))
        if furthest != self.sampler.state_dict():
            self.sampler.load_state_dict(furthest)


def global_normalizer(loss_mask: torch.Tensor, max_tokens: int, group) -> LossNormalizer:
    """Loss denominators counted over the whole step's batch, i.e. summed over the data-parallel ranks."""
    local = LossNormalizer.from_mask(loss_mask, max_tokens)
    if group is None:
        return local
    tokens, sequences = distributed.all_reduce_values([local.num_tokens, local.num_sequences], "sum", group)
    return dataclasses.replace(local, num_tokens=tokens, num_sequences=sequences)


def balance_by_tokens(lengths: list[int], ranks: int) -> list[list[int]]:
    """Assign rows to ``ranks`` so that token counts (not row counts) are as equal as greedy LPT makes them.

    Longest row first, each to the rank with the fewest tokens so far (ties: the lower rank); every rank gets a row
    when there are at least ``ranks`` rows. Each rank's rows come back in ascending index order.
    """
    load = [0] * ranks
    owned: list[list[int]] = [[] for _ in range(ranks)]
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        rank = min(range(ranks), key=lambda r: (load[r], len(owned[r]), r))
        owned[rank].append(i)
        load[rank] += lengths[i]
    return [sorted(rows) for rows in owned]


def balance_across_ranks(batch: RolloutBatch, group, shared_prefix: bool = False) -> RolloutBatch:
    """Re-deal this step's rows over the data-parallel ``group`` so every rank trains on about as many tokens.

    Every rank sends its rows to every other one (rollout tensors are small next to the model) and keeps the share
    :func:`balance_by_tokens` assigns it; ranks holding identical rows (tensor/pipeline peers) keep identical shares.
    ``shared_prefix`` (``policy.shared_prefix``): whole groups are dealt, weighed by the tokens the shared layout
    computes (the prefix once), so no group's prefix is computed on two ranks.
    """
    if group is None or distributed.world_size(group) == 1:
        return batch
    gathered = distributed.all_gather_objects(batch.to("cpu"), group)
    width = max(part.input_ids.shape[1] for part in gathered)
    if shared_prefix:  # group ids are numbered per rank: make them distinct across ranks first
        gathered = _distinct_group_ids(gathered)
    everything = _concat([_pad_to(part, width) for part in gathered])
    if shared_prefix:
        groups = units(everything)
        share = balance_by_tokens([u.tokens for u in groups], len(gathered))[distributed.rank(group)]
        mine = sorted(row for i in share for row in groups[i].rows)
    else:
        mine = balance_by_tokens(row_lengths(everything), len(gathered))[distributed.rank(group)]
    return everything.select(torch.tensor(mine, dtype=torch.long)).trim().to(batch.input_ids.device)


def _distinct_group_ids(parts: list[RolloutBatch]) -> list[RolloutBatch]:
    out, offset = [], 0
    for part in parts:
        out.append(replace(part, group_ids=part.group_ids + offset))
        offset += int(part.group_ids.max()) + 1 if part.size else 0
    return out


def _pad_to(batch: RolloutBatch, width: int) -> RolloutBatch:
    extra = width - batch.input_ids.shape[1]
    if extra == 0:
        return batch

    def pad(value):
        if value is None or value.dim() != 2:
            return value
        return torch.nn.functional.pad(value, (0, extra))

    return replace(batch, **{f.name: pad(getattr(batch, f.name)) for f in fields(batch)})


def _concat(parts: list[RolloutBatch]) -> RolloutBatch:
    def cat(name):
        values = [getattr(p, name) for p in parts]
        if any(v is None for v in values):
            if not all(v is None for v in values):
                raise ValueError(f"ranks disagree on whether RolloutBatch.{name} is set")
            return None
        return torch.cat(values)

    return replace(parts[0], **{f.name: cat(f.name) for f in fields(parts[0])})

"""Micro-batches by tokens instead of rows, and data-parallel shards balanced by tokens.

Reasoning completions range from a few hundred to thousands of tokens. Row micro-batches pad every row to the
longest one in its micro-batch and run short sequences in tiny batches; a token budget instead groups sequences of
similar length (sorted, longest first) until ``rows × longest row`` (padded) or ``Σ lengths`` (packed) would exceed
``policy.max_tokens_per_micro_batch``. A sequence longer than the budget runs alone.

Losses and metrics are normalised by step-global counts (``algorithms.aggregation``), so any grouping of the rows,
and any assignment of rows to data-parallel ranks, sums to the same step.
"""

from __future__ import annotations

import torch

from nemo_igrpo.algorithms.batch import RolloutBatch

KEY = "policy.max_tokens_per_micro_batch"


def row_lengths(batch: RolloutBatch) -> list[int]:
    """Real tokens per row (rows are right-padded)."""
    return [int(n) for n in batch.attention_mask.sum(dim=1).tolist()]


def token_budget_groups(lengths: list[int], max_tokens: int, packed: bool = False) -> list[list[int]]:
    """Row indices per micro-batch, longest rows first, each within ``max_tokens``.

    Padded (``packed=False``): a micro-batch costs rows × its longest row, so rows are taken in descending length and
    a micro-batch closes when one more row would exceed the budget. Packed: it costs the sum of its lengths
    (first-fit decreasing, so short rows fill the gaps left by long ones).
    """
    if max_tokens < 1:
        raise ValueError(f"{KEY}: must be >= 1, got {max_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    if packed:
        bins: list[list[int]] = []
        used: list[int] = []
        for i in order:
            size = max(lengths[i], 1)
            for b, total in enumerate(used):
                if total + size <= max_tokens:
                    bins[b].append(i)
                    used[b] += size
                    break
            else:
                bins.append([i])
                used.append(size)
        return bins
    groups: list[list[int]] = []
    for i in order:
        if groups and (len(groups[-1]) + 1) * max(lengths[groups[-1][0]], 1) <= max_tokens:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


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
    from nemo_igrpo import distributed

    if group is None or distributed.world_size(group) == 1:
        return batch
    gathered = distributed.all_gather_objects(batch.to("cpu"), group)
    width = max(part.input_ids.shape[1] for part in gathered)
    if shared_prefix:  # group ids are numbered per rank: make them distinct across ranks first
        gathered = _distinct_group_ids(gathered)
    everything = _concat([_pad_to(part, width) for part in gathered])
    if shared_prefix:
        from nemo_igrpo.policy.prefix_groups import units

        groups = units(everything)
        share = balance_by_tokens([u.tokens for u in groups], len(gathered))[distributed.rank(group)]
        mine = sorted(row for i in share for row in groups[i].rows)
    else:
        mine = balance_by_tokens(row_lengths(everything), len(gathered))[distributed.rank(group)]
    return everything.select(torch.tensor(mine, dtype=torch.long)).trim().to(batch.input_ids.device)


def _distinct_group_ids(parts: list[RolloutBatch]) -> list[RolloutBatch]:
    from dataclasses import replace

    out, offset = [], 0
    for part in parts:
        out.append(replace(part, group_ids=part.group_ids + offset))
        offset += int(part.group_ids.max()) + 1 if part.size else 0
    return out


def _pad_to(batch: RolloutBatch, width: int) -> RolloutBatch:
    from dataclasses import fields, replace

    extra = width - batch.input_ids.shape[1]
    if extra == 0:
        return batch

    def pad(value):
        if value is None or value.dim() != 2:
            return value
        return torch.nn.functional.pad(value, (0, extra))

    return replace(batch, **{f.name: pad(getattr(batch, f.name)) for f in fields(batch)})


def _concat(parts: list[RolloutBatch]) -> RolloutBatch:
    from dataclasses import fields, replace

    def cat(name):
        values = [getattr(p, name) for p in parts]
        if any(v is None for v in values):
            if not all(v is None for v in values):
                raise ValueError(f"ranks disagree on whether RolloutBatch.{name} is set")
            return None
        return torch.cat(values)

    return replace(parts[0], **{f.name: cat(f.name) for f in fields(parts[0])})


def micro_batches(batch: RolloutBatch, micro_batch_size: int,
                  max_tokens: int | None) -> list[tuple[torch.Tensor, RolloutBatch]]:
    """(row indices into ``batch``, trimmed micro-batch) pairs: row micro-batches when ``max_tokens`` is None."""
    if max_tokens is None:
        groups = [list(range(s, min(s + micro_batch_size, batch.size))) for s in range(0, batch.size, micro_batch_size)]
    else:
        groups = token_budget_groups(row_lengths(batch), max_tokens)
    out = []
    for rows in groups:
        index = torch.tensor(rows, dtype=torch.long)
        out.append((index, batch.select(index).trim()))
    return out

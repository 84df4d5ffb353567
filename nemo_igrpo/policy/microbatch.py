"""Micro-batches by tokens instead of rows (data-parallel shards by tokens: ``sharding.balance_across_ranks``).

Reasoning completions range from a few hundred to thousands of tokens. Row micro-batches pad every row to the
longest one in its micro-batch and run short sequences in tiny batches; a token budget instead groups sequences of
similar length (sorted, longest first) until ``rows × longest row`` (padded) or ``Σ lengths`` (packed) would exceed
``policy.max_tokens_per_micro_batch``. A sequence longer than the budget runs alone.

Losses and metrics are normalised by step-global counts (``algorithms.aggregation``), so any grouping of the rows,
and any assignment of rows to data-parallel ranks, sums to the same step.
"""

from __future__ import annotations

import torch

from nemo_igrpo.algorithms.batch import RolloutBatch, row_lengths  # noqa: F401  (re-exported for the backends)

KEY = "policy.max_tokens_per_micro_batch"


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

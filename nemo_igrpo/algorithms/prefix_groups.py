"""A batch's rows grouped by ``group_ids``, each group with the prefix its rows share (``policy.shared_prefix``).

Pure bookkeeping over a ``RolloutBatch``, apart from the layout (``policy.shared_prefix``) so that the data-parallel
re-deal (``sharding.balance_across_ranks``, whole groups) can use it without importing a policy backend.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nemo_igrpo.algorithms.batch import RolloutBatch


@dataclass
class Unit:
    rows: list[int]  # rows of the micro-batch that share the prefix
    prefix: int  # number of shared leading tokens
    lengths: list[int]  # real tokens of each row

    @property
    def tokens(self) -> int:
        """Tokens the shared layout computes: the prefix once plus every suffix."""
        return self.prefix + sum(n - self.prefix for n in self.lengths)


def units(batch: RolloutBatch) -> list[Unit]:
    """The batch's rows grouped by ``group_ids`` (first-appearance order), with each group's shareable prefix."""
    lengths = batch.attention_mask.sum(dim=1).tolist()
    by_group: dict[int, list[int]] = {}
    for row, gid in enumerate(batch.group_ids.tolist()):
        by_group.setdefault(int(gid), []).append(row)
    out = []
    for rows in by_group.values():
        row_lengths = [int(lengths[r]) for r in rows]
        limit = min(_first_scored(batch.loss_mask[r], n) for r, n in zip(rows, row_lengths))
        ids = batch.input_ids[rows, :limit]
        same = (ids == ids[:1]).all(dim=0)
        prefix = int(same.long().cumprod(0).sum()) if limit else 0
        out.append(Unit(rows, prefix, row_lengths))
    return out


def _first_scored(loss_mask: torch.Tensor, length: int) -> int:
    scored = loss_mask[:length].nonzero()
    return int(scored[0]) if len(scored) else length

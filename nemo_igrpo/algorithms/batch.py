"""The padded tensor batch that crosses from rollout to the policy backend.

Alignment convention (used everywhere): every per-token tensor has the shape of ``input_ids`` [B, L]; position t
holds the quantity for *token t* (for log-probs: log p(input_ids[t] | input_ids[:t])). Position 0 has no
prediction and is never in ``loss_mask``. Rows are right-padded.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Callable, Sequence

import torch


@dataclass
class RolloutBatch:
    input_ids: torch.Tensor  # [B, L] long: prompt + completion, right-padded
    attention_mask: torch.Tensor  # [B, L] long: 1 on real tokens
    loss_mask: torch.Tensor  # [B, L] float: 1 on completion tokens (the only tokens with gradient)
    advantages: torch.Tensor  # [B] float
    group_ids: torch.Tensor  # [B] long: which prompt (group) the row belongs to
    gen_logprobs: torch.Tensor  # [B, L] float: sampling log-probs reported by the generator (0 off-mask)
    old_logprobs: torch.Tensor | None = None  # [B, L] π_old; None ⇒ on-policy, use detached current log-probs
    ref_logprobs: torch.Tensor | None = None  # [B, L] reference policy, only when the KL coefficient > 0
    policy_version: torch.Tensor | None = None  # [B] long: the generator version its first token came from (async)
    policy_version_last: torch.Tensor | None = None  # [B] long: ... and its last (later under inflight_updates=keep)

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    def select(self, index: torch.Tensor | slice) -> "RolloutBatch":
        """Rows ``index`` of every tensor field (None stays None)."""
        return replace(self, **{f.name: _take(getattr(self, f.name), index) for f in fields(self)})

    def split(self, micro_batch_size: int) -> list["RolloutBatch"]:
        """Consecutive micro-batches of at most ``micro_batch_size`` rows, trimmed to their longest row."""
        parts = []
        for start in range(0, self.size, micro_batch_size):
            part = self.select(slice(start, start + micro_batch_size))
            parts.append(part.trim())
        return parts

    def trim(self) -> "RolloutBatch":
        """Drop trailing columns that are padding in every row (saves compute on short micro-batches)."""
        length = int(self.attention_mask.sum(dim=1).max().item()) if self.size else 0
        if length == self.input_ids.shape[1]:
            return self
        return replace(self, **{f.name: _cut(getattr(self, f.name), length) for f in fields(self)})

    def to(self, device: torch.device | str) -> "RolloutBatch":
        return replace(self, **{f.name: _move(getattr(self, f.name), device) for f in fields(self)})


def _take(value, index):
    return None if value is None else value[index]


def _cut(value, length: int):
    return value[:, :length] if value is not None and value.dim() == 2 else value


def _move(value, device):
    return None if value is None else value.to(device)


def pad_sequences(
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    pad_token_id: int,
    completion_values: Sequence[Sequence[float]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Concatenate prompt+completion per row and right-pad.

    Returns ``input_ids``, ``attention_mask``, ``loss_mask`` (1 on completion tokens) and, aligned the same way,
    ``completion_values`` (e.g. generator log-probs; zeros when not given).
    """
    rows = [list(p) + list(c) for p, c in zip(prompts, completions)]
    length = max(len(r) for r in rows)
    batch = len(rows)
    input_ids = torch.full((batch, length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, length), dtype=torch.long)
    loss_mask = torch.zeros((batch, length), dtype=torch.float32)
    values = torch.zeros((batch, length), dtype=torch.float32)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        n, m = len(p), len(c)
        input_ids[i, : n + m] = torch.tensor(rows[i], dtype=torch.long)
        attention_mask[i, : n + m] = 1
        loss_mask[i, n : n + m] = 1.0
        if completion_values is not None and m:
            values[i, n : n + m] = torch.tensor(completion_values[i][:m], dtype=torch.float32)
    return input_ids, attention_mask, loss_mask, values


@dataclass
class TokenStats:
    """What a policy backend computes for a batch and hands to the loss."""

    logprobs: torch.Tensor  # [B, L], aligned with input_ids (see the module docstring)
    entropy: torch.Tensor  # [B, L] entropy of the predictive distribution at each position


# loss_fn(stats of one micro-batch (with grad), the micro-batch) -> (loss, metrics).
# The loss and every metric are already normalised by counts of the *whole* optimizer step,
# so a backend simply sums them over micro-batches (and over data-parallel ranks).
LossFn = Callable[[TokenStats, RolloutBatch], "tuple[torch.Tensor, dict[str, torch.Tensor]]"]


def row_lengths(batch: RolloutBatch) -> list[int]:
    """Real tokens per row (rows are right-padded)."""
    return [int(n) for n in batch.attention_mask.sum(dim=1).tolist()]

"""Reduce a per-token loss [B, L] to a scalar with step-global denominators.

Every denominator counts the WHOLE optimizer step (a ``LossNormalizer`` built once from the step's loss mask), so
summing ``aggregate`` over the step's micro-batches gives exactly the full-batch value and gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import Tensor

from nemo_igrpo.registry import Registry


@dataclass(frozen=True)
class LossNormalizer:
    num_tokens: float  # masked (completion) tokens in the step
    num_sequences: float  # rows with at least one masked token in the step
    max_tokens: int  # the completion-length budget (Dr.GRPO's constant denominator)

    @classmethod
    def from_mask(cls, loss_mask: Tensor, max_tokens: int) -> "LossNormalizer":
        """Counts over the whole step's ``loss_mask`` [B, L] (not a micro-batch's)."""
        per_row = (loss_mask > 0).sum(dim=1)  # [B]
        return cls(
            num_tokens=float(per_row.sum().item()),
            num_sequences=float((per_row > 0).sum().item()),
            max_tokens=int(max_tokens),
        )


Aggregator = Callable[[Tensor, Tensor, "LossNormalizer"], Tensor]  # (per_token, mask, counts) -> scalar
AGGREGATIONS: Registry[Aggregator] = Registry("loss aggregation", "algorithm.loss_agg")


def _denominator(count: float) -> float:
    """A step with nothing to learn from sums to 0; dividing by 1 keeps that 0 instead of NaN."""
    return max(float(count), 1.0)


@AGGREGATIONS.register("token-mean")
def _token_mean(x: Tensor, m: Tensor, norm: LossNormalizer) -> Tensor:
    """Σ_i,t x·m / num_tokens."""
    return (x * m).sum() / _denominator(norm.num_tokens)


@AGGREGATIONS.register("seq-mean-token-mean")
def _seq_mean_token_mean(x: Tensor, m: Tensor, norm: LossNormalizer) -> Tensor:
    """Σ_i (Σ_t x·m / |o_i|) / num_sequences (the iGRPO / original GRPO objective)."""
    lengths = m.sum(dim=1).clamp(min=1)  # clamp: rows without tokens contribute 0
    return ((x * m).sum(dim=1) / lengths).sum() / _denominator(norm.num_sequences)


@AGGREGATIONS.register("seq-mean-token-sum")
def _seq_mean_token_sum(x: Tensor, m: Tensor, norm: LossNormalizer) -> Tensor:
    """Σ_i,t x·m / num_sequences."""
    return (x * m).sum() / _denominator(norm.num_sequences)


@AGGREGATIONS.register("seq-mean-token-sum-norm")
def _seq_mean_token_sum_norm(x: Tensor, m: Tensor, norm: LossNormalizer) -> Tensor:
    """Σ_i,t x·m / (num_sequences · max_tokens) (Dr.GRPO: a constant, length-unbiased denominator)."""
    return (x * m).sum() / _denominator(norm.num_sequences * norm.max_tokens)


def check_aggregation(mode: str) -> None:
    """Raise ValueError unless ``mode`` is one of ``AGGREGATIONS``."""
    AGGREGATIONS.lookup(mode)


def aggregate(per_token: Tensor, loss_mask: Tensor, mode: str, norm: LossNormalizer) -> Tensor:
    """Scalar from ``per_token`` [B, L] over ``loss_mask`` [B, L] with step-global counts ``norm``.

    ``mode`` is one of ``AGGREGATIONS``; each formula is on its ``_token_mean`` ... ``_seq_mean_token_sum_norm``.
    """
    return AGGREGATIONS.lookup(mode)(per_token, loss_mask.to(per_token.dtype), norm)

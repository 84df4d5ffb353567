"""Per-token estimators of KL(π ‖ π_ref) from samples of π (Schulman, "Approximating KL Divergence", 2020)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from nemo_igrpo.registry import Registry

# log π − log π_ref [*] -> per-token estimate [*]
KLEstimator = Callable[[Tensor], Tensor]

KL_ESTIMATORS: Registry[KLEstimator] = Registry("KL estimator", "algorithm.kl_estimator")


@KL_ESTIMATORS.register("k1")
def _k1(log_ratio: Tensor) -> Tensor:
    """k1 = log π − log π_ref (unbiased, high variance, can be negative)."""
    return log_ratio


@KL_ESTIMATORS.register("k2")
def _k2(log_ratio: Tensor) -> Tensor:
    """k2 = ½ (log π − log π_ref)² (biased, low variance, ≥ 0)."""
    return 0.5 * log_ratio.square()


# k3 exponentiates the log-ratio: beyond ±20 (e^20 ≈ 5e8) float32 overflows soon after, and an overflowed value
# clamped by kl_clamp still back-propagates 0·inf = NaN. veRL and NeMo-RL clamp the log-ratio the same way.
K3_LOG_RATIO_CLAMP = 20.0


@KL_ESTIMATORS.register("k3")
def _k3(log_ratio: Tensor) -> Tensor:
    """k3 = exp(log π_ref − log π) − 1 − (log π_ref − log π) (unbiased, low variance, ≥ 0), with the log-ratio
    clamped to ±20 first (no gradient beyond it)."""
    neg = (-log_ratio).clamp(-K3_LOG_RATIO_CLAMP, K3_LOG_RATIO_CLAMP)
    return torch.expm1(neg) - neg  # expm1: exact near 0, where most tokens are


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: str, clamp: float | None) -> Tensor:
    """Per-token KL(π ‖ π_ref) estimate ``estimator`` ∈ {k1, k2, k3}, clamped to [−clamp, clamp] if given.

    logprobs, ref_logprobs: [B, L] (any matching shape); returns the same shape, differentiable in ``logprobs``.
    """
    kl = KL_ESTIMATORS.lookup(estimator)(logprobs - ref_logprobs)
    return kl if clamp is None else kl.clamp(-clamp, clamp)

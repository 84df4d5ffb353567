"""The training loss handed to a policy backend: policy loss (+ KL penalty), aggregated with step-global counts."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from nemo_igrpo.algorithms.aggregation import LossNormalizer, aggregate, check_aggregation
from nemo_igrpo.algorithms.kl import KL_ESTIMATORS, kl_penalty
from nemo_igrpo.algorithms.policy_losses import POLICY_LOSSES

if TYPE_CHECKING:  # policy.base imports algorithms.batch; a runtime import here would be circular
    from nemo_igrpo.algorithms.batch import RolloutBatch
    from nemo_igrpo.policy.base import LossFn, TokenStats


def make_loss_fn(
    *,
    policy_loss: str,
    eps_low: float,
    eps_high: float,
    dual_clip: float | None,
    loss_agg: str,
    kl_coef: float,
    kl_estimator: str,
    kl_clamp: float | None,
    normalizer: LossNormalizer,
) -> "LossFn":
    """Build ``loss_fn(stats, micro_batch) -> (loss, metrics)`` for one optimizer step.

    loss = agg_t(ℓ_policy,t + kl_coef · KL_t) with agg = ``loss_agg`` and step-global counts ``normalizer``.
    π_old = ``micro_batch.old_logprobs``, or sg[log π] when None (on-policy: ratio 1, gradient of A·log π).
    Metrics are detached and already divided by the step-global counts, so summing them over micro-batches gives
    the step value: ``policy_loss`` (aggregated like the loss), and token-means of ``kl`` (the unweighted
    penalty, 0 when kl_coef == 0), ``clip_fraction``, ``entropy`` and ``ratio_mean``.
    """
    if policy_loss not in POLICY_LOSSES:
        raise ValueError(f"unknown policy loss {policy_loss!r}; valid: {', '.join(POLICY_LOSSES)}")
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {kl_estimator!r}; valid: {', '.join(KL_ESTIMATORS)}")
    check_aggregation(loss_agg)
    if kl_coef < 0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
    policy_fn = POLICY_LOSSES[policy_loss]

    def token_mean(x: Tensor, mask: Tensor) -> Tensor:
        return aggregate(x.detach(), mask, "token-mean", normalizer)

    def loss_fn(stats: "TokenStats", batch: "RolloutBatch") -> tuple[Tensor, dict[str, Tensor]]:
        logprobs, mask = stats.logprobs, batch.loss_mask  # [B, L]
        old = batch.old_logprobs if batch.old_logprobs is not None else logprobs.detach()
        out = policy_fn(
            logprobs, old, batch.advantages, mask, eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip
        )
        per_token = out.per_token_loss
        kl = torch.zeros_like(per_token)
        if kl_coef > 0:
            if batch.ref_logprobs is None:
                raise ValueError("kl_coef > 0 needs micro_batch.ref_logprobs (score the batch with the reference)")
            # padding holds arbitrary log-probs: compare them as equal there, so exp() in k3 stays finite
            on_mask = mask > 0
            policy_lp = torch.where(on_mask, logprobs, 0.0)
            ref_lp = torch.where(on_mask, batch.ref_logprobs, 0.0)
            kl = kl_penalty(policy_lp, ref_lp, kl_estimator, kl_clamp)
            per_token = per_token + kl_coef * kl
        loss = aggregate(per_token, mask, loss_agg, normalizer)
        metrics = {
            "policy_loss": aggregate(out.per_token_loss.detach(), mask, loss_agg, normalizer),
            "kl": token_mean(kl, mask),
            "clip_fraction": token_mean(out.clipped, mask),
            "entropy": token_mean(stats.entropy, mask),
            "ratio_mean": token_mean(out.ratio, mask),
        }
        return loss, metrics

    return loss_fn

"""The training loss handed to a policy backend: policy loss (+ KL penalty), aggregated with step-global counts."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import Tensor

from nemo_igrpo import faults
from nemo_igrpo.algorithms.aggregation import AGGREGATIONS, LossNormalizer, aggregate
from nemo_igrpo.algorithms.batch import LossFn, RolloutBatch, TokenStats
from nemo_igrpo.algorithms.kl import KL_ESTIMATORS, kl_penalty
from nemo_igrpo.algorithms.policy_losses import POLICY_LOSSES
from nemo_igrpo.registry import Registry

# Δ = log π_trainer − log π_gen [B, L] (0 off-mask) -> log importance weight [B, L]; None: no correction
ImportanceCorrection = Callable[[Tensor], Tensor] | None

IMPORTANCE_CORRECTIONS: Registry[ImportanceCorrection] = Registry("importance correction",
                                                                  "algorithm.importance_correction")
IMPORTANCE_CORRECTIONS.register("none", None)
IMPORTANCE_CORRECTIONS.register("token", lambda delta: delta)  # w_t = e^{Δ_t}
IMPORTANCE_CORRECTIONS.register("sequence", lambda delta: delta.sum(dim=1, keepdim=True).expand_as(delta))  # e^{ΣΔ}


@dataclass(frozen=True)
class LossSpec:
    """Every choice that defines the training loss, made once (``nemo_igrpo.assembly.build_loss``).

    The KL decision lives here alone: ``needs_reference`` tells the assembly to build a reference policy and the
    loop to score the batch with it; ``build`` applies the penalty. No defaults here: they live in the config
    schema (``AlgorithmConfig``), and every field is given.
    """

    policy_loss: str
    eps_low: float
    eps_high: float
    dual_clip: float | None
    loss_agg: str
    kl_coef: float
    kl_estimator: str
    kl_clamp: float | None
    importance_correction: str
    importance_cap: float
    max_tokens: int  # the completion budget: Dr.GRPO's constant denominator

    @property
    def needs_reference(self) -> bool:
        return self.kl_coef > 0

    def build(self, normalizer: LossNormalizer) -> LossFn:
        """This step's ``loss_fn``, with the step-global counts ``normalizer``."""
        options = asdict(self)
        options.pop("max_tokens")
        return make_loss_fn(**options, normalizer=normalizer)


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
    importance_correction: str,
    importance_cap: float,
) -> LossFn:
    """Build ``loss_fn(stats, micro_batch) -> (loss, metrics)`` for one optimizer step.

    loss = agg_t(ℓ_policy,t + kl_coef · KL_t) with agg = ``loss_agg`` and step-global counts ``normalizer``.
    π_old = ``micro_batch.old_logprobs``, or sg[log π] when None (on-policy: ratio 1, gradient of A·log π).
    Metrics are detached and already divided by the step-global counts, so summing them over micro-batches gives
    the step value: ``policy_loss`` (aggregated like the loss), and token-means of ``kl`` (the unweighted
    penalty, 0 when kl_coef == 0), ``clip_fraction``, ``entropy`` and ``ratio_mean``.

    Generator/trainer mismatch, with Δ_t = log π_trainer,t − log π_gen,t (π_trainer = π_old, the trainer's scores of
    the sampled tokens before this step's update; π_gen = ``micro_batch.gen_logprobs``):
      ``mismatch/token_prob_error`` = token-mean of exp|Δ_t| (NeMo-RL's multiplicative prob error; 1 = identical),
      ``mismatch/seq_kl`` = sequence-mean of Σ_t (e^{Δ_t} − 1 − Δ_t), the k3 estimate of KL(π_gen ‖ π_trainer)
      over each sampled sequence (≥ 0; 0 = identical).
    ``importance_correction`` (truncated importance sampling, Yao et al. 2025) multiplies each token's policy loss
    by a detached weight: ``token``: w_t = min(e^{Δ_t}, cap); ``sequence``: w_i = min(e^{Σ_t Δ_t}, cap) on every
    token of sequence i. Then ``mismatch/is_weight_mean`` and ``mismatch/is_capped_fraction`` are logged too.
    """
    policy_fn = POLICY_LOSSES.lookup(policy_loss)
    KL_ESTIMATORS.lookup(kl_estimator)
    AGGREGATIONS.lookup(loss_agg)
    correction = IMPORTANCE_CORRECTIONS.lookup(importance_correction)
    if correction is not None and not importance_cap > 0:
        raise ValueError(f"importance_cap must be > 0, got {importance_cap}")
    if kl_coef < 0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")

    def token_mean(x: Tensor, mask: Tensor) -> Tensor:
        return aggregate(x.detach(), mask, "token-mean", normalizer)

    def loss_fn(stats: TokenStats, batch: RolloutBatch) -> tuple[Tensor, dict[str, Tensor]]:
        logprobs, mask = stats.logprobs, batch.loss_mask  # [B, L]
        old = batch.old_logprobs if batch.old_logprobs is not None else logprobs.detach()
        out = policy_fn(
            logprobs, old, batch.advantages, mask, eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip
        )
        on_mask = mask > 0
        # Δ = log π_trainer − log π_gen on the sampled tokens; 0 off-mask so exp() stays finite on padding
        delta = torch.where(on_mask, old.detach() - batch.gen_logprobs.to(old.dtype), 0.0)
        policy_part = out.per_token_loss
        weight = None
        if correction is not None:
            weight, capped = truncated_is_weight(delta, mask, importance_correction, importance_cap)
            policy_part = policy_part * weight
        per_token = policy_part
        kl = torch.zeros_like(per_token)
        if kl_coef > 0:
            if batch.ref_logprobs is None:
                raise ValueError("kl_coef > 0 needs micro_batch.ref_logprobs (score the batch with the reference)")
            # padding holds arbitrary log-probs: compare them as equal there, so exp() in k3 stays finite
            policy_lp = torch.where(on_mask, logprobs, 0.0)
            ref_lp = torch.where(on_mask, batch.ref_logprobs, 0.0)
            kl = kl_penalty(policy_lp, ref_lp, kl_estimator, kl_clamp)
            per_token = per_token + kl_coef * kl
        loss = aggregate(per_token, mask, loss_agg, normalizer)
        metrics = {
            "policy_loss": aggregate(policy_part.detach(), mask, loss_agg, normalizer),
            "kl": token_mean(kl, mask),
            "clip_fraction": token_mean(out.clipped, mask),
            "entropy": token_mean(stats.entropy, mask),
            "ratio_mean": token_mean(out.ratio, mask),
            "mismatch/token_prob_error": token_mean(delta.abs().exp(), mask),
            # Σ_t k3 per sequence, averaged over the step's sequences (seq-mean-token-sum)
            "mismatch/seq_kl": aggregate((delta.exp() - 1 - delta).detach(), mask, "seq-mean-token-sum", normalizer),
        }
        if weight is not None:
            metrics["mismatch/is_weight_mean"] = token_mean(weight, mask)
            metrics["mismatch/is_capped_fraction"] = token_mean(capped, mask)
        return faults.point("loss.computed", loss), metrics  # the drills' NaN loss / NaN gradient

    return loss_fn


def truncated_is_weight(delta: Tensor, loss_mask: Tensor, level: str, cap: float) -> tuple[Tensor, Tensor]:
    """Detached truncated importance weights [B, L] from Δ = log π_trainer − log π_gen (0 off-mask), and a float
    mask [B, L] of where the cap was hit.

    ``token``: min(e^{Δ_t}, cap); ``sequence``: min(e^{Σ_t Δ_t}, cap), broadcast to the sequence's tokens. Off-mask
    positions get weight 1 (their loss is 0 anyway). The cap is applied in log space, so no exp() can overflow.
    """
    correction = IMPORTANCE_CORRECTIONS.lookup(level)
    if correction is None:
        raise ValueError(f"importance correction {level!r} has no weights; use one of: token, sequence")
    log_cap = math.log(cap)
    delta = delta.detach()
    log_w = correction(delta)
    on_mask = loss_mask > 0
    weight = torch.where(on_mask, log_w.clamp(max=log_cap).exp(), 1.0)
    return weight, (on_mask & (log_w >= log_cap)).to(delta.dtype)

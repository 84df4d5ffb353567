"""Per-token policy-gradient losses (to be minimised), before aggregation over tokens and sequences.

Shapes: logprobs, old_logprobs, loss_mask, and every output are [B, L] (aligned with ``input_ids``);
advantages are [B], one per sequence. Off-mask positions hold arbitrary padding values, so every loss reads the
log-ratio through the mask (0 there) and writes 0 there: ``exp`` can never overflow on padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import Tensor

from nemo_igrpo.registry import Registry


@dataclass
class PolicyLossOutput:
    per_token_loss: Tensor  # [B, L] loss per token, 0 off-mask (aggregate it)
    clipped: Tensor  # [B, L] float: 1 where clipping was active (on-mask only)
    ratio: Tensor  # [B, L] detached importance ratio used by the loss (1 off-mask)


class PolicyLossFn(Protocol):
    def __call__(
        self,
        logprobs: Tensor,
        old_logprobs: Tensor,
        advantages: Tensor,
        loss_mask: Tensor,
        *,
        eps_low: float,
        eps_high: float,
        dual_clip: float | None,
    ) -> PolicyLossOutput: ...


POLICY_LOSSES: Registry[PolicyLossFn] = Registry("policy loss", "algorithm.policy_loss")


def register_policy_loss(name: str) -> Callable[[PolicyLossFn], PolicyLossFn]:
    """Decorator: make ``fn`` available as ``algorithm.policy_loss: name`` (see ``examples/custom_loss.py``)."""
    return POLICY_LOSSES.register(name)


def _masked_log_ratio(logprobs: Tensor, old_logprobs: Tensor, mask: Tensor) -> Tensor:
    """log π − log π_old on-mask, 0 off-mask ([B, L]; differentiable in ``logprobs``)."""
    return torch.where(mask, logprobs - old_logprobs, 0.0)


def _clipped_surrogate(
    ratio: Tensor, advantages: Tensor, mask: Tensor, eps_low: float, eps_high: float, dual_clip: float | None
) -> PolicyLossOutput:
    """PPO's pessimistic clipped loss for any per-token ratio [B, L] and advantages [B, 1].

    loss = max(−A·r, −A·clip(r, 1−eps_low, 1+eps_high)) (DAPO clip-higher when eps_high ≠ eps_low);
    dual clip (Ye et al. 2020, "Mastering Complex Control in MOBA Games with Deep RL"), c > 1: for A < 0 the loss
    is additionally capped, loss = min(loss, −c·A), so one huge ratio on a bad token cannot dominate the step.
    """
    unclipped = -advantages * ratio
    clipped_loss = -advantages * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    loss = torch.maximum(unclipped, clipped_loss)
    clipped = clipped_loss > unclipped
    if dual_clip is not None:
        if dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
        cap = -dual_clip * advantages
        capped = (advantages < 0) & (loss > cap)
        loss = torch.where(capped, cap, loss)
        clipped = clipped | capped
    return PolicyLossOutput(
        per_token_loss=torch.where(mask, loss, 0.0),
        clipped=(clipped & mask).to(ratio.dtype),
        ratio=ratio.detach(),
    )


@register_policy_loss("ppo")
def ppo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    loss_mask: Tensor,
    *,
    eps_low: float,
    eps_high: float,
    dual_clip: float | None,
) -> PolicyLossOutput:
    """PPO / GRPO token-level clipped loss (Schulman et al. 2017), r_t = exp(log π_t − log π_old,t).

    loss_t = max(−A·r_t, −A·clip(r_t, 1−eps_low, 1+eps_high)),
    optionally dual-clipped (see ``_clipped_surrogate``).
    """
    mask = loss_mask > 0
    ratio = _masked_log_ratio(logprobs, old_logprobs, mask).exp()
    return _clipped_surrogate(ratio, advantages[:, None], mask, eps_low, eps_high, dual_clip)


@register_policy_loss("gspo")
def gspo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    loss_mask: Tensor,
    *,
    eps_low: float,
    eps_high: float,
    dual_clip: float | None,
) -> PolicyLossOutput:
    """GSPO (Zheng et al. 2025, "Group Sequence Policy Optimization"), in its GSPO-token form.

    Sequence ratio s_i = exp(1/|o_i| · Σ_t (log π_t − log π_old,t)) over the sequence's masked tokens.
    Per token s_i,t = sg[s_i] · exp(log π_t − sg[log π_t]): its value is s_i, its gradient flows through
    each token.
    loss_t = max(−A_i·s_i,t, −A_i·clip(s_i,t, 1−eps_low, 1+eps_high)) — the same value on every token of a
    sequence, equal to the sequence-level GSPO objective (and, aggregated with seq-mean-token-mean, its gradient).
    """
    mask = loss_mask > 0
    log_ratio = _masked_log_ratio(logprobs, old_logprobs, mask)
    lengths = mask.sum(dim=1).clamp(min=1)  # [B]; clamp: rows without completion tokens
    seq_log_ratio = log_ratio.sum(dim=1) / lengths  # [B]
    token_log_ratio = seq_log_ratio.detach()[:, None] + (logprobs - logprobs.detach())  # value: log s_i
    ratio = torch.where(mask, token_log_ratio, 0.0).exp()  # [B, L]
    return _clipped_surrogate(ratio, advantages[:, None], mask, eps_low, eps_high, dual_clip)


@register_policy_loss("cispo")
def cispo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    loss_mask: Tensor,
    *,
    eps_low: float,
    eps_high: float,
    dual_clip: float | None,
) -> PolicyLossOutput:
    """CISPO (MiniMax-M1, 2025): loss_t = −sg[clip(r_t, 1−eps_low, 1+eps_high)] · A · log π_t.

    The importance-sampling weight is clipped and detached instead of the update, so every token keeps a gradient
    (−clip(r_t)·A w.r.t. log π_t), including those a PPO clip would silence. Dual clip does not apply.
    """
    if dual_clip is not None:
        raise ValueError("dual_clip does not apply to cispo (its clipped weight carries no gradient); set it to None")
    mask = loss_mask > 0
    ratio = _masked_log_ratio(logprobs, old_logprobs, mask).exp().detach()
    weight = ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    loss = -weight * advantages[:, None] * logprobs
    return PolicyLossOutput(
        per_token_loss=torch.where(mask, loss, 0.0),
        clipped=((weight != ratio) & mask).to(ratio.dtype),
        ratio=ratio,
    )

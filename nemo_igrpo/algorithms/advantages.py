"""Group-relative advantage estimators: one scalar advantage per completion, relative to its prompt's group.

Groups are given explicitly by ``group_ids`` (arbitrary non-negative ints, in any order); they are never inferred
from tokens. Everything is vectorised over groups with ``index_add`` / ``scatter_reduce`` on a dense group index.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from nemo_igrpo.registry import Registry

# (rewards [B] float, group_ids [B] long, eps) -> advantages [B]
AdvantageFn = Callable[[Tensor, Tensor, float], Tensor]

ADVANTAGE_ESTIMATORS: Registry[AdvantageFn] = Registry("advantage estimator", "algorithm.advantage")


def register_advantage(name: str) -> Callable[[AdvantageFn], AdvantageFn]:
    """Decorator: make ``fn`` available as ``algorithm.advantage: name``."""
    return ADVANTAGE_ESTIMATORS.register(name)


def _dense_groups(group_ids: Tensor) -> tuple[Tensor, int]:
    """Map arbitrary group ids to a dense index 0..G-1 per row; returns (index [B], G)."""
    unique, index = torch.unique(group_ids, return_inverse=True)
    return index, unique.numel()


def _row_group_sum(values: Tensor, index: Tensor, num_groups: int) -> Tensor:
    """Σ of ``values`` [B] over each row's group, broadcast back to the rows -> [B]."""
    return values.new_zeros(num_groups).index_add_(0, index, values)[index]


def zero_variance_groups(rewards: Tensor, group_ids: Tensor) -> Tensor:
    """True [B] for rows whose group's finite rewards are all equal (max_g == min_g; size-1 groups included).

    Such groups carry no learning signal: DAPO's dynamic sampling drops them, and their fraction is logged.
    Exact comparison, so rounding in a mean can never make an all-equal group look informative. Non-finite rewards
    (unscorable samples) are ignored; a group with none finite has no signal either.
    """
    index, num_groups = _dense_groups(group_ids)
    finite = torch.isfinite(rewards)
    empty = rewards.new_full((num_groups,), float("nan"))
    high = empty.scatter_reduce(0, index, rewards.masked_fill(~finite, -torch.inf), reduce="amax", include_self=False)
    low = empty.scatter_reduce(0, index, rewards.masked_fill(~finite, torch.inf), reduce="amin", include_self=False)
    return (high <= low)[index]  # high < low only when nothing in the group is finite


def compute_advantages(name: str, rewards: Tensor, group_ids: Tensor, eps: float) -> Tensor:
    """The registered estimator ``name`` over the finite rewards only: a NaN/inf reward (e.g. from a user's reward)
    marks its sample unscorable: it is left out of its group's statistics and gets advantage 0."""
    estimator = ADVANTAGE_ESTIMATORS.lookup(name)
    finite = torch.isfinite(rewards)
    if bool(finite.all()):
        return estimator(rewards, group_ids, eps)
    advantages = torch.zeros_like(rewards)
    if bool(finite.any()):
        advantages[finite] = estimator(rewards[finite], group_ids[finite], eps)
    return advantages


@register_advantage("grpo")
def grpo_advantages(rewards: Tensor, group_ids: Tensor, eps: float) -> Tensor:
    """GRPO (Shao et al. 2024, DeepSeekMath): A_i = (r_i − mean_g) / (std_g + eps).

    std_g is unbiased (Bessel, n_g − 1, like ``torch.std``). Groups with std_g = 0 (all rewards equal, or a single
    member) get exactly A = 0.
    """
    index, num_groups = _dense_groups(group_ids)
    count = _row_group_sum(torch.ones_like(rewards), index, num_groups)
    centered = rewards - _row_group_sum(rewards, index, num_groups) / count
    # clamp: size-1 groups would divide by 0; they are zeroed below anyway
    std = (_row_group_sum(centered.square(), index, num_groups) / (count - 1).clamp(min=1)).sqrt()
    return (centered / (std + eps)).masked_fill(zero_variance_groups(rewards, group_ids), 0.0)


@register_advantage("drgrpo")
def drgrpo_advantages(rewards: Tensor, group_ids: Tensor, eps: float) -> Tensor:
    """Dr.GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training"): A_i = r_i − mean_g (no std division).

    ``eps`` is unused (kept for the common signature). All-equal groups give exactly 0, not rounding noise.
    """
    index, num_groups = _dense_groups(group_ids)
    count = _row_group_sum(torch.ones_like(rewards), index, num_groups)
    mean = _row_group_sum(rewards, index, num_groups) / count
    return (rewards - mean).masked_fill(zero_variance_groups(rewards, group_ids), 0.0)


@register_advantage("rloo")
def rloo_advantages(rewards: Tensor, group_ids: Tensor, eps: float) -> Tensor:
    """RLOO (Ahmadian et al. 2024, "Back to Basics"): A_i = r_i − mean_{j≠i} r_j.

    With group size n_g and sum S_g: mean_{j≠i} r_j = (S_g − r_i) / (n_g − 1).

    ``eps`` is unused. Size-1 groups (no other member to compare with) and all-equal groups get exactly 0.
    """
    index, num_groups = _dense_groups(group_ids)
    count = _row_group_sum(torch.ones_like(rewards), index, num_groups)
    others_mean = (_row_group_sum(rewards, index, num_groups) - rewards) / (count - 1).clamp(min=1)
    return (rewards - others_mean).masked_fill(zero_variance_groups(rewards, group_ids), 0.0)

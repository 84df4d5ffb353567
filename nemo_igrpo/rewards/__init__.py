"""Rewards for verifiable math: answer extraction/matching and the ``REWARDS`` registry.

Importing this package registers the built-in rewards; others register themselves with ``@register_reward``.
"""

from __future__ import annotations

from typing import Any

from nemo_igrpo.rewards.answer import (
    answers_match,
    extract_answer_tag,
    extract_boxed,
    extract_final_answer,
    normalize_answer,
    parse_rational,
)
from nemo_igrpo.rewards.base import REWARDS, Reward, RewardOutput, register_reward
from nemo_igrpo.rewards.match import BoxedMatchReward
from nemo_igrpo.rewards.math_verify_reward import MathVerifyReward
from nemo_igrpo.rewards.pool import GradingPool


def build_reward(name: str, **kwargs: Any) -> Reward:
    """Instantiate the reward registered as ``name`` with ``kwargs``."""
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; registered: {sorted(REWARDS)}")
    return REWARDS[name](**kwargs)


__all__ = [
    "REWARDS",
    "BoxedMatchReward",
    "GradingPool",
    "MathVerifyReward",
    "Reward",
    "RewardOutput",
    "answers_match",
    "build_reward",
    "extract_answer_tag",
    "extract_boxed",
    "extract_final_answer",
    "normalize_answer",
    "parse_rational",
    "register_reward",
]

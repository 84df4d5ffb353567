"""Rewards for verifiable math: answer extraction/matching and the ``REWARDS`` registry.

Importing this package registers the built-in rewards; others register themselves with ``@register_reward``.
"""

from __future__ import annotations

from typing import Any

from nemo_igrpo.rewards.answer import (
    answers_match,
    extract_answer,
    extract_answer_tag,
    extract_boxed,
    extract_boxed_answer,
    extract_final_answer,
    normalize_answer,
    parse_rational,
)
from nemo_igrpo.rewards.base import REWARDS, ChatModel, Reward, RewardContext, RewardOutput, register_reward
from nemo_igrpo.rewards.format import FormatReward
from nemo_igrpo.rewards.judge import JudgeReward
from nemo_igrpo.rewards.match import BoxedMatchReward
from nemo_igrpo.rewards.math_verify_reward import MathVerifyReward
from nemo_igrpo.rewards.pool import GradingPool
from nemo_igrpo.rewards.weighted import WeightedReward


def build_reward(name: str, **kwargs: Any) -> Reward:
    """Instantiate the reward registered as ``name`` with ``kwargs``."""
    return REWARDS.lookup(name)(**kwargs)


__all__ = [
    "REWARDS",
    "BoxedMatchReward",
    "GradingPool",
    "MathVerifyReward",
    "Reward",
    "RewardOutput",
    "answers_match",
    "build_reward",
    "ChatModel",
    "RewardContext",
    "FormatReward",
    "JudgeReward",
    "WeightedReward",
    "extract_answer",
    "extract_answer_tag",
    "extract_boxed",
    "extract_boxed_answer",
    "extract_final_answer",
    "normalize_answer",
    "parse_rational",
    "register_reward",
]

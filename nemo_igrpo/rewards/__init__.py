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
from nemo_igrpo.rewards.base import REWARDS, Reward, RewardOutput, register_reward
from nemo_igrpo.rewards.format import FormatReward
from nemo_igrpo.rewards.judge import JudgeReward
from nemo_igrpo.rewards.match import BoxedMatchReward
from nemo_igrpo.rewards.math_verify_reward import MathVerifyReward
from nemo_igrpo.rewards.pool import GradingPool
from nemo_igrpo.rewards.weighted import WeightedReward


def build_reward(name: str, **kwargs: Any) -> Reward:
    """Instantiate the reward registered as ``name`` with ``kwargs``."""
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; registered: {sorted(REWARDS)}")
    return REWARDS[name](**kwargs)


def build_training_reward(config: Any) -> Reward:
    """The reward of a run (``nemo_igrpo.config.Config``): one registered reward, or the weighted sum of
    ``reward.components`` (name → weight), e.g. the paper's ``{math_verify: 1.0, format: 1.0}``."""
    parts = {name: (REWARDS[name].from_config(config), weight) for name, weight in config.reward.components.items()}
    if len(parts) == 1:
        ((reward, weight),) = parts.values()
        if weight == 1.0:
            return reward
    return WeightedReward(parts)


__all__ = [
    "REWARDS",
    "BoxedMatchReward",
    "GradingPool",
    "MathVerifyReward",
    "Reward",
    "RewardOutput",
    "answers_match",
    "build_reward",
    "build_training_reward",
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

#!/usr/bin/env python
"""Train with a reward of your own: register it under a name, then select it in ``reward.components``.

This one adds a brevity bonus to exact-answer matching (a shaped reward: correct and short beats correct and
long). It runs the embedded demo for a few steps:

    python examples/custom_reward.py trainer.max_steps=5 trainer.output_dir=runs/custom_reward
"""

from __future__ import annotations

import sys

from nemo_igrpo.cli import default_config_path
from nemo_igrpo.config import load_config
from nemo_igrpo.rewards import BoxedMatchReward, Reward, RewardOutput, register_reward
from nemo_igrpo.trainer import train


@register_reward("boxed_match_brief")
class BriefBoxedMatch(Reward):
    """1 for a correct boxed answer, minus 0.01 per character beyond 40 (never below 0.5 when correct)."""

    def __init__(self, extract: str = "boxed"):
        self.match = BoxedMatchReward(extract=extract)

    def __call__(self, completions: list[str], answers: list[str]) -> RewardOutput:
        accuracy = self.match(completions, answers).scores
        brevity = [max(0.5, 1.0 - 0.01 * max(0, len(text) - 40)) for text in completions]
        scores = [a * b for a, b in zip(accuracy, brevity)]
        return RewardOutput(scores=scores, components={"accuracy": accuracy, "brevity": brevity})


if __name__ == "__main__":
    config = load_config(default_config_path(), ["reward.components={boxed_match_brief: 1.0}", *sys.argv[1:]])
    train(config)

"""The paper's format reward: the completion is ``<think>…</think><answer>…</answer>`` and nothing else."""

from __future__ import annotations

import re

from nemo_igrpo.rewards.base import Reward, RewardOutput, register_reward

# One think block then one answer block, whitespace around them allowed; the blocks themselves may not nest or
# repeat (a second <think> or <answer> inside makes the match fail), so the model cannot pad its way to the bonus.
_TEMPLATE = re.compile(
    r"\s*<think>(?:(?!</?think>|</?answer>).)*</think>\s*<answer>(?:(?!</?think>|</?answer>).)*</answer>\s*",
    re.DOTALL,
)


@register_reward("format")
class FormatReward(Reward):
    """1.0 when the completion follows the paper's ``<think>…</think><answer>…</answer>`` template, else 0.0."""

    def __call__(self, completions: list[str], answers: list[str]) -> RewardOutput:
        scores = [1.0 if _TEMPLATE.fullmatch(text) else 0.0 for text in completions]
        return RewardOutput(scores=scores, components={"format": list(scores)})

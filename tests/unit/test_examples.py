"""The examples stay runnable: the custom reward example registers a reward that the trainer can select."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from nemo_igrpo.config import load_config
from nemo_igrpo.rewards import REWARDS, build_reward

REPO = Path(__file__).resolve().parents[2]


def test_custom_reward_example():
    spec = importlib.util.spec_from_file_location("custom_reward", REPO / "examples" / "custom_reward.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert REWARDS["boxed_match_brief"] is module.BriefBoxedMatch

    reward = build_reward("boxed_match_brief", extract="boxed")
    long_right = "x" * 60 + r" \boxed{7}"  # 70 characters: 30 over → 1 − 0.30
    out = reward([r"\boxed{7}", long_right, r"\boxed{8}"], ["7", "7", "7"])
    assert out.scores == [1.0, 0.7, 0.0]
    assert out.components["accuracy"] == [1.0, 1.0, 0.0]
    config = load_config(None, ["reward.components={boxed_match_brief: 1.0}"])
    assert config.reward.components == {"boxed_match_brief": 1.0}

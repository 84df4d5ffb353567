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


def test_custom_loss_example_is_one_function_that_config_and_the_loss_accept():
    import pytest
    import torch

    from nemo_igrpo.algorithms import POLICY_LOSSES, LossNormalizer
    from nemo_igrpo.algorithms.batch import RolloutBatch, TokenStats
    from nemo_igrpo.algorithms.loss import LossSpec
    from nemo_igrpo.config import ConfigError

    with pytest.raises(ConfigError, match="algorithm.policy_loss: unknown policy loss 'reinforce'"):
        load_config(None, ["algorithm.policy_loss=reinforce"])  # not registered until the example is imported
    spec = importlib.util.spec_from_file_location("custom_loss", REPO / "examples" / "custom_loss.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        assert POLICY_LOSSES["reinforce"] is module.reinforce_loss
        config = load_config(None, ["algorithm.policy_loss=reinforce"])
        assert config.algorithm.policy_loss == "reinforce"

        # On-policy (π_old = sg[π]): loss = token-mean of −A, and d loss / d log π_t = −A_i / (number of tokens).
        mask = torch.tensor([[0.0, 1.0, 1.0], [0.0, 1.0, 0.0]])
        logprobs = torch.tensor([[0.0, -1.0, -2.0], [0.0, -0.5, -3.0]], requires_grad=True)
        batch = RolloutBatch(input_ids=torch.zeros(2, 3, dtype=torch.long), attention_mask=torch.ones(2, 3),
                             loss_mask=mask, advantages=torch.tensor([1.0, -2.0]), group_ids=torch.tensor([0, 0]),
                             gen_logprobs=logprobs.detach().clone())
        spec = LossSpec(policy_loss="reinforce", eps_low=0.2, eps_high=0.2, dual_clip=None, loss_agg="token-mean",
                        kl_coef=0.0, kl_estimator="k3", kl_clamp=None, importance_correction="none",
                        importance_cap=2.0, max_tokens=3)
        loss_fn = spec.build(LossNormalizer.from_mask(mask, 3))
        loss, metrics = loss_fn(TokenStats(logprobs=logprobs, entropy=torch.zeros(2, 3)), batch)
        loss.backward()
        assert loss.item() == pytest.approx((-1.0 - 1.0 + 2.0) / 3)  # exact in binary: 0.0
        # float32 ratios of exp(0): the only rounding is in 1/3 (relative 1e-7)
        expected = torch.tensor([[0.0, -1 / 3, -1 / 3], [0.0, 2 / 3, 0.0]])
        torch.testing.assert_close(logprobs.grad, expected, rtol=1e-6, atol=0.0)
        assert metrics["ratio_mean"].item() == pytest.approx(1.0)
    finally:
        del POLICY_LOSSES["reinforce"]

"""Generator/trainer mismatch metrics and truncated importance sampling in the loss, against hand-computed numbers.

Two sequences; loss-mask positions and log-probs are chosen so every quantity can be written out by hand:
    row 0: completion tokens at columns 1..3, Δ = log π_trainer − log π_gen = (0.1, −0.5, 0)
    row 1: completion tokens at columns 2..3, Δ = (−0.5, 0.7)
"""

from __future__ import annotations

import math

import pytest
import torch

from nemo_igrpo.algorithms.aggregation import AGGREGATIONS, LossNormalizer
from nemo_igrpo.algorithms.batch import RolloutBatch
from nemo_igrpo.algorithms.loss import make_loss_fn, truncated_is_weight
from nemo_igrpo.policy.base import TokenStats

MASK = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]], dtype=torch.float64)
TRAINER = torch.tensor([[0.0, -1.0, -2.0, -0.5], [0.0, 0.0, -1.5, -0.2]], dtype=torch.float64)
GEN = torch.tensor([[0.0, -1.1, -1.5, -0.5], [0.0, 0.0, -1.0, -0.9]], dtype=torch.float64)
ADVANTAGES = torch.tensor([1.0, -2.0], dtype=torch.float64)
E = math.exp


def _batch() -> RolloutBatch:
    return RolloutBatch(input_ids=torch.zeros(2, 4, dtype=torch.long), attention_mask=torch.ones(2, 4, dtype=torch.long),
                        loss_mask=MASK, advantages=ADVANTAGES, group_ids=torch.tensor([0, 0]), gen_logprobs=GEN)


def _loss_fn(correction: str, cap: float, agg: str = "token-mean"):
    return make_loss_fn(policy_loss="ppo", eps_low=0.2, eps_high=0.2, dual_clip=None, loss_agg=agg, kl_coef=0.0,
                        kl_estimator="k3", kl_clamp=None, normalizer=LossNormalizer.from_mask(MASK, 4),
                        importance_correction=correction, importance_cap=cap)


def _run(correction: str, cap: float = 2.0):
    logprobs = TRAINER.clone().requires_grad_(True)
    loss, metrics = _loss_fn(correction, cap)(TokenStats(logprobs, torch.zeros_like(TRAINER)), _batch())
    loss.backward()
    return loss.item(), {k: v.item() for k, v in metrics.items()}, logprobs.grad


def test_mismatch_metrics_match_hand_computed_values():
    _, metrics, _ = _run("none")
    # token_prob_error: mean over the 5 completion tokens of exp|Δ|
    assert metrics["mismatch/token_prob_error"] == pytest.approx((E(0.1) + E(0.5) + 1 + E(0.5) + E(0.7)) / 5, abs=1e-12)
    # seq_kl: mean over the 2 sequences of Σ_t (e^Δ − 1 − Δ)
    k3 = lambda d: E(d) - 1 - d
    assert metrics["mismatch/seq_kl"] == pytest.approx((k3(0.1) + k3(-0.5) + k3(0) + k3(-0.5) + k3(0.7)) / 2,
                                                       abs=1e-12)
    assert "mismatch/is_weight_mean" not in metrics


def test_identical_log_probs_give_the_neutral_values():
    logprobs = TRAINER.clone()
    batch = _batch()
    batch.gen_logprobs = TRAINER * MASK + 5.0 * (1 - MASK)  # padding differs arbitrarily: must not count
    _, metrics = _loss_fn("token", 2.0)(TokenStats(logprobs, torch.zeros_like(TRAINER)), batch)
    assert metrics["mismatch/token_prob_error"].item() == 1.0
    assert metrics["mismatch/seq_kl"].item() == 0.0
    assert metrics["mismatch/is_weight_mean"].item() == 1.0


def test_token_level_truncated_is_weights_the_loss_and_its_gradient():
    plain_loss, _, plain_grad = _run("none")
    loss, metrics, grad = _run("token", cap=1.5)
    # on-policy PPO: ratio 1, so per-token loss −A_i·w_t; token-mean over 5 tokens
    weights = [[E(0.1), E(-0.5), 1.0], [E(-0.5), 1.5]]  # e^0.7 ≈ 2.01 is capped at 1.5
    assert plain_loss == pytest.approx((-1.0 * 3 + 2.0 * 2) / 5, abs=1e-12)
    assert loss == pytest.approx((-1.0 * sum(weights[0]) + 2.0 * sum(weights[1])) / 5, abs=1e-12)
    expected_grad = torch.zeros(2, 4, dtype=torch.float64)
    expected_grad[0, 1:] = torch.tensor(weights[0], dtype=torch.float64) * -1.0 / 5
    expected_grad[1, 2:] = torch.tensor(weights[1], dtype=torch.float64) * 2.0 / 5
    torch.testing.assert_close(grad, expected_grad, atol=1e-12, rtol=0)
    torch.testing.assert_close(plain_grad, (-ADVANTAGES[:, None] * MASK / 5), atol=1e-12, rtol=0)
    assert metrics["mismatch/is_weight_mean"] == pytest.approx((sum(weights[0]) + sum(weights[1])) / 5, abs=1e-12)
    assert metrics["mismatch/is_capped_fraction"] == pytest.approx(1 / 5, abs=1e-12)
    assert metrics["policy_loss"] == pytest.approx(loss, abs=1e-12)


def test_sequence_level_truncated_is_uses_one_capped_weight_per_sequence():
    loss, metrics, grad = _run("sequence", cap=1.1)
    w0, w1 = E(0.1 - 0.5 + 0.0), min(E(-0.5 + 0.7), 1.1)  # e^0.2 ≈ 1.22 is capped at 1.1
    assert loss == pytest.approx((-1.0 * 3 * w0 + 2.0 * 2 * w1) / 5, abs=1e-12)
    assert metrics["mismatch/is_capped_fraction"] == pytest.approx(2 / 5, abs=1e-12)  # both tokens of row 1
    torch.testing.assert_close(grad[1, 2:], torch.full((2,), 2.0 * w1 / 5, dtype=torch.float64), atol=1e-12, rtol=0)


def test_weights_never_overflow_and_padding_gets_weight_one():
    delta = torch.tensor([[0.0, 500.0, -500.0]], dtype=torch.float32)
    mask = torch.tensor([[0.0, 1.0, 1.0]])
    weight, capped = truncated_is_weight(delta, mask, "token", 3.0)
    assert weight.tolist()[0] == pytest.approx([1.0, 3.0, 0.0])
    assert capped.tolist() == [[0.0, 1.0, 0.0]]
    weight, _ = truncated_is_weight(delta, mask, "sequence", 3.0)
    assert torch.isfinite(weight).all()


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="unknown importance correction 'tokens'"):
        _loss_fn("tokens", 2.0)
    with pytest.raises(ValueError, match="importance_cap must be > 0"):
        _loss_fn("token", 0.0)


@pytest.mark.parametrize("correction", ["token", "sequence"])
@pytest.mark.parametrize("agg", AGGREGATIONS)
def test_micro_batches_sum_to_the_full_batch_with_correction(correction, agg):
    """Like tests/unit/test_microbatch_invariance.py, with random generator log-probs and the correction on."""
    gen = torch.Generator().manual_seed(0)
    rows, length = 6, 7
    mask = torch.zeros(rows, length, dtype=torch.float64)
    for i in range(rows):
        mask[i, 1 + i % 3: length - i % 2] = 1.0
    trainer = -torch.rand(rows, length, generator=gen, dtype=torch.float64) * 3
    batch = RolloutBatch(input_ids=torch.zeros(rows, length, dtype=torch.long),
                         attention_mask=torch.ones(rows, length, dtype=torch.long), loss_mask=mask,
                         advantages=torch.randn(rows, generator=gen, dtype=torch.float64),
                         group_ids=torch.arange(rows) // 3,
                         gen_logprobs=trainer + 0.5 * torch.randn(rows, length, generator=gen, dtype=torch.float64))
    loss_fn = make_loss_fn(policy_loss="ppo", eps_low=0.2, eps_high=0.2, dual_clip=None, loss_agg=agg, kl_coef=0.0,
                           kl_estimator="k3", kl_clamp=None, normalizer=LossNormalizer.from_mask(mask, length),
                           importance_correction=correction, importance_cap=1.5)

    def run(parts):
        logprobs = trainer.clone().requires_grad_(True)
        total, metrics = 0.0, {}
        for index in parts:
            part = batch.select(index)
            loss, part_metrics = loss_fn(TokenStats(logprobs[index], torch.zeros_like(logprobs[index])), part)
            loss.backward()
            total += loss.item()
            for key, value in part_metrics.items():
                metrics[key] = metrics.get(key, 0.0) + value.item()
        return total, metrics, logprobs.grad

    full = run([slice(0, rows)])
    micro = run([slice(0, 2), slice(2, 4), slice(4, 6)])
    assert micro[0] == pytest.approx(full[0], abs=1e-12)
    torch.testing.assert_close(micro[2], full[2], atol=1e-12, rtol=0)
    assert micro[1] == pytest.approx(full[1], abs=1e-12)
    assert full[1]["mismatch/is_capped_fraction"] > 0  # the cap is part of what is compared


def test_config_rejects_a_non_positive_cap_and_unknown_levels():
    from nemo_igrpo.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="algorithm.importance_cap: must be > 0"):
        load_config(None, ["algorithm.importance_cap=0"])
    with pytest.raises(ConfigError, match="algorithm.importance_correction: unknown importance correction 'tokens'"):
        load_config(None, ["algorithm.importance_correction=tokens"])

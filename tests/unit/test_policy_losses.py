import math

import pytest
import torch

from nemo_igrpo.algorithms.aggregation import LossNormalizer, aggregate
from nemo_igrpo.algorithms.batch import RolloutBatch
from nemo_igrpo.algorithms.loss import make_loss_fn
from nemo_igrpo.algorithms.policy_losses import POLICY_LOSSES
from nemo_igrpo.policy.base import TokenStats

F64 = dict(dtype=torch.float64)


def _lp_with_ratios(ratios, old):
    """log π such that exp(log π − old) = ratios (old given)."""
    return (torch.tensor(ratios, **F64).log() + old).requires_grad_(True)


# ---------------------------------------------------------------- ppo
# old = 0 everywhere, so ratio = exp(lp). Row 0: A = +2, ratios [1.5, 1.25, 0.5] + a padding slot holding lp = 100.
# Row 1: A = -1, ratios [1.5, 0.7, 5.0, 0.9].
PPO_OLD = torch.zeros(2, 4, **F64)
PPO_RATIOS = [[1.5, 1.25, 0.5, math.exp(100.0)], [1.5, 0.7, 5.0, 0.9]]
PPO_MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]], **F64)
PPO_ADV = torch.tensor([2.0, -1.0], **F64)


def _ppo(eps_low=0.2, eps_high=0.28, dual_clip=None):
    lp = _lp_with_ratios(PPO_RATIOS, PPO_OLD)
    out = POLICY_LOSSES["ppo"](lp, PPO_OLD, PPO_ADV, PPO_MASK, eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip)
    out.per_token_loss.sum().backward()
    return out, lp.grad


def test_ppo_asymmetric_clip_values_and_gradients():
    out, grad = _ppo()
    # row 0 (A=+2, clip range [0.8, 1.28]): loss = max(−2r, −2·clip(r))
    #   r=1.5  → max(−3.0, −2.56) = −2.56  clipped, grad 0
    #   r=1.25 → −2.5 (inside the range)   grad −A·r = −2.5
    #   r=0.5  → max(−1.0, −1.6) = −1.0    not clipped (pessimistic), grad −1.0
    # row 1 (A=−1): loss = max(r, clip(r))
    #   r=1.5 → 1.5 (not clipped, grad 1.5); r=0.7 → 0.8 (clipped, grad 0)
    #   r=5 → 5 (grad 5); r=0.9 → 0.9 (grad 0.9)
    expected = torch.tensor([[-2.56, -2.5, -1.0, 0.0], [1.5, 0.8, 5.0, 0.9]], **F64)
    torch.testing.assert_close(out.per_token_loss, expected)
    torch.testing.assert_close(out.clipped, torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]], **F64))
    torch.testing.assert_close(grad, torch.tensor([[0.0, -2.5, -1.0, 0.0], [1.5, 0.0, 5.0, 0.9]], **F64))
    # reported ratio: detached, 1 on the padding slot (never exp(100))
    assert not out.ratio.requires_grad
    torch.testing.assert_close(out.ratio, torch.tensor([[1.5, 1.25, 0.5, 1.0], [1.5, 0.7, 5.0, 0.9]], **F64))


def test_ppo_symmetric_clip_clips_what_clip_higher_keeps():
    # eps_high 0.2: r=1.25 with A=+2 → max(−2.5, −2.4) = −2.4, now clipped (clip-higher's 0.28 kept it)
    out, _ = _ppo(eps_low=0.2, eps_high=0.2)
    assert out.per_token_loss[0, 1].item() == pytest.approx(-2.4)
    assert out.clipped[0, 1].item() == 1.0


def test_ppo_dual_clip():
    # c = 3: for A=−1 the loss is capped at −c·A = 3 → r=5 gives 3 (clipped, grad 0); r=1.5 stays 1.5.
    # A>0 rows are untouched (row 0 identical to the plain case).
    out, grad = _ppo(dual_clip=3.0)
    expected = torch.tensor([[-2.56, -2.5, -1.0, 0.0], [1.5, 0.8, 3.0, 0.9]], **F64)
    torch.testing.assert_close(out.per_token_loss, expected)
    torch.testing.assert_close(out.clipped, torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 1.0, 0]], **F64))
    torch.testing.assert_close(grad, torch.tensor([[0.0, -2.5, -1.0, 0.0], [1.5, 0.0, 0.0, 0.9]], **F64))


def test_ppo_dual_clip_must_exceed_one():
    with pytest.raises(ValueError, match="dual_clip"):
        _ppo(dual_clip=1.0)


# ---------------------------------------------------------------- gspo
def test_gspo_sequence_ratio_values():
    # position 0 is off-mask and holds junk (lp = 50). Rows' masked log-ratios:
    #   row 0: [0.1, 0.3]        → mean 0.2,  s = e^0.2  = 1.22140
    #          A=+1, range [0.9, 1.28] → loss −1.22140, unclipped
    #   row 1: [-0.5, -0.2, 0.1] → mean −0.2, s = e^-0.2 = 0.81873
    #          A=−2 → max(2·0.81873 = 1.63746, 2·0.9 = 1.8) = 1.8, clipped
    old = torch.tensor([[0.0, -1.0, -2.0, -1.0], [0.0, -1.0, -1.0, -1.0]], **F64)
    log_ratio = torch.tensor([[50.0, 0.1, 0.3, 0.0], [50.0, -0.5, -0.2, 0.1]], **F64)
    mask = torch.tensor([[0.0, 1, 1, 0], [0, 1, 1, 1]], **F64)
    lp = (old + log_ratio).requires_grad_(True)
    out = POLICY_LOSSES["gspo"](
        lp, old, torch.tensor([1.0, -2.0], **F64), mask, eps_low=0.1, eps_high=0.28, dual_clip=None
    )
    s0, s1 = math.exp(0.2), math.exp(-0.2)
    torch.testing.assert_close(out.ratio, torch.tensor([[1.0, s0, s0, 1.0], [1.0, s1, s1, s1]], **F64))
    torch.testing.assert_close(out.per_token_loss, torch.tensor([[0.0, -s0, -s0, 0.0], [0.0, 1.8, 1.8, 1.8]], **F64))
    torch.testing.assert_close(out.clipped, torch.tensor([[0.0, 0, 0, 0], [0, 1, 1, 1]], **F64))
    assert s0 == pytest.approx(1.22140, abs=1e-5)


def test_gspo_equals_sequence_level_objective_value_and_gradient():
    gen = torch.Generator().manual_seed(0)
    batch, length = 6, 7
    lengths = torch.tensor([6, 3, 1, 5, 2, 4])
    mask = (torch.arange(length)[None, :].ge(1) & torch.arange(length)[None, :].le(lengths[:, None])).double()
    old = -torch.rand(batch, length, generator=gen, **F64) * 3
    lp0 = old + 0.4 * torch.randn(batch, length, generator=gen, **F64)
    adv = torch.tensor([1.0, -1.0, 2.0, -0.5, 1.5, -2.0], **F64)
    eps_low, eps_high = 0.1, 0.15
    norm = LossNormalizer.from_mask(mask, max_tokens=length)

    # GSPO-token, aggregated per sequence
    lp = lp0.clone().requires_grad_(True)
    out = POLICY_LOSSES["gspo"](lp, old, adv, mask, eps_low=eps_low, eps_high=eps_high, dual_clip=None)
    token_form = aggregate(out.per_token_loss, mask, "seq-mean-token-mean", norm)
    token_form.backward()

    # sequence-level GSPO written directly:
    #   s_i = exp(Σ_t m(lp − old) / |o_i|),  J = mean_i max(−A s_i, −A clip(s_i))
    lp_seq = lp0.clone().requires_grad_(True)
    s = (((lp_seq - old) * mask).sum(1) / mask.sum(1)).exp()
    seq_loss = torch.maximum(-adv * s, -adv * s.clamp(1 - eps_low, 1 + eps_high)).mean()
    seq_loss.backward()

    clipped_rows = out.clipped.amax(dim=1)
    assert 0 < clipped_rows.sum() < batch  # both regimes are exercised
    torch.testing.assert_close(token_form, seq_loss)
    torch.testing.assert_close(lp.grad, lp_seq.grad)


# ---------------------------------------------------------------- cispo
def test_cispo_values_and_gradient_is_minus_clipped_ratio_times_advantage():
    # ratios [1.5, 0.5, 1.1], A = +2, range [0.8, 1.28] → w = sg[clip(r)] = [1.28, 0.8, 1.1]
    # lp = [-0.5, -1, -2]: loss = −w·A·lp = [1.28, 1.6, 4.4]; d loss / d lp = −w·A = [−2.56, −1.6, −2.2]
    # (the clipped tokens 0 and 1 still get gradient, unlike PPO)
    lp0 = torch.tensor([[-0.5, -1.0, -2.0, 7.0]], **F64)  # last slot is padding
    ratios = torch.tensor([[1.5, 0.5, 1.1, 1.0]], **F64)
    old = lp0 - ratios.log()
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]], **F64)
    lp = lp0.clone().requires_grad_(True)
    out = POLICY_LOSSES["cispo"](lp, old, torch.tensor([2.0], **F64), mask, eps_low=0.2, eps_high=0.28, dual_clip=None)
    out.per_token_loss.sum().backward()
    torch.testing.assert_close(out.per_token_loss, torch.tensor([[1.28, 1.6, 4.4, 0.0]], **F64))
    torch.testing.assert_close(lp.grad, torch.tensor([[-2.56, -1.6, -2.2, 0.0]], **F64))
    torch.testing.assert_close(out.clipped, torch.tensor([[1.0, 1.0, 0.0, 0.0]], **F64))
    torch.testing.assert_close(out.ratio, ratios)


def test_cispo_rejects_dual_clip():
    z = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="dual_clip"):
        POLICY_LOSSES["cispo"](z, z, torch.ones(1), torch.ones(1, 2), eps_low=0.2, eps_high=0.2, dual_clip=3.0)


# ---------------------------------------------------------------- make_loss_fn
# One micro-batch of a step whose normalizer counts twice as many tokens (6) as this micro-batch holds (3).
#   logprobs [[0, -1, -2], [0, -0.5, -3]], mask [[0,1,1],[0,1,0]], A = [1, -4]
#   on-policy: ratio 1 → policy loss per token = −A: row 0 [−1, −1], row 1 [4]; token-mean = 2/6 = 0.33333
#   ref [[0, -1.5, -1], [0, -0.5, 1000 (padding)]] → k1 = lp − ref = [0.5, −1], [0]
#   kl token-mean = −0.5/6 = −0.08333
#   entropy on mask: 1, 2, 3 → 6/6 = 1
NORM = LossNormalizer(num_tokens=6.0, num_sequences=4.0, max_tokens=3)


def _micro_batch(ref=True, old=None):
    mask = torch.tensor([[0.0, 1, 1], [0, 1, 0]], **F64)
    return RolloutBatch(
        input_ids=torch.zeros(2, 3, dtype=torch.long),
        attention_mask=torch.ones(2, 3, dtype=torch.long),
        loss_mask=mask,
        advantages=torch.tensor([1.0, -4.0], **F64),
        group_ids=torch.tensor([0, 0]),
        gen_logprobs=torch.zeros(2, 3, **F64),
        old_logprobs=old,
        ref_logprobs=torch.tensor([[0.0, -1.5, -1.0], [0.0, -0.5, 1000.0]], **F64) if ref else None,
    )


def _stats():
    lp = torch.tensor([[0.0, -1.0, -2.0], [0.0, -0.5, -3.0]], **F64, requires_grad=True)
    return TokenStats(logprobs=lp, entropy=torch.tensor([[9.0, 1.0, 2.0], [9.0, 3.0, 9.0]], **F64))


def _make(kl_coef, kl_estimator="k1", **kw):
    args = dict(policy_loss="ppo", eps_low=0.2, eps_high=0.28, dual_clip=None, loss_agg="token-mean",
                importance_correction="none", importance_cap=2.0)
    args.update(kw)
    return make_loss_fn(**args, kl_coef=kl_coef, kl_estimator=kl_estimator, kl_clamp=None, normalizer=NORM)


def test_loss_fn_without_kl():
    stats = _stats()
    loss, metrics = _make(0.0)(stats, _micro_batch(ref=False))  # no ref needed when kl_coef == 0
    loss.backward()
    assert loss.item() == pytest.approx(2 / 6)
    # on-policy gradient of −A·r/6 with r = exp(lp − sg[lp]): −A/6 → row 0: −1/6, row 1: 4/6
    torch.testing.assert_close(stats.logprobs.grad, torch.tensor([[0.0, -1 / 6, -1 / 6], [0.0, 4 / 6, 0.0]], **F64))
    expected = {"policy_loss": 2 / 6, "kl": 0.0, "clip_fraction": 0.0, "entropy": 1.0, "ratio_mean": 3 / 6,
                # generator log-probs 0: Δ = lp − 0 = [−1, −2], [−0.5] (see tests/unit/test_importance_correction.py)
                "mismatch/token_prob_error": (math.e + math.e ** 2 + math.e ** 0.5) / 6,
                "mismatch/seq_kl": (math.exp(-1) + math.exp(-2) + 1 + math.exp(-0.5) - 0.5) / 4}
    assert {k: pytest.approx(v.item()) for k, v in metrics.items()} == expected
    assert all(not v.requires_grad for v in metrics.values())


def test_loss_fn_with_kl():
    # loss = 0.33333 + 0.5 · (−0.08333) = 0.29167; gradient adds kl_coef · d k1/d lp / 6 = 0.5/6 per masked token
    stats = _stats()
    loss, metrics = _make(0.5)(stats, _micro_batch())
    loss.backward()
    assert loss.item() == pytest.approx(2 / 6 - 0.5 * 0.5 / 6)
    assert metrics["kl"].item() == pytest.approx(-0.5 / 6)
    assert metrics["policy_loss"].item() == pytest.approx(2 / 6)
    torch.testing.assert_close(
        stats.logprobs.grad, torch.tensor([[0.0, -0.5 / 6, -0.5 / 6], [0.0, 4.5 / 6, 0.0]], **F64)
    )


def test_loss_fn_kl_ignores_padding():
    # k3 on the padding slot would be exp(1000 − (−3)) = inf; only masked tokens count:
    #   k3(d) = e^−d − 1 + d for d = [0.5, −1, 0] → 0.10653 + 0.71828 + 0 = 0.82481 → /6 = 0.13747
    loss, metrics = _make(0.5, kl_estimator="k3")(_stats(), _micro_batch())
    assert torch.isfinite(loss)
    assert metrics["kl"].item() == pytest.approx((math.exp(-0.5) - 0.5 + math.e - 2) / 6)


def test_loss_fn_uses_old_logprobs_when_given():
    # stale π_old at row 0, t=1: ratio 1.5 with A=+1 → max(−1.5, −1.28) = −1.28, clipped
    # policy loss = (−1.28 − 1 + 4)/6 = 0.28667; clip_fraction 1/6; ratio_mean (1.5 + 1 + 1)/6
    old = torch.tensor([[0.0, -1.0 - math.log(1.5), -2.0], [0.0, -0.5, -3.0]], **F64)
    loss, metrics = _make(0.0)(_stats(), _micro_batch(old=old))
    assert loss.item() == pytest.approx(1.72 / 6)
    assert metrics["clip_fraction"].item() == pytest.approx(1 / 6)
    assert metrics["ratio_mean"].item() == pytest.approx(3.5 / 6)


def test_loss_fn_errors():
    with pytest.raises(ValueError, match="ref_logprobs"):
        _make(0.5)(_stats(), _micro_batch(ref=False))
    with pytest.raises(ValueError, match="ppo"):
        _make(0.0, policy_loss="reinforce")
    with pytest.raises(ValueError, match="token-mean"):
        _make(0.0, loss_agg="sum")
    with pytest.raises(ValueError, match="k1"):
        _make(0.0, kl_estimator="k9")

import math

import pytest
import torch

from nemo_igrpo.algorithms.kl import kl_penalty

# log π = [-1.0, -2.0], log π_ref = [-1.5, -1.0]  →  d = log π − log π_ref = [0.5, -1.0]
LP = torch.tensor([-1.0, -2.0], dtype=torch.float64)
REF = torch.tensor([-1.5, -1.0], dtype=torch.float64)


def test_k1():
    torch.testing.assert_close(kl_penalty(LP, REF, "k1", None), torch.tensor([0.5, -1.0], dtype=torch.float64))


def test_k2():
    # ½ d² = [0.125, 0.5]
    torch.testing.assert_close(kl_penalty(LP, REF, "k2", None), torch.tensor([0.125, 0.5], dtype=torch.float64))


def test_k3():
    # x = log π_ref − log π = [-0.5, 1.0]
    # eˣ − 1 − x = [0.60653 − 1 + 0.5, 2.71828 − 1 − 1] = [0.10653, 0.71828]
    expected = torch.tensor([math.exp(-0.5) - 0.5, math.e - 2.0], dtype=torch.float64)
    torch.testing.assert_close(kl_penalty(LP, REF, "k3", None), expected)
    torch.testing.assert_close(expected, torch.tensor([0.10653, 0.71828], dtype=torch.float64), atol=1e-5, rtol=0)


def test_clamp_both_sides():
    # clamp 0.3: k1 [0.5, -1.0] → [0.3, -0.3]; k2 [0.125, 0.5] → [0.125, 0.3]
    #            k3 [0.10653, 0.71828] → [0.10653, 0.3]
    f64 = dict(dtype=torch.float64)
    torch.testing.assert_close(kl_penalty(LP, REF, "k1", 0.3), torch.tensor([0.3, -0.3], **f64))
    torch.testing.assert_close(kl_penalty(LP, REF, "k2", 0.3), torch.tensor([0.125, 0.3], **f64))
    torch.testing.assert_close(kl_penalty(LP, REF, "k3", 0.3), torch.tensor([math.exp(-0.5) - 0.5, 0.3], **f64))


def test_k3_gradient():
    # d/d log π of e^(ref−lp) − 1 − (ref−lp) = 1 − e^(ref−lp) = [1 − 0.60653, 1 − 2.71828]
    lp = LP.clone().requires_grad_(True)
    kl_penalty(lp, REF, "k3", None).sum().backward()
    torch.testing.assert_close(lp.grad, torch.tensor([1 - math.exp(-0.5), 1 - math.e], dtype=torch.float64))


def test_unknown_estimator_names_valid_ones():
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_penalty(LP, REF, "k4", None)


@pytest.mark.parametrize("clamp", [None, 10.0])
def test_k3_gradient_stays_finite_far_below_the_reference(clamp):
    """log π = −90 under log π_ref = 0 (float32): exp(90) overflows; the log-ratio is clamped to ±20 first (as veRL
    and NeMo-RL do), so the value is finite and the gradient is 0 there, not 0·inf = NaN."""
    logprobs = torch.tensor([-90.0, -0.5, 30.0], requires_grad=True)
    kl = kl_penalty(logprobs, torch.tensor([0.0, 0.0, 0.0]), "k3", clamp)
    kl.sum().backward()
    assert torch.isfinite(kl).all() and torch.isfinite(logprobs.grad).all()
    assert logprobs.grad[0] == 0.0 and logprobs.grad[2] == 0.0  # clamped: no gradient through the clamp
    # an unclamped entry keeps the exact k3 gradient: d/dx [exp(−x) − 1 + x] = 1 − exp(−x)
    assert logprobs.grad[1].item() == pytest.approx(1 - math.exp(0.5), rel=1e-6)
    expected_first = math.expm1(20) - 20 if clamp is None else clamp
    assert kl[0].item() == pytest.approx(expected_first, rel=1e-6)

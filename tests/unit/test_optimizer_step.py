"""The optimizer step shared by both policy backends (``nemo_igrpo.policy.optimizer_step``), on a bare torch model."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from nemo_igrpo.policy.optimizer_step import TorchOptimizerHooks, optimizer_step, warmup_cosine


def setup(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(1, 10, 0.1))
    return model, optimizer, scheduler


def backward(model: torch.nn.Module, scale: float = 1.0) -> float:
    loss = model(torch.ones(4, 3)).pow(2).mean() * scale
    loss.backward()
    return loss.item()


def test_a_nan_gradient_skips_the_step_and_keeps_weights_and_adam_state_bit_identical():
    model, optimizer, scheduler = setup()
    hooks = TorchOptimizerHooks(model, optimizer, scheduler)
    first = optimizer_step(backward(model), {}, hooks, max_grad_norm=1.0)  # Adam now has moments to protect
    assert first["skipped"] == 0.0
    weights = copy.deepcopy(model.state_dict())
    state = copy.deepcopy(optimizer.state_dict())

    optimizer.zero_grad()
    loss = backward(model)  # a finite loss...
    model.weight.grad[0, 0] = float("nan")  # ...with a NaN gradient
    result = optimizer_step(loss, {"kl": 0.5}, hooks, max_grad_norm=1.0)

    assert result["skipped"] == 1.0 and math.isnan(result["grad_norm"]) and result["loss"] == loss
    assert result["kl"] == 0.5 and result["lr"] == 0.1  # step 1 of warmup_cosine(1, 10, 0.1) runs at the peak
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    after = optimizer.state_dict()["state"]
    assert all(torch.equal(state["state"][i][k], after[i][k]) for i in after for k in after[i])
    assert all(p.grad is None for p in model.parameters())  # the NaN gradient is gone
    assert scheduler.last_epoch == 2  # the schedule still advanced


def test_clipping_scales_the_gradient_to_max_grad_norm_as_torch_does():
    model, optimizer, scheduler = setup()
    backward(model, scale=100.0)
    reference = copy.deepcopy(model)
    for param, original in zip(reference.parameters(), model.parameters()):
        param.grad = original.grad.clone()  # deepcopy leaves .grad behind
    expected_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
    seen = {}

    class Recording(TorchOptimizerHooks):
        def apply(self):  # the gradients the update would use
            seen.update({n: p.grad.clone() for n, p in self.model.named_parameters()})

    result = optimizer_step(1.0, {}, Recording(model, optimizer, scheduler), max_grad_norm=0.5)

    assert result["grad_norm"] == expected_norm.item() > 0.5  # the pre-clipping norm is reported
    for name, param in reference.named_parameters():
        assert torch.equal(seen[name], param.grad)  # the same bits as torch.nn.utils.clip_grad_norm_
    clipped = torch.linalg.vector_norm(torch.stack([g.norm() for g in seen.values()])).item()
    # 0.5 · norm / (norm + 1e-6): torch's epsilon costs < 1e-6 relative, fp32 rounding ~1e-7.
    assert clipped == pytest.approx(0.5, rel=2e-6)


class Calls:
    """OptimizerHooks that record what the shared step asked for."""

    def __init__(self, norm: float) -> None:
        self.norm, self.calls = norm, []

    def lr(self):
        return 0.25

    def grad_norm(self):
        self.calls.append("norm")
        return self.norm

    def clip(self, max_norm, total_norm):
        self.calls.append(("clip", max_norm, total_norm))

    def apply(self):
        self.calls.append("apply")

    def discard(self):
        self.calls.append("discard")

    def advance_schedule(self):
        self.calls.append("advance")


@pytest.mark.parametrize(("loss", "norm", "max_norm", "calls"), [
    (1.0, 3.0, 1.0, ["norm", ("clip", 1.0, 3.0), "apply", "advance"]),
    (1.0, 3.0, math.inf, ["norm", "apply", "advance"]),  # max_grad_norm None → inf: no clipping
    (1.0, 3.0, 0.0, ["norm", "apply", "advance"]),  # ≤ 0: no clipping either
    (math.nan, 3.0, 1.0, ["norm", "discard", "advance"]),
    (1.0, math.inf, 1.0, ["norm", "discard", "advance"]),
])
def test_skip_clip_and_schedule_decisions(loss, norm, max_norm, calls):
    hooks = Calls(norm)
    result = optimizer_step(loss, {"x": 2.0}, hooks, max_norm)
    assert hooks.calls == calls
    assert result["skipped"] == float("discard" in calls) and result["lr"] == 0.25 and result["x"] == 2.0
    assert result["grad_norm"] == norm and list(result)[-4:] == ["loss", "grad_norm", "lr", "skipped"]


def test_warmup_cosine_at_hand_computed_steps():
    lr = warmup_cosine(warmup_steps=2, total_steps=6, min_lr_ratio=0.1)
    # warmup (k+1)/2; then 0.1 + 0.9 · (1 + cos(π · (k−2)/4)) / 2; the floor from step 6 on
    assert [lr(k) for k in (0, 1, 2)] == [0.5, 1.0, 1.0]
    assert lr(4) == pytest.approx(0.55, abs=1e-15)  # cos(π/2) = 6e-17, not 0
    assert lr(3) == pytest.approx(0.1 + 0.45 * (1 + math.sqrt(0.5)), abs=1e-15)
    assert lr(6) == lr(50) == pytest.approx(0.1, abs=1e-15)
    assert warmup_cosine(0, 4, 0.0)(0) == 1.0  # no warmup: the first step runs at the peak

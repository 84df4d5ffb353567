"""The optimizer step both policy backends take after their gradients are accumulated (and reduced over DP).

One rule set, written once: the LR schedule (:func:`warmup_cosine`), the non-finite skip (a NaN/inf loss or gradient
norm drops the update and leaves weights and optimizer state untouched), clipping by the global gradient norm, and a
schedule that advances every training step whether or not the update was applied. :func:`optimizer_step` applies
them and reports the step's metrics; what differs between backends is only *how* a norm is measured, gradients are
scaled and an update is applied, which each backend supplies as :class:`OptimizerHooks` (:class:`TorchOptimizerHooks`
for a plain ``torch.optim`` optimizer; the Megatron backend's own in ``policy.megatron.step``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any, Protocol

import torch

from nemo_igrpo import faults


def warmup_cosine(warmup_steps: int, total_steps: int, min_lr_ratio: float) -> Callable[[int], float]:
    """LR multiplier for optimizer step ``step`` (0-based): linear warmup, then cosine decay to ``min_lr_ratio``.

    Warmup rises as (step + 1) / warmup_steps, so the first step already moves the weights (the common
    step / warmup_steps form wastes it on lr = 0) and the last warmup step runs at the peak. The cosine then falls
    from 1 at ``warmup_steps`` to ``min_lr_ratio`` at ``total_steps`` and stays there.
    """

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return multiplier


def clipping_enabled(max_grad_norm: float) -> bool:
    """``optim.max_grad_norm``: inf or a value ≤ 0 means no clipping (Megatron's and HF Trainer's rule)."""
    return math.isfinite(max_grad_norm) and max_grad_norm > 0


class OptimizerHooks(Protocol):
    """What a backend's optimizer does for :func:`optimizer_step`; gradients are already accumulated and reduced."""

    def lr(self) -> float:
        """The learning rate this step's update uses (reported as ``lr``)."""

    def grad_norm(self) -> Any:
        """The global L2 norm of the gradients before clipping: a float or a 0-dim tensor (kept for :meth:`clip`)."""

    def clip(self, max_norm: float, total_norm: Any) -> None:
        """Scale the gradients by min(1, max_norm / (total_norm + 1e-6)), ``total_norm`` as :meth:`grad_norm` gave
        it."""

    def apply(self) -> None:
        """Take the optimizer's update with the (clipped) gradients."""

    def discard(self) -> None:
        """Drop this step's gradients without an update (weights and optimizer state stay bit-identical)."""

    def advance_schedule(self) -> None:
        """Move the LR schedule to the next training step."""


def optimizer_step(loss: float, metrics: dict[str, float], hooks: OptimizerHooks,
                   max_grad_norm: float) -> dict[str, float]:
    """Skip, clip or apply; advance the schedule; return ``{**metrics, loss, grad_norm, lr, skipped}``.

    ``loss`` and ``metrics`` are the step's totals (summed over micro-batches and DP ranks), so every rank takes the
    same skip decision.
    """
    faults.point("policy.gradients")  # gradients accumulated, update not yet applied (the drills' kill point)
    lr = hooks.lr()
    norm = hooks.grad_norm()
    grad_norm = float(norm)
    skipped = not (math.isfinite(loss) and math.isfinite(grad_norm))
    if skipped:
        # A non-finite loss or gradient would poison Adam's moments for good: drop this update entirely.
        hooks.discard()
    else:
        if clipping_enabled(max_grad_norm):
            hooks.clip(max_grad_norm, norm)
        hooks.apply()
    # The schedule is a function of the training step, whether or not this step's update was applied.
    hooks.advance_schedule()
    return {**metrics, "loss": loss, "grad_norm": grad_norm, "lr": lr, "skipped": float(skipped)}


class TorchOptimizerHooks:
    """:class:`OptimizerHooks` of a ``torch.optim`` optimizer over ``model``'s parameters with a torch LR scheduler."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def grad_norm(self) -> torch.Tensor:
        # The two halves of torch.nn.utils.clip_grad_norm_, so clipping reuses this very tensor (same bits).
        return torch.nn.utils.get_total_norm([p.grad for p in self.model.parameters() if p.grad is not None])

    def clip(self, max_norm: float, total_norm: torch.Tensor) -> None:
        torch.nn.utils.clip_grads_with_norm_(self.model.parameters(), max_norm, total_norm)

    def apply(self) -> None:
        self.optimizer.step()

    def discard(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def advance_schedule(self) -> None:
        with warnings.catch_warnings():
            # torch warns when the scheduler steps before any optimizer.step(), as it does after a skipped first step.
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
            self.scheduler.step()

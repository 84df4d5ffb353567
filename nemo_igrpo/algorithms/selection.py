"""iGRPO Stage 1: pick the best draft per prompt."""

from __future__ import annotations

import torch
from torch import Tensor

TIE_BREAKS: tuple[str, ...] = ("first", "random")


def select_best(rewards: Tensor, tie_break: str, generator: torch.Generator | None = None) -> Tensor:
    """argmax_j rewards[p, j] per prompt: rewards [P, N] -> LongTensor [P] of draft indices.

    Non-finite rewards are never chosen. Ties: ``first`` takes the lowest index; ``random`` draws uniformly among the tied maxima using ``generator``
    (deterministic for a seeded generator): iid uniform scores on the maxima, -1 elsewhere, then argmax.
    """
    if tie_break not in TIE_BREAKS:
        raise ValueError(f"unknown tie_break {tie_break!r}; valid: {', '.join(TIE_BREAKS)}")
    # A non-finite reward (unscorable sample) is never the best: NaN compares false against every maximum, and
    # +inf would win outright. A prompt with no finite reward has all drafts tied, as when all rewards are equal.
    rewards = rewards.masked_fill(~torch.isfinite(rewards), -torch.inf)
    is_max = rewards == rewards.amax(dim=1, keepdim=True)  # [P, N]
    if tie_break == "first":
        scores = is_max.to(torch.float32)  # argmax returns the first maximal index
    else:
        device = generator.device if generator is not None else rewards.device
        noise = torch.rand(rewards.shape, generator=generator, device=device).to(rewards.device)
        scores = torch.where(is_max, noise, -1.0)
    return scores.argmax(dim=1)

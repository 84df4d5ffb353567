"""iGRPO Stage 1: pick the draft per prompt that Stage 2 is conditioned on (best; random as ablation)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from nemo_igrpo.registry import Registry

# (is_max [P, N] bool, generator) -> scores [P, N]: argmax of the scores is the chosen draft
TieBreak = Callable[[Tensor, "torch.Generator | None"], Tensor]

TIE_BREAKS: Registry[TieBreak] = Registry("tie-break", "algorithm.tie_break")


@TIE_BREAKS.register("first")
def _first(is_max: Tensor, generator: torch.Generator | None) -> Tensor:
    """The lowest maximal index (argmax returns the first maximum)."""
    return is_max.to(torch.float32)


@TIE_BREAKS.register("random")
def _random(is_max: Tensor, generator: torch.Generator | None) -> Tensor:
    """Uniform among the tied maxima: iid uniform scores on the maxima, -1 elsewhere (deterministic for a seeded
    ``generator``)."""
    device = generator.device if generator is not None else is_max.device
    noise = torch.rand(is_max.shape, generator=generator, device=device).to(is_max.device)
    return torch.where(is_max, noise, -1.0)


def select_best(rewards: Tensor, tie_break: str, generator: torch.Generator | None = None) -> Tensor:
    """argmax_j rewards[p, j] per prompt: rewards [P, N] -> LongTensor [P] of draft indices.

    Non-finite rewards are never chosen. Ties are broken by the registered ``tie_break`` (``first``: lowest index;
    ``random``: uniform among the tied maxima using ``generator``).
    """
    breaker = TIE_BREAKS.lookup(tie_break)
    # A non-finite reward (unscorable sample) is never the best: NaN compares false against every maximum, and
    # +inf would win outright. A prompt with no finite reward has all drafts tied, as when all rewards are equal.
    rewards = rewards.masked_fill(~torch.isfinite(rewards), -torch.inf)
    is_max = rewards == rewards.amax(dim=1, keepdim=True)  # [P, N]
    return breaker(is_max, generator).argmax(dim=1)


# (rewards [P, N], tie_break, generator) -> LongTensor [P]: the draft each prompt's Stage 2 is conditioned on
DraftSelector = Callable[[Tensor, str, "torch.Generator | None"], Tensor]

DRAFT_SELECTIONS: Registry[DraftSelector] = Registry("draft selection", "algorithm.draft_selection")
DRAFT_SELECTIONS.register("best", select_best)  # the paper: argmax of the reward


@DRAFT_SELECTIONS.register("random")
def select_random(rewards: Tensor, tie_break: str, generator: torch.Generator | None = None) -> Tensor:
    """A uniformly random draft per prompt, whatever its reward (an ablation of the selection the paper does not
    run). Unscorable drafts (non-finite reward) are left out unless every draft of the prompt is."""
    finite = torch.isfinite(rewards)
    candidates = torch.where(finite.any(dim=1, keepdim=True), finite, torch.ones_like(finite))
    return TIE_BREAKS["random"](candidates, generator).argmax(dim=1)


def select_draft(rewards: Tensor, selection: str, tie_break: str, generator: torch.Generator | None = None) -> Tensor:
    """The registered ``algorithm.draft_selection`` (``best`` | ``random``): rewards [P, N] -> LongTensor [P]."""
    return DRAFT_SELECTIONS.lookup(selection)(rewards, tie_break, generator)

"""A rollout's rows and their bookkeeping: what one sampling round produced (``StageSamples``), how rounds are
concatenated and filtered (dynamic sampling), and how the kept rows become the training batch.

Moved out of ``igrpo.py`` so that it reads as Algorithm 1; each ``StageSamples`` field says (in its metadata) how
``select_rows`` and ``extend`` treat it, so a new field is one line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Callable

import torch

from nemo_igrpo.algorithms.advantages import compute_advantages, zero_variance_groups
from nemo_igrpo.algorithms.batch import RolloutBatch, pad_sequences
from nemo_igrpo.generation.base import Completion

if TYPE_CHECKING:
    from nemo_igrpo.algorithms.igrpo import RolloutSettings

_KIND = "stage_samples"
_ROW = "row"  # a list, one entry per refinement row: select_rows keeps the selected rows, extend concatenates
_ROW_COLUMNS = "row_columns"  # name → list with one entry per row: filtered and concatenated per name
_PROBLEM = "problem"  # a list per problem: select_rows keeps it whole, extend concatenates
_DRAFT = "draft"  # a flat list, N entries per problem in problem order: as _PROBLEM
_COUNTERS = "counters"  # name → count: extend sums; a row subset starts without them (metrics read `seen`'s)


def _field(kind: str, factory: Callable = list):
    return field(default_factory=factory, metadata={_KIND: kind})


@dataclass
class StageSamples:
    """What one rollout round produced, for metrics and for the training batch."""

    prompts: list[list[int]] = _field(_ROW)  # Stage-2 prompt of each refinement row
    completions: list[Completion] = _field(_ROW)  # refinements, G per problem, problem-major
    rewards: list[float] = _field(_ROW)
    group_ids: list[int] = _field(_ROW)
    components: dict[str, list[float]] = _field(_ROW_COLUMNS, dict)
    texts: list[str] = _field(_ROW)  # the refinements decoded, and their accuracy verdicts (refinement_metrics)
    solved: list[bool] = _field(_ROW)
    draft_rewards: list[list[float]] = _field(_PROBLEM)  # [problem][N]
    draft_solved: list[list[bool]] = _field(_PROBLEM)  # [problem][N]: the accuracy verdicts
    best_draft_index: list[int] = _field(_PROBLEM)  # [problem]: the selected draft
    draft_lengths: list[int] = _field(_DRAFT)
    draft_logprob_sums: list[float] = _field(_DRAFT)  # per draft, NaN without log-probs (refinement_metrics)
    draft_prompts: list[list[int]] = _field(_PROBLEM)  # [problem], and [problem][N] drafts: for draft_loss.py
    draft_completions: list[list[Completion]] = _field(_PROBLEM)
    best_drafts: list[str] = _field(_PROBLEM)
    reward_counters: dict[str, int] = _field(_COUNTERS, dict)  # e.g. grader timeouts, over both stages


def count_non_finite(into: dict[str, int], scores: list[float]) -> None:
    """Unscorable samples (a NaN/inf reward): they get advantage 0 and are never the best draft."""
    into["non_finite"] = into.get("non_finite", 0) + sum(not math.isfinite(s) for s in scores)


def add_seconds(timings: dict[str, float], key: str, seconds: float) -> None:
    timings[key] = timings.get(key, 0.0) + seconds


def add_counts(into: dict[str, int], more: dict[str, int]) -> None:
    for key, value in more.items():
        into[key] = into.get(key, 0) + value


def drop_zero_variance(samples: StageSamples) -> StageSamples:
    flat = zero_variance_groups(torch.tensor(samples.rewards), torch.tensor(samples.group_ids))
    keep = [i for i, zero in enumerate(flat.tolist()) if not zero]
    return select_rows(samples, keep)


def first_groups(samples: StageSamples, num_groups: int) -> StageSamples:
    """The rows of the first ``num_groups`` groups (a last dynamic-sampling round may overshoot)."""
    wanted = set(list(dict.fromkeys(samples.group_ids))[:num_groups])
    return select_rows(samples, [i for i, gid in enumerate(samples.group_ids) if gid in wanted])


def select_rows(samples: StageSamples, keep: list[int]) -> StageSamples:
    """The refinement rows ``keep``; per-problem lists stay whole, counters start empty."""
    return _select(samples, {_ROW: lambda rows: [rows[i] for i in keep],
                             _ROW_COLUMNS: lambda columns: {k: [v[i] for i in keep] for k, v in columns.items()},
                             _COUNTERS: lambda counters: {}})


def select_problems(samples: StageSamples, keep: list[int], num_drafts: int) -> StageSamples:
    """The problems ``keep`` of a Stage 1 done apart (``draft_stage``, whose callbacks run in problem order, so the
    per-draft lists are too), before any refinement row exists; counters stay whole."""
    return _select(samples, {_PROBLEM: lambda per_problem: [per_problem[i] for i in keep],
                             _DRAFT: lambda per_draft: [per_draft[i * num_drafts + j] for i in keep
                                                        for j in range(num_drafts)]})


def _select(samples: StageSamples, pick: dict[str, Callable]) -> StageSamples:
    """A new ``StageSamples`` whose fields of each kind in ``pick`` are ``pick[kind](field)``; the others as they are."""
    return StageSamples(**{item.name: pick.get(item.metadata[_KIND], lambda value: value)(getattr(samples, item.name))
                           for item in fields(StageSamples)})


def extend(into: StageSamples, more: StageSamples) -> None:
    for item in fields(StageSamples):
        kind, mine, theirs = item.metadata[_KIND], getattr(into, item.name), getattr(more, item.name)
        if kind in (_ROW, _PROBLEM, _DRAFT):
            mine += theirs
        elif kind == _ROW_COLUMNS:
            for key, values in theirs.items():
                mine.setdefault(key, []).extend(values)
        else:
            add_counts(mine, theirs)


def to_batch(samples: StageSamples, settings: RolloutSettings, pad_token_id: int) -> RolloutBatch:
    rewards = torch.tensor(samples.rewards, dtype=torch.float32)
    group_ids = torch.tensor(samples.group_ids, dtype=torch.long)
    advantages = compute_advantages(settings.advantage, rewards, group_ids, settings.adv_eps)
    input_ids, attention_mask, loss_mask, gen_logprobs = pad_sequences(
        samples.prompts, [c.token_ids for c in samples.completions], pad_token_id,
        [c.logprobs for c in samples.completions])
    if settings.overlong_filter:  # truncated samples stay in their group's baseline but carry no loss
        truncated = torch.tensor([c.finish_reason == "length" for c in samples.completions])
        loss_mask[truncated] = 0.0
    return RolloutBatch(input_ids=input_ids, attention_mask=attention_mask, loss_mask=loss_mask,
                        advantages=advantages, group_ids=group_ids, gen_logprobs=gen_logprobs)

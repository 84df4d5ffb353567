"""One iGRPO training batch, as Algorithm 1 of arXiv 2602.09000 reads.

    Stage 1  for each problem q: N drafts d_1..d_N ~ π_old(·|q), rewards R(d_i), best d̂ = argmax_i R(d_i)
    Stage 2  q' = template(q, d̂); G refinements o_j ~ π_old(·|q'); rewards R(o_j)
    Update   advantages over the G refinements only; only refinement tokens carry loss

GRPO is the same batch with N = 0 (Stage 2 then sees the plain problem prompt). No gradient flows through
Stage 1: drafts only shape the Stage-2 prompt, and the draft tokens are prompt context with loss mask 0.

The two stages themselves are ``algorithms.two_stage`` (shared with two-pass evaluation); the rows' bookkeeping is
``algorithms.samples``. Stage 1 can also run on its own (``BatchCollector.draft``) and be handed to ``collect_batch``
as a precomputed result: the rollout producer (``nemo_igrpo.rollout_producer``) drafts step t+1's problems while
step t's update runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Callable, Protocol, Sequence

import torch

from nemo_igrpo import faults
from nemo_igrpo.algorithms import two_stage
from nemo_igrpo.algorithms.advantages import zero_variance_groups
from nemo_igrpo.algorithms.batch import RolloutBatch
from nemo_igrpo.algorithms.draft_loss import with_draft_rows
from nemo_igrpo.algorithms.refinement_metrics import refinement_metrics
from nemo_igrpo.algorithms.samples import (
    StageSamples,
    add_counts,
    add_seconds,
    count_non_finite,
    drop_zero_variance,
    extend,
    first_groups,
    select_problems,
    to_batch,
)
from nemo_igrpo.algorithms.two_stage import DraftSelection, Problem, PromptTemplate
from nemo_igrpo.generation.base import Completion, GenerationBackend, SamplingParams

__all__ = ["BatchCollector", "DraftSelection", "Drafts", "DynamicSamplingError", "Problem", "PromptTemplate",
           "RewardFn", "RolloutSettings", "StageSamples", "collect_batch"]


class RewardFn(Protocol):
    # -> RewardOutput: scores, components, counters, and solved() (the accuracy verdicts of Proposition 3.1)
    def __call__(self, completions: list[str], answers: list[str]): ...


@dataclass(frozen=True)
class RolloutSettings:
    num_drafts: int  # N (0 = GRPO)
    num_refinements: int  # G
    tie_break: str
    advantage: str
    adv_eps: float
    dynamic_sampling: bool
    max_sampling_rounds: int
    sampling: SamplingParams  # n is replaced per stage
    overlong_buffer: int = 0  # DAPO soft overlong penalty over the last N tokens of the budget (0 = off)
    overlong_penalty: float = 1.0  # the penalty at the full budget
    overlong_filter: bool = False  # DAPO overlong filtering: truncated samples get no loss
    draft_selection: str = "best"  # which draft Stage 2 sees: best (the paper) | random (selection.py)
    draft_loss_weight: float = 0.0  # > 0: the drafts are trained too, with loss_agg (draft_loss.py; beyond the paper)
    loss_agg: str = "seq-mean-token-mean"
    skip_solved_by_drafts: bool = False  # no Stage 2 for a problem all of whose drafts are right; draw another


@dataclass
class Drafts:
    """Stage 1 of a rollout's first round, computed apart from Stage 2 (``draft_stage``): the problems, their
    Stage-2 prompts (each with its best draft), and the draft fields, reward counters and seconds of their
    ``StageSamples``."""

    problems: list
    refinement_prompts: list[list[int]]
    samples: StageSamples
    timings: dict[str, float]


class DynamicSamplingError(RuntimeError):
    pass


def collect_batch(
    problems_source: Callable[[int], Sequence[Problem]],
    num_problems: int,
    generator: GenerationBackend,
    reward: RewardFn,
    template: PromptTemplate,
    decode: Callable[[list[int]], str],
    settings: RolloutSettings,
    pad_token_id: int,
    timings: dict[str, float] | None = None,
    drafts: Drafts | None = None,
) -> tuple[RolloutBatch, dict[str, float]]:
    """Sample, score and select until ``num_problems`` groups are kept; return the Stage-2 batch and metrics.

    With dynamic sampling (DAPO), groups whose G refinement rewards are all equal carry no signal and are
    dropped; more problems are drawn (at most ``max_sampling_rounds`` rounds) until the batch is full.
    Seconds per phase are added to ``timings`` (``rollout/drafts``, ``rollout/refinements``, ``rollout/reward``,
    ``rollout/generation``). Random tie-breaks draw from torch's global RNG, which checkpoints save and restore.

    With ``skip_solved_by_drafts`` (beyond the paper), a problem whose N drafts are all right with one reward skips
    Stage 2: its refinement group would almost surely have zero variance. It is decided after Stage 1, before any
    refinement is sampled, and replacement problems are drawn in further rounds as dynamic sampling does; the last
    allowed round refines every problem, so the batch is always full. Skips are counted in
    ``rollout/skipped_solved``; the draft metrics cover the problems that reached Stage 2.

    ``drafts`` (from ``draft_stage``): the first round's Stage 1, already done; its problems are not drawn again
    and only their refinements are sampled here. Later dynamic-sampling rounds run both stages as usual.
    """
    timings = {} if timings is None else timings
    kept: list[StageSamples] = []
    seen = StageSamples()
    kept_groups = skipped = 0
    refills = settings.dynamic_sampling or settings.skip_solved_by_drafts
    for round_index in range(settings.max_sampling_rounds if refills else 1):
        needed = num_problems - kept_groups
        skip = settings.skip_solved_by_drafts and round_index < settings.max_sampling_rounds - 1
        first_group_id = len(set(seen.group_ids))
        if skip:  # Stage 1 apart, so that a solved problem's Stage 2 is never paid for
            if round_index > 0 or drafts is None:
                drafts = draft_stage(problems_source, needed, generator, reward, template, decode, settings)
            drafts, dropped = _without_solved(drafts, settings.num_drafts)
            skipped += dropped
            samples = _refine_drafts(drafts, generator, reward, decode, settings, timings, first_group_id)
        elif round_index == 0 and drafts is not None:
            samples = _refine_drafts(drafts, generator, reward, decode, settings, timings, first_group_id)
        else:
            samples = _sample_round(problems_source(needed), generator, reward, template, decode, settings, timings,
                                    first_group_id)
        extend(seen, samples)
        if settings.dynamic_sampling:
            samples = drop_zero_variance(samples)
        kept.append(samples)
        kept_groups += len(set(samples.group_ids))
        if kept_groups >= num_problems:
            break
    else:
        if settings.dynamic_sampling:
            raise DynamicSamplingError(
                f"dynamic sampling: only {kept_groups} of {num_problems} groups had reward variance after "
                f"{settings.max_sampling_rounds} rounds (algorithm.max_sampling_rounds); the task is too easy or "
                f"too hard for the policy, or disable algorithm.dynamic_sampling")
    batch_samples = StageSamples()
    for samples in kept:
        extend(batch_samples, samples)
    batch_samples = first_groups(batch_samples, num_problems)

    batch = to_batch(batch_samples, settings, pad_token_id)
    if settings.draft_loss_weight > 0:
        batch = with_draft_rows(batch, batch_samples, settings, pad_token_id)
    metrics = _rollout_metrics(seen, batch_samples, settings, rounds=round_index + 1)
    if settings.skip_solved_by_drafts:
        metrics["rollout/skipped_solved"] = float(skipped)
    return batch, metrics


def draft_stage(problems_source: Callable[[int], Sequence[Problem]], num_problems: int,
                generator: GenerationBackend, reward: RewardFn, template: PromptTemplate,
                decode: Callable[[list[int]], str], settings: RolloutSettings) -> Drafts:
    """Stage 1 alone, for ``collect_batch(..., drafts=...)``: draw ``num_problems`` problems, sample N drafts each,
    score them and select the best. Seconds go to the result's ``timings`` (``rollout/drafts``,
    ``rollout/generation``, ``rollout/reward``), counted into the step that consumes it."""
    problems = list(problems_source(num_problems))
    samples = StageSamples()
    select = _selection(problems, reward, template, decode, settings, samples)
    prompts, timings = two_stage.draft_stage(problems, generator, select,
                                             replace(settings.sampling, n=settings.num_drafts))
    return Drafts(problems, prompts, samples, timings)


@dataclass
class BatchCollector:
    """``collect_batch`` and ``draft_stage`` bound to a run's generator, reward, template and settings: what the
    rollout producer calls for each step (built once, by the assembly)."""

    generator: GenerationBackend
    reward: RewardFn
    template: PromptTemplate
    decode: Callable[[list[int]], str]
    settings: RolloutSettings
    pad_token_id: int

    def collect(self, problems_source: Callable[[int], Sequence[Problem]], num_problems: int,
                timings: dict[str, float] | None = None,
                drafts: Drafts | None = None) -> tuple[RolloutBatch, dict[str, float]]:
        return collect_batch(problems_source, num_problems, self.generator, self.reward, self.template, self.decode,
                             self.settings, self.pad_token_id, timings=timings, drafts=drafts)

    def draft(self, problems_source: Callable[[int], Sequence[Problem]], num_problems: int) -> Drafts:
        return draft_stage(problems_source, num_problems, self.generator, self.reward, self.template, self.decode,
                           self.settings)


def _selection(problems, reward, template, decode, settings: RolloutSettings, samples: StageSamples):
    """Training's draft selection: the reward (with DAPO's length penalty), then ``algorithm.draft_selection``
    (``best``, the paper's argmax; ``random``, the ablation)."""
    def score(texts, answers, drafts):
        return _with_length_penalty(reward(texts, answers), drafts, settings)

    return DraftSelection(problems, template, decode, settings.num_drafts, score,
                          two_stage.by_reward(settings.draft_selection, settings.tie_break), samples)


def _without_solved(drafts: Drafts, num_drafts: int) -> tuple[Drafts, int]:
    """``skip_solved_by_drafts``: ``drafts`` without the problems whose N drafts are all right and scored alike
    (the top reward, whatever the reward's scale), and how many were dropped."""
    s = drafts.samples
    keep = [i for i, (solved, scores) in enumerate(zip(s.draft_solved, s.draft_rewards))
            if not (all(solved) and len(set(scores)) == 1)]
    kept = Drafts([drafts.problems[i] for i in keep], [drafts.refinement_prompts[i] for i in keep],
                  select_problems(s, keep, num_drafts), drafts.timings)
    return kept, len(drafts.problems) - len(keep)


def _refine_drafts(drafts: Drafts, generator, reward, decode, settings, timings, first_group_id) -> StageSamples:
    """A round whose Stage 1 is done: sample and score the refinements of ``drafts``."""
    for key, seconds in drafts.timings.items():
        add_seconds(timings, key, seconds)
    if not drafts.problems:  # every problem was skipped: nothing to generate or score
        return drafts.samples
    refinements, seconds = two_stage.refine(drafts.refinement_prompts, generator,
                                            replace(settings.sampling, n=settings.num_refinements))
    for key, value in seconds.items():
        add_seconds(timings, key, value)
    return _score_refinements(drafts.samples, drafts.problems, drafts.refinement_prompts, refinements, reward, decode,
                              settings, timings, first_group_id)


def _sample_round(problems, generator, reward, template, decode, settings, timings, first_group_id):
    samples = StageSamples()
    select = _selection(problems, reward, template, decode, settings, samples)
    stage2_prompts, refinements, seconds = two_stage.draft_and_refine(
        problems, generator, select, replace(settings.sampling, n=settings.num_drafts),
        replace(settings.sampling, n=settings.num_refinements))
    for key, value in seconds.items():
        add_seconds(timings, key, value)
    return _score_refinements(samples, problems, stage2_prompts, refinements, reward, decode, settings, timings,
                              first_group_id)


def _score_refinements(samples: StageSamples, problems, stage2_prompts, refinements, reward, decode, settings,
                       timings, first_group_id) -> StageSamples:
    """Score the G refinements per problem and put the round's rows into ``samples``."""
    g = settings.num_refinements
    answers = [p.answer for p in problems]
    started = time.perf_counter()
    texts = faults.point("rollout.reward", [decode(c.token_ids) for group in refinements for c in group],
                         stage="refinement")
    flat = [c for group in refinements for c in group]
    scored = _with_length_penalty(reward(texts, [a for a in answers for _ in range(g)]), flat, settings)
    faults.point("rollout.rewarded", stage="refinement")
    add_counts(samples.reward_counters, scored.counters)
    count_non_finite(samples.reward_counters, scored.scores)
    add_seconds(timings, "rollout/reward", time.perf_counter() - started)
    samples.prompts = [list(stage2_prompts[i]) for i in range(len(problems)) for _ in range(g)]
    samples.completions, samples.texts, samples.solved = flat, texts, scored.solved()
    samples.rewards = list(scored.scores)
    samples.components = {k: list(v) for k, v in scored.components.items()}
    samples.group_ids = [first_group_id + i for i in range(len(problems)) for _ in range(g)]
    return samples


def _with_length_penalty(scored, completions: list[Completion], settings: RolloutSettings):
    """DAPO's soft overlong punishment, added to the reward: 0 up to ``max_new_tokens − buffer`` tokens, then
    falling linearly to −``overlong_penalty`` at the budget. Logged as the ``overlong`` component."""
    if settings.overlong_buffer <= 0:
        return scored
    limit = settings.sampling.max_new_tokens
    start = limit - settings.overlong_buffer
    penalty = [-settings.overlong_penalty * min(max(len(c.token_ids) - start, 0) / settings.overlong_buffer, 1.0)
               for c in completions]
    scored.scores = [s + p for s, p in zip(scored.scores, penalty)]
    scored.components = {**scored.components, "overlong": penalty}
    return scored



def _finite_mean(values) -> float:
    """Mean over the finite entries (unscorable samples are counted in ``reward/count/non_finite`` instead)."""
    values = torch.as_tensor(values, dtype=torch.float32).flatten()
    finite = values[torch.isfinite(values)]
    return finite.mean().item() if finite.numel() else float("nan")


def _rollout_metrics(seen: StageSamples, batch: StageSamples, settings: RolloutSettings, rounds: int):
    """Everything the paper plots plus what it could not show (best-draft success vs 1 − (1 − p)^N, etc.)."""
    rewards = torch.tensor(seen.rewards)
    group_ids = torch.tensor(seen.group_ids)
    lengths = torch.tensor([len(c.token_ids) for c in seen.completions], dtype=torch.float32)
    truncated = torch.tensor([c.finish_reason == "length" for c in seen.completions], dtype=torch.float32)
    metrics = {
        "reward/refinement_mean": _finite_mean(rewards),
        "zero_variance_fraction": zero_variance_groups(rewards, group_ids).float().mean().item(),
        "response_length/refinement_mean": lengths.mean().item(),
        "response_length/refinement_max": lengths.max().item(),
        "truncated_fraction": truncated.mean().item(),
        "rollouts_per_prompt/drafts": float(settings.num_drafts),
        "rollouts_per_prompt/refinements": float(settings.num_refinements),
        "rollouts_per_prompt/total": float(settings.num_drafts + settings.num_refinements),
        "sampling_rounds": float(rounds),
        "tokens/generated": float(lengths.sum().item() + sum(seen.draft_lengths)),
        "batch/sequences": float(len(batch.rewards)),
        "batch/reward_mean": _finite_mean(batch.rewards) if batch.rewards else 0.0,
    }
    for key, values in seen.components.items():
        metrics[f"reward/{key}"] = _finite_mean(values)
    for key, count in seen.reward_counters.items():  # e.g. grader timeouts and crashes, both stages
        metrics[f"reward/count/{key}"] = float(count)
    if settings.num_drafts:
        metrics.update(_draft_metrics(seen, rewards, settings))
    metrics.update(refinement_metrics(seen, settings.num_refinements, has_drafts=settings.num_drafts > 0))
    return metrics


def _draft_metrics(seen: StageSamples, rewards: torch.Tensor, settings: RolloutSettings) -> dict[str, float]:
    """Stage-1 metrics: the total reward of drafts and best drafts, and Proposition 3.1 on the accuracy verdicts.

    Proposition 3.1 is about the binary correctness reward: with p a problem's success rate, the best of N i.i.d.
    drafts is right with probability 1 − (1 − p)^N. p is plugged in per problem as the fraction of its own N drafts
    that are right (``reward/accuracy/draft_mean``), and the prediction is compared with the observed best-of-N
    success (``any_draft_correct``) and with the accuracy of the draft actually selected by the total reward.
    """
    drafts = torch.tensor(seen.draft_rewards)  # [P, N], total reward
    solved = torch.tensor(seen.draft_solved, dtype=torch.float32)  # [P, N], 0/1
    selected = torch.tensor(seen.best_draft_index)[:, None]
    best = drafts.gather(1, selected).squeeze(1)  # the selected draft's reward: the maximum of the finite ones
    refined = rewards.view(len(seen.draft_rewards), settings.num_refinements)
    refined_mean = torch.tensor([_finite_mean(row) for row in refined])
    p = solved.mean(dim=1)
    return {
        "reward/draft_mean": _finite_mean(drafts),
        "reward/best_draft_mean": _finite_mean(best),
        "reward/refinement_minus_best_draft": _finite_mean(refined_mean - best),
        "reward/accuracy/draft_mean": p.mean().item(),
        "reward/accuracy/best_draft_mean": solved.gather(1, selected).mean().item(),
        "reward/accuracy/any_draft_correct": solved.amax(dim=1).mean().item(),
        "reward/accuracy/best_draft_predicted": (1 - (1 - p) ** settings.num_drafts).mean().item(),
        "response_length/draft_mean": float(sum(seen.draft_lengths)) / max(len(seen.draft_lengths), 1),
    }

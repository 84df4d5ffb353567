"""One iGRPO rollout, as Algorithm 1 of arXiv 2602.09000 reads.

    Stage 1  for each problem q: N drafts d_1..d_N ~ π_old(·|q), rewards R(d_i), best d̂ = argmax_i R(d_i)
    Stage 2  q' = template(q, d̂); G refinements o_j ~ π_old(·|q'); rewards R(o_j)
    Update   advantages over the G refinements only; only refinement tokens carry loss

GRPO is the same rollout with N = 0 (Stage 2 then sees the plain problem prompt). No gradient flows through
Stage 1: drafts only shape the Stage-2 prompt, and the draft tokens are prompt context with loss mask 0.

Stage 1 can also run on its own (``draft_stage``) and be handed to ``rollout`` as a precomputed result: the
rollout producer (``nemo_igrpo.rollout_producer``) drafts step t+1's problems while step t's update runs.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, fields, replace
from typing import Callable, Protocol, Sequence

import torch

from nemo_igrpo import faults
from nemo_igrpo.algorithms.advantages import compute_advantages, zero_variance_groups
from nemo_igrpo.algorithms.batch import RolloutBatch, pad_sequences
from nemo_igrpo.algorithms.draft_loss import with_draft_rows
from nemo_igrpo.algorithms.refinement_metrics import refinement_metrics
from nemo_igrpo.algorithms.selection import select_draft
from nemo_igrpo.generation.base import Completion, GenerationBackend, SamplingParams


class Problem(Protocol):
    problem: str
    answer: str


class RewardFn(Protocol):
    # -> RewardOutput: scores, components, counters, and solved() (the accuracy verdicts of Proposition 3.1)
    def __call__(self, completions: list[str], answers: list[str]): ...


class PromptTemplate(Protocol):
    def problem_ids(self, problem: str) -> list[int]: ...
    def refinement_ids(self, problem: str, draft_text: str) -> list[int]: ...


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


# How _rows and _extend treat each StageSamples field (its metadata), so that a new field is one line here.
_KIND = "stage_samples"
_ROW = "row"  # a list, one entry per refinement row: _rows keeps the selected rows, _extend concatenates
_ROW_COLUMNS = "row_columns"  # name → list with one entry per row: filtered and concatenated per name
_PROBLEM = "problem"  # a list per problem (or per draft): _rows keeps it whole, _extend concatenates
_COUNTERS = "counters"  # name → count: _extend sums; a row subset starts without them (metrics read `seen`'s)


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
    draft_lengths: list[int] = _field(_PROBLEM)
    draft_logprob_sums: list[float] = _field(_PROBLEM)  # per draft, NaN without log-probs (refinement_metrics)
    draft_prompts: list[list[int]] = _field(_PROBLEM)  # [problem], and [problem][N] drafts: for draft_loss.py
    draft_completions: list[list[Completion]] = _field(_PROBLEM)
    best_drafts: list[str] = _field(_PROBLEM)
    reward_counters: dict[str, int] = _field(_COUNTERS, dict)  # e.g. grader timeouts, over both stages


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


def rollout(
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

    ``drafts`` (from ``draft_stage``): the first round's Stage 1, already done; its problems are not drawn again
    and only their refinements are sampled here. Later dynamic-sampling rounds run both stages as usual.
    """
    timings = {} if timings is None else timings
    kept: list[StageSamples] = []
    seen = StageSamples()
    kept_groups = 0
    for round_index in range(settings.max_sampling_rounds if settings.dynamic_sampling else 1):
        needed = num_problems - kept_groups
        if round_index == 0 and drafts is not None:
            samples = _refine_drafts(drafts, generator, reward, decode, settings, timings)
        else:
            samples = _sample_round(problems_source(needed), generator, reward, template, decode, settings, timings,
                                    first_group_id=len(set(seen.group_ids)))
        _extend(seen, samples)
        if settings.dynamic_sampling:
            samples = _drop_zero_variance(samples)
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
        _extend(batch_samples, samples)
    batch_samples = _first_groups(batch_samples, num_problems)

    batch = _to_batch(batch_samples, settings, pad_token_id)
    if settings.draft_loss_weight > 0:
        batch = with_draft_rows(batch, batch_samples, settings, pad_token_id)
    metrics = _rollout_metrics(seen, batch_samples, settings, rounds=round_index + 1)
    return batch, metrics


class _DraftSelection:
    """Stage 1 for one problem at a time: score its N drafts, select the best, return its Stage-2 prompt.

    Called as each problem's drafts are done (streaming backends: in any order, under their lock); draft lengths
    and reward counters go into ``samples``, the rest is put in problem order by ``fill``."""

    def __init__(self, problems, reward, template, decode, settings: RolloutSettings, samples: StageSamples):
        self.problems, self.reward, self.template, self.decode = problems, reward, template, decode
        self.settings, self.samples = settings, samples
        self.answers = [p.answer for p in problems]
        self.first_follow_up: float | None = None  # when the first problem's drafts were done
        self.reward_seconds = 0.0
        # keyed by problem: streaming backends may finish out of order
        self.draft_rewards: dict[int, list[float]] = {}
        self.draft_solved: dict[int, list[bool]] = {}
        self.best_index: dict[int, int] = {}
        self.best_drafts: dict[int, str] = {}
        self.drafts: dict[int, list[Completion]] = {}

    def __call__(self, i: int, drafts: list[Completion]) -> list[int]:
        n, settings, samples = self.settings.num_drafts, self.settings, self.samples
        started = time.perf_counter()
        self.first_follow_up = self.first_follow_up or started
        if n == 0:
            return self.template.problem_ids(self.problems[i].problem)
        texts = faults.point("rollout.reward", [self.decode(d.token_ids) for d in drafts], stage="draft")
        scored = _with_length_penalty(self.reward(texts, [self.answers[i]] * n), drafts, settings)
        faults.point("rollout.rewarded", stage="draft")
        _count(samples.reward_counters, scored.counters)
        _count_non_finite(samples.reward_counters, scored.scores)
        scores = scored.scores
        best = int(select_draft(torch.tensor([scores]), settings.draft_selection, settings.tie_break)[0])
        self.reward_seconds += time.perf_counter() - started
        self.draft_rewards[i], self.draft_solved[i] = list(scores), scored.solved()
        self.best_index[i], self.best_drafts[i], self.drafts[i] = best, texts[best], drafts
        samples.draft_lengths.extend(len(d.token_ids) for d in drafts)
        samples.draft_logprob_sums.extend(sum(d.logprobs) if len(d.logprobs) == len(d.token_ids) else math.nan
                                          for d in drafts)
        return self.template.refinement_ids(self.problems[i].problem, texts[best])

    def fill(self) -> None:
        samples = self.samples
        samples.draft_rewards = [self.draft_rewards[i] for i in sorted(self.draft_rewards)]
        samples.draft_solved = [self.draft_solved[i] for i in sorted(self.draft_solved)]
        samples.best_draft_index = [self.best_index[i] for i in sorted(self.best_index)]
        samples.best_drafts = [self.best_drafts[i] for i in sorted(self.best_drafts)]
        samples.draft_completions = [self.drafts[i] for i in sorted(self.drafts)]
        samples.draft_prompts = [self.template.problem_ids(self.problems[i].problem) for i in sorted(self.drafts)]


def draft_stage(problems_source: Callable[[int], Sequence[Problem]], num_problems: int,
                generator: GenerationBackend, reward: RewardFn, template: PromptTemplate,
                decode: Callable[[list[int]], str], settings: RolloutSettings) -> Drafts:
    """Stage 1 alone, for ``rollout(..., drafts=...)``: draw ``num_problems`` problems, sample N drafts each,
    score them and select the best. Seconds go to the result's ``timings`` (``rollout/drafts``,
    ``rollout/generation``, ``rollout/reward``), counted into the step that consumes it."""
    problems = list(problems_source(num_problems))
    samples = StageSamples()
    select = _DraftSelection(problems, reward, template, decode, settings, samples)
    started = time.perf_counter()
    prompts = [template.problem_ids(p.problem) for p in problems]
    faults.point("rollout.generate")
    drafts = (generator.generate(prompts, replace(settings.sampling, n=settings.num_drafts))
              if settings.num_drafts > 0 else [[] for _ in problems])
    generated = time.perf_counter() - started
    refinement_prompts = [list(select(i, d)) for i, d in enumerate(drafts)]
    select.fill()
    return Drafts(problems, refinement_prompts, samples, {
        "rollout/drafts": generated, "rollout/generation": generated, "rollout/reward": select.reward_seconds})


def _refine_drafts(drafts: Drafts, generator, reward, decode, settings, timings) -> StageSamples:
    """A first round whose Stage 1 is done: sample and score the refinements of ``drafts``."""
    for key, seconds in drafts.timings.items():
        _add(timings, key, seconds)
    started = time.perf_counter()
    refinements = generator.generate(drafts.refinement_prompts, replace(settings.sampling, n=settings.num_refinements))
    generated = time.perf_counter() - started
    _add(timings, "rollout/generation", generated)
    _add(timings, "rollout/refinements", generated)
    return _score_refinements(drafts.samples, drafts.problems, drafts.refinement_prompts, refinements, reward, decode,
                              settings, timings, first_group_id=0)


def _sample_round(problems, generator, reward, template, decode, settings, timings, first_group_id):
    n, g = settings.num_drafts, settings.num_refinements
    samples = StageSamples()
    start = time.perf_counter()
    select = _DraftSelection(problems, reward, template, decode, settings, samples)

    prompts = [template.problem_ids(p.problem) for p in problems]
    faults.point("rollout.generate")
    _, stage2_prompts, refinements = generator.generate_chained(
        prompts, replace(settings.sampling, n=n), select, replace(settings.sampling, n=g))
    select.fill()
    generated = time.perf_counter() - start - select.reward_seconds

    drafts = (select.first_follow_up - start) if n else 0.0
    _add(timings, "rollout/reward", select.reward_seconds)
    _add(timings, "rollout/generation", generated)
    _add(timings, "rollout/drafts", drafts)
    _add(timings, "rollout/refinements", generated - drafts)
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
    _count(samples.reward_counters, scored.counters)
    _count_non_finite(samples.reward_counters, scored.scores)
    _add(timings, "rollout/reward", time.perf_counter() - started)
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


def _count_non_finite(into: dict[str, int], scores: list[float]) -> None:
    """Unscorable samples (a NaN/inf reward): they get advantage 0 and are never the best draft."""
    into["non_finite"] = into.get("non_finite", 0) + sum(not math.isfinite(s) for s in scores)


def _add(timings: dict[str, float], key: str, seconds: float) -> None:
    timings[key] = timings.get(key, 0.0) + seconds


def _count(into: dict[str, int], more: dict[str, int]) -> None:
    for key, value in more.items():
        into[key] = into.get(key, 0) + value


def _drop_zero_variance(samples: StageSamples) -> StageSamples:
    flat = zero_variance_groups(torch.tensor(samples.rewards), torch.tensor(samples.group_ids))
    keep = [i for i, zero in enumerate(flat.tolist()) if not zero]
    return _rows(samples, keep)


def _first_groups(samples: StageSamples, num_groups: int) -> StageSamples:
    """The rows of the first ``num_groups`` groups (a last dynamic-sampling round may overshoot)."""
    wanted = set(list(dict.fromkeys(samples.group_ids))[:num_groups])
    return _rows(samples, [i for i, gid in enumerate(samples.group_ids) if gid in wanted])


def _rows(samples: StageSamples, keep: list[int]) -> StageSamples:
    values = {}
    for item in fields(StageSamples):
        kind, value = item.metadata[_KIND], getattr(samples, item.name)
        if kind == _ROW:
            values[item.name] = [value[i] for i in keep]
        elif kind == _ROW_COLUMNS:
            values[item.name] = {k: [v[i] for i in keep] for k, v in value.items()}
        elif kind == _PROBLEM:
            values[item.name] = value
    return StageSamples(**values)


def _extend(into: StageSamples, more: StageSamples) -> None:
    for item in fields(StageSamples):
        kind, mine, theirs = item.metadata[_KIND], getattr(into, item.name), getattr(more, item.name)
        if kind in (_ROW, _PROBLEM):
            mine += theirs
        elif kind == _ROW_COLUMNS:
            for key, values in theirs.items():
                mine.setdefault(key, []).extend(values)
        else:
            _count(mine, theirs)


def _to_batch(samples: StageSamples, settings: RolloutSettings, pad_token_id: int) -> RolloutBatch:
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

"""The two-stage flow, written once: Stage-1 drafts → select one per problem → Stage-2 prompt → refinements.

Training (``igrpo.collect_batch``), draft-ahead training (Stage 1 apart, ``draft_stage`` then ``refine``) and two-pass
evaluation (``evaluation.two_pass``) all run it, so a change to the Stage-2 prompt (``template.refinement_ids``) or
to how a draft is selected reaches all three. What differs between them is handed in: how drafts are scored
(``score``: training adds DAPO's length penalty) and how one is chosen (``choose``: the best reward, or, at test
time, the majority answer).

Seconds per phase are returned under the keys the training metrics use (``rollout/drafts``,
``rollout/refinements``, ``rollout/generation``, ``rollout/reward``).
"""

from __future__ import annotations

import math
import time
from typing import Callable, Protocol, Sequence

import torch

from nemo_igrpo import faults
from nemo_igrpo.algorithms.samples import StageSamples, add_counts, count_non_finite
from nemo_igrpo.algorithms.selection import select_draft
from nemo_igrpo.generation.base import Completion, GenerationBackend, SamplingParams


class Problem(Protocol):
    problem: str
    answer: str


class PromptTemplate(Protocol):
    def problem_ids(self, problem: str) -> list[int]: ...
    def refinement_ids(self, problem: str, draft_text: str) -> list[int]: ...


# (draft texts, their gold answers, the drafts) -> a RewardOutput (scores, counters, solved())
DraftScorer = Callable[[list[str], list[str], list[Completion]], object]
# (the drafts' scores, their texts) -> the index of the selected draft
DraftChooser = Callable[[list[float], list[str]], int]


def by_reward(selection: str, tie_break: str) -> DraftChooser:
    """Select by the drafts' rewards with the registered ``algorithm.draft_selection``: ``best`` is Algorithm 1's
    argmax (ties by ``tie_break``), ``random`` the ablation that ignores them."""
    return lambda scores, texts: int(select_draft(torch.tensor([scores]), selection, tie_break)[0])


def best_reward(tie_break: str) -> DraftChooser:
    """Select the draft with the highest reward (Algorithm 1's argmax; ties by ``tie_break``)."""
    return by_reward("best", tie_break)


class DraftSelection:
    """Stage 1 → Stage 2 for one problem at a time: score its N drafts, select one, return its Stage-2 prompt.

    Called as each problem's drafts are done (streaming backends: in any order, under their lock); draft lengths
    and reward counters go into ``samples`` as they come, the rest is put in problem order by ``fill``. With
    ``num_drafts`` 0 (GRPO) the Stage-2 prompt is the plain problem prompt."""

    def __init__(self, problems: Sequence[Problem], template: PromptTemplate, decode: Callable[[list[int]], str],
                 num_drafts: int, score: DraftScorer, choose: DraftChooser, samples: StageSamples) -> None:
        self.problems, self.template, self.decode = problems, template, decode
        self.num_drafts, self.score, self.choose, self.samples = num_drafts, score, choose, samples
        self.answers = [p.answer for p in problems]
        self.first_follow_up: float | None = None  # when the first problem's drafts were done
        self.reward_seconds = 0.0
        # keyed by problem: streaming backends may finish out of order
        self.draft_texts: dict[int, list[str]] = {}
        self.draft_rewards: dict[int, list[float]] = {}
        self.draft_solved: dict[int, list[bool]] = {}
        self.best_index: dict[int, int] = {}
        self.best_drafts: dict[int, str] = {}
        self.drafts: dict[int, list[Completion]] = {}

    def __call__(self, i: int, drafts: list[Completion]) -> list[int]:
        n, samples = self.num_drafts, self.samples
        started = time.perf_counter()
        self.first_follow_up = self.first_follow_up or started
        if n == 0:
            return self.template.problem_ids(self.problems[i].problem)
        texts = faults.point("rollout.reward", [self.decode(d.token_ids) for d in drafts], stage="draft")
        scored = self.score(texts, [self.answers[i]] * n, drafts)
        faults.point("rollout.rewarded", stage="draft")
        add_counts(samples.reward_counters, scored.counters)
        count_non_finite(samples.reward_counters, scored.scores)
        scores = scored.scores
        best = self.choose(scores, texts)
        self.reward_seconds += time.perf_counter() - started
        self.draft_texts[i] = texts
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


def draft_and_refine(problems: Sequence[Problem], generator: GenerationBackend, select: DraftSelection,
                     draft_params: SamplingParams, refine_params: SamplingParams,
                     ) -> tuple[list[list[int]], list[list[Completion]], dict[str, float]]:
    """Both stages in one call (``generate_chained``: streaming engines start a problem's refinements as soon as its
    own drafts are selected). Returns the Stage-2 prompts, the refinements and the seconds per phase."""
    n = draft_params.n
    start = time.perf_counter()
    prompts = [select.template.problem_ids(p.problem) for p in problems]
    faults.point("rollout.generate")
    _, stage2_prompts, refinements = generator.generate_chained(prompts, draft_params, select, refine_params)
    select.fill()
    generated = time.perf_counter() - start - select.reward_seconds
    drafts = (select.first_follow_up - start) if n else 0.0
    return stage2_prompts, refinements, {"rollout/reward": select.reward_seconds, "rollout/generation": generated,
                                         "rollout/drafts": drafts, "rollout/refinements": generated - drafts}


def draft_stage(problems: Sequence[Problem], generator: GenerationBackend, select: DraftSelection,
                params: SamplingParams) -> tuple[list[list[int]], dict[str, float]]:
    """Stage 1 alone (draft-ahead: run beside the previous update): sample ``params.n`` drafts per problem, score
    them and select one. Returns the Stage-2 prompts and the seconds per phase; ``refine`` is the rest."""
    started = time.perf_counter()
    prompts = [select.template.problem_ids(p.problem) for p in problems]
    faults.point("rollout.generate")
    drafts = generator.generate(prompts, params) if params.n > 0 else [[] for _ in problems]
    generated = time.perf_counter() - started
    refinement_prompts = [list(select(i, d)) for i, d in enumerate(drafts)]
    select.fill()
    return refinement_prompts, {"rollout/drafts": generated, "rollout/generation": generated,
                                "rollout/reward": select.reward_seconds}


def refine(refinement_prompts: list[list[int]], generator: GenerationBackend, params: SamplingParams,
           ) -> tuple[list[list[Completion]], dict[str, float]]:
    """Stage 2 of prompts whose drafts were selected by ``draft_stage``: ``params.n`` refinements each."""
    started = time.perf_counter()
    refinements = generator.generate(refinement_prompts, params)
    generated = time.perf_counter() - started
    return refinements, {"rollout/generation": generated, "rollout/refinements": generated}

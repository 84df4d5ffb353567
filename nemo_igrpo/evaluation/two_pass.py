"""Two-pass (draft → refine) evaluation: does a trained model answer better with its own best draft in the prompt?

The paper evaluates single-pass (``nemo_igrpo.evaluation.run``). This runs iGRPO's two stages at test time, to tell
apart what training taught: single-pass skill (the drafts get better) or refinement (the answer given a draft beats
the draft). Per problem: N drafts from the plain prompt; one is selected; k refinements are sampled from the Stage-2
prompt (``PromptBuilder.refinement_ids``: problem + header + draft, as in training) and graded. The stages are
training's own flow (``algorithms.two_stage``), so a change to the Stage-2 prompt or the selection reaches both.

Selection:

* ``oracle``: the highest reward against the gold answer, as Stage 1 does in training. At test time this peeks at
  the answer, so its numbers are an upper bound on what refinement can use, not a deployable accuracy.
* ``majority``: the first draft whose final answer is the most common among the N (no gold answer used): a protocol
  a user could actually run (self-consistency, then refine).
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Sequence

from nemo_igrpo.algorithms.samples import StageSamples
from nemo_igrpo.algorithms.two_stage import DraftSelection, best_reward, draft_and_refine
from nemo_igrpo.data.dataset import Example
from nemo_igrpo.evaluation.metrics import summarize
from nemo_igrpo.generation.base import GenerationBackend, SamplingParams
from nemo_igrpo.rewards.answer import extract_final_answer

SELECTIONS = ("oracle", "majority")


@dataclass
class TwoPassResult:
    summary: dict[str, float]
    records: list[dict]  # one per problem: drafts, their verdicts, the selected one, refinements and verdicts


def evaluate_two_pass(examples: Sequence[Example], generator: GenerationBackend, template, reward,
                      decode: Callable[[list[int]], str], params: SamplingParams, num_drafts: int,
                      selection: str = "oracle", tie_break: str = "first") -> TwoPassResult:
    """``num_drafts`` drafts and ``params.n`` refinements per problem, both sampled with ``params``' settings.

    ``template`` is a ``PromptBuilder`` (its ``draft_content`` decides how much of the draft is shown). Summary (all
    fractions): ``draft_accuracy`` (p, the single-pass success of one draft), ``any_draft_correct`` (best-of-N with
    an oracle), ``selected_draft_accuracy``, ``refined_accuracy`` (avg@k of the refinements; also ``refined/pass@j``),
    ``refined_minus_selected_draft``, and ``refined_given_right_draft`` / ``refined_given_wrong_draft`` (does the
    refinement keep a right draft, repair a wrong one; NaN when no problem is in that case).
    """
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {', '.join(SELECTIONS)}, got {selection!r}")
    if num_drafts < 1:
        raise ValueError(f"two-pass evaluation needs num_drafts >= 1, got {num_drafts}")
    samples = StageSamples()
    choose = best_reward(tie_break) if selection == "oracle" else (lambda scores, texts: majority_index(texts))
    select = DraftSelection(examples, template, decode, num_drafts,
                            lambda texts, answers, drafts: reward(texts, answers), choose, samples)
    _, refinements, _ = draft_and_refine(examples, generator, select, dataclasses.replace(params, n=num_drafts),
                                         params)  # the training flow: drafts → selection → Stage-2 prompt → refine
    draft_texts = [select.draft_texts[i] for i in range(len(examples))]
    draft_correct, chosen = samples.draft_solved, samples.best_draft_index
    refined_texts = [[decode(c.token_ids) for c in group] for group in refinements]
    k = params.n
    answers = [e.answer for e in examples]
    verdicts = reward([t for group in refined_texts for t in group], [a for a in answers for _ in range(k)]).solved()
    refined_correct = [verdicts[i * k:(i + 1) * k] for i in range(len(examples))]

    selected_right = [draft_correct[i][chosen[i]] for i in range(len(examples))]
    refined_rate = [sum(c) / k for c in refined_correct]
    summary = {
        "draft_accuracy": _mean([sum(c) / num_drafts for c in draft_correct]),
        "any_draft_correct": _mean([float(any(c)) for c in draft_correct]),
        "selected_draft_accuracy": _mean([float(r) for r in selected_right]),
        "refined_accuracy": _mean(refined_rate),
        "refined_minus_selected_draft": _mean([r - s for r, s in zip(refined_rate, selected_right)]),
        "refined_given_right_draft": _mean([r for r, s in zip(refined_rate, selected_right) if s]),
        "refined_given_wrong_draft": _mean([r for r, s in zip(refined_rate, selected_right) if not s]),
        **{f"refined/{key}": value for key, value in summarize(refined_correct).items()},
    }
    records = [{"id": e.id, "problem": e.problem, "answer": e.answer, "drafts": draft_texts[i],
                "draft_correct": draft_correct[i], "selected": chosen[i], "refinements": refined_texts[i],
                "refined_correct": refined_correct[i]} for i, e in enumerate(examples)]
    return TwoPassResult(summary=summary, records=records)


def majority_index(texts: Sequence[str]) -> int:
    """The first text whose final answer is the most frequent among those with an answer; 0 when none has one."""
    extracted = [extract_final_answer(t) for t in texts]
    counts = Counter(a.strip() for a in extracted if a is not None)
    if not counts:
        return 0
    top = max(counts.values())
    return next(i for i, a in enumerate(extracted) if a is not None and counts[a.strip()] == top)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan

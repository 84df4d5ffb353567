"""Single-pass evaluation (no drafts at inference, as in the paper): k samples per problem, scored by the reward."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from nemo_igrpo import distributed
from nemo_igrpo.data.dataset import Example
from nemo_igrpo.evaluation.metrics import summarize
from nemo_igrpo.generation.base import GenerationBackend, SamplingParams
from nemo_igrpo.rewards.answer import extract_final_answer


@dataclass
class EvalResult:
    summary: dict[str, float]  # avg@k and pass@k for k = 1, 2, 4, …, and no_answer (share without a final answer)
    records: list[dict]  # one per problem: completions, extracted answers, verdicts

    @property
    def accuracy(self) -> float:
        return next(v for k, v in self.summary.items() if k.startswith("avg@"))


def evaluate(
    examples: Sequence[Example],
    generator: GenerationBackend,
    prompt_ids: Callable[[str], list[int]],
    reward: Callable,
    decode: Callable[[list[int]], str],
    params: SamplingParams,
) -> EvalResult:
    """Sample ``params.n`` answers per problem from its plain prompt and grade each with ``reward`` (> 0 = correct)."""
    outputs = generator.generate([prompt_ids(e.problem) for e in examples], params)
    texts = [[decode(c.token_ids) for c in group] for group in outputs]
    scores = reward([t for group in texts for t in group], [e.answer for e in examples for _ in range(params.n)])
    verdicts = scores.solved()  # the accuracy component when there is one: a format bonus is not a solve
    correct = [verdicts[i * params.n:(i + 1) * params.n] for i in range(len(examples))]
    records = [
        {"id": e.id, "problem": e.problem, "answer": e.answer,
         "completions": group, "extracted": [extract_final_answer(t) for t in group], "correct": verdict}
        for e, group, verdict in zip(examples, texts, correct)
    ]
    return EvalResult(summary={**summarize(correct, None), "no_answer": _no_answer(records)}, records=records)


def _no_answer(records: list[dict]) -> float:
    """The share of completions with no final answer to extract: a gain in accuracy that is only this share falling
    is the answer format being learnt, not solving."""
    extracted = [answer for r in records for answer in r["extracted"]]
    return sum(answer is None for answer in extracted) / max(len(extracted), 1)


def sharded_eval(examples: list[Example], generator: GenerationBackend, template, reward, decode,
                 params: SamplingParams, group) -> EvalResult:
    """Each rank evaluates every world-th problem; the summary is over all problems (records: this rank's only)."""
    world = distributed.world_size(group)
    if group is None or world == 1:
        return evaluate(examples, generator, template.problem_ids, reward, decode, params)
    mine = examples[distributed.rank(group)::world]
    result = evaluate(mine, generator, template.problem_ids, reward, decode, params) if mine else None
    records = result.records if result else []
    mine_only = [{"correct": r["correct"], "extracted": r["extracted"]} for r in records]
    everyone = [r for part in distributed.all_gather_objects(mine_only, group) for r in part]
    summary = {**summarize([r["correct"] for r in everyone], None), "no_answer": _no_answer(everyone)}
    return EvalResult(summary=summary, records=records)

"""Rule-based correctness reward: 1.0 when the completion's final answer matches the gold answer, else 0.0."""

from __future__ import annotations

from functools import partial
from typing import Callable, Literal

from nemo_igrpo.rewards.answer import answers_match, extract_answer
from nemo_igrpo.rewards.base import Reward, RewardOutput, register_reward

ExtractMode = Literal["boxed", "answer_tag", "boxed_or_tag"]

# Where the final answer is read (``extract_answer``): boxes in the <think> part never count once the completion
# has an <answer> block, and boxes that together state one answer are read together.
EXTRACTORS: dict[str, Callable[[str], str | None]] = {
    mode: partial(extract_answer, mode=mode) for mode in ("boxed", "answer_tag", "boxed_or_tag")
}


@register_reward("boxed_match")
class BoxedMatchReward(Reward):
    """Exact-answer reward. Only the completion is scored: in iGRPO the draft sits in the prompt, and an answer
    copied there must not earn a refinement any credit unless the refinement states it itself."""

    def __init__(self, extract: ExtractMode = "boxed") -> None:
        if extract not in EXTRACTORS:
            raise ValueError(f"extract must be one of {sorted(EXTRACTORS)}, got {extract!r}")
        self.extract = extract
        self._extractor = EXTRACTORS[extract]

    @classmethod
    def from_config(cls, settings, context) -> "BoxedMatchReward":
        return cls(extract=settings.extract)

    def __call__(self, completions: list[str], answers: list[str]) -> RewardOutput:
        if len(completions) != len(answers):
            raise ValueError(f"{len(completions)} completions but {len(answers)} answers")
        predictions = [self._extractor(completion) for completion in completions]
        scores = [float(answers_match(pred, gold)) for pred, gold in zip(predictions, answers)]
        # Completions without any extractable answer: a format problem rather than a wrong answer.
        no_answer = sum(pred is None for pred in predictions)
        return RewardOutput(scores=scores, components={"accuracy": list(scores)}, counters={"no_answer": no_answer})

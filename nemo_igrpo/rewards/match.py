"""Rule-based correctness reward: 1.0 when the completion's final answer matches the gold answer, else 0.0."""

from __future__ import annotations

from typing import Callable, Literal

from nemo_igrpo.rewards.answer import answers_match, extract_answer_tag, extract_boxed, extract_final_answer
from nemo_igrpo.rewards.base import Reward, RewardOutput, register_reward

ExtractMode = Literal["boxed", "answer_tag", "boxed_or_tag"]

EXTRACTORS: dict[str, Callable[[str], str | None]] = {
    "boxed": extract_boxed,
    "answer_tag": extract_answer_tag,
    "boxed_or_tag": extract_final_answer,
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
    def from_config(cls, config) -> "BoxedMatchReward":
        return cls(extract=config.reward.extract)

    def __call__(self, completions: list[str], answers: list[str]) -> RewardOutput:
        if len(completions) != len(answers):
            raise ValueError(f"{len(completions)} completions but {len(answers)} answers")
        predictions = [self._extractor(completion) for completion in completions]
        scores = [float(answers_match(pred, gold)) for pred, gold in zip(predictions, answers)]
        # Completions without any extractable answer: a format problem rather than a wrong answer.
        no_answer = sum(pred is None for pred in predictions)
        return RewardOutput(scores=scores, components={"accuracy": list(scores)}, counters={"no_answer": no_answer})

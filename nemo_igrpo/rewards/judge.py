"""A generative judge as the reward (the paper's Table 3 swaps the rule reward for GPT-5 scoring in [0, 1]).

Any generation backend can be the judge: the prompt (a ``string.Template`` file with ``$answer`` and
``$completion``) is rendered with the judge's chat template, the judge answers greedily, and the first number in
[0, 1] of its reply is the score. A reply without one scores 0 and is counted as ``judge_unparseable``.
"""

from __future__ import annotations

import re
import string
from importlib import resources
from pathlib import Path
from typing import Callable

from nemo_igrpo.generation.base import GenerationBackend, SamplingParams
from nemo_igrpo.rewards.base import Reward, RewardContext, RewardOutput, register_reward

# A standalone number in [0, 1]: 0, 1, 0.75, .5, 1.0 — not the 1 of "10" or of "1/2" halves.
_SCORE = re.compile(r"(?<![\d.])(1(?:\.0*)?|0?\.\d+|0)(?![\d./])")


def parse_score(reply: str) -> float | None:
    """The first standalone number in [0, 1] in ``reply``, or None."""
    match = _SCORE.search(reply)
    return float(match.group(1)) if match else None


def load_template(name: str) -> string.Template:
    """A template file: a path, or a name under conf/ (e.g. ``judge/math_judge.txt``, shipped in the wheel)."""
    path = Path(name)
    if not path.is_file():
        repo_copy = Path(__file__).resolve().parents[2] / "conf" / name
        path = repo_copy if repo_copy.is_file() else Path(str(resources.files("nemo_igrpo.conf").joinpath(name)))
    if not path.is_file():
        raise FileNotFoundError(f"reward.judge.template: no template file {name!r} (a path or a name under conf/)")
    return string.Template(path.read_text())


@register_reward("judge")
class JudgeReward(Reward):
    uses_chat_model = True

    def __init__(self, generator: GenerationBackend, render: Callable[[str], list[int]],
                 decode: Callable[[list[int]], str], template: string.Template, stop_token_ids: tuple[int, ...],
                 max_new_tokens: int = 8, max_completion_chars: int = 4000):
        self.generator = generator
        self.render = render  # user message → prompt token ids (the judge's chat template)
        self.decode = decode
        self.template = template
        self.params = SamplingParams(n=1, temperature=0.0, max_new_tokens=max_new_tokens,
                                     stop_token_ids=stop_token_ids)
        self.max_completion_chars = max_completion_chars

    def __call__(self, completions: list[str], answers: list[str]) -> RewardOutput:
        prompts = [self.render(self.template.safe_substitute(
            answer=answer, completion=completion[-self.max_completion_chars:]))  # the end holds the final answer
            for completion, answer in zip(completions, answers)]
        replies = [self.decode(group[0].token_ids) for group in self.generator.generate(prompts, self.params)]
        parsed = [parse_score(reply) for reply in replies]
        scores = [score if score is not None else 0.0 for score in parsed]
        return RewardOutput(scores=scores, components={"judge": list(scores)},
                            counters={"judge_unparseable": sum(score is None for score in parsed)})

    def close(self) -> None:
        self.generator.close()

    @classmethod
    def from_config(cls, settings, context: RewardContext) -> "JudgeReward":
        """The judge model (``reward.judge.model``, default the policy's starting model), on the run's generation
        backend (``context.chat_model``, lent by the assembly)."""
        judge = settings.judge
        chat = context.chat_model(judge.model)
        return cls(chat.generator, chat.render, chat.decode, load_template(judge.template), chat.stop_token_ids,
                   judge.max_new_tokens, judge.max_completion_chars)

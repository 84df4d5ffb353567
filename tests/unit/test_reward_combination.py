"""The paper's format reward, the weighted sum of rewards, and building the training reward from config."""

from __future__ import annotations

import pytest

from nemo_igrpo.config import load_config
from nemo_igrpo.assembly import build_training_reward
from nemo_igrpo.rewards import BoxedMatchReward, FormatReward, WeightedReward


@pytest.mark.parametrize("text, expected", [
    ("<think>7+5=12</think><answer>12</answer>", 1.0),
    ("  <think>a\nb</think>\n<answer>\\boxed{12}</answer>\n", 1.0),  # whitespace around blocks is fine
    ("<answer>12</answer>", 0.0),  # no reasoning block
    ("<think>x</think>", 0.0),  # no answer block
    ("<answer>12</answer><think>x</think>", 0.0),  # wrong order
    ("<think>x</think><answer>1</answer> and more", 0.0),  # trailing text
    ("<think>x<think>y</think><answer>1</answer>", 0.0),  # nested think
    ("<think>x</think><answer>1</answer><answer>2</answer>", 0.0),  # two answers
    ("the answer is 12", 0.0),
])
def test_format_reward(text, expected):
    out = FormatReward()([text], ["12"])
    assert out.scores == [expected] and out.components == {"format": [expected]}


def test_weighted_sum_keeps_every_component():
    reward = WeightedReward({"boxed_match": (BoxedMatchReward("boxed_or_tag"), 1.0), "format": (FormatReward(), 0.5)})
    texts = ["<think>7+5</think><answer>12</answer>",  # right and well formed: 1 + 0.5
             "<think>7+5</think><answer>13</answer>",  # wrong, well formed: 0 + 0.5
             "\\boxed{12}"]  # right, no template: 1 + 0
    out = reward(texts, ["12"] * 3)
    assert out.scores == [1.5, 0.5, 1.0]
    assert out.components == {"accuracy": [1.0, 0.0, 1.0], "format": [1.0, 1.0, 0.0]}
    assert out.counters == {"no_answer": 0}


def test_training_reward_from_config():
    paper = build_training_reward(load_config(None))  # math_verify 1.0 + format 1.0
    assert isinstance(paper, WeightedReward) and set(paper.parts) == {"math_verify", "format"}
    paper.close()
    single = build_training_reward(load_config(None, ["reward.components={boxed_match: 1.0}",
                                                      "reward.extract=answer_tag"]))
    assert isinstance(single, BoxedMatchReward) and single.extract == "answer_tag"


def test_evaluation_counts_only_the_accuracy_component():
    from nemo_igrpo.data.dataset import Example
    from nemo_igrpo.evaluation.run import evaluate
    from nemo_igrpo.generation.base import Completion, GenerationBackend, SamplingParams

    class WellFormattedButWrong(GenerationBackend):
        def generate(self, prompts, params):
            return [[Completion([1], [0.0], "stop")] * params.n for _ in prompts]

        def update_weights(self, weights):
            pass

    reward = WeightedReward({"boxed_match": (BoxedMatchReward("boxed_or_tag"), 1.0), "format": (FormatReward(), 1.0)})
    result = evaluate([Example("Q?", "12")], WellFormattedButWrong(), lambda problem: [0], reward,
                      lambda ids: "<think>x</think><answer>13</answer>", SamplingParams(n=2))
    assert result.accuracy == 0.0  # reward 1.0 from format alone is not a solve


def test_evaluation_reports_the_share_without_an_answer():
    from nemo_igrpo.data.dataset import Example
    from nemo_igrpo.evaluation.run import evaluate
    from nemo_igrpo.generation.base import Completion, GenerationBackend, SamplingParams

    class Numbered(GenerationBackend):  # sample k of each problem decodes to texts[k]
        def generate(self, prompts, params):
            return [[Completion([k], [0.0], "stop") for k in range(params.n)] for _ in prompts]

        def update_weights(self, weights):
            pass

    texts = ["\\boxed{12}", "twelve", "\\boxed{13}", "no box"]
    result = evaluate([Example("Q?", "12"), Example("R?", "12")], Numbered(), lambda problem: [0],
                      BoxedMatchReward("boxed"), lambda ids: texts[ids[0]], SamplingParams(n=4))
    assert result.accuracy == 0.25  # one right of four, on each problem
    assert result.summary["no_answer"] == 0.5  # "twelve" and "no box": 2 of 4, on each problem

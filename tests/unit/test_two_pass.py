"""Two-pass (draft → refine) evaluation with a scripted generator: which draft is selected, that the second-pass
prompt carries it, and that accuracy is computed on the refinements."""

import math

import pytest

from nemo_igrpo.data.char_tokenizer import build_char_tokenizer
from nemo_igrpo.data.dataset import Example
from nemo_igrpo.data.prompts import PromptBuilder
from nemo_igrpo.evaluation.two_pass import evaluate_two_pass, majority_index
from nemo_igrpo.generation.base import Completion, GenerationBackend, SamplingParams
from nemo_igrpo.rewards import BoxedMatchReward

TOKENIZER = build_char_tokenizer()
END = TOKENIZER.eos_token_id
TEMPLATE = PromptBuilder(TOKENIZER, system_prompt=None, draft_header="Draft:", draft_content="full")
PROBLEMS = [Example("Q1?", "5"), Example("Q2?", "3")]
DRAFTS = {"Q1?": ["1+3=4 \\boxed{4}", "2+3=5 \\boxed{5}", "1+3=4 \\boxed{4}", "3+4=7 \\boxed{7}"],  # one right
          "Q2?": ["\\boxed{1}", "\\boxed{2}", "\\boxed{2}", "\\boxed{1}"]}  # none right; 1 and 2 tie for majority


class Scripted(GenerationBackend):
    """Drafts from DRAFTS; a refinement of a right draft is right for samples 0-2 of 4, of a wrong draft only for
    sample 0 (so refined accuracy is 0.75 after a right draft, 0.25 after a wrong one). Records every prompt."""

    def __init__(self):
        self.prompts: list[str] = []

    def generate(self, prompts, params):
        out = []
        for ids in prompts:
            text = TOKENIZER.decode(ids)
            self.prompts.append(text)
            problem = next(p for p in PROBLEMS if p.problem in text)
            if "Draft:" not in text:
                answers = DRAFTS[problem.problem][: params.n]
            else:
                shown_right = f"\\boxed{{{problem.answer}}}" in text.split("Draft:", 1)[1]
                right = 3 if shown_right else 1
                answers = [f"\\boxed{{{problem.answer if j < right else 0}}}" for j in range(params.n)]
            out.append([Completion(TOKENIZER.encode(a, add_special_tokens=False) + [END], [0.0] * (len(a) + 1),
                                   "stop") for a in answers])
        return out

    def update_weights(self, weights):
        pass


def decode(ids):
    return TOKENIZER.decode(ids, skip_special_tokens=True)


def run(selection):
    generator = Scripted()
    result = evaluate_two_pass(PROBLEMS, generator, TEMPLATE, BoxedMatchReward(), decode, SamplingParams(n=4), 4,
                               selection=selection)
    return result, generator


def test_oracle_selection_refines_on_the_best_draft():
    result, generator = run("oracle")
    assert [r["selected"] for r in result.records] == [1, 0]  # Q1: the right draft; Q2: all wrong, the first
    # Second pass: exactly the training Stage-2 prompt, holding the selected draft in full
    assert generator.prompts[2:] == [TOKENIZER.decode(TEMPLATE.refinement_ids("Q1?", "2+3=5 \\boxed{5}")),
                                     TOKENIZER.decode(TEMPLATE.refinement_ids("Q2?", "\\boxed{1}"))]
    assert "Draft:\n2+3=5 \\boxed{5}" in generator.prompts[2]
    s = result.summary
    assert s["draft_accuracy"] == pytest.approx((1 / 4 + 0) / 2)  # exact in binary: 0.125
    assert (s["any_draft_correct"], s["selected_draft_accuracy"]) == (0.5, 0.5)
    assert s["refined_accuracy"] == pytest.approx((0.75 + 0.25) / 2)  # accuracy of the refinements, not the drafts
    assert s["refined/avg@4"] == pytest.approx(0.5)
    assert s["refined/pass@4"] == 1.0
    assert s["refined_minus_selected_draft"] == pytest.approx(((0.75 - 1) + (0.25 - 0)) / 2)  # = 0
    assert (s["refined_given_right_draft"], s["refined_given_wrong_draft"]) == (0.75, 0.25)
    assert result.records[0]["refined_correct"] == [True, True, True, False]


def test_majority_selection_uses_no_gold_answer():
    result, generator = run("majority")
    # Q1: "4" is the most common answer (drafts 0 and 2) → draft 0, which is wrong; Q2: 1 and 2 tie → the first
    assert [r["selected"] for r in result.records] == [0, 0]
    assert "Draft:\n1+3=4 \\boxed{4}" in generator.prompts[2]
    s = result.summary
    assert (s["selected_draft_accuracy"], s["refined_accuracy"], s["refined_given_wrong_draft"]) == (0.0, 0.25, 0.25)
    assert math.isnan(s["refined_given_right_draft"])  # no problem had a right selected draft


def test_majority_index():
    assert majority_index(["\\boxed{3}", "\\boxed{4}", "\\boxed{4}"]) == 1
    assert majority_index(["no answer", "\\boxed{2}"]) == 1  # drafts without an answer do not vote
    assert majority_index(["none", "none"]) == 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="selection"):
        evaluate_two_pass(PROBLEMS, Scripted(), TEMPLATE, BoxedMatchReward(), decode, SamplingParams(n=1), 2, "best")
    with pytest.raises(ValueError, match="num_drafts"):
        evaluate_two_pass(PROBLEMS, Scripted(), TEMPLATE, BoxedMatchReward(), decode, SamplingParams(n=1), 0)

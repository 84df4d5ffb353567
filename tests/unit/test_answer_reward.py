"""Answer extraction, normalisation/matching and the boxed-match reward."""

import time

import pytest

from nemo_igrpo.rewards.answer import extract_answer

from nemo_igrpo.rewards import (
    REWARDS,
    BoxedMatchReward,
    Reward,
    RewardOutput,
    answers_match,
    build_reward,
    extract_answer_tag,
    extract_boxed,
    extract_boxed_answer,
    normalize_answer,
    register_reward,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so \\boxed{42}.", "42"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{{a}{b{c}}}", "{a}{b{c}}"),
        ("\\boxed{1} and later \\boxed{2}", "2"),
        ("\\boxed {7}", "7"),
        ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),
        ("no box here", None),
        ("\\boxed{1} then \\boxed{2", None),
        ("\\boxed{{1}", None),
        ("", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_extract_boxed_deep_nesting_and_long_inputs_are_fast():
    deep = "\\boxed{" + "{" * 10_000 + "x" + "}" * 10_000 + "}"
    long_text = "a" * 100_000 + "\\boxed{" + "{}" * 50_000 + "}"
    unbalanced = "\\boxed{" + "{" * 200_000
    many_boxes = "\\boxed{1}" * 25_000
    start = time.perf_counter()
    assert extract_boxed(deep) == "{" * 10_000 + "x" + "}" * 10_000
    assert extract_boxed(long_text) == "{}" * 50_000
    assert extract_boxed(unbalanced) is None
    assert extract_boxed(many_boxes) == "1"
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so \\boxed{42}.", "42"),
        ("The solutions are \\boxed{(1, 2)}, \\boxed{(2, 1)}.", "(1, 2), (2, 1)"),
        ("So $n$ is \\boxed{1} and \\boxed{2} and \\boxed{3}.", "1, 2, 3"),
        ("$\\boxed{k = 45} \\quad\\text{and}\\quad \\boxed{n = 2}$", "k = 45, n = 2"),
        ("$y_1 = \\boxed{3}$ and $y_2 = \\boxed{-1}$", "3, -1"),
        ("$$\\boxed{(3, 3)} \\text{ for part (a) and } \\boxed{(1, 1)}$$", "(3, 3), (1, 1)"),
        ("It is \\boxed{5} or \\boxed{6}.", "5, 6"),  # a hedge stays a hedge: the pair, not the last one
        ("First I thought \\boxed{41}, but actually \\boxed{42}.", "42"),  # a correction: the last box
        ("$$\\boxed{20}$$ \\boxed{143}", "143"),  # side by side without a connector: a restatement
        ("$x = \\boxed{3}$. Substituting back and simplifying, $y = \\boxed{7}$.", "7"),  # an intermediate box
        ("\\boxed{\\boxed{1}}", "\\boxed{1}"),  # nested: the outer box
        ("\\boxed{1}, \\boxed{2", None),  # the last box never closes
        ("no box", None),
    ],
)
def test_extract_boxed_answer(text, expected):
    assert extract_boxed_answer(text) == expected


@pytest.mark.parametrize(
    ("mode", "text", "expected"),
    [
        ("boxed_or_tag", "<think>\\boxed{3}</think><answer>5</answer>", "5"),  # the scratch box does not count
        ("boxed_or_tag", "<think>no closing tag <answer>5</answer>", "5"),
        ("boxed_or_tag", "<think>x</think><answer>so \\boxed{5}</answer>", "5"),
        ("boxed_or_tag", "<think>\\boxed{5}</think>", "5"),  # no answer block: the box counts
        ("boxed", "<think>\\boxed{3}</think><answer>5</answer>", None),
        ("boxed", "\\boxed{1} and \\boxed{2}", "1, 2"),
        ("answer_tag", "<think>\\boxed{3}</think><answer> 5 </answer>", "5"),
    ],
)
def test_extract_answer_follows_the_template(mode, text, expected):
    assert extract_answer(text, mode) == expected


def test_extract_boxed_answer_is_linear():
    many_boxes = "\\boxed{1}, " * 25_000
    nested = "\\boxed{" * 20_000 + "}" * 20_000
    start = time.perf_counter()
    assert extract_boxed_answer(many_boxes) == ", ".join(["1"] * 25_000)
    assert extract_boxed_answer(nested) == "\\boxed{" * 19_999 + "}" * 19_999
    assert time.perf_counter() - start < 1.0


def test_extract_answer_tag():
    assert extract_answer_tag("<answer>1</answer> <answer> 2 </answer>") == "2"
    assert extract_answer_tag("<think>x</think><answer>\\frac{1}{2}</answer>") == "\\frac{1}{2}"
    assert extract_answer_tag("<answer>1</answer> <answer>2") == "1"
    assert extract_answer_tag("no tags") is None
    assert extract_answer_tag("</answer> only") is None


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        (" $1,000$. ", "1000"),
        ("\\dfrac{3}{4}", "3/4"),
        ("\\frac12", "1/2"),
        ("\\left( 1, 2 \\right)", "(1,2)"),
        ("-\\frac{1+x}{2}", "-(1+x)/2"),
        ("1\\!234", "1234"),
        ("\\frac{\\frac{1}{2}}{3}", "(1/2)/3"),
    ],
)
def test_normalize_answer(raw, normal):
    assert normalize_answer(raw) == normal


@pytest.mark.parametrize(
    ("pred", "gold"),
    [
        ("1/2", "0.5"),
        ("\\frac{1}{2}", "0.5"),
        ("\\dfrac{1}{2}", "1/2"),
        ("0.50", "\\frac12"),
        ("1,000", "1000"),
        ("1,000,000", "1000000"),
        ("$38$", "38"),
        ("38.", "38"),
        (" 38 ", "38"),
        ("5.0", "5"),
        ("-3", "-3.0"),
        ("\\frac{-1}{2}", "-0.5"),
        ("2/4", "1/2"),
        ("\\left(1,2\\right)", "(1,2)"),
        ("x+1", "x + 1"),
    ],
)
def test_answers_match_true(pred, gold):
    assert answers_match(pred, gold)


@pytest.mark.parametrize(
    ("pred", "gold"),
    [
        ("1/3", "0.33"),
        ("37", "38"),
        ("1,2", "12"),
        ("1/0", "0"),
        ("", "0"),
        (None, "1"),
        ("x+1", "1+x"),
        ("1e3", "1000"),
        ("9" * 5000, "9" * 5000 + "1"),
    ],
)
def test_answers_match_false(pred, gold):
    assert not answers_match(pred, gold)


def test_boxed_match_reward_scores_only_the_completion():
    reward = BoxedMatchReward()
    prompt_with_draft = "Previous draft:\n23+15=38 \\boxed{38}"
    completions = [
        "23+15=38 \\boxed{38}",
        "23+15=37 \\boxed{37}",
        "I agree with the draft.",  # would be right if the prompt's draft were scored
        "\\boxed{0.5}",
    ]
    assert "\\boxed{38}" in prompt_with_draft
    output = reward(completions, ["38", "38", "38", "1/2"])
    assert isinstance(output, RewardOutput)
    assert output.scores == [1.0, 0.0, 0.0, 1.0]
    assert output.components == {"accuracy": [1.0, 0.0, 0.0, 1.0]}
    assert output.counters == {"no_answer": 1}


def test_extract_modes():
    completions = ["<answer>4</answer>", "\\boxed{4}", "<answer>\\boxed{4}</answer>"]
    gold = ["4"] * 3
    assert BoxedMatchReward("boxed")(completions, gold).scores == [0.0, 1.0, 1.0]
    assert BoxedMatchReward("answer_tag")(completions, gold).scores == [1.0, 0.0, 0.0]
    assert BoxedMatchReward("boxed_or_tag")(completions, gold).scores == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="extract"):
        BoxedMatchReward("regex")


def test_reward_rejects_length_mismatch():
    with pytest.raises(ValueError):
        BoxedMatchReward()(["\\boxed{1}"], [])


def test_registry_and_build_reward():
    assert REWARDS["boxed_match"] is BoxedMatchReward
    reward = build_reward("boxed_match", extract="answer_tag")
    assert isinstance(reward, BoxedMatchReward) and reward.extract == "answer_tag"
    with pytest.raises(ValueError, match="unknown reward"):
        build_reward("nope")


def test_register_reward_is_open_and_rejects_name_clashes():
    @register_reward("test_constant")
    class Constant(Reward):
        def __call__(self, completions, answers):
            return RewardOutput(scores=[0.5] * len(completions))

    try:
        assert build_reward("test_constant")(["a"], ["b"]).scores == [0.5]
        with pytest.raises(ValueError, match="already registered"):
            register_reward("boxed_match")(Constant)
    finally:
        del REWARDS["test_constant"]

"""The multi-step task builtin:chain: hand-checked problems, every written step correct, the step-count knob,
determinism, a disjoint held-out split, and its data source."""

import re

import pytest

from nemo_igrpo.config import load_config
from nemo_igrpo.data.chain import chain_train_and_heldout, make_chain_split
from nemo_igrpo.data.dataset import DatasetError
from nemo_igrpo.data.sources import load_examples
from nemo_igrpo.rewards import extract_boxed

STEP = re.compile(r"(\d+)([+*-])(\d+)=(\d+)")


def _answer_from_problem(problem: str) -> tuple[int, int]:
    """(answer, number of operations), recomputed from the wording alone."""
    start, rest = re.fullmatch(r"\w+ has (\d+) \w+, (.*)\. How many now\?", problem).groups()
    value, phrases = int(start), rest.split(", ")
    for phrase in phrases:
        if phrase == "doubles":
            value *= 2
        else:
            verb, k = phrase.split(" ")
            value = value + int(k) if verb == "gets" else value - int(k)
    return value, len(phrases)


def test_hand_checked_problems():
    first = make_chain_split(3, seed=0, max_operand=30, min_steps=2, max_steps=4)
    # Checked by hand: 9·2 = 18, 18 − 13 = 5, 5 − 4 = 1; 10 + 25 = 35, + 20 = 55, − 30 = 25; 4·2 = 8, + 29 = 37,
    # − 16 = 21, ·2 = 42.
    assert [(e.problem, e.answer, e.solution) for e in first] == [
        ("Sam has 9 apples, doubles, gives 13, gives 4. How many now?", "1", "9*2=18, 18-13=5, 5-4=1 \\boxed{1}"),
        ("Dee has 10 cards, gets 25, gets 20, gives 30. How many now?", "25",
         "10+25=35, 35+20=55, 55-30=25 \\boxed{25}"),
        ("Cy has 4 coins, doubles, gets 29, gives 16, doubles. How many now?", "42",
         "4*2=8, 8+29=37, 37-16=21, 21*2=42 \\boxed{42}"),
    ]


def test_every_written_step_is_right_and_chained():
    for example in make_chain_split(500, seed=3, max_operand=30, min_steps=1, max_steps=5):
        answer, num_phrases = _answer_from_problem(example.problem)
        assert example.answer == str(answer) == extract_boxed(example.solution)
        steps = STEP.findall(example.solution)
        assert len(steps) == num_phrases
        previous = int(re.search(r"has (\d+)", example.problem).group(1))
        for left, op, right, result in steps:
            left, right, result = int(left), int(right), int(result)
            assert left == previous  # each step starts from the last result
            assert result == {"+": left + right, "-": left - right, "*": left * right}[op]
            assert result >= 1  # counts never reach 0
            previous = result
        assert previous == answer <= (num_phrases + 1) * 30  # the bound in the module docstring


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_the_knob_sets_the_number_of_steps(steps):
    examples = make_chain_split(200, seed=1, max_operand=30, min_steps=steps, max_steps=steps)
    assert {len(STEP.findall(e.solution)) for e in examples} == {steps}


def test_a_range_of_steps_is_drawn_uniformly():
    counts = [len(STEP.findall(e.solution)) for e in make_chain_split(3000, seed=2, max_operand=30, min_steps=2,
                                                                      max_steps=4)]
    # 1000 expected each; a binomial(3000, 1/3) count has std ≈ 26, so ± 120 (4.6 std) never fails by chance
    assert all(abs(counts.count(k) - 1000) < 120 for k in (2, 3, 4))


def test_deterministic_distinct_and_disjoint():
    assert make_chain_split(50, 7, 30, 2, 4) == make_chain_split(50, 7, 30, 2, 4)
    assert make_chain_split(50, 7, 30, 2, 4) != make_chain_split(50, 8, 30, 2, 4)
    train, heldout = chain_train_and_heldout(1000, 200, seed=5, max_operand=30, min_steps=2, max_steps=4)
    assert (len(train), len(heldout), len({e.problem for e in train})) == (1000, 200, 1000)
    assert not {e.problem for e in train} & {e.problem for e in heldout}
    assert not {e.id for e in train} & {e.id for e in heldout}


def test_unboxed_fraction_changes_only_the_ending():
    boxed = make_chain_split(100, 4, 30, 2, 4)
    mixed = make_chain_split(100, 4, 30, 2, 4, unboxed_fraction=1.0)
    assert [e.problem for e in boxed] == [e.problem for e in mixed]
    answer = boxed[0].answer
    assert mixed[0].solution == boxed[0].solution.replace(f" \\boxed{{{answer}}}", f", answer {answer}")


def test_bad_knob_values_raise():
    with pytest.raises(ValueError, match="min_steps <= max_steps"):
        make_chain_split(10, 0, 30, min_steps=3, max_steps=2)
    with pytest.raises(ValueError, match="min_steps <= max_steps"):
        make_chain_split(10, 0, 30, min_steps=0, max_steps=2)


def test_builtin_chain_source_reads_the_arithmetic_keys():
    config = load_config(None, ["data.arithmetic.num_train=30", "data.arithmetic.num_heldout=10",
                                "data.arithmetic.min_steps=3", "data.arithmetic.max_steps=3"])
    train = load_examples("builtin:chain", config.data, "train")
    heldout = load_examples("builtin:chain", config.data, "eval")
    assert (len(train), len(heldout)) == (30, 10)
    assert {len(STEP.findall(e.solution)) for e in train + heldout} == {3}
    assert train == make_chain_split(30, config.data.arithmetic.seed, config.data.arithmetic.max_operand, 3, 3)
    bad = load_config(None, ["data.arithmetic.min_steps=5"])  # above max_steps = 4
    with pytest.raises(DatasetError, match=r"data\.train: builtin:chain .*min_steps <= max_steps"):
        load_examples("builtin:chain", bad.data, "train")

"""The embedded arithmetic task: correct answers, short texts, determinism and a disjoint held-out split."""

import re

import pytest

from nemo_igrpo.data.arithmetic import arithmetic_train_and_heldout, make_arithmetic_split
from nemo_igrpo.rewards import answers_match, extract_boxed


def _expected_answer(problem: str) -> int:
    """Recompute the answer from the numbers and wording of the problem."""
    numbers = [int(x) for x in re.findall(r"\d+", problem)]
    if "twice" in problem:
        return 2 * numbers[0]
    if "gives away" in problem or "How many more" in problem:
        return numbers[0] - numbers[1]
    return numbers[0] + numbers[1]


def test_answers_are_correct_and_solutions_box_them():
    examples = make_arithmetic_split(500, seed=3, max_operand=99)
    for example in examples:
        expected = _expected_answer(example.problem)
        assert expected >= 0
        assert example.answer == str(expected)
        assert extract_boxed(example.solution) == example.answer
        assert answers_match(extract_boxed(example.solution), example.answer)


def test_texts_are_short():
    examples = make_arithmetic_split(500, seed=0, max_operand=999)
    assert max(len(e.problem) for e in examples) <= 70
    assert max(len(e.solution) for e in examples) <= 30


def test_concrete_solution_format():
    example = make_arithmetic_split(200, seed=0, max_operand=99)
    with_plus = next(e for e in example if "gets" in e.problem)
    a, b = (int(x) for x in re.findall(r"\d+", with_plus.problem))
    assert with_plus.solution == f"{a}+{b}={a + b} \\boxed{{{a + b}}}"


def test_deterministic_by_seed_and_distinct():
    first = make_arithmetic_split(100, seed=7, max_operand=50)
    assert first == make_arithmetic_split(100, seed=7, max_operand=50)
    assert first != make_arithmetic_split(100, seed=8, max_operand=50)
    assert len({e.problem for e in first}) == 100
    assert len({e.id for e in first}) == 100


def test_heldout_is_disjoint_from_train():
    train, heldout = arithmetic_train_and_heldout(800, 200, seed=0, max_operand=20)
    assert (len(train), len(heldout)) == (800, 200)
    assert not {e.problem for e in train} & {e.problem for e in heldout}
    assert not {e.id for e in train} & {e.id for e in heldout}


def test_exclude_is_respected_and_exhaustion_raises():
    excluded = {e.problem for e in make_arithmetic_split(50, seed=1, max_operand=9)}
    again = make_arithmetic_split(50, seed=1, max_operand=9, exclude=excluded)
    assert not excluded & {e.problem for e in again}
    with pytest.raises(ValueError, match="distinct problems"):
        make_arithmetic_split(2_000, seed=0, max_operand=1)  # ~1,500 exist


def test_unboxed_fraction_changes_only_the_solution_style():
    plain = make_arithmetic_split(400, seed=5, max_operand=12)
    noisy = make_arithmetic_split(400, seed=5, max_operand=12, unboxed_fraction=0.5)
    assert [e.problem for e in plain] == [e.problem for e in noisy]
    unboxed = [e for e in noisy if "\\boxed" not in e.solution]
    assert 150 < len(unboxed) < 250  # about half
    for example in unboxed:  # same computation, the answer stated in words
        assert example.solution.endswith(f", answer {example.answer}")
        assert example.solution.split(",")[0].endswith(f"={example.answer}")
    assert all("\\boxed" in e.solution for e in plain)

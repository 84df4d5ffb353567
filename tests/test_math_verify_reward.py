"""MathVerifyReward: math-verify 0.9.0's verdicts on a table of answer pairs, completion-only scoring, and hostile
model output (which must cost at most the deadline and never stall the batch)."""

from __future__ import annotations

import multiprocessing
import time

import pytest

from nemo_igrpo.rewards import REWARDS, MathVerifyReward, build_reward
from nemo_igrpo.rewards.math_verify_reward import as_math_mode


@pytest.fixture(scope="module")
def reward():
    reward = MathVerifyReward(num_workers=2, timeout_s=5.0)
    yield reward
    reward.close()


# (gold, prediction, expected verdict). The prediction is boxed at the end of a completion. Verdicts are what
# math-verify 0.9.0 returns, pinned here so that an upgrade that changes them shows up as a test failure.
VERDICTS = [
    # --- integers and decimals
    ("5", "5", True),
    ("5", "05", True),  # leading zero
    ("5", "5.0", True),
    ("5", "6", False),
    ("-3", "-3", True),
    ("-3", "3", False),  # sign matters
    ("0.5", "0.50", True),
    ("0.4", ".4", True),
    ("1000", "1,000", True),  # thousands separators
    ("1000", "1{,}000", True),
    ("1000", "1\\,000", True),  # only because as_math_mode drops the thin space: math-verify alone reads 1*0 = 0
    ("0", "1\\,000", False),
    ("12345", "12,345", True),
    ("100000000", "100000001", False),
    ("5", "5.0000001", False),  # 6-decimal rounding does not apply against an integer gold
    # --- fractions
    ("\\frac{1}{2}", "0.5", True),
    ("0.5", "\\frac{1}{2}", True),
    ("\\frac{1}{2}", "1/2", True),
    ("\\frac12", "\\dfrac{1}{2}", True),
    ("\\frac{1}{2}", "\\frac{2}{4}", True),
    ("\\frac{1}{2}", "\\frac{1}{3}", False),
    ("-\\frac{1}{2}", "\\frac{-1}{2}", True),
    ("\\frac{1}{3}", "0.333333", True),  # floats are compared after rounding to 6 decimals
    ("\\frac{1}{3}", "0.33", False),
    ("\\frac{7}{2}", "3\\frac{1}{2}", True),  # a mixed number
    ("3.5", "3\\frac{1}{2}", True),
    # --- radicals and constants
    ("\\frac{\\sqrt{2}}{2}", "\\sqrt{2}/2", True),
    ("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}", True),
    ("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}", True),
    ("\\frac{\\sqrt{2}}{2}", "sqrt(2)/2", True),  # plain text parses inside $...$ (as_math_mode adds it)
    ("\\frac{\\sqrt{2}}{2}", "0.707107", True),
    ("\\frac{\\sqrt{2}}{2}", "0.7071", False),
    ("\\frac{\\sqrt{2}}{2}", "\\sqrt{3}/2", False),
    ("2\\sqrt{2}", "\\sqrt{8}", True),
    ("\\pi", "3.14159", False),  # a symbolic gold is not approximated
    ("2\\pi", "\\pi \\cdot 2", True),
    ("\\infty", "\\infty", True),
    ("-\\infty", "\\infty", False),
    # --- intervals, sets, tuples
    ("(0,\\infty)", "(0, \\infty)", True),
    ("(0,\\infty)", "x>0", True),  # needs allow_set_relation_comp=True
    ("(0,\\infty)", "[0,\\infty)", False),
    ("[1,2]", "[1, 2]", True),
    ("[1,2]", "(1,2)", False),
    ("(-\\infty, 3]", "x \\le 3", True),
    ("(-\\infty, 3]", "x < 3", False),
    ("\\{1,2,3\\}", "\\{3,2,1\\}", True),  # sets are unordered
    ("\\{1,2\\}", "1,2", True),
    ("\\{1,2\\}", "\\{1,2,3\\}", False),
    ("2, 3", "3, 2", True),
    ("(3,4)", "(3, 4)", True),
    ("(1,2)", "(2,1)", False),  # ordered pair (an open interval, to math-verify): order matters
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3, \\pi/2)", True),
    # --- expressions and equations
    ("x^2+2x+1", "(x+1)^2", True),
    ("x^2+2x+1", "(x-1)^2", False),
    ("2x", "x+x", True),
    ("y=2x+1", "2x+1", True),  # the gold's left-hand side is dropped for a bare prediction
    ("x=3", "3", True),
    ("3", "x=3", True),
    ("\\log_2 8", "3", True),
    ("\\binom{5}{2}", "10", True),
    ("5!", "120", True),
    ("10^{3}", "1000", True),
    ("1000", "1e3", False),  # "1e3" is read as 1 * e * 3
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}", True),
    # --- LaTeX vs plain forms, text and multiple choice
    ("\\frac{10}{9}", "10/9", True),
    ("\\text{(A)}", "A", True),
    ("\\textbf{(B)}", "B", True),
    ("\\text{(A)}", "B", False),
    ("\\text{Evelyn}", "\\text{Evelyn}", True),
    # --- units and degrees: a trailing unit is stripped, a unit inside \text{} with the number is not
    ("5", "5\\text{ cm}", True),
    ("5\\text{ cm}", "5", True),
    ("5", "5 \\,\\mathrm{cm}", True),
    ("5", "\\text{5 cm}", False),
    ("90^\\circ", "90", True),
    ("90", "90^\\circ", True),
    # --- percent: math-verify reads "50\%" as the number 50 marked as a percentage and compares it with the
    # bare number, not with the fraction 0.5 (its own tests pin "$28\%$" = "28" and "$0.28$" != "28").
    ("50\\%", "50", True),
    ("50", "50\\%", True),
    ("50\\%", "50\\%", True),
    ("50\\%", "0.5", False),
    ("0.5", "50\\%", False),
    ("12.5\\%", "12.5", True),
    # --- hedging does not pay: a set of candidates is not the number
    ("5", "5, 6", False),
    ("5", "5 \\text{ or } 6", False),
    ("5", "\\pm 5", False),
    ("5", "[4,6]", False),
]


@pytest.mark.parametrize(("gold", "prediction", "expected"), VERDICTS, ids=[f"{g} | {p}" for g, p, _ in VERDICTS])
def test_math_verify_verdicts(reward, gold, prediction, expected):
    output = reward([f"Let me work it out step by step... so \\boxed{{{prediction}}}"], [gold])
    assert output.scores == [float(expected)]
    assert output.components == {"accuracy": [float(expected)]}
    assert output.counters == {"no_answer": 0, "too_long": 0, "timeouts": 0, "crashes": 0, "errors": 0}


def test_the_table_is_large_and_has_both_verdicts():
    assert len(VERDICTS) >= 60
    assert sum(expected for *_, expected in VERDICTS) < len(VERDICTS) - 15


def test_only_the_completion_is_scored_and_the_last_box_counts(reward):
    # In iGRPO the draft, with its answer (say "\boxed{42}"), sits in the refinement's prompt. The reward never
    # sees prompts, and it hands math-verify only the completion's own final answer: given the raw text,
    # math-verify would happily pick up a 42 that the completion merely quotes.
    completions = [
        "I agree with the draft.",  # no answer of its own
        "The draft's answer, 42, looks right to me.",  # quotes the gold but states no final answer
        "First I thought \\boxed{42}, but actually \\boxed{41}.",  # the last box is the answer
        "First I thought \\boxed{41}, but actually \\boxed{42}.",
        "The answer is \\boxed{}.",  # an empty box is no answer
    ]
    output = reward(completions, ["42"] * len(completions))
    assert output.scores == [0.0, 0.0, 0.0, 1.0, 0.0]
    assert output.counters["no_answer"] == 3


@pytest.mark.parametrize(
    ("extract", "cases"),
    [
        ("answer_tag", {"<answer>\\frac{1}{2}</answer>": 1.0, "<answer>$0.5$</answer>": 1.0, "so \\boxed{0.5}": 0.0}),
        ("boxed", {"<answer>0.5</answer>": 0.0, "<answer>so \\boxed{0.5}</answer>": 1.0}),
        ("boxed_or_tag", {"<answer>0.5</answer>": 1.0, "<answer>so \\boxed{0.5}</answer>": 1.0}),
    ],
)
def test_extract_modes(extract, cases):
    reward = MathVerifyReward(extract=extract, num_workers=1)
    try:
        output = reward(list(cases), ["\\frac{1}{2}"] * len(cases))
    finally:
        reward.close()
    assert output.scores == list(cases.values())


def test_hostile_outputs_score_zero_within_the_deadline():
    timeout_s = 2.0
    hostile = [
        "\\boxed{9^{9^{9^{9^{9}}}}}",  # exact evaluation would never finish
        "x" * 200_000 + " \\boxed{" + "1+" * 100_000 + "1}",  # 200k characters, answer far over the limit
        "\\boxed{" + "{" * 10_000 + "1" + "}" * 10_000 + "}",  # 10k nested braces: over the limit
        "\\boxed{" + "{" * 300 + "1" + "}" * 300 + "}",  # 300 nested braces: under the limit, slow to parse
        "\\boxed{\\frac{1}{",  # malformed: the box never closes
        "\\boxed{\\frac{1}{}}",  # malformed inside a closed box
        "\\boxed{1\x00\x00}",  # NUL bytes
        "\\boxed{\\left(}",
        "\\boxed{\\begin{pmatrix}}",
    ]
    control = "x" * 200_000 + " so \\boxed{\\frac{1}{2}}"  # long, but a short final answer: graded normally
    children_before = set(multiprocessing.active_children())  # the module's shared reward has its own workers
    reward = MathVerifyReward(num_workers=2, timeout_s=timeout_s)
    try:
        reward(["\\boxed{1}"], ["1"])  # start the workers outside the timed region
        start = time.perf_counter()
        output = reward(hostile + [control], ["2"] * len(hostile) + ["0.5"])
        elapsed = time.perf_counter() - start
    finally:
        reward.close()
    assert output.scores == [0.0] * len(hostile) + [1.0]
    assert output.counters["too_long"] == 2
    assert output.counters["no_answer"] == 1
    assert elapsed < 3 * timeout_s
    assert set(multiprocessing.active_children()) == children_before


def test_a_grade_past_the_hard_deadline_is_a_counted_timeout():
    # math-verify's own alarm is whole seconds (at least 1), so with a 0.5 s deadline a slow parse is killed by
    # the pool first; the next item is graded by the replacement worker.
    reward = MathVerifyReward(num_workers=1, timeout_s=0.5)
    try:
        reward(["\\boxed{1}"], ["1"])
        slow = "\\boxed{" + "{" * 300 + "1" + "}" * 300 + "}"
        output = reward([slow, "\\boxed{2}"], ["1", "2"])
    finally:
        reward.close()
    assert output.scores == [0.0, 1.0]
    assert output.counters["timeouts"] == 1


def test_pool_is_started_lazily_and_reused(reward):
    fresh = MathVerifyReward()
    try:
        output = fresh(["no answer here"], ["1"])
        assert fresh._pool is None  # nothing to grade: no processes
        # The same counters whether or not the pool ran, so that logged series stay aligned.
        assert output.counters == {"no_answer": 1, "too_long": 0, "timeouts": 0, "crashes": 0, "errors": 0}
        fresh(["\\boxed{1}"], ["1"])
        pool = fresh._pool
        fresh(["\\boxed{2}"], ["2"])
        assert fresh._pool is pool and pool is not None
    finally:
        fresh.close()
    assert fresh._pool is None


def test_registered_and_validated():
    assert REWARDS["math_verify"] is MathVerifyReward
    reward = build_reward("math_verify", extract="boxed_or_tag", num_workers=1, timeout_s=1.0)
    assert isinstance(reward, MathVerifyReward)
    reward.close()  # never started: nothing to do
    with pytest.raises(ValueError, match="extract"):
        MathVerifyReward(extract="last_number")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="completions"):
        MathVerifyReward()(["\\boxed{1}"], [])


def test_as_math_mode():
    assert as_math_mode("\\frac{1}{2}") == "$\\frac{1}{2}$"
    assert as_math_mode("$5$") == "$5$"  # already delimited
    assert as_math_mode("\\$5") == "$\\$5$"  # an escaped dollar is content
    assert as_math_mode("\\begin{pmatrix}\n1\n\\end{pmatrix}") == "$\\begin{pmatrix} 1 \\end{pmatrix}$"
    assert as_math_mode("1\\,000\\,000") == "$1000000$"
    assert as_math_mode("1\\,5") == "$1\\,5$"  # not a thousands group


def test_importing_the_rewards_does_not_import_sympy():
    import subprocess
    import sys

    code = "import sys, nemo_igrpo.rewards; print('sympy' in sys.modules or 'math_verify' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"

"""MathVerifyReward: math-verify 0.9.0's verdicts on a table of answer pairs, completion-only scoring, and hostile
model output (which must cost at most the deadline and never stall the batch)."""

from __future__ import annotations

import json
import logging
import multiprocessing
import re
import time
from pathlib import Path

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
    assert output.counters == {"no_answer": 0, "fallback_extraction": 0, "too_long": 0, "timeouts": 0, "crashes": 0,
                               "errors": 0}


def test_the_table_is_large_and_has_both_verdicts():
    assert len(VERDICTS) >= 60
    assert sum(expected for *_, expected in VERDICTS) < len(VERDICTS) - 15


def test_only_the_completion_is_scored_and_the_last_box_counts(reward):
    # In iGRPO the draft, with its answer (say "\boxed{42}"), sits in the refinement's prompt. The reward never
    # sees prompts, and it hands math-verify only the completion's own final answer: given the raw text,
    # math-verify would happily pick up a 42 that the completion merely quotes.
    completions = [
        "I agree with the draft.",  # no answer of its own
        # No box: the fallback reads the completion's own final expression, 42. The completion does state it
        # (the accuracy component credits that); the format component withholds the template bonus.
        "The draft's answer, 42, looks right to me.",
        "First I thought \\boxed{42}, but actually \\boxed{41}.",  # the last box is the answer
        "First I thought \\boxed{41}, but actually \\boxed{42}.",
        "The answer is \\boxed{}.",  # an empty box is an (empty) answer: no fallback
    ]
    output = reward(completions, ["42"] * len(completions))
    assert output.scores == [0.0, 1.0, 0.0, 1.0, 0.0]
    assert output.counters["no_answer"] == 3
    assert output.counters["fallback_extraction"] == 1  # "I agree with the draft." has nothing to extract


# Completions without a box that hold several numbers: the fallback grades the final one (math-verify's own
# extraction of the text's end), never the first or any other number the reasoning passed through.
FALLBACK_CASES = [
    ("41 … so the answer is 42", "42", 1.0),
    ("41 … so the answer is 42", "41", 0.0),
    ("Try 7 and 35: 7 + 35 = 42, so the answer is 42.", "42", 1.0),
    ("Try 7 and 35: 7 + 35 = 42, so the answer is 42.", "7", 0.0),
    ("Adding 40 and 1 gives 41, not 42... wait, 40 + 2 = 42.", "42", 1.0),
    ("I count 41 first, then recount: 43.", "43", 1.0),
    ("I count 41 first, then recount: 43.", "41", 0.0),
]


def test_the_fallback_grades_the_final_number_of_several(reward):
    completions, golds, expected = zip(*FALLBACK_CASES)
    output = reward(list(completions), list(golds))
    assert output.scores == list(expected)
    assert output.counters["fallback_extraction"] == len(FALLBACK_CASES)  # none has a box: every one is a fallback


@pytest.mark.slow  # its own grading workers: each start is a fresh interpreter (seconds on loaded cores)
@pytest.mark.parametrize(
    ("extract", "fallback", "cases"),
    [
        ("answer_tag", False, {"<answer>\\frac{1}{2}</answer>": 1.0, "<answer>$0.5$</answer>": 1.0,
                               "so \\boxed{0.5}": 0.0}),
        ("boxed", False, {"<answer>0.5</answer>": 0.0, "<answer>so \\boxed{0.5}</answer>": 1.0}),
        ("boxed_or_tag", False, {"<answer>0.5</answer>": 1.0, "<answer>so \\boxed{0.5}</answer>": 1.0}),
        # The scratch work's box does not count once there is an answer block (the paper's template).
        ("boxed_or_tag", False, {"<think>\\boxed{0.5}</think><answer>0.4</answer>": 0.0,
                                 "<think>\\boxed{0.4}</think><answer>0.5</answer>": 1.0,
                                 "<think>never closed <answer>0.5</answer>": 1.0}),
        ("boxed", False, {"<think>\\boxed{0.5}</think><answer>0.4</answer>": 0.0}),
        # With the fallback, what a mode does not read is still graded from math-verify's own extraction (of the
        # answer block, when there is one).
        ("answer_tag", True, {"so \\boxed{0.5}": 1.0}),
        ("boxed", True, {"<answer>0.5</answer>": 1.0, "<think>\\boxed{0.5}</think><answer>0.4</answer>": 0.0}),
    ],
)
def test_extract_modes(extract, fallback, cases):
    reward = MathVerifyReward(extract=extract, num_workers=1, fallback=fallback)
    try:
        output = reward(list(cases), ["\\frac{1}{2}"] * len(cases))
    finally:
        reward.close()
    assert output.scores == list(cases.values())


@pytest.mark.slow  # its own grading workers: each start is a fresh interpreter (seconds on loaded cores)
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
        reward.start()  # start the workers outside the timed region
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


@pytest.mark.slow  # its own grading workers: each start is a fresh interpreter (seconds on loaded cores)
def test_a_grade_past_the_hard_deadline_is_a_counted_timeout():
    # math-verify's own alarm is whole seconds (at least 1), so with a 0.5 s deadline a slow parse is killed by
    # the pool first; the next item is graded by the replacement worker.
    reward = MathVerifyReward(num_workers=1, timeout_s=0.5)
    try:
        reward.start()
        slow = "\\boxed{" + "{" * 300 + "1" + "}" * 300 + "}"
        output = reward([slow, "\\boxed{2x}"], ["1", "x+x"])
    finally:
        reward.close()
    assert output.scores == [0.0, 1.0]
    assert output.counters["timeouts"] == 1


@pytest.mark.slow  # its own grading workers: each start is a fresh interpreter (seconds on loaded cores)
def test_pool_is_started_lazily_and_reused(reward):
    fresh = MathVerifyReward()
    try:
        output = fresh(["no answer here"], ["1"])
        assert fresh._pool is None  # nothing to grade: no processes
        # The same counters whether or not the pool ran, so that logged series stay aligned.
        assert output.counters == {"no_answer": 1, "fallback_extraction": 0, "too_long": 0, "timeouts": 0,
                                   "crashes": 0, "errors": 0}
        fresh(["\\boxed{1}"], ["1"])
        assert fresh._pool is None  # decided without sympy (quick_verdict): still no processes
        fresh(["\\boxed{x+1}"], ["1+x"])
        pool = fresh._pool
        fresh(["\\boxed{2x}"], ["x+x"])
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


@pytest.mark.slow  # a fresh interpreter imports the package (6 s on loaded cores)
def test_importing_the_rewards_does_not_import_sympy():
    import subprocess
    import sys

    code = "import sys, nemo_igrpo.rewards; print('sympy' in sys.modules or 'math_verify' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


# ------------------------------------------------------------------------------ third-party verdict table

CASES = Path(__file__).resolve().parents[1] / "data" / "grader_cases.jsonl"  # tests/data, shared by the layers
AGREEMENT_BAR = 0.95  # issue 15: the reward's verdict must match the source's on at least 95% of the table


def load_cases() -> list[dict]:
    return [json.loads(line) for line in CASES.read_text().splitlines() if line.strip()]


def as_completion(case: dict) -> str:
    """What the reward grades: a "completion" case is graded as written; an "answer" case (a grader's unit test
    on bare answers) is put in the paper's template."""
    if case["form"] == "completion":
        return case["prediction"]
    return f"<think>Working it out.</think><answer>{case['prediction']}</answer>"


def plain_math_verify(gold: str, prediction: str) -> bool:
    """The baseline: math-verify with its default extraction on both raw strings."""
    from math_verify import parse, verify

    try:
        return bool(verify(parse(gold), parse(prediction)))
    except Exception:  # noqa: BLE001 - a baseline that raises has not found the answers equal
        return False


def agreement_table(cases: list[dict], ours: list[bool], plain: list[bool]) -> dict[str, list[int]]:
    """source → [cases, ours agreeing, plain math-verify agreeing]."""
    table: dict[str, list[int]] = {}
    for case, mine, theirs in zip(cases, ours, plain):
        source = case["source"]
        row = table.setdefault(f"{source['project']}:{source['file']}", [0, 0, 0])
        row[0] += 1
        row[1] += mine == case["expected"]
        row[2] += theirs == case["expected"]
    return table


def test_the_verdict_table_cites_its_sources():
    cases = load_cases()
    assert len(cases) >= 300
    assert len({case["id"] for case in cases}) == len(cases)
    for case in cases:
        source = case["source"]
        assert source["project"] and source["file"], case["id"]
        # Third-party facts name the commit they were read at; this project's own cases live in this file.
        assert re.fullmatch(r"[0-9a-f]{40}", source["commit"]) or source["project"] == "nemo-igrpo", case["id"]
        assert isinstance(case["expected"], bool) and case["form"] in ("completion", "answer"), case["id"]
    expected = [case["expected"] for case in cases]
    assert 0.2 < sum(expected) / len(expected) < 0.9  # both verdicts well represented


@pytest.mark.slow  # 364 cases through 2 grading workers (33 s on loaded cores)
def test_agreement_with_third_party_verdicts():
    """Agreement per source, ours vs plain math-verify (computed here, not pinned): at least AGREEMENT_BAR
    overall, and never below plain math-verify on any source. ``-s`` prints the table (docs/rewards.md has it)."""
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    cases = load_cases()
    # The table is about verdicts, not deadlines: a generous deadline keeps a loaded CI machine from turning a slow
    # symbolic comparison (1.8 s for a sum with 8 processes on 2 cores) into a timeout and a wrong verdict.
    reward = MathVerifyReward(num_workers=2, timeout_s=30.0)
    try:
        output = reward([as_completion(case) for case in cases], [case["gold"] for case in cases])
    finally:
        reward.close()
    assert output.counters["timeouts"] == output.counters["crashes"] == output.counters["errors"] == 0
    ours = [score == 1.0 for score in output.scores]
    plain = [plain_math_verify(case["gold"], case["prediction"]) for case in cases]
    table = agreement_table(cases, ours, plain)
    lines = [f"{source:60s} {n:4d} {mine / n:7.1%} {theirs / n:7.1%}" for source, (n, mine, theirs) in table.items()]
    total = [sum(row[i] for row in table.values()) for i in range(3)]
    lines.append(f"{'all':60s} {total[0]:4d} {total[1] / total[0]:7.1%} {total[2] / total[0]:7.1%}")
    report = "\n".join([f"{'source':60s} {'n':>4s} {'ours':>7s} {'plain':>7s}", *lines])
    print(report)
    assert total[1] >= AGREEMENT_BAR * total[0], report
    for source, (_, mine, theirs) in table.items():
        assert mine >= theirs, f"worse than plain math-verify on {source}\n{report}"


@pytest.mark.slow  # its own grading workers: each start is a fresh interpreter (seconds on loaded cores)
def test_fallback_grades_the_accuracy_only():
    # No box and no answer block: the accuracy component falls back to math-verify's extraction; the format
    # component (the paper's template) still scores 0, and the fallback is counted.
    from nemo_igrpo.rewards import FormatReward, WeightedReward

    reward = WeightedReward({"math_verify": (MathVerifyReward(num_workers=1), 1.0), "format": (FormatReward(), 1.0)})
    completions = [
        "The base area is $15$ and the height is $8$, so the volume is $120$.",
        "<think>base 15, height 8</think><answer>120</answer>",
        "I cannot finish this.",
    ]
    try:
        output = reward(completions, ["120"] * 3)
    finally:
        reward.close()
    assert output.components == {"accuracy": [1.0, 1.0, 0.0], "format": [0.0, 1.0, 0.0]}
    assert output.scores == [1.0, 2.0, 0.0]
    assert output.counters["no_answer"] == 2
    assert output.counters["fallback_extraction"] == 1


def test_identical_pairs_are_graded_once(reward):
    sizes: list[int] = []
    pool = reward._get_pool()
    original = pool.map

    def counting_map(items):
        sizes.append(len(items))
        return original(items)

    pool.map = counting_map
    try:
        # A GRPO group: eight completions, three distinct final answers; a second problem with the same answer.
        # (Expressions: plain numbers never reach the pool, see test_quick_verdicts_skip_the_pool.)
        right, wrong, other = "(x+1)^2", "(x-1)^2", "x^2+1+2x"
        group = [f"so \\boxed{{{right}}}"] * 4 + [f"hence \\boxed{{{right}}}", f"so \\boxed{{{wrong}}}",
                                                  f"so \\boxed{{{wrong}}}", f"so \\boxed{{{other}}}"]
        output = reward(group + [f"so \\boxed{{{right}}}"], ["x^2+2x+1"] * 8 + ["x^2-2x+1"])
    finally:
        del pool.map
    assert output.scores == [1.0] * 5 + [0.0, 0.0, 1.0, 0.0]
    assert sizes == [4]  # (right, gold 1), (wrong, gold 1), (other, gold 1), (right, gold 2)


def test_quick_verdicts_skip_the_pool():
    # Equal normal forms, plain numbers and lists of plain numbers are decided without sympy (and without a
    # worker): milliseconds to tens of milliseconds saved per answer.
    fresh = MathVerifyReward(num_workers=1)
    try:
        output = fresh(["\\boxed{1,000}", "\\boxed{0.5}", "\\boxed{-7}", "\\boxed{\\{3, 2, 1\\}}", "\\boxed{(2, 1)}"],
                       ["1000", "\\frac{1}{2}", "7", "\\{1,2,3\\}", "(1,2)"])
        assert fresh._pool is None
    finally:
        fresh.close()
    assert output.scores == [1.0, 1.0, 0.0, 1.0, 0.0]


def test_defaults_come_from_the_config():
    from nemo_igrpo.config import RewardConfig

    reward = MathVerifyReward()
    defaults = RewardConfig()
    assert (reward.extract, reward.num_workers, reward.timeout_s) == (
        defaults.extract, defaults.num_workers, defaults.timeout_s)
    assert reward.extract == "boxed_or_tag"


def test_two_threads_get_one_pool(monkeypatch):
    # Async rollouts and the evaluation grade from two threads (issue 26 item 2): when the pool is (re)created lazily,
    # both must get the same one (two pools would leak one's workers and race on the reward's state).
    import threading

    made = []

    class SlowPool:
        def __init__(self, *args, **kwargs):
            time.sleep(0.2)  # a constructor slow enough for the other thread to arrive meanwhile
            made.append(self)
            self.closed = False

    monkeypatch.setattr("nemo_igrpo.rewards.math_verify_reward.GradingPool", SlowPool)
    reward = MathVerifyReward()
    got = []
    threads = [threading.Thread(target=lambda: got.append(reward._get_pool())) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(made) == 1 and got == [made[0], made[0]]

"""Accuracy reward graded by math-verify: 1.0 when the completion's final answer is mathematically equal to the gold
answer (``\\frac{1}{2}`` = ``0.5``, ``(x+1)^2`` = ``x^2+2x+1``, ``(0,\\infty)`` = ``x>0``), else 0.0.

The final answer is extracted in the trainer process with the linear-time extractors from ``answer.py``; only that
short string (at most ``max_answer_chars``) crosses into a ``GradingPool`` worker, where math-verify parses and
compares it with sympy. Nothing from model output is evaluated in the trainer process, and a pathological answer
costs at most ``timeout_s`` of one worker. math-verify (and sympy) is imported only inside the workers, so
importing this module stays cheap.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass

from nemo_igrpo.rewards.base import Reward, RewardOutput, register_reward
from nemo_igrpo.rewards.match import EXTRACTORS, ExtractMode
from nemo_igrpo.rewards.pool import GradingPool

# Caps a worker's heap: an answer that makes sympy allocate without bound becomes a counted crash, not memory
# pressure on the trainer. Generous, because a spawned worker re-imports the trainer's main module (and torch).
_WORKER_MEMORY_LIMIT_MB = 4096

# "1\,000" (thin space as thousands separator) parses as 1*0 = 0 in math-verify 0.9.0, which makes it equal to 0
# and unequal to 1000. Its normalisation already handles "1,000" and "1{,}000".
_THIN_SPACE_THOUSANDS = re.compile(r"(?<=\d)\\,(?=\d{3}(?!\d))")
_UNESCAPED_DOLLAR = re.compile(r"(?<!\\)\$")


@dataclass(frozen=True)
class GradeTask:
    """One (gold, prediction) pair for a worker. ``op_timeout_s`` bounds each math-verify parse/compare step."""

    gold: str
    prediction: str
    op_timeout_s: int


def as_math_mode(answer: str) -> str:
    """``answer`` as one inline-math span, the form math-verify's LaTeX extractor reliably picks up.

    A bare number parses either way, but the delimiters matter elsewhere: ``$50\\%$`` parses while
    ``\\boxed{50\\%}`` falls back to a string, and plain ``sqrt(2)/2`` only parses inside ``$...$``.
    """
    # LaTeX treats a newline as a space, but math-verify's inline-math pattern does not span lines (a multi-line
    # pmatrix would otherwise be skipped in favour of a stray number).
    text = " ".join(answer.split())
    text = _THIN_SPACE_THOUSANDS.sub("", text)
    # An answer that brings its own math delimiters ("<answer>$5$</answer>") is already in the expected form.
    return text if _UNESCAPED_DOLLAR.search(text) else f"${text}$"


def grade(task: GradeTask) -> float:
    """1.0 if math-verify finds the prediction equal to the gold answer, else 0.0. Runs in a pool worker.

    math-verify's own ``signal.alarm`` timeouts work here (a worker's main thread) and turn a slow step into
    0.0 without losing the worker; the pool's hard deadline covers what an alarm cannot interrupt (C code).
    """
    from math_verify import parse, verify  # here, not at module level: keeps sympy out of the trainer process

    gold = parse(as_math_mode(task.gold), parsing_timeout=task.op_timeout_s)
    prediction = parse(as_math_mode(task.prediction), parsing_timeout=task.op_timeout_s)
    # allow_set_relation_comp: an interval gold accepts the equivalent inequality ("(0,\infty)" vs "x>0").
    equal = verify(gold, prediction, allow_set_relation_comp=True, timeout_seconds=task.op_timeout_s)
    return 1.0 if equal else 0.0


# Equal pairs graded once per worker: this runs the lazily initialised parts of the LaTeX parser and of sympy
# (≈0.3 s on first use), and proves that LaTeX parsing works at all. The generous per-operation timeout is for
# busy machines: first use can take seconds there, and a timeout here would read as a broken parser.
_WARM_UP_TIMEOUT_S = 30
_WARM_UP = (
    GradeTask("\\frac{1}{2}", "0.5", _WARM_UP_TIMEOUT_S),
    GradeTask("x^2+2x+1", "(x+1)^2", _WARM_UP_TIMEOUT_S),
    GradeTask("(0,\\infty)", "x>0", _WARM_UP_TIMEOUT_S),
)


def init_grading_worker() -> None:
    """Quiet math-verify's logs (it logs every internal timeout together with the offending, possibly huge, input),
    pay its start-up costs (≈0.3 s import, ≈0.3 s first use) before the first item's deadline starts, and refuse
    to start if LaTeX does not parse."""
    for name in ("math_verify", "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for task in _WARM_UP:
        if grade(task) != 1.0:
            # Without a LaTeX parser every answer would silently score 0. latex2sympy2_extended ships parsers for
            # antlr4-python3-runtime 4.9.3, 4.11 and 4.13.2 only, although it accepts any version in between.
            raise RuntimeError(
                f"math-verify graded {task.prediction!r} != {task.gold!r}: LaTeX parsing is broken here "
                "(is antlr4-python3-runtime 4.9.3, 4.11.x or 4.13.2 installed?)"
            )


@register_reward("math_verify")
class MathVerifyReward(Reward):
    """Math-verify accuracy. Only the completion is scored (see ``BoxedMatchReward`` for why).

    Counters: ``no_answer`` (nothing extractable), ``too_long`` (answer over ``max_answer_chars``, scored 0 without
    grading), and from the pool ``timeouts`` and ``crashes`` (scored 0) and ``errors`` (``grade`` raised).
    The worker pool starts on the first call that has something to grade and is reused until ``close()``.
    """

    def __init__(
        self,
        extract: ExtractMode = "boxed",
        num_workers: int = 2,
        timeout_s: float = 5.0,
        max_answer_chars: int = 1000,
    ) -> None:
        if extract not in EXTRACTORS:
            raise ValueError(f"extract must be one of {sorted(EXTRACTORS)}, got {extract!r}")
        if num_workers < 1 or timeout_s <= 0 or max_answer_chars < 1:
            raise ValueError("num_workers, timeout_s and max_answer_chars must be positive")
        self.extract = extract
        self.num_workers = num_workers
        self.timeout_s = timeout_s
        self.max_answer_chars = max_answer_chars
        self._extractor = EXTRACTORS[extract]
        # math-verify's own per-step alarm (whole seconds, at least 1): a third of the item's deadline, because an
        # item takes up to three heavy steps (parse gold, parse prediction, compare).
        self._op_timeout_s = max(1, math.floor(timeout_s / 3))
        self._pool: GradingPool[GradeTask, float] | None = None

    @classmethod
    def from_config(cls, config) -> "MathVerifyReward":
        return cls(extract=config.reward.extract, num_workers=config.reward.num_workers,
                   timeout_s=config.reward.timeout_s)

    def __call__(self, completions: list[str], answers: list[str]) -> RewardOutput:
        if len(completions) != len(answers):
            raise ValueError(f"{len(completions)} completions but {len(answers)} answers")
        scores = [0.0] * len(completions)
        counters = dict.fromkeys(("no_answer", "too_long", "timeouts", "crashes", "errors"), 0)
        slots, tasks = self._gradable(completions, answers, counters)
        if tasks:
            results, pool_counters = self._get_pool().map(tasks)
            for slot, score in zip(slots, results):
                scores[slot] = score
            counters.update(pool_counters)
        return RewardOutput(scores=scores, components={"accuracy": list(scores)}, counters=counters)

    def _gradable(
        self, completions: list[str], answers: list[str], counters: dict[str, int]
    ) -> tuple[list[int], list[GradeTask]]:
        """Extract each final answer (linear time, in this process); count those that are missing or too long,
        and return the positions and grading tasks of the rest."""
        slots: list[int] = []
        tasks: list[GradeTask] = []
        for slot, (completion, gold) in enumerate(zip(completions, answers)):
            prediction = self._extractor(completion)
            if prediction is None or not prediction.strip():
                counters["no_answer"] += 1
            elif len(prediction) > self.max_answer_chars:
                counters["too_long"] += 1
            else:
                slots.append(slot)
                tasks.append(GradeTask(gold, prediction, self._op_timeout_s))
        return slots, tasks

    def close(self) -> None:
        """Kill the worker processes; a later call starts new ones."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def _get_pool(self) -> GradingPool[GradeTask, float]:
        if self._pool is None or self._pool.closed:
            self._pool = GradingPool(
                grade,
                self.num_workers,
                self.timeout_s,
                default=0.0,
                initializer=init_grading_worker,
                memory_limit_mb=_WORKER_MEMORY_LIMIT_MB,
            )
        return self._pool

"""Accuracy reward graded by math-verify: 1.0 when the completion's final answer is mathematically equal to the gold
answer (``\\frac{1}{2}`` = ``0.5``, ``(x+1)^2`` = ``x^2+2x+1``, ``(0,\\infty)`` = ``x>0``), else 0.0.

The final answer is extracted in the trainer process with the linear-time extractors from ``answer.py``; only that
short string (at most ``max_answer_chars``) crosses into a ``GradingPool`` worker, where math-verify parses and
compares it with sympy. A completion with neither a box nor an answer block falls back to math-verify's own
extraction of its final expression, on at most its last ``_FALLBACK_TAIL_CHARS`` characters (counted as
``fallback_extraction``; the ``format`` reward still enforces the template). Nothing from model output is evaluated
in the trainer process, and a pathological answer costs at most ``timeout_s`` of one worker. math-verify (and
sympy) is imported only inside the workers, so importing this module stays cheap.

Throughput: identical (answer, gold) pairs in a call are graded once (a GRPO group often repeats an answer), the
pool sends several items per message, and each worker keeps the golds it has parsed. See docs/rewards.md.

This module is the trainer side (extraction, quick verdicts, the pool); ``math_grading`` is what the workers run and
``math_normalize`` the answer rewriting both use.
"""

from __future__ import annotations

import math
import re
import threading

from nemo_igrpo.rewards.answer import quick_verdict
from nemo_igrpo.rewards.base import Reward, RewardOutput, register_reward
from nemo_igrpo.rewards.defaults import DEFAULT_EXTRACT, DEFAULT_NUM_WORKERS, DEFAULT_TIMEOUT_S
from nemo_igrpo.rewards.match import EXTRACTORS, ExtractMode
from nemo_igrpo.rewards.math_grading import GradeTask, grade, init_grading_worker
from nemo_igrpo.rewards.math_normalize import as_math_mode, decimal_comma_reading, normalize_number_format
from nemo_igrpo.rewards.pool import GradingPool

# Re-exported from their modules: this one was their home before the worker side moved out.
__all__ = ["GradeTask", "MathVerifyReward", "as_math_mode", "decimal_comma_reading", "final_math_span", "grade",
           "init_grading_worker", "normalize_number_format"]

# Caps a worker's heap: an answer that makes sympy allocate without bound becomes a counted crash, not memory
# pressure on the trainer. Generous, because a spawned worker re-imports the trainer's main module (and torch).
_WORKER_MEMORY_LIMIT_MB = 4096

# The fallback reads the end of the completion only: the final expression is there (as in the completions of the
# verdict table), and math-verify's regexes then cost the same for a
# 300-character and a 300,000-character completion.
_FALLBACK_TAIL_CHARS = 600
# A tail without a digit or a math delimiter has nothing math-verify could extract: not worth a worker round trip.
_FALLBACK_WORTH_TRYING = re.compile(r"\d|\$|\\\(|\\\[")
# The last math span of a text and what follows it: "... So the answer is $(x+3)^2$. I hope it is correct."
_LAST_MATH_SPAN = re.compile(r"(?:\$\$?|\\\(|\\\[)([^$]{1,200}?)(?:\$\$?|\\\)|\\\])([^$\d]{0,40})$")
_SENTENCE_BREAK = re.compile(r"[.!?:]\s|\n")


def final_math_span(text: str) -> str | None:
    """The content of the math span that ends ``text`` (up to 40 characters of prose may follow), when it is the
    only math in its sentence: then it is what math-verify's own extraction reads as the final answer too."""
    match = _LAST_MATH_SPAN.search(text[-300:])
    if match is None:
        return None
    before = text[: len(text) - len(text[-300:]) + match.start()]
    breaks = list(_SENTENCE_BREAK.finditer(before))
    sentence = before[breaks[-1].end() :] if breaks else before
    if "$" in sentence or "\\(" in sentence or "\\[" in sentence:
        return None
    return match.group(1)


def _fallback_text(text: str) -> str:
    """The last ``_FALLBACK_TAIL_CHARS`` characters of ``text``, starting at a word boundary."""
    if len(text) <= _FALLBACK_TAIL_CHARS:
        return text
    tail = text[-_FALLBACK_TAIL_CHARS:]
    space = tail.find(" ")
    return tail[space + 1 :] if 0 <= space < 100 else tail


@register_reward("math_verify")
class MathVerifyReward(Reward):
    """Math-verify accuracy. Only the completion is scored (see ``BoxedMatchReward`` for why).

    ``extract``, ``num_workers`` and ``timeout_s`` default to the ``reward.*`` defaults (``rewards.defaults``).
    ``fallback``: a completion with neither a box nor an answer block is graded on math-verify's own extraction of
    its final expression.

    Counters: ``no_answer`` (no box and no answer block, or an empty one), ``fallback_extraction`` (of those, graded
    by the fallback), ``too_long`` (answer over ``max_answer_chars``, scored 0 without grading), and from the pool
    ``timeouts`` and ``crashes`` (scored 0) and ``errors`` (``grade`` raised). The worker pool starts on the first
    call that has something to grade and is reused until ``close()``.
    """

    def __init__(
        self,
        extract: ExtractMode = DEFAULT_EXTRACT,
        num_workers: int = DEFAULT_NUM_WORKERS,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_answer_chars: int = 1000,
        fallback: bool = True,
    ) -> None:
        if extract not in EXTRACTORS:
            raise ValueError(f"extract must be one of {sorted(EXTRACTORS)}, got {extract!r}")
        if num_workers < 1 or timeout_s <= 0 or max_answer_chars < 1:
            raise ValueError("num_workers, timeout_s and max_answer_chars must be positive")
        self.extract = extract
        self.num_workers = num_workers
        self.timeout_s = timeout_s
        self.max_answer_chars = max_answer_chars
        self.fallback = fallback
        self._extractor = EXTRACTORS[extract]
        # math-verify's own per-step alarm (whole seconds, at least 1): half the item's deadline, because an item
        # takes two heavy steps (parse the prediction, compare; golds are parsed once per worker). A third was too
        # tight on a busy machine: a symbolic sum took 1.8 s to compare with 8 processes on 2 cores.
        self._op_timeout_s = max(1, math.floor(timeout_s / 2))
        self._pool: GradingPool[GradeTask, float] | None = None
        self._pool_lock = threading.Lock()  # async rollouts and the evaluation may (re)create the pool at once

    @classmethod
    def from_config(cls, settings, context) -> "MathVerifyReward":
        return cls(extract=settings.extract, num_workers=settings.num_workers, timeout_s=settings.timeout_s)

    def __call__(self, completions: list[str], answers: list[str]) -> RewardOutput:
        if len(completions) != len(answers):
            raise ValueError(f"{len(completions)} completions but {len(answers)} answers")
        scores = [0.0] * len(completions)
        counters = dict.fromkeys(
            ("no_answer", "fallback_extraction", "too_long", "timeouts", "crashes", "errors"), 0
        )
        slots, tasks = self._gradable(completions, answers, counters, scores)
        if tasks:
            # Each distinct task is graded once; its score goes to every completion that produced it. Sorted by
            # gold, so that the items a worker receives together mostly share a gold (parsed once per worker).
            unique = sorted(dict.fromkeys(tasks), key=lambda task: task.gold)
            results, pool_counters = self._get_pool().map(unique)
            score_of = dict(zip(unique, results))
            for slot, task in zip(slots, tasks):
                scores[slot] = score_of[task]
            counters.update(pool_counters)
        return RewardOutput(scores=scores, components={"accuracy": list(scores)}, counters=counters)

    def _gradable(
        self, completions: list[str], answers: list[str], counters: dict[str, int], scores: list[float]
    ) -> tuple[list[int], list[GradeTask]]:
        """Extract each final answer (linear time, in this process); count those that are missing or too long,
        score those whose verdict is certain without sympy (``quick_verdict``: equal normal forms, plain numbers,
        lists of plain numbers), and return the positions and grading tasks of the rest."""
        slots: list[int] = []
        tasks: list[GradeTask] = []
        for slot, (completion, gold) in enumerate(zip(completions, answers)):
            prediction = self._extractor(completion)
            if prediction is None or not prediction.strip():
                counters["no_answer"] += 1
                task = self._fallback_task(completion, prediction, gold)
                if task is None:
                    continue
                counters["fallback_extraction"] += 1
                # A final "$...$" that is a plain number or list is decided here, like an extracted answer.
                span = final_math_span(task.prediction)
                verdict = None if span is None else quick_verdict(span, gold)
                if verdict is not None:
                    scores[slot] = float(verdict)
                else:
                    slots.append(slot)
                    tasks.append(task)
            elif len(prediction) > self.max_answer_chars:
                counters["too_long"] += 1
            elif (verdict := quick_verdict(prediction, gold)) is not None:
                scores[slot] = float(verdict)
            else:
                slots.append(slot)
                tasks.append(GradeTask(gold, prediction, self._op_timeout_s))
        return slots, tasks

    def _fallback_task(self, completion: str, prediction: str | None, gold: str) -> GradeTask | None:
        """A task grading math-verify's own extraction from the completion's end, when the completion states no
        answer in the expected form at all (an empty box or answer block is an answer: an empty one)."""
        if not self.fallback or prediction is not None:
            return None
        # With an answer block ("boxed" mode, no box inside) only the block counts, as for the extractors.
        block = EXTRACTORS["answer_tag"](completion)
        text = _fallback_text(completion if block is None else block)
        if not _FALLBACK_WORTH_TRYING.search(text):
            return None
        return GradeTask(gold, text, self._op_timeout_s, fallback=True)

    def start(self) -> None:
        """Start (and warm up) the grading workers now; otherwise the first call that needs them does."""
        self._get_pool().start()

    def close(self) -> None:
        """Kill the worker processes; a later call starts new ones."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def _get_pool(self) -> GradingPool[GradeTask, float]:
        with self._pool_lock:
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

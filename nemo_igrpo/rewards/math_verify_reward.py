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
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass

from nemo_igrpo.rewards.answer import quick_verdict
from nemo_igrpo.rewards.base import Reward, RewardOutput, register_reward
from nemo_igrpo.rewards.match import EXTRACTORS, ExtractMode
from nemo_igrpo.rewards.pool import GradingPool

# Caps a worker's heap: an answer that makes sympy allocate without bound becomes a counted crash, not memory
# pressure on the trainer. Generous, because a spawned worker re-imports the trainer's main module (and torch).
_WORKER_MEMORY_LIMIT_MB = 4096

# "1\,000" (thin space as thousands separator) parses as 1*0 = 0 in math-verify 0.9.0, which makes it equal to 0
# and unequal to 1000. Its normalisation already handles "1,000" and "1{,}000".
_THIN_SPACE_THOUSANDS = re.compile(r"(?<=\d)\\,(?=\d{3}(?!\d))")
# A whole answer such as "1 000" or "12 345.5": a plain space as thousands separator (math-verify reads 1*000).
_SPACE_THOUSANDS = re.compile(r"-?\d{1,3}(?: \d{3})+(?:\.\d+)?")
# A whole answer such as "1000,99" or "0,111": a decimal comma, unless it is a thousands separator ("1,000").
_DECIMAL_COMMA = re.compile(r"(-?)(\d+),(\d+)")
_PLAIN_NUMBER = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)")
# "185\": a stray trailing backslash (math-verify then sees an escaped closing "$" and no math at all).
_TRAILING_BACKSLASH = re.compile(r"(?<!\\)\\$")
_UNESCAPED_DOLLAR = re.compile(r"(?<!\\)\$")
# Sentence punctuation written inside the math ("$\frac{1}{3}.$", "\[x = 2,\]") or after a bare answer: math-verify
# 0.9.0 then misses the expression (and may fall back to a stray number). Not an ellipsis ("1, 2, 3, ...").
_PUNCTUATION_BEFORE_CLOSE = re.compile(r"(?<![.,;])\s*[.,;]\s*(?=\$|\\\]|\\\))")
_TRAILING_PUNCTUATION = re.compile(r"(?<![.,;])\s*[.,;]\s*$")

# The fallback reads the end of the completion only: the final expression is there (as in the completions of the
# verdict table), and math-verify's regexes then cost the same for a
# 300-character and a 300,000-character completion.
_FALLBACK_TAIL_CHARS = 600
# A tail without a digit or a math delimiter has nothing math-verify could extract: not worth a worker round trip.
_FALLBACK_WORTH_TRYING = re.compile(r"\d|\$|\\\(|\\\[")
# The last math span of a text and what follows it: "... So the answer is $(x+3)^2$. I hope it is correct."
_LAST_MATH_SPAN = re.compile(r"(?:\$\$?|\\\(|\\\[)([^$]{1,200}?)(?:\$\$?|\\\)|\\\])([^$\d]{0,40})$")
_SENTENCE_BREAK = re.compile(r"[.!?:]\s|\n")
_GOLD_CACHE_SIZE = 4096  # parsed golds kept per worker; a run has at most a few thousand distinct problems

@dataclass(frozen=True)
class GradeTask:
    """One (gold, prediction) pair for a worker. ``op_timeout_s`` bounds each math-verify parse/compare step.
    ``fallback``: ``prediction`` is completion text, whose final expression math-verify extracts itself."""

    gold: str
    prediction: str
    op_timeout_s: int
    fallback: bool = False


def normalize_number_format(answer: str) -> str:
    """``answer`` without formatting math-verify misreads: a stray trailing backslash, sentence punctuation at the
    end of the math, thin or plain spaces as thousands separators (``1\\,000``, ``1 000``)."""
    text = " ".join(answer.split())
    text = _TRAILING_BACKSLASH.sub("", text).strip()
    text = _TRAILING_PUNCTUATION.sub("", _PUNCTUATION_BEFORE_CLOSE.sub("", text))
    text = _THIN_SPACE_THOUSANDS.sub("", text)
    if _SPACE_THOUSANDS.fullmatch(text):
        text = text.replace(" ", "")
    return text


def decimal_comma_reading(answer: str) -> str | None:
    """``answer`` read with a decimal comma (``1000,99`` → ``1000.99``, ``0,111`` → ``0.111``), or None when it is not
    one number with one comma, or the comma is a thousands separator (three digits after a non-zero integer)."""
    match = _DECIMAL_COMMA.fullmatch(answer.strip().strip("$").strip())
    if match is None:
        return None
    sign, integer, fraction = match.groups()
    if len(fraction) == 3 and integer.lstrip("0"):
        return None
    return f"{sign}{integer}.{fraction}"


def as_math_mode(answer: str) -> str:
    """``answer`` as one inline-math span, the form math-verify's LaTeX extractor reliably picks up.

    A bare number parses either way, but the delimiters matter elsewhere: ``$50\\%$`` parses while
    ``\\boxed{50\\%}`` falls back to a string, and plain ``sqrt(2)/2`` only parses inside ``$...$``.
    """
    # LaTeX treats a newline as a space, but math-verify's inline-math pattern does not span lines (a multi-line
    # pmatrix would otherwise be skipped in favour of a stray number).
    text = normalize_number_format(answer)
    # An answer that brings its own math delimiters ("<answer>$5$</answer>") is already in the expected form.
    return text if _UNESCAPED_DOLLAR.search(text) else f"${text}$"


_gold_cache: dict[tuple[str, int], list] = {}


def _parse_gold(gold: str, timeout_s: int) -> list:
    """math-verify's parse of a gold answer, remembered: a batch grades many completions against few golds."""
    from math_verify import parse

    key = (gold, timeout_s)
    if key not in _gold_cache:
        if len(_gold_cache) >= _GOLD_CACHE_SIZE:
            _gold_cache.clear()
        _gold_cache[key] = parse(as_math_mode(gold), parsing_timeout=timeout_s)
    return _gold_cache[key]


# Points at which _numeric_verdict evaluates expressions: irrational-looking, of both signs, away from the
# integers where denominators tend to vanish.
_PROBE_POINTS = ((0.7134, 1.3917, -0.5311), (-1.2573, 0.4429, 2.1786))
_MAX_PROBE_SYMBOLS = 3


def _smooth_functions() -> tuple[type, ...]:
    import sympy

    return (sympy.sin, sympy.cos, sympy.tan, sympy.cot, sympy.sec, sympy.csc, sympy.asin, sympy.acos, sympy.atan,
            sympy.exp, sympy.log, sympy.sinh, sympy.cosh, sympy.tanh)


_SMOOTH_FUNCTIONS: tuple[type, ...] = ()


def _numeric_verdict(gold: list, prediction: list) -> bool | None:
    """Settle a pair of plain expressions numerically, when that is certain enough; None leaves it to math-verify.

    Applies when gold and prediction are each one plain expression (no equation, relation, set or matrix) in the
    same at most three symbols. False: the values differ clearly (1e-4 relative, far outside math-verify's
    6-decimal float comparison) at a probe point. True: they agree to 1e-12 at every probe point and are built
    from arithmetic, powers and roots, the constants, trigonometric, exponential and logarithmic functions only
    (two such expressions that agree at two irrational-looking points are the same expression; floor, ceiling,
    absolute values and the like are excluded because they can agree at a point without being equal).
    Undefined or non-finite values prove nothing. For such pairs math-verify spends most of its time (≈14 ms for
    ``(x+10)^2`` vs ``x^2+20x+100``) in symbolic simplification; this takes well under a millisecond.
    """
    import sympy

    gold_exprs = [item for item in gold if isinstance(item, sympy.Expr)]
    prediction_exprs = [item for item in prediction if isinstance(item, sympy.Expr)]
    if len(gold_exprs) != 1 or len(prediction_exprs) != 1:
        return None
    (a,), (b,) = gold_exprs, prediction_exprs
    symbols = sorted(a.free_symbols | b.free_symbols, key=str)
    if a.free_symbols != b.free_symbols or len(symbols) > _MAX_PROBE_SYMBOLS:
        return None
    if any(isinstance(item, sympy.MatrixBase) or item.has(sympy.Piecewise) for item in (a, b)):
        return None
    agreed = 0
    for point in _PROBE_POINTS:
        values = dict(zip(symbols, point))
        try:
            x, y = complex(a.evalf(20, subs=values)), complex(b.evalf(20, subs=values))
        except (TypeError, ValueError, ArithmeticError):
            continue
        if not all(math.isfinite(part) for part in (x.real, x.imag, y.real, y.imag)):
            continue
        scale = max(1.0, abs(x), abs(y))
        if abs(x - y) > 1e-4 * scale:
            return False
        agreed += abs(x - y) <= 1e-12 * scale
    smooth = all(isinstance(function, _SMOOTH_FUNCTIONS) for item in (a, b) for function in item.atoms(sympy.Function))
    return True if agreed == len(_PROBE_POINTS) and smooth else None


def grade(task: GradeTask) -> float:
    """1.0 if math-verify finds the prediction equal to the gold answer, else 0.0. Runs in a pool worker.

    math-verify's own ``signal.alarm`` timeouts work here (a worker's main thread) and turn a slow step into
    0.0 without losing the worker; the pool's hard deadline covers what an alarm cannot interrupt (C code).
    A number that failed as written gets one more try with a decimal comma (``1,22`` = 1.22), but only against a
    plain number: against a list or a set, ``1,2`` stays the pair it is.
    """
    from math_verify import parse, verify  # here, not at module level: keeps sympy out of the trainer process

    timeout = task.op_timeout_s
    gold = _parse_gold(task.gold, timeout)
    if task.fallback:
        prediction = parse(_PUNCTUATION_BEFORE_CLOSE.sub("", task.prediction), parsing_timeout=timeout)
    else:
        prediction = parse(as_math_mode(task.prediction), parsing_timeout=timeout)
    global _SMOOTH_FUNCTIONS
    if not _SMOOTH_FUNCTIONS:
        _SMOOTH_FUNCTIONS = _smooth_functions()
    numeric = _numeric_verdict(gold, prediction)
    if numeric is not None:
        return float(numeric)
    # allow_set_relation_comp: an interval gold accepts the equivalent inequality ("(0,\infty)" vs "x>0").
    if verify(gold, prediction, allow_set_relation_comp=True, timeout_seconds=timeout):
        return 1.0
    # math-verify's parse returns [value, the text it read]: compare what was read, not what was sent.
    gold_text = gold[-1] if gold else task.gold
    prediction_text = prediction[-1] if prediction else ""
    if not (isinstance(gold_text, str) and isinstance(prediction_text, str)):
        return 0.0
    for number, other, other_is_gold in ((gold_text, prediction_text, False), (prediction_text, gold_text, True)):
        reading = decimal_comma_reading(other)
        if _PLAIN_NUMBER.fullmatch(number.strip("$ ")) and reading is not None:
            alternative = parse(f"${reading}$", parsing_timeout=timeout)
            pair = (alternative, prediction) if other_is_gold else (gold, alternative)
            return 1.0 if verify(*pair, timeout_seconds=timeout) else 0.0
    return 0.0


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


def _config_default(key: str):
    """The default of ``reward.<key>`` in ``nemo_igrpo.config``, where every default lives (imported here, not at
    module level: the config module validates reward names against this package)."""
    return {"extract": "boxed_or_tag", "num_workers": 2, "timeout_s": 5.0}[key]  # TEMP until s17 merge


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

    ``extract``, ``num_workers`` and ``timeout_s`` default to the config's ``reward.*`` defaults. ``fallback``: a
    completion with neither a box nor an answer block is graded on math-verify's own extraction of its final
    expression.

    Counters: ``no_answer`` (no box and no answer block, or an empty one), ``fallback_extraction`` (of those, graded
    by the fallback), ``too_long`` (answer over ``max_answer_chars``, scored 0 without grading), and from the pool
    ``timeouts`` and ``crashes`` (scored 0) and ``errors`` (``grade`` raised). The worker pool starts on the first
    call that has something to grade and is reused until ``close()``.
    """

    def __init__(
        self,
        extract: ExtractMode | None = None,
        num_workers: int | None = None,
        timeout_s: float | None = None,
        max_answer_chars: int = 1000,
        fallback: bool = True,
    ) -> None:
        extract = _config_default("extract") if extract is None else extract
        num_workers = _config_default("num_workers") if num_workers is None else num_workers
        timeout_s = _config_default("timeout_s") if timeout_s is None else timeout_s
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

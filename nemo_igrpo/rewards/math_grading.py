"""What a ``GradingPool`` worker runs for the ``math_verify`` reward: one (gold, prediction) pair in, 1.0 or 0.0 out.

math-verify and sympy are imported only here, inside functions, so they load in the worker processes and never in
the trainer. Golds are parsed once per worker; plain expressions are settled numerically when that is certain; the
rest goes to math-verify's ``verify``.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass

from nemo_igrpo.rewards.math_normalize import as_math_mode, decimal_comma_reading, strip_punctuation_before_close

# A plain decimal number: the only kind of answer a decimal-comma reading is tried against.
_PLAIN_NUMBER = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)")
_GOLD_CACHE_SIZE = 4096  # parsed golds kept per worker; a run has at most a few thousand distinct problems


@dataclass(frozen=True)
class GradeTask:
    """One (gold, prediction) pair for a worker. ``op_timeout_s`` bounds each math-verify parse/compare step.
    ``fallback``: ``prediction`` is completion text, whose final expression math-verify extracts itself."""

    gold: str
    prediction: str
    op_timeout_s: int
    fallback: bool = False


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
        prediction = parse(strip_punctuation_before_close(task.prediction), parsing_timeout=timeout)
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


"""Final-answer extraction and comparison for verifiable math.

Everything here is plain string processing with linear-time scans: completions are untrusted model output, may be
long (hundreds of thousands of characters) or adversarially nested, and are never passed to ``eval``. Numeric
equality goes through ``fractions.Fraction`` on strings that a strict regex has already accepted.
"""

from __future__ import annotations

import re
from fractions import Fraction

# "\boxed{" (LaTeX allows spaces before the brace). Matching with finditer and keeping the last hit is linear.
_BOXED_OPEN = re.compile(r"\\boxed\s*\{")
# Structural braces; "\{" and "\}" are literal braces in LaTeX (e.g. set notation) and must not change the depth.
_BRACE = re.compile(r"\\[{}]|[{}]")

_ANSWER_OPEN, _ANSWER_CLOSE = "<answer>", "</answer>"


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` in ``text`` (nested braces allowed), or None if absent or unbalanced."""
    last_open = _last_match(_BOXED_OPEN, text)
    if last_open is None:
        return None
    start = last_open.end()
    depth = 1
    for brace in _BRACE.finditer(text, start):
        token = brace.group()
        if len(token) == 2:  # escaped brace: content, not structure
            continue
        depth += 1 if token == "{" else -1
        if depth == 0:
            return text[start : brace.start()]
    return None


def _last_match(pattern: re.Pattern[str], text: str) -> re.Match[str] | None:
    """The last non-overlapping match of ``pattern`` (one forward scan; no backtracking from the end)."""
    last = None
    for last in pattern.finditer(text):
        pass
    return last


def extract_answer_tag(text: str) -> str | None:
    """Stripped content of the last complete ``<answer>...</answer>`` pair, or None."""
    close = text.rfind(_ANSWER_CLOSE)
    if close < 0:
        return None
    open_ = text.rfind(_ANSWER_OPEN, 0, close)
    if open_ < 0:
        return None
    return text[open_ + len(_ANSWER_OPEN) : close].strip()


def extract_final_answer(text: str) -> str | None:
    """The last boxed answer, else the last ``<answer>`` tag's content, else None.

    Boxed wins because a tagged answer usually wraps a boxed one (``<answer>so \\boxed{5}</answer>``).
    """
    boxed = extract_boxed(text)
    return boxed if boxed is not None else extract_answer_tag(text)


# LaTeX sizing and spacing commands that never change the value. The lookahead keeps "\leftarrow" intact.
_NOISE = re.compile(r"\\(?:left|right)(?![a-zA-Z])|\\[!,;: ]|\\\$|\$")
# \frac{a}{b}, \dfrac{a}{b}, \tfrac{a}{b} with brace-free arguments: nested fractions resolve innermost first.
_FRAC = re.compile(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}")
_FRAC_SHORT = re.compile(r"\\[dt]?frac(\d)(\d)")  # "\frac12"
_MAX_FRAC_PASSES = 8  # deeper nesting is not a final answer worth normalising (and would cost quadratic time)
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_ATOMIC = re.compile(r"-?[\w.]+")


def normalize_answer(answer: str) -> str:
    """A canonical string form: no whitespace/``$``/``\\left``/``\\right``/``\\!``, fractions as ``a/b``,
    no thousands separators, no trailing period."""
    text = _NOISE.sub("", answer)
    text = re.sub(r"\s+", "", text)
    text = _FRAC_SHORT.sub(r"\1/\2", text)
    for _ in range(_MAX_FRAC_PASSES):
        text, replaced = _FRAC.subn(_frac_as_division, text)
        if not replaced:
            break
    text = _THOUSANDS.sub("", text)
    return text.removesuffix(".")


def _frac_as_division(match: re.Match[str]) -> str:
    """``a/b``, parenthesising compound parts so that ``\\frac{1+x}{2}`` does not become ``1+x/2``."""
    numerator, denominator = (_group(part) for part in match.groups())
    return f"{numerator}/{denominator}"


def _group(part: str) -> str:
    return part if _ATOMIC.fullmatch(part) else f"({part})"


_DECIMAL = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)"
_RATIONAL = re.compile(rf"({_DECIMAL})(?:/({_DECIMAL}))?")
_MAX_NUMBER_CHARS = 100  # longer "numbers" are not answers; also keeps int() far from CPython's digit limit


def parse_rational(text: str) -> Fraction | None:
    """An integer, decimal or ``a/b`` as an exact ``Fraction``; None for anything else (or a zero denominator)."""
    if len(text) > _MAX_NUMBER_CHARS:
        return None
    match = _RATIONAL.fullmatch(text)
    if match is None:
        return None
    numerator, denominator = match.groups()
    value = Fraction(numerator)
    if denominator is None:
        return value
    divisor = Fraction(denominator)
    return None if divisor == 0 else value / divisor


def answers_match(pred: str | None, gold: str) -> bool:
    """Whether a predicted final answer equals the gold one: same normal form, or the same rational number."""
    if pred is None:
        return False
    pred_norm, gold_norm = normalize_answer(pred), normalize_answer(gold)
    if not pred_norm or not gold_norm:
        return False
    if pred_norm == gold_norm:
        return True
    pred_value, gold_value = parse_rational(pred_norm), parse_rational(gold_norm)
    return pred_value is not None and pred_value == gold_value

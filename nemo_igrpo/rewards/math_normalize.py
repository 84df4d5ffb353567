"""Answer text rewritten into the form math-verify 0.9.0 reads correctly: number formats it misreads, sentence
punctuation inside the math, and inline-math delimiters. Pure string functions: used by the grading workers
(``math_grading``) and cheap to import anywhere.
"""

from __future__ import annotations

import re

# "1\,000" (thin space as thousands separator) parses as 1*0 = 0 in math-verify 0.9.0, which makes it equal to 0
# and unequal to 1000. Its normalisation already handles "1,000" and "1{,}000".
_THIN_SPACE_THOUSANDS = re.compile(r"(?<=\d)\\,(?=\d{3}(?!\d))")
# A whole answer such as "1 000" or "12 345.5": a plain space as thousands separator (math-verify reads 1*000).
_SPACE_THOUSANDS = re.compile(r"-?\d{1,3}(?: \d{3})+(?:\.\d+)?")
# A whole answer such as "1000,99" or "0,111": a decimal comma, unless it is a thousands separator ("1,000").
_DECIMAL_COMMA = re.compile(r"(-?)(\d+),(\d+)")
# "185\": a stray trailing backslash (math-verify then sees an escaped closing "$" and no math at all).
_TRAILING_BACKSLASH = re.compile(r"(?<!\\)\\$")
_UNESCAPED_DOLLAR = re.compile(r"(?<!\\)\$")
# Sentence punctuation written inside the math ("$\frac{1}{3}.$", "\[x = 2,\]") or after a bare answer: math-verify
# 0.9.0 then misses the expression (and may fall back to a stray number). Not an ellipsis ("1, 2, 3, ...").
_PUNCTUATION_BEFORE_CLOSE = re.compile(r"(?<![.,;])\s*[.,;]\s*(?=\$|\\\]|\\\))")
_TRAILING_PUNCTUATION = re.compile(r"(?<![.,;])\s*[.,;]\s*$")


def strip_punctuation_before_close(text: str) -> str:
    """``text`` without sentence punctuation written just before a closing math delimiter (``$\\frac{1}{3}.$``)."""
    return _PUNCTUATION_BEFORE_CLOSE.sub("", text)


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

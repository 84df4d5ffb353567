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
    """The final answer under the ``boxed_or_tag`` rule: see ``extract_answer``."""
    return extract_answer(text, "boxed_or_tag")


# One token of the box scan: a box opening, an escaped (literal) brace, or a structural brace.
_BOX_TOKEN = re.compile(r"\\boxed\s*\{|\\[{}]|[{}]")
# What may stand between boxes that together state one answer ("\boxed{1}, \boxed{2}", "\boxed{k=45} \quad
# \text{and} \quad \boxed{n=2}", "$y_1 = \boxed{3}$ and $y_2 = \boxed{-1}$"): punctuation, math delimiters and
# spacing, "and"/"or", "for part (a)", and a short label such as "y_2 =". Anything else ("but actually", a
# sentence) means the earlier box was an intermediate or abandoned result, and only the last box counts.
# (Bounded by _MAX_CONNECTOR_CHARS, so backtracking between the overlapping alternatives stays cheap.)
_JOIN_WORDS = r"and|or|for|part|parts|respectively|\([a-z]\)"
_BOX_CONNECTOR = re.compile(
    r"(?:\s|[,;:&$]|\\[,;:! \\()\[\]]|\\|\\q?quad\b|\\(?:text|textrm|textbf|mbox)\s*\{(?:\s|,|"
    + _JOIN_WORDS
    + r")*\}|\b(?:"
    + _JOIN_WORDS
    + r")\b|[A-Za-z](?:_\{?\w{1,3}\}?)?\s*=)*"
)
# ...and at least one of these must be there: boxes merely next to each other ("$$\boxed{20}$$ \boxed{143}") are a
# restatement or a correction, not a list.
_JOIN_MARK = re.compile(r"[,;&=]|\b(?:and|or)\b")
_MAX_CONNECTOR_CHARS = 80


def extract_boxed_answer(text: str) -> str | None:
    """The final boxed answer: the last top-level ``\\boxed{...}``, joined with ``", "`` to the boxes right before
    it that only connectors separate (``\\boxed{1} and \\boxed{2}`` is the answer ``1, 2``; ``\\boxed{41}, but
    actually \\boxed{42}`` is ``42``). None if there is no box or the last one never closes. One linear scan."""
    boxes: list[tuple[int, int, int]] = []  # (position of "\\boxed", content start, content end), top level only
    stack: list[int] = []  # per open brace: content start if it opened a box, else -1
    boxes_open = 0
    last_open = -1  # position of the last "\\boxed{" seen, closed or not
    for token in _BOX_TOKEN.finditer(text):
        symbol = token.group()
        if len(symbol) == 2:  # escaped brace: content, not structure
            continue
        if symbol == "{":
            stack.append(-1)
        elif symbol == "}":
            if not stack:
                continue
            start = stack.pop()
            if start >= 0:
                boxes_open -= 1
                if boxes_open == 0:
                    boxes.append((text.rfind("\\boxed", 0, start), start, token.start()))
        else:  # a box opening
            if boxes_open == 0:
                last_open = token.start()
            stack.append(token.end())
            boxes_open += 1
    if not boxes or boxes[-1][0] != last_open:
        return None
    parts = [boxes[-1]]
    for box in reversed(boxes[:-1]):
        gap = text[box[2] + 1 : parts[-1][0]]
        if len(gap) > _MAX_CONNECTOR_CHARS or not _BOX_CONNECTOR.fullmatch(gap) or not _JOIN_MARK.search(gap):
            break
        parts.append(box)
    return ", ".join(text[start:end] for _, start, end in reversed(parts))


def extract_answer(text: str, mode: str) -> str | None:
    """The completion's final answer, following the paper's ``<think>…</think><answer>…</answer>`` template.

    When the completion has an ``<answer>`` block, only that block is read: a box in the ``<think>`` part is
    scratch work. ``boxed``: the final boxed answer (of the answer block if there is one). ``answer_tag``: the
    answer block. ``boxed_or_tag``: the final boxed answer inside the answer block, else the block itself, else
    the final boxed answer anywhere (a completion that ignores the template).
    """
    tag = extract_answer_tag(text)
    if mode == "answer_tag":
        return tag
    if tag is not None:
        boxed = extract_boxed_answer(tag)
        if boxed is not None or mode == "boxed":
            return boxed
        return tag
    return extract_boxed_answer(text)


# LaTeX sizing and spacing commands that never change the value. The lookahead keeps "\leftarrow" intact.
_NOISE = re.compile(r"\\(?:left|right)(?![a-zA-Z])|\\[!,;: ]|\\\$|\$")
# \frac{a}{b}, \dfrac{a}{b}, \tfrac{a}{b} with brace-free arguments: nested fractions resolve innermost first.
_FRAC = re.compile(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}")
_FRAC_SHORT = re.compile(r"\\[dt]?frac(\d)(\d)")  # "\frac12"
_MAX_FRAC_PASSES = 8  # deeper nesting is not a final answer worth normalising (and would cost quadratic time)
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
# Only a whole number has thousands separators: in "(170,171)" the comma separates two numbers.
_GROUPED_NUMBER = re.compile(r"[+-]?[1-9]\d{0,2}(?:,\d{3})+(?:\.\d*)?")  # not "0,111": a decimal comma
_ATOMIC = re.compile(r"-?[\w.]+")


def normalize_answer(answer: str) -> str:
    """A canonical string form: no whitespace/``$``/``\\left``/``\\right``/``\\!``, fractions as ``a/b``,
    no thousands separators, no trailing period."""
    text = _NOISE.sub("", answer)
    text = re.sub(r"\s+", "", text)
    text = _FRAC_SHORT.sub(_frac_as_division, text)
    for _ in range(_MAX_FRAC_PASSES):
        text, replaced = _FRAC.subn(_frac_as_division, text)
        if not replaced:
            break
    if _GROUPED_NUMBER.fullmatch(text.removesuffix(".")):
        text = _THOUSANDS.sub("", text)
    return text.removesuffix(".")


def _frac_as_division(match: re.Match[str]) -> str:
    """``a/b``, parenthesising compound parts so that ``\\frac{1+x}{2}`` does not become ``1+x/2``, and the whole
    after a digit: ``918\\frac{1}{2}`` is a mixed number (918 + 1/2), not 9181/2."""
    numerator, denominator = (_group(part) for part in match.groups())
    start = match.start()
    after_digit = start > 0 and match.string[start - 1].isdigit()
    return f"({numerator}/{denominator})" if after_digit else f"{numerator}/{denominator}"


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


# ------------------------------------------------------------------------------------- quick verdicts
# Most answers are numbers or short lists of numbers; math-verify spends milliseconds on a number and tens of
# milliseconds on a list (its LaTeX parser), so these are decided here, where the verdict is certain, and the
# rest is left to math-verify.

_INTEGER = re.compile(r"[+-]?\d+")
# A written difference this large (relative) is never erased by math-verify's 6-decimal float comparison.
_CLEARLY_DIFFERENT = Fraction(1, 10_000)
_INFINITY = re.compile(r"[+-]?(?:\\infty|∞|inf)")
# Brackets of a list: "(…)", "[…]", "{…}" (after normalize_answer "\{" is still "\{"), or none at all.
_LIST = re.compile(r"(\\\{|[(\[{]?)(.*?)(\\\}|[)\]}]?)")
_SET_BRACKETS = {("", ""), ("\\{", "\\}"), ("{", "}")}
_MAX_LIST_ITEMS = 20


def _number(text: str) -> Fraction | float | None:
    """A plain rational (``3``, ``-0.25``, ``1/4`` in normal form) or ±infinity, else None."""
    if _INFINITY.fullmatch(text):
        return float("-inf") if text.startswith("-") else float("inf")
    return parse_rational(text)


def _numbers_verdict(pred: str, gold: str) -> bool | None:
    """True/False when both are plain numbers whose equality is certain, else None."""
    a, b = _number(pred), _number(gold)
    if a is None or b is None:
        return None
    if a == b:
        return True
    if isinstance(a, float) or isinstance(b, float):  # an infinity against anything else
        return False
    if _INTEGER.fullmatch(pred) and _INTEGER.fullmatch(gold):
        return False
    if abs(a - b) > _CLEARLY_DIFFERENT * max(1, abs(a), abs(b)):
        return False
    return None  # e.g. 1/3 vs 0.333333: math-verify's rounding decides


def _list_of_numbers(text: str) -> tuple[str, str, list[Fraction | float]] | None:
    match = _LIST.fullmatch(text)
    if match is None:
        return None
    opening, body, closing = match.groups()
    items = body.split(",")
    if not 2 <= len(items) <= _MAX_LIST_ITEMS:
        return None
    numbers = [_number(item) for item in items]
    if any(number is None for number in numbers):
        return None
    return opening, closing, numbers  # type: ignore[return-value]


def _lists_verdict(pred: str, gold: str) -> bool | None:
    """True/False for two lists of plain numbers with the same brackets where the verdict is certain: sets
    (braces or none) compare as sets, tuples and intervals element by element; anything else is None."""
    a, b = _list_of_numbers(pred), _list_of_numbers(gold)
    if a is None or b is None or len(a[2]) != len(b[2]):
        return None
    (a_open, a_close, a_items), (b_open, b_close, b_items) = a, b
    if (a_open, a_close) in _SET_BRACKETS and (b_open, b_close) in _SET_BRACKETS:
        if len(set(a_items)) != len(a_items) or len(set(b_items)) != len(b_items):
            return None  # repeated elements: leave multiset questions to math-verify
        pairs = list(zip(sorted(a_items), sorted(b_items)))
    elif (a_open, a_close) == (b_open, b_close) and a_open in "([" and a_close in ")]" and a_open and a_close:
        pairs = list(zip(a_items, b_items))
    elif (len(a_items) == 2 and a_open in "([" and b_open in "([" and a_close in ")]" and b_close in ")]"
          and a_open and b_open and a_close and b_close and a_items == b_items and a_items[0] != a_items[1]):
        return False  # the same endpoints, opened or closed differently: different intervals
    else:
        return None
    verdicts = [_numbers_verdict(_plain(x), _plain(y)) for x, y in pairs]
    if all(verdict is True for verdict in verdicts):
        return True
    if any(verdict is False for verdict in verdicts):
        return False
    return None


def _plain(number: Fraction | float) -> str:
    """A number back in the normal form ``_numbers_verdict`` reads (integers stay integers)."""
    if isinstance(number, float):
        return "-\\infty" if number < 0 else "\\infty"
    if number.denominator == 1:
        return str(number.numerator)
    return f"{number.numerator}/{number.denominator}"


def quick_verdict(pred: str, gold: str) -> bool | None:
    """Whether ``pred`` equals ``gold`` when that is certain without a computer-algebra system, else None: the same
    normal form (``normalize_answer``), two plain numbers, or two lists of plain numbers. Linear in the input."""
    pred_norm, gold_norm = normalize_answer(pred), normalize_answer(gold)
    if not pred_norm or not gold_norm:
        return None
    if pred_norm == gold_norm:
        return True
    verdict = _numbers_verdict(pred_norm, gold_norm)
    return verdict if verdict is not None else _lists_verdict(pred_norm, gold_norm)

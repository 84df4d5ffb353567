"""The drafts a warm-start refinement row can show (``warm_start.draft_mix``), and the near-miss perturbation.

A refinement row is the Stage-2 prompt ``template(problem, draft)`` with the problem's reference solution as target,
so the warm start can teach a small model what RL's Stage 2 asks of it: keep a right draft, repair a wrong one. The
kinds, in the order a mix is drawn from:

* ``reference``: the problem's own reference solution (the target copied);
* ``near_miss``: the reference with one slip (:func:`near_miss`): the situation Stage 2 meets most during RL, a
  draft of the same problem that is right up to some step;
* ``foreign``: another problem's reference solution (other numbers, usually another starting count);
* ``own``: a draft sampled from the model being warmed (``nemo_igrpo.warm_start``; ``None`` here, because it needs
  the model, not just the data).

A kind is ``(example, pool, rng) -> draft text``; a user's own is ``DRAFT_KINDS.register("name", fn)`` before the
config is loaded.
"""

from __future__ import annotations

import random
import re
from typing import Callable

from nemo_igrpo.data.dataset import Example
from nemo_igrpo.registry import Registry

DraftKind = Callable[[Example, list[Example], random.Random], str]

DRAFT_KINDS: Registry[DraftKind | None] = Registry("warm-start draft kind", "warm_start.draft_mix")

_STEP = re.compile(r"(\d+)([+*-])(\d+)=(\d+)")
_ENDING = re.compile(r"(.*?)( \\boxed\{(\d+)\}|, answer (\d+))")
_OPS: dict[str, Callable[[int, int], int]] = {"+": lambda a, b: a + b, "-": lambda a, b: a - b,
                                              "*": lambda a, b: a * b}
_SLIPS = (-3, -2, -1, 1, 2, 3)


def near_miss(solution: str, rng: random.Random) -> str | None:
    """``solution`` with one slip, whose final answer is therefore wrong; None when it holds no number.

    A worked chain (``7+5=12, 12-3=9, 9*2=18 \\boxed{18}``: ``builtin:chain``, and ``builtin:arithmetic`` as a chain
    of one step) gets one step's result changed by ±1..3 and every later step recomputed from it, the final answer
    included (``7+5=12, 12-3=11, 11*2=22 \\boxed{22}``); results stay >= 0. Any other solution (a user dataset's)
    gets its final answer perturbed: the last number inside the last ``\\boxed{}``, or the text's last number when
    nothing is boxed.
    """
    steps = _parse_chain(solution)
    if steps is not None:
        return _chain_slip(solution, steps, rng)
    box = solution.rfind("\\boxed{")
    numbers = list(re.finditer(r"\d+", solution[box:] if box >= 0 else ""))
    offset = box
    if not numbers:
        numbers, offset = list(re.finditer(r"\d+", solution)), 0
    if not numbers:
        return None
    last = numbers[-1]
    value = int(last.group())
    slipped = value + _slip(rng, lambda delta: value + delta >= 0)
    start, end = offset + last.start(), offset + last.end()
    return solution[:start] + str(slipped) + solution[end:]


def _parse_chain(solution: str) -> list[list] | None:
    """[[a, op, b, c], ...] when ``solution`` is steps ``a op b=c`` joined by ", " (each after the first starting
    from the previous result, every result right) and a final answer equal to the last result; else None."""
    ending = _ENDING.fullmatch(solution)
    if ending is None:
        return None
    steps = []
    for text in ending.group(1).split(", "):
        match = _STEP.fullmatch(text)
        if match is None:
            return None
        a, op, b, c = int(match.group(1)), match.group(2), int(match.group(3)), int(match.group(4))
        if _OPS[op](a, b) != c or (steps and a != steps[-1][3]):
            return None
        steps.append([a, op, b, c])
    final = int(ending.group(3) or ending.group(4))
    return steps if steps and final == steps[-1][3] else None


def _chain_slip(solution: str, steps: list[list], rng: random.Random) -> str:
    at = rng.randrange(len(steps))

    def recomputed(delta: int) -> list[list]:
        out = [list(step) for step in steps]
        out[at][3] += delta
        for i in range(at + 1, len(out)):
            out[i][0] = out[i - 1][3]
            out[i][3] = _OPS[out[i][1]](out[i][0], out[i][2])
        return out

    slipped = recomputed(_slip(rng, lambda delta: all(step[3] >= 0 for step in recomputed(delta))))
    body = ", ".join(f"{a}{op}{b}={c}" for a, op, b, c in slipped)
    final = slipped[-1][3]
    boxed = _ENDING.fullmatch(solution).group(3) is not None  # type: ignore[union-attr]
    return body + (f" \\boxed{{{final}}}" if boxed else f", answer {final}")


def _slip(rng: random.Random, allowed: Callable[[int], bool]) -> int:
    """A change of ±1..3; a negative one that breaks ``allowed`` (a result below 0) becomes positive, which never
    does: later steps add, subtract or double a larger count."""
    delta = rng.choice(_SLIPS)
    return delta if allowed(delta) else abs(delta)


@DRAFT_KINDS.register("reference")
def _reference(example: Example, pool: list[Example], rng: random.Random) -> str:
    return example.solution


@DRAFT_KINDS.register("near_miss")
def _near_miss(example: Example, pool: list[Example], rng: random.Random) -> str:
    """A solution with no number to perturb gets another problem's solution instead (a wrong draft either way)."""
    slipped = near_miss(example.solution, rng)
    return slipped if slipped is not None else rng.choice(pool).solution


@DRAFT_KINDS.register("foreign")
def _foreign(example: Example, pool: list[Example], rng: random.Random) -> str:
    return rng.choice(pool).solution


DRAFT_KINDS.register("own", None)  # sampled from the model being warmed, by nemo_igrpo.warm_start

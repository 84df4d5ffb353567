"""The embedded demo task: one-sentence arithmetic word problems with short ``\\boxed{}`` solutions.

The policy in the demo is a tiny character-level transformer, so everything is kept short: problems stay under
about 70 characters and a solution is just the computation and the boxed result, e.g. ``23+15=38 \\boxed{38}``.
Generation is deterministic by seed; a held-out split is kept disjoint from training by excluding its problems.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

from nemo_igrpo.data.dataset import Example

NAMES = ("Ann", "Bob", "Cy", "Dee", "Eve", "Max", "Sam", "Zoe")
ITEMS = ("apples", "pens", "cards", "books", "coins", "eggs", "shells", "stamps")


@dataclass(frozen=True)
class _Operands:
    """The random draws one problem is made from."""

    name: str
    other: str  # a second person, different from ``name``
    item: str
    a: int
    b: int  # a >= b, so differences are never negative


# Each template turns operands into (problem, answer, worked computation without the boxed part).
_Template = Callable[[_Operands], tuple[str, int, str]]


def _gets_more(o: _Operands) -> tuple[str, int, str]:
    problem = f"{o.name} has {o.a} {o.item} and gets {o.b} more. How many {o.item} now?"
    return problem, o.a + o.b, f"{o.a}+{o.b}"


def _gives_away(o: _Operands) -> tuple[str, int, str]:
    problem = f"{o.name} has {o.a} {o.item} and gives away {o.b}. How many are left?"
    return problem, o.a - o.b, f"{o.a}-{o.b}"


def _in_total(o: _Operands) -> tuple[str, int, str]:
    problem = f"{o.name} has {o.a} {o.item} and {o.other} has {o.b}. How many in total?"
    return problem, o.a + o.b, f"{o.a}+{o.b}"


def _how_many_more(o: _Operands) -> tuple[str, int, str]:
    problem = f"{o.name} has {o.a} {o.item} and {o.other} has {o.b}. How many more has {o.name}?"
    return problem, o.a - o.b, f"{o.a}-{o.b}"


def _twice_as_many(o: _Operands) -> tuple[str, int, str]:
    problem = f"{o.name} has {o.a} {o.item}. {o.other} has twice as many. How many has {o.other}?"
    return problem, 2 * o.a, f"2*{o.a}"


TEMPLATES: tuple[_Template, ...] = (_gets_more, _gives_away, _in_total, _how_many_more, _twice_as_many)

_MAX_CONSECUTIVE_MISSES = 10_000


def make_arithmetic_split(
    num: int, seed: int, max_operand: int, exclude: set[str] | None = None, unboxed_fraction: float = 0.0
) -> list[Example]:
    """``num`` distinct problems with operands in [1, max_operand], none of whose text is in ``exclude``.

    An ``unboxed_fraction`` of the reference solutions states the result in words (``9+4=13, answer 13``) instead
    of ``\\boxed{}``: imperfectly formatted warm-start data, which a reward that reads only ``\\boxed{}`` answers
    teaches the policy to fix. The problems themselves do not depend on it.

    Raises ``ValueError`` when that many distinct problems cannot be found (``max_operand`` too small).
    """
    if num < 0 or max_operand < 1:
        raise ValueError(f"need num >= 0 and max_operand >= 1, got num={num}, max_operand={max_operand}")
    rng = random.Random(seed)
    style_rng = random.Random(seed + 1)  # a separate stream, so the problem set is the same for any fraction
    seen = set(exclude or ())
    examples: list[Example] = []
    misses = 0  # draws in a row that produced no new problem
    # Collisions are rare unless the problem space is (nearly) used up; then stop rather than loop forever.
    while len(examples) < num and misses < _MAX_CONSECUTIVE_MISSES:
        problem, answer, computation = rng.choice(TEMPLATES)(_draw_operands(rng, max_operand))
        if problem in seen:
            misses += 1
            continue
        misses = 0
        seen.add(problem)
        boxed = style_rng.random() >= unboxed_fraction
        ending = f" \\boxed{{{answer}}}" if boxed else f", answer {answer}"
        solution = f"{computation}={answer}{ending}"
        examples.append(Example(problem, str(answer), solution, id=f"arith-s{seed}-{len(examples)}"))
    if len(examples) < num:
        raise ValueError(f"found only {len(examples)} of {num} distinct problems; raise max_operand={max_operand}")
    return examples


def arithmetic_train_and_heldout(
    num_train: int, num_heldout: int, seed: int, max_operand: int, unboxed_fraction: float = 0.0
) -> tuple[list[Example], list[Example]]:
    """A training split and a held-out split that shares no problem text with it."""
    train = make_arithmetic_split(num_train, seed, max_operand, unboxed_fraction=unboxed_fraction)
    # A different stream than training's, plus explicit exclusion, so no held-out problem was ever trained on.
    heldout_seed = seed + 1_000_003
    heldout = make_arithmetic_split(num_heldout, heldout_seed, max_operand, exclude={e.problem for e in train})
    return train, heldout


def _draw_operands(rng: random.Random, max_operand: int) -> _Operands:
    name, other = rng.sample(NAMES, 2)
    x, y = rng.randint(1, max_operand), rng.randint(1, max_operand)
    return _Operands(name=name, other=other, item=rng.choice(ITEMS), a=max(x, y), b=min(x, y))

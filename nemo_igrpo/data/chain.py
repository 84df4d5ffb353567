"""A harder embedded task: chains of arithmetic operations whose reference solution writes out every step.

``builtin:arithmetic`` is one operation, so the best of 4 drafts is almost always right and a draft carries no
reasoning worth repairing. Here a problem applies ``min_steps``..``max_steps`` operations to a starting count, e.g.

    problem   Ann has 7 pens, gets 5, gives 3, doubles. How many now?
    solution  7+5=12, 12-3=9, 9*2=18 \\boxed{18}

so a draft can be right up to some step and wrong after it, and with ``prompt.draft_content: full`` a refinement
sees where. The number of steps is the difficulty knob (``data.arithmetic.min_steps`` / ``max_steps``): each step is
another place to slip. Operations: "gets k" (+k), "gives k" (−k, the count stays >= 1) and "doubles" (×2, only while
the count is <= ``max_operand``; so every count stays <= (steps + 1) · max_operand: 150 for 4 steps of operands up to
30). Offline and deterministic by seed, with a held-out split disjoint from training, as
``nemo_igrpo.data.arithmetic``.
"""

from __future__ import annotations

import random

from nemo_igrpo.data.arithmetic import ITEMS, NAMES
from nemo_igrpo.data.dataset import Example

_MAX_CONSECUTIVE_MISSES = 10_000


def chain_problem(rng: random.Random, max_operand: int, steps: int) -> tuple[str, int, str]:
    """One problem: (text, answer, worked computation without the final boxed answer)."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    value = rng.randint(1, max_operand)
    phrases, lines = [], []
    start = value
    for _ in range(steps):
        options = ["add"] + (["sub"] if value >= 2 else []) + (["double"] if value <= max_operand else [])
        op = rng.choice(options)
        if op == "add":
            k = rng.randint(1, max_operand)
            phrases.append(f"gets {k}")
            lines.append(f"{value}+{k}={value + k}")
            value += k
        elif op == "sub":
            k = rng.randint(1, min(value - 1, max_operand))  # the count never drops to 0 or below
            phrases.append(f"gives {k}")
            lines.append(f"{value}-{k}={value - k}")
            value -= k
        else:
            phrases.append("doubles")
            lines.append(f"{value}*2={2 * value}")
            value *= 2
    problem = f"{name} has {start} {item}, {', '.join(phrases)}. How many now?"
    return problem, value, ", ".join(lines)


def make_chain_split(num: int, seed: int, max_operand: int, min_steps: int, max_steps: int,
                     exclude: set[str] | None = None, unboxed_fraction: float = 0.0) -> list[Example]:
    """``num`` distinct chain problems with min_steps..max_steps operations (uniform), none whose text is in
    ``exclude``. ``unboxed_fraction`` as in ``make_arithmetic_split``: that share of solutions ends ", answer N"."""
    if num < 0 or max_operand < 1 or not 1 <= min_steps <= max_steps:
        raise ValueError(f"need num >= 0, max_operand >= 1 and 1 <= min_steps <= max_steps, got num={num}, "
                         f"max_operand={max_operand}, min_steps={min_steps}, max_steps={max_steps}")
    rng = random.Random(seed)
    style_rng = random.Random(seed + 1)  # a separate stream: the problem set does not depend on the fraction
    seen = set(exclude or ())
    examples: list[Example] = []
    misses = 0
    while len(examples) < num and misses < _MAX_CONSECUTIVE_MISSES:
        problem, answer, computation = chain_problem(rng, max_operand, rng.randint(min_steps, max_steps))
        if problem in seen:
            misses += 1
            continue
        misses = 0
        seen.add(problem)
        ending = f" \\boxed{{{answer}}}" if style_rng.random() >= unboxed_fraction else f", answer {answer}"
        examples.append(Example(problem, str(answer), computation + ending, id=f"chain-s{seed}-{len(examples)}"))
    if len(examples) < num:
        raise ValueError(f"found only {len(examples)} of {num} distinct chain problems; raise max_operand")
    return examples


def chain_train_and_heldout(num_train: int, num_heldout: int, seed: int, max_operand: int, min_steps: int,
                            max_steps: int, unboxed_fraction: float = 0.0) -> tuple[list[Example], list[Example]]:
    """A training split and a held-out split sharing no problem text (held-out solutions are always boxed)."""
    train = make_chain_split(num_train, seed, max_operand, min_steps, max_steps, unboxed_fraction=unboxed_fraction)
    heldout = make_chain_split(num_heldout, seed + 1_000_003, max_operand, min_steps, max_steps,
                               exclude={e.problem for e in train})
    return train, heldout

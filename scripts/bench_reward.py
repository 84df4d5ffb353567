#!/usr/bin/env python
"""Rewards per second of the math-verify reward on synthetic but realistic completions (boxed_match for scale).

Completions come in GRPO groups (several per problem, adjacent), one problem per group with its own numbers (so
golds rarely repeat across groups), and mix correct answers with two different wrong ones, written the way a
model writes them: decimals vs fractions, LaTeX expressions, intervals and sets, percentages and units. Most end
in a box; some use the paper's ``<think>…</think><answer>…</answer>`` template, some state the answer in prose
only (graded by the fallback extraction), some state none, and a few are 50k characters long. The worker pool is
started (and warmed up) before the clock starts, so the numbers are steady-state grading throughput. Writes the
numbers as JSON.

    python scripts/bench_reward.py --completions 1000 --workers 2 --output bench_reward.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.table import Table

from nemo_igrpo.rewards import BoxedMatchReward, MathVerifyReward, Reward

# Problem kinds: k → (gold, a correct final answer, two incorrect ones), in the forms a model tends to write them.
PROBLEMS: list[Callable[[int], tuple[str, str, str, str]]] = [
    lambda k: (str(k), str(k), str(k + 1), str(2 * k)),
    lambda k: (str(1000 * k), f"{k},000", str(100 * k), f"{k},100"),
    lambda k: (f"-{k}", f"-{k}", str(k), f"-{k + 2}"),
    lambda k: (f"\\frac{{{k}}}{{4}}", str(k / 4), f"\\frac{{{k}}}{{5}}", str(k / 4 + 1)),
    lambda k: (str(k / 4), f"\\frac{{{k}}}{{4}}", f"\\frac{{{k + 1}}}{{4}}", f"\\frac{{4}}{{{k}}}"),
    lambda k: (f"{k}\\sqrt{{2}}", f"\\sqrt{{{2 * k * k}}}", f"{k}\\sqrt{{3}}", f"\\sqrt{{{k}}}"),
    lambda k: (f"x^2+{2 * k}x+{k * k}", f"(x+{k})^2", f"(x-{k})^2", f"x^2+{k * k}"),
    lambda k: (f"\\frac{{\\pi}}{{{k}}}", f"\\pi/{k}", f"\\frac{{\\pi}}{{{k + 1}}}", f"{k}\\pi"),
    lambda k: (f"({k},\\infty)", f"x > {k}", f"[{k},\\infty)", f"(-\\infty,{k})"),
    lambda k: (f"\\{{{k}, {k + 1}, {k + 2}\\}}", f"\\{{{k + 2}, {k + 1}, {k}\\}}", f"\\{{{k}, {k + 1}\\}}",
               f"\\{{{k}, {k + 2}\\}}"),
    lambda k: (f"({k}, -{k + 1})", f"({k},-{k + 1})", f"(-{k + 1},{k})", f"({k},{k + 1})"),
    lambda k: (f"{k}\\%", str(k), str(k / 100), str(k + 10)),
    lambda k: (f"{k}\\text{{ cm}}", f"{k}\\text{{ cm}}", str(k + 1), f"{k}\\text{{ m}}"),
]

FILLER = (
    "We start from the given conditions and simplify step by step. Substituting the known values gives an "
    "equation in one unknown, which we rearrange and solve; checking the result against the constraints "
    "confirms it. "
)


def make_completion(answer: str | None, length_chars: int, style: float) -> str:
    """Reasoning text of about ``length_chars`` characters ending in the answer: boxed (70%), in the paper's
    template (20%), or in prose without a box (10%); ``answer=None``: no answer at all."""
    reasoning = (FILLER * (length_chars // len(FILLER) + 1))[:length_chars]
    if answer is None:
        return reasoning + " I am not sure how to finish this."
    if style < 0.7:
        return f"{reasoning} Therefore the answer is $\\boxed{{{answer}}}$."
    if style < 0.9:
        return f"<think>{reasoning}</think>\n<answer>${answer}$</answer>"
    return f"{reasoning} So the answer is ${answer}$."


def make_batch(n: int, group_size: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """``n`` (completion, gold) pairs in GRPO order: ``group_size`` consecutive completions share a problem.

    Of the completions ~46% are correct, ~46% incorrect (two different wrong answers per problem), 8% have no
    answer; 2% are 50k characters long.
    """
    rng = random.Random(seed)
    completions, golds = [], []
    while len(completions) < n:
        gold, right, *wrong = rng.choice(PROBLEMS)(rng.randint(2, 400))
        for _ in range(min(group_size, n - len(completions))):
            kind = rng.random()
            answer = None if kind < 0.08 else (right if kind < 0.54 else rng.choice(wrong))
            length = 50_000 if rng.random() < 0.02 else rng.randint(300, 3000)
            completions.append(make_completion(answer, length, rng.random()))
            golds.append(gold)
    return completions, golds


def worker_cpu_seconds(reward: Reward) -> float:
    """User + system CPU seconds used so far by a pooled reward's worker processes (Linux /proc), else 0."""
    pool = getattr(reward, "_pool", None)
    total = 0.0
    for worker in getattr(pool, "_workers", []):
        fields = Path(f"/proc/{worker.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def measure(reward: Reward, completions: list[str], golds: list[str], workers: int) -> dict[str, float]:
    """Grade the batch once (after a warm-up call) and return throughput, mean accuracy and counters.

    On a shared machine the wall-clock rate depends on the other processes; the CPU seconds do not, so the
    table also shows the rate the same work reaches on otherwise idle cores: the trainer-side CPU time plus the
    workers' CPU time spread over ``workers`` cores (each worker is single-threaded)."""
    if isinstance(reward, MathVerifyReward):
        reward.start()  # starts and warms the workers (many answers never need them: they would start mid-run)
    reward(completions[:8], golds[:8])
    workers_before, cpu_start = worker_cpu_seconds(reward), time.process_time()
    start = time.perf_counter()
    output = reward(completions, golds)
    seconds = time.perf_counter() - start
    parent_cpu, worker_cpu = time.process_time() - cpu_start, worker_cpu_seconds(reward) - workers_before
    return {
        "trainer_cpu_s": parent_cpu,
        "workers_cpu_s": worker_cpu,
        "idle_cores_rewards_per_s": len(completions) / (parent_cpu + worker_cpu / workers),
        "completions": len(completions),
        "seconds": seconds,
        "rewards_per_s": len(completions) / seconds,
        "accuracy": sum(output.scores) / len(output.scores),
        "timeouts": output.counters.get("timeouts", 0),
        "crashes": output.counters.get("crashes", 0),
        "no_answer": output.counters.get("no_answer", 0),
        "fallback": output.counters.get("fallback_extraction", 0),
    }


# Column → format of its values.
COLUMNS = {
    "completions": "d",
    "seconds": ".2f",
    "rewards_per_s": ",.0f",
    "trainer_cpu_s": ".2f",
    "workers_cpu_s": ".2f",
    "idle_cores_rewards_per_s": ",.0f",
    "accuracy": ".3f",
    "timeouts": "d",
    "crashes": "d",
    "no_answer": "d",
    "fallback": "d",
}


def make_table(results: dict[str, dict[str, float]], title: str) -> Table:
    table = Table(title=f"reward throughput, {title}")
    table.add_column("reward")
    for column in COLUMNS:
        table.add_column(column.replace("_rewards_per_s", " rewards/s").replace("_per_", "/"), justify="right")
    for name, row in results.items():
        table.add_row(name, *(format(row[column], spec) for column, spec in COLUMNS.items()))
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--completions", type=int, default=1000, help="batch size")
    parser.add_argument("--group-size", type=int, default=8, help="completions per problem, adjacent as in GRPO")
    parser.add_argument("--workers", type=int, default=2, help="math-verify grading processes")
    parser.add_argument("--timeout", type=float, default=5.0, help="per-answer deadline in seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=Path("bench_reward.json"), help="JSON file to write")
    args = parser.parse_args()

    completions, golds = make_batch(args.completions, args.group_size, args.seed)
    rewards: dict[str, Callable[[], Reward]] = {
        "math_verify": lambda: MathVerifyReward(num_workers=args.workers, timeout_s=args.timeout),
        "boxed_match": BoxedMatchReward,
    }
    results = {}
    for name, build in rewards.items():
        reward = build()
        try:
            results[name] = measure(reward, completions, golds, args.workers)
        finally:
            reward.close()

    Console(width=160).print(make_table(results, f"{args.completions} completions, {args.workers} math-verify workers"))

    report = {
        "results": results,
        "group_size": args.group_size,
        "workers": args.workers,
        "timeout_s": args.timeout,
        "seed": args.seed,
        "cpu_count": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0],
        "python": platform.python_version(),
    }
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()

"""Sample-based accuracy metrics.

``correct_per_problem[i][j]`` says whether sample j for problem i was correct. Metrics are fractions in [0, 1];
``markdown_table`` renders them as percentages.
"""

from __future__ import annotations

import math

Z_95 = 1.96  # two-sided 95% quantile of the standard normal


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al., 2021): 1 - C(n-c, k) / C(n, k).

    Evaluated as 1 - prod_{i=n-c+1}^{n} (1 - k/i), which avoids the huge binomials of the direct formula.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:  # every size-k subset contains a correct sample
        return 1.0
    failure = 1.0
    for i in range(n - c + 1, n + 1):
        failure *= 1.0 - k / i
    return 1.0 - failure


def avg_at_k(correct: list[list[bool]]) -> float:
    """Mean over problems of the fraction of correct samples (avg@n, n = samples per problem)."""
    if not correct or any(not samples for samples in correct):
        raise ValueError("avg_at_k needs at least one problem and one sample per problem")
    return sum(sum(samples) / len(samples) for samples in correct) / len(correct)


def avg_at_k_ci95(correct: list[list[bool]]) -> float:
    """Half-width of a 95% confidence interval for avg@n: the normal approximation over problems.

    Problem i contributes its accuracy a_i = (correct samples) / n, and avg@n is the mean of the a_i over the P
    problems, so its standard error is s / sqrt(P), with s the sample standard deviation (ddof 1) of the a_i. The
    interval is avg@n ± 1.96 s / sqrt(P). Problems, not samples, are the unit: a problem's n samples are correlated,
    so treating all P·n samples as independent would understate the uncertainty. Deterministic; not clipped to
    [0, 1] (so the ± is symmetric); needs P >= 2 for a spread.
    """
    if len(correct) < 2:
        raise ValueError(f"an interval needs at least 2 problems, got {len(correct)}")
    mean = avg_at_k(correct)  # also validates: every problem has samples
    accuracies = [sum(samples) / len(samples) for samples in correct]
    variance = sum((a - mean) ** 2 for a in accuracies) / (len(accuracies) - 1)
    return Z_95 * math.sqrt(variance / len(accuracies))


def summarize(correct_per_problem: list[list[bool]], ks: list[int] | None = None) -> dict[str, float]:
    """``{"avg@n": ..., "pass@k": ...}`` with every problem sampled n times; ks default to 1, 2, 4, ... <= n."""
    n = _samples_per_problem(correct_per_problem)
    ks = _powers_of_two_up_to(n) if ks is None else ks
    results = {f"avg@{n}": avg_at_k(correct_per_problem)}
    for k in ks:
        scores = [pass_at_k(n, sum(samples), k) for samples in correct_per_problem]
        results[f"pass@{k}"] = sum(scores) / len(scores)
    return results


def markdown_table(results: dict[str, dict[str, float]],
                   intervals: dict[str, dict[str, float]] | None = None) -> str:
    """A Markdown table with one row per dataset and one column per metric, values as percentages (2 decimals).

    Columns appear in first-seen order; a metric a dataset lacks shows as "-". ``intervals[dataset][metric]``, where
    given, is a half-width shown as ``value ± half-width``.
    """
    intervals = intervals or {}
    columns = list(dict.fromkeys(metric for metrics in results.values() for metric in metrics))
    lines = [
        "| " + " | ".join(["dataset", *columns]) + " |",
        "|" + "|".join(["---", *("---:" for _ in columns)]) + "|",
    ]
    for dataset, metrics in results.items():
        cells = [_cell(metrics, column, intervals.get(dataset, {})) for column in columns]
        lines.append("| " + " | ".join([dataset, *cells]) + " |")
    return "\n".join(lines)


def _cell(metrics: dict[str, float], column: str, half_widths: dict[str, float]) -> str:
    if column not in metrics:
        return "-"
    text = f"{100 * metrics[column]:.2f}"
    return f"{text} ± {100 * half_widths[column]:.2f}" if column in half_widths else text


def _samples_per_problem(correct_per_problem: list[list[bool]]) -> int:
    sizes = {len(samples) for samples in correct_per_problem}
    if len(sizes) != 1 or 0 in sizes:
        raise ValueError(f"every problem needs the same, non-zero number of samples; got sizes {sorted(sizes)}")
    return sizes.pop()


def _powers_of_two_up_to(n: int) -> list[int]:
    ks, k = [], 1
    while k <= n:
        ks.append(k)
        k *= 2
    return ks

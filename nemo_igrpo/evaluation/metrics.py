"""Sample-based accuracy metrics.

``correct_per_problem[i][j]`` says whether sample j for problem i was correct. Metrics are fractions in [0, 1];
``markdown_table`` renders them as percentages.
"""

from __future__ import annotations


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


def summarize(correct_per_problem: list[list[bool]], ks: list[int] | None = None) -> dict[str, float]:
    """``{"avg@n": ..., "pass@k": ...}`` with every problem sampled n times; ks default to 1, 2, 4, ... <= n."""
    n = _samples_per_problem(correct_per_problem)
    ks = _powers_of_two_up_to(n) if ks is None else ks
    results = {f"avg@{n}": avg_at_k(correct_per_problem)}
    for k in ks:
        scores = [pass_at_k(n, sum(samples), k) for samples in correct_per_problem]
        results[f"pass@{k}"] = sum(scores) / len(scores)
    return results


def markdown_table(results: dict[str, dict[str, float]]) -> str:
    """A Markdown table with one row per dataset and one column per metric, values as percentages (2 decimals).

    Columns appear in first-seen order; a metric a dataset lacks shows as "-".
    """
    columns = list(dict.fromkeys(metric for metrics in results.values() for metric in metrics))
    lines = [
        "| " + " | ".join(["dataset", *columns]) + " |",
        "|" + "|".join(["---", *("---:" for _ in columns)]) + "|",
    ]
    for dataset, metrics in results.items():
        cells = [f"{100 * metrics[c]:.2f}" if c in metrics else "-" for c in columns]
        lines.append("| " + " | ".join([dataset, *cells]) + " |")
    return "\n".join(lines)


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

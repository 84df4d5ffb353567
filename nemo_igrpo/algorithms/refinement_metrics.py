"""What Stage 2 does with its draft, per step: accuracy after a right or a wrong draft, copying, both stages' entropy.

The paper reports refinement reward and Stage-2 entropy only, so it cannot say whether refinements repair wrong
drafts, reproduce right ones, or ignore them. These metrics (pure functions of a rollout's texts, verdicts and
generator log-probs) answer that:

* ``reward/accuracy/refined_after_right_draft`` / ``..._after_wrong_draft``: accuracy of the refinements of problems
  whose selected draft was right / wrong (absent in a step without such a problem);
* ``rollout/copy_rate``: share of refinements whose text equals the selected draft after whitespace normalisation;
* ``rollout/edit_distance_to_draft``: mean normalised word-level edit distance between refinement and draft (0 =
  the same words, 1 = nothing kept); words rather than characters, so that it stays cheap for 4k-token texts, and on
  ``builtin:chain`` a word is one step of the computation;
* ``rollout/entropy/draft`` / ``rollout/entropy/refinement``: per-token entropy of each stage's sampling
  distribution, estimated as the mean of −log q(token) over the sampled tokens (the generator's log-probs, after
  temperature and top-p). The same estimator for both stages, and for GRPO's only stage (logged as
  ``refinement``), so the paper's entropy claim can be compared across methods. With ``top_p = 1`` it estimates the
  entropy that ``train/entropy`` computes exactly on the trained tokens.
"""

from __future__ import annotations

import math
from typing import Sequence

# "weight/<name>": <name> is a mean over that many items, which may differ between data-parallel ranks
# (``sharding.reduce_metrics`` combines it weighted and leaves it out where no rank had any item; not logged)
WEIGHT = "weight/"


def accuracy_after_draft(refined_solved: Sequence[bool], selected_right: Sequence[bool],
                         group_size: int) -> dict[str, float]:
    """Refinement accuracy split by the selected draft's verdict. ``refined_solved`` holds ``group_size`` rows per
    problem, problem-major; ``selected_right`` one verdict per problem."""
    if len(refined_solved) != group_size * len(selected_right):
        raise ValueError(f"{len(refined_solved)} refinements for {len(selected_right)} problems × {group_size}")
    buckets: dict[bool, list[bool]] = {True: [], False: []}
    for p, right in enumerate(selected_right):
        buckets[bool(right)].extend(refined_solved[p * group_size:(p + 1) * group_size])
    out = {}
    for right, name in ((True, "right"), (False, "wrong")):
        if buckets[right]:
            out[f"reward/accuracy/refined_after_{name}_draft"] = sum(buckets[right]) / len(buckets[right])
    return out


def word_edit_distance(a: Sequence[str], b: Sequence[str]) -> int:
    """Levenshtein distance between two word sequences (insert, delete, substitute a word: cost 1 each).

    Myers' bit-parallel algorithm (Hyyrö's formulation): one column of the dynamic programme is a pair of bit
    vectors (Python ints), so the cost is len(a) big-integer operations of len(b) bits instead of len(a) × len(b)
    Python steps.
    """
    if len(a) < len(b):
        a, b = b, a
    m = len(b)
    if m == 0:
        return len(a)
    peq: dict[str, int] = {}
    for i, word in enumerate(b):
        peq[word] = peq.get(word, 0) | (1 << i)
    full, top = (1 << m) - 1, 1 << (m - 1)
    pv, mv, score = full, 0, m
    for word in a:
        eq = peq.get(word, 0)
        xv = eq | mv
        xh = (((eq & pv) + pv) ^ pv) | eq
        ph = (mv | ~(xh | pv)) & full
        mh = pv & xh
        if ph & top:
            score += 1
        elif mh & top:
            score -= 1
        ph = ((ph << 1) | 1) & full  # | 1: the first row of the programme grows by one per word of ``a``
        mh = (mh << 1) & full
        pv = (mh | ~(xv | ph)) & full
        mv = ph & xv
    return score


def copy_metrics(refinements: Sequence[str], drafts: Sequence[str]) -> dict[str, float]:
    """Copy rate and mean normalised edit distance of each refinement to its selected draft (one draft per row).

    Whitespace normalisation: texts are compared as their whitespace-separated words, so spacing and line breaks do
    not count. The distance is divided by the longer text's word count (0 when both are empty)."""
    if len(refinements) != len(drafts) or not refinements:
        raise ValueError(f"need one draft per refinement, got {len(refinements)} refinements, {len(drafts)} drafts")
    copies, distances = 0, []
    for refinement, draft in zip(refinements, drafts):
        a, b = refinement.split(), draft.split()
        copies += a == b
        distances.append(word_edit_distance(a, b) / max(len(a), len(b), 1))
    return {"rollout/copy_rate": copies / len(refinements),
            "rollout/edit_distance_to_draft": sum(distances) / len(distances)}


def sampled_entropy(logprob_sums: Sequence[float], token_counts: Sequence[int]) -> float | None:
    """Token-mean of −log q over sampled tokens, from per-sample sums and lengths; None when there is no token or
    a log-prob is not finite (a backend that returns none)."""
    tokens = sum(token_counts)
    total = sum(logprob_sums)
    if tokens == 0 or not math.isfinite(total):
        return None
    return -total / tokens


def refinement_metrics(samples, group_size: int, has_drafts: bool) -> dict[str, float]:
    """Every metric above for one rollout's ``StageSamples`` (``nemo_igrpo.algorithms.igrpo``: ``texts``,
    ``solved``, ``completions`` per refinement row; ``draft_solved``, ``best_draft_index``, ``best_drafts`` per
    problem; ``draft_lengths``, ``draft_logprob_sums`` per draft).

    Each comes with ``weight/<name>``, the number of items it averages (rows, problems' rows of one kind, tokens),
    so that data-parallel ranks combine it as the global mean (``sharding.reduce_metrics``, which also leaves out
    a metric no rank had items for); every rank reports the same names."""
    metrics: dict[str, float] = {}

    def put(name: str, value: float | None, weight: int) -> None:
        metrics[name], metrics[WEIGHT + name] = (value, float(weight)) if value is not None and weight else (0.0, 0.0)

    put("reward/accuracy/refinement_mean", sum(samples.solved) / max(len(samples.solved), 1), len(samples.solved))
    scored = [c for c in samples.completions if len(c.logprobs) == len(c.token_ids)]
    lengths = [len(c.token_ids) for c in scored]
    put("rollout/entropy/refinement", sampled_entropy([sum(c.logprobs) for c in scored], lengths), sum(lengths))
    if not has_drafts:
        return metrics
    selected_right = [solved[i] for solved, i in zip(samples.draft_solved, samples.best_draft_index)]
    after = accuracy_after_draft(samples.solved, selected_right, group_size)
    for name, right in (("right", True), ("wrong", False)):
        key = f"reward/accuracy/refined_after_{name}_draft"
        put(key, after.get(key), group_size * sum(bool(r) == right for r in selected_right))
    rows = len(samples.texts)
    copies = copy_metrics(samples.texts, [d for d in samples.best_drafts for _ in range(group_size)]) if rows else {}
    for key in ("rollout/copy_rate", "rollout/edit_distance_to_draft"):
        put(key, copies.get(key), rows)
    put("rollout/entropy/draft", sampled_entropy(samples.draft_logprob_sums, samples.draft_lengths),
        sum(samples.draft_lengths))
    return metrics

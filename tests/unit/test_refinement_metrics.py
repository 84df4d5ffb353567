"""Per-step refinement metrics (nemo_igrpo.algorithms.refinement_metrics) against hand-computed numbers, and as the
rollout logs them."""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import pytest
from test_igrpo_rollout import ScriptedGenerator, drafts_then_refinements, run, settings

from nemo_igrpo.algorithms.refinement_metrics import (
    accuracy_after_draft,
    copy_metrics,
    refinement_metrics,
    sampled_entropy,
    word_edit_distance,
)
from nemo_igrpo.data.dataset import Example
from nemo_igrpo.sharding import reduce_metrics
from nemo_igrpo.generation.base import Completion


def test_accuracy_after_right_and_wrong_drafts_by_hand():
    # 3 problems × G = 2; selected drafts right, wrong, right
    solved = [True, False, True, True, False, False]
    assert accuracy_after_draft(solved, [True, False, True], 2) == {
        "reward/accuracy/refined_after_right_draft": 0.25,  # rows 0, 1, 4, 5: one right of four
        "reward/accuracy/refined_after_wrong_draft": 1.0,  # rows 2, 3
    }
    # no right draft this step: that key is absent rather than a made-up number
    assert accuracy_after_draft([True, False], [False], 2) == {"reward/accuracy/refined_after_wrong_draft": 0.5}
    with pytest.raises(ValueError):
        accuracy_after_draft([True], [True], 2)


@pytest.mark.parametrize("a, b, distance", [
    ("", "", 0), ("a b c", "", 3), ("", "x", 1),
    ("a b c", "a b c", 0),
    ("a b c", "a x c", 1),  # one substitution
    ("a b c d", "a c d", 1),  # one deletion
    ("kitten sat", "sitting sat on", 2),  # substitute kitten→sitting, insert on
    ("1 2 3 4 5", "5 4 3 2 1", 4),  # reversed: only the middle word stays aligned
])
def test_word_edit_distance_by_hand(a, b, distance):
    assert word_edit_distance(a.split(), b.split()) == distance
    assert word_edit_distance(b.split(), a.split()) == distance


def _reference_distance(a, b):
    """The textbook O(len(a) · len(b)) programme, to check the bit-parallel one on random inputs."""
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        previous, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (x != y))
    return row[-1]


def test_word_edit_distance_matches_the_textbook_programme():
    rng = random.Random(0)
    for _ in range(300):
        a = [rng.choice("abcd") for _ in range(rng.randint(0, 90))]  # past 64 words: several machine words
        b = [rng.choice("abcd") for _ in range(rng.randint(0, 90))]
        assert word_edit_distance(a, b) == _reference_distance(a, b)


def test_copy_rate_and_edit_distance_by_hand():
    refinements = ["7+5=12,  12-3=9 \\boxed{9}\n", "7+5=12, 12-3=8 \\boxed{8}", "no idea"]
    drafts = ["7+5=12, 12-3=9 \\boxed{9}", "7+5=12, 12-3=9 \\boxed{9}", "7+5=12, 12-3=9 \\boxed{9}"]
    metrics = copy_metrics(refinements, drafts)
    assert metrics["rollout/copy_rate"] == pytest.approx(1 / 3)  # the first differs from its draft in spacing only
    # distances: 0/3; 2 of 3 words changed: 2/3; 3 words vs 2: 3 edits / 3 = 1
    assert metrics["rollout/edit_distance_to_draft"] == pytest.approx((0 + 2 / 3 + 1) / 3)


def test_sampled_entropy_is_the_token_mean_of_minus_logprob():
    # two samples, 2 and 3 tokens, log-probs summing to -1.0 and -2.0: 3 nats over 5 tokens
    assert sampled_entropy([-1.0, -2.0], [2, 3]) == pytest.approx(0.6)
    assert sampled_entropy([], []) is None
    assert sampled_entropy([math.nan, -1.0], [1, 1]) is None  # a backend without log-probs


def _samples():
    """Two problems, G = 2, N = 2: problem 0's selected draft (index 1) is right, problem 1's (index 0) wrong."""
    def completion(n, logprob):
        return Completion(list(range(n)), [logprob] * n, "stop")

    return SimpleNamespace(
        texts=["a b", "a  b", "x y", "p q"], solved=[True, True, False, True],
        completions=[completion(2, -0.5), completion(2, -0.5), completion(4, -1.0), completion(4, -1.0)],
        draft_solved=[[False, True], [False, False]], best_draft_index=[1, 0], best_drafts=["a b", "p r"],
        draft_lengths=[1, 2, 3, 4], draft_logprob_sums=[-1.0, -1.0, -1.0, -2.0])


def test_refinement_metrics_of_a_rollout_by_hand():
    metrics = reduce_metrics(refinement_metrics(_samples(), group_size=2, has_drafts=True), None)  # weights dropped
    assert metrics == pytest.approx({
        "reward/accuracy/refinement_mean": 0.75,
        "reward/accuracy/refined_after_right_draft": 1.0,  # rows 0, 1
        "reward/accuracy/refined_after_wrong_draft": 0.5,  # rows 2, 3
        "rollout/copy_rate": 0.5,  # "a b" and "a  b" copy "a b"; "x y" and "p q" differ from "p r"
        "rollout/edit_distance_to_draft": (0 + 0 + 1 + 0.5) / 4,
        "rollout/entropy/refinement": (1.0 + 1.0 + 4.0 + 4.0) / 12,
        "rollout/entropy/draft": 5.0 / 10,
    })
    grpo = reduce_metrics(refinement_metrics(_samples(), group_size=2, has_drafts=False), None)
    assert set(grpo) == {"reward/accuracy/refinement_mean", "rollout/entropy/refinement"}


def test_the_rollout_logs_the_refinement_metrics():
    # drafts answer 7, 5 (answer 7): best = draft #0, right; refinements "#0 \boxed{7}" (a copy of the draft: the
    # scripted texts number samples from 0 in both stages), "#1 \boxed{3}" (wrong, one word of two changed)
    generator = ScriptedGenerator(drafts_then_refinements(["7", "5"], ["7", "3"]))
    _, metrics = run(generator, [Example("Q?", "7")], settings(2, 2))
    metrics = reduce_metrics(metrics, None)  # as the loop logs them: a metric without items is left out
    assert metrics["reward/accuracy/refined_after_right_draft"] == 0.5
    assert "reward/accuracy/refined_after_wrong_draft" not in metrics
    assert metrics["rollout/copy_rate"] == 0.5
    assert metrics["rollout/edit_distance_to_draft"] == pytest.approx((0 + 1.0) / 2)  # "#1 \boxed{3}" vs "#0 \boxed{7}"
    assert metrics["rollout/entropy/draft"] == pytest.approx(0.5)  # the scripted log-probs are all -0.5
    assert metrics["rollout/entropy/refinement"] == pytest.approx(0.5)


def test_ranks_combine_the_refinement_metrics_as_one_global_mean(monkeypatch):
    """Two data-parallel ranks with different token counts and draft verdicts: the reduced metrics are the global
    (item-weighted) means, not the mean of the two ranks' means, and a kind of problem only one rank saw is still
    reported (every rank sends the same names)."""
    from nemo_igrpo import distributed

    one = {"rollout/entropy/draft": 1.0, "weight/rollout/entropy/draft": 30.0,  # 30 tokens at 1.0 nat
           "reward/accuracy/refined_after_wrong_draft": 0.0, "weight/reward/accuracy/refined_after_wrong_draft": 0.0,
           "reward/accuracy/refined_after_right_draft": 0.5, "weight/reward/accuracy/refined_after_right_draft": 4.0}
    two = {"rollout/entropy/draft": 4.0, "weight/rollout/entropy/draft": 10.0,  # 10 tokens at 4.0 nats
           "reward/accuracy/refined_after_wrong_draft": 0.25, "weight/reward/accuracy/refined_after_wrong_draft": 4.0,
           "reward/accuracy/refined_after_right_draft": 0.0, "weight/reward/accuracy/refined_after_right_draft": 0.0}
    monkeypatch.setattr(distributed, "world_size", lambda group=None: 2)
    monkeypatch.setattr(distributed, "all_gather_objects", lambda obj, group=None: [obj, obj])
    # What rank two sends, as reduce_metrics prepares it; then rank one's call combines its own values with those.
    sent: dict[str, list[float]] = {}
    monkeypatch.setattr(distributed, "all_reduce_values", lambda values, op, group=None: sent.setdefault(op, values))
    reduce_metrics(two, group="dp")
    monkeypatch.setattr(distributed, "all_reduce_values", lambda values, op, group=None: [
        (sum if op == "sum" else max)(pair) for pair in zip(values, sent[op])])
    reduced = reduce_metrics(one, group="dp")
    # (30 × 1 + 10 × 4) / 40 = 1.75 (the mean of the rank means would be 2.5); each accuracy from its one rank
    assert reduced == pytest.approx({"rollout/entropy/draft": 1.75, "reward/accuracy/refined_after_wrong_draft": 0.25,
                                     "reward/accuracy/refined_after_right_draft": 0.5})

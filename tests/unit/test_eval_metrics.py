"""pass@k / avg@n against hand-computed values, and the results table."""

import math

import pytest

from nemo_igrpo.evaluation import avg_at_k, markdown_table, pass_at_k, summarize


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (4, 1, 1, 0.25),
        (4, 1, 2, 0.5),
        (5, 2, 2, 0.7),
        (4, 0, 2, 0.0),
        (4, 4, 1, 1.0),
        (4, 3, 2, 1.0),  # n - c < k: every pair contains a correct sample
        (10, 3, 1, 0.3),
    ],
)
def test_pass_at_k_hand_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected)


def test_pass_at_k_matches_binomials_and_is_stable_for_large_n():
    for n, c, k in [(20, 5, 3), (64, 10, 8), (100, 1, 50)]:
        assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k))
    assert 0.0 < pass_at_k(2000, 1, 16) < 1.0


def test_pass_at_k_rejects_bad_arguments():
    for n, c, k in [(4, 5, 1), (4, 1, 0), (4, 1, 5), (4, -1, 1)]:
        with pytest.raises(ValueError):
            pass_at_k(n, c, k)


def test_avg_at_k():
    assert avg_at_k([[True, False, False, False], [True, True, False, False]]) == pytest.approx(0.375)
    with pytest.raises(ValueError):
        avg_at_k([])


def test_summarize_default_ks():
    correct = [[True, False, False, False], [False, False, False, False], [True, True, True, True]]
    summary = summarize(correct, ks=None)
    assert list(summary) == ["avg@4", "pass@1", "pass@2", "pass@4"]
    assert summary["avg@4"] == pytest.approx((0.25 + 0 + 1) / 3)
    assert summary["pass@1"] == pytest.approx((0.25 + 0 + 1) / 3)
    assert summary["pass@2"] == pytest.approx((0.5 + 0 + 1) / 3)
    assert summary["pass@4"] == pytest.approx(2 / 3)
    assert list(summarize([[True] * 5], ks=None)) == ["avg@5", "pass@1", "pass@2", "pass@4"]
    assert summarize([[True, False]], ks=[2]) == {"avg@2": 0.5, "pass@2": 1.0}
    with pytest.raises(ValueError):
        summarize([[True], [True, False]], ks=None)


def test_markdown_table():
    table = markdown_table(
        {
            "arithmetic": {"avg@4": 0.375, "pass@1": 0.375, "pass@4": 2 / 3},
            "gsm8k": {"avg@4": 1.0, "pass@1": 0.12345},
        }
    )
    assert table == (
        "| dataset | avg@4 | pass@1 | pass@4 |\n"
        "|---|---:|---:|---:|\n"
        "| arithmetic | 37.50 | 37.50 | 66.67 |\n"
        "| gsm8k | 100.00 | 12.35 | - |"
    )

import pytest
import torch

from nemo_igrpo.algorithms.aggregation import AGGREGATIONS, LossNormalizer, aggregate

# Ragged 2×3 example (position 0 is prompt):
#   x    = [[1, 2, 3], [4, 5, 6]]
#   mask = [[0, 1, 1], [0, 1, 0]]  → row 0 sums 2+3 = 5 over 2 tokens, row 1 sums 5 over 1 token
#   num_tokens 3, num_sequences 2, max_tokens 4
X = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=torch.float64)
MASK = torch.tensor([[0.0, 1.0, 1.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
NORM = LossNormalizer.from_mask(MASK, max_tokens=4)

EXPECTED = {
    "token-mean": 10 / 3,  # (5 + 5) / 3 = 3.3333
    "seq-mean-token-mean": (5 / 2 + 5 / 1) / 2,  # (2.5 + 5) / 2 = 3.75
    "seq-mean-token-sum": 10 / 2,  # 5
    "seq-mean-token-sum-norm": 10 / (2 * 4),  # 1.25
}


def test_modes_listed():
    assert set(AGGREGATIONS) == set(EXPECTED)


def test_normalizer_from_mask():
    assert NORM == LossNormalizer(num_tokens=3.0, num_sequences=2.0, max_tokens=4)


def test_normalizer_ignores_rows_without_tokens():
    mask = torch.tensor([[0.0, 1, 1], [0, 0, 0], [0, 1, 0]])
    assert LossNormalizer.from_mask(mask, 8) == LossNormalizer(num_tokens=3.0, num_sequences=2.0, max_tokens=8)


@pytest.mark.parametrize("mode", list(EXPECTED))
def test_each_mode_hand_numbers(mode):
    assert aggregate(X, MASK, mode, NORM).item() == pytest.approx(EXPECTED[mode])


@pytest.mark.parametrize("mode", list(EXPECTED))
def test_rows_summed_separately_equal_whole(mode):
    # step-global denominators: per-row (micro-batch) aggregates sum to the whole-batch value
    parts = aggregate(X[:1], MASK[:1], mode, NORM) + aggregate(X[1:, :2], MASK[1:, :2], mode, NORM)
    assert parts.item() == pytest.approx(EXPECTED[mode])


@pytest.mark.parametrize("mode", list(EXPECTED))
def test_step_without_tokens_is_zero_not_nan(mode):
    empty = torch.zeros(2, 3)
    assert aggregate(torch.ones(2, 3), empty, mode, LossNormalizer.from_mask(empty, 4)).item() == 0.0


def test_unknown_mode_names_valid_ones():
    with pytest.raises(ValueError, match="seq-mean-token-mean"):
        aggregate(X, MASK, "sum", NORM)

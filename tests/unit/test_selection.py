import pytest
import torch

from nemo_igrpo.algorithms.selection import select_best

# prompt 0: tie between drafts 1 and 2; prompt 1: tie between 0, 2, 3; prompt 2: unique max at 3
REWARDS = torch.tensor([[0.0, 1.0, 1.0, 0.0], [2.0, 0.0, 2.0, 2.0], [0.0, 0.0, 0.0, 5.0]])


def test_first_takes_lowest_tied_index():
    assert select_best(REWARDS, "first").tolist() == [1, 0, 3]
    assert select_best(REWARDS, "first").dtype == torch.long


def test_random_covers_all_tied_maxima_and_nothing_else():
    seen = [set(), set(), set()]
    for seed in range(200):
        picks = select_best(REWARDS, "random", torch.Generator().manual_seed(seed)).tolist()
        for p, j in enumerate(picks):
            seen[p].add(j)
    assert seen == [{1, 2}, {0, 2, 3}, {3}]


def test_random_is_deterministic_for_a_seed():
    big = torch.zeros(64, 8)  # all tied: 8^64 possible outcomes, so equality means determinism
    a = select_best(big, "random", torch.Generator().manual_seed(123))
    b = select_best(big, "random", torch.Generator().manual_seed(123))
    c = select_best(big, "random", torch.Generator().manual_seed(124))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_unknown_tie_break():
    with pytest.raises(ValueError, match="first, random"):
        select_best(REWARDS, "last")


def test_non_finite_rewards_are_never_the_best_draft():
    nan, inf = float("nan"), float("inf")
    rewards = torch.tensor([[0.0, nan, 1.0, 0.0], [nan, 0.0, nan, nan], [inf, 0.0, 0.5, nan], [nan, nan, nan, nan]])
    assert select_best(rewards, "first").tolist() == [2, 1, 2, 0]  # all unscorable: the first, as with all equal
    for seed in range(5):
        best = select_best(rewards, "random", torch.Generator().manual_seed(seed)).tolist()
        assert best[:3] == [2, 1, 2]

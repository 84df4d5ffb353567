import pytest
import torch

from nemo_igrpo.algorithms.selection import DRAFT_SELECTIONS, select_best, select_draft
from nemo_igrpo.config import ConfigError, load_config

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


def test_draft_selection_best_is_select_best_and_random_is_uniform_over_all_drafts():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0]] * 4000)
    assert torch.equal(select_draft(rewards, "best", "first"), torch.zeros(4000, dtype=torch.long))
    chosen = select_draft(rewards, "random", "first", torch.Generator().manual_seed(0))
    counts = torch.bincount(chosen, minlength=4).float() / 4000
    # each index has probability 1/4 whatever its reward; binomial std over 4000 prompts is 0.0068: 0.03 > 4 std
    torch.testing.assert_close(counts, torch.full((4,), 0.25), atol=0.03, rtol=0)


def test_random_draft_selection_skips_unscorable_drafts_unless_all_are():
    rewards = torch.tensor([[float("nan"), 0.0, float("inf"), 0.0], [float("nan")] * 4])
    seen = {0: set(), 1: set()}
    generator = torch.Generator().manual_seed(1)
    for _ in range(200):
        for p, i in enumerate(select_draft(rewards, "random", "first", generator).tolist()):
            seen[p].add(i)
    assert seen == {0: {1, 3}, 1: {0, 1, 2, 3}}


def test_draft_selection_is_a_registered_config_option():
    assert list(DRAFT_SELECTIONS) == ["best", "random"]
    assert load_config(None).algorithm.draft_selection == "best"  # the paper's method by default
    with pytest.raises(ConfigError, match="algorithm.draft_selection: unknown draft selection 'randm'"):
        load_config(None, ["algorithm.draft_selection=randm"])

import pytest
import torch

from nemo_igrpo.algorithms.advantages import (
    ADVANTAGE_ESTIMATORS,
    compute_advantages,
    register_advantage,
    zero_variance_groups,
)

# Shared example: groups given by non-contiguous, shuffled ids.
#   group 7  = rows 0, 2, 5 with rewards [1, 0, 2]
#   group 3  = rows 1, 3    with rewards [2, 4]
#   group 42 = row 4        with reward  5 (size 1)
IDS = torch.tensor([7, 3, 7, 3, 42, 7])
REWARDS = torch.tensor([1.0, 2.0, 0.0, 4.0, 5.0, 2.0])


def test_registry_names():
    assert {"grpo", "drgrpo", "rloo"} <= set(ADVANTAGE_ESTIMATORS)


def test_grpo_single_group_hand_numbers():
    # rewards [1,0,0,1]: mean 0.5, unbiased var = 4·0.25/3 = 1/3, std = 0.57735 → A = ±0.5/0.57735 = ±0.86603
    adv = ADVANTAGE_ESTIMATORS["grpo"](torch.tensor([1.0, 0.0, 0.0, 1.0]), torch.zeros(4, dtype=torch.long), 0.0)
    torch.testing.assert_close(adv, torch.tensor([0.86603, -0.86603, -0.86603, 0.86603]), atol=1e-5, rtol=0)


def test_grpo_eps_is_added_to_std():
    # rewards [0, 2]: mean 1, unbiased std = sqrt((1+1)/1) = 1.41421; eps 1 → A = ±1/2.41421 = ±0.41421
    adv = ADVANTAGE_ESTIMATORS["grpo"](torch.tensor([0.0, 2.0]), torch.tensor([0, 0]), 1.0)
    torch.testing.assert_close(adv, torch.tensor([-0.41421, 0.41421]), atol=1e-5, rtol=0)


def test_grpo_shuffled_noncontiguous_groups():
    # group 7:  mean 1, var ((0)²+(-1)²+(1)²)/2 = 1, std 1        → A = [0, -1, 1]        (rows 0, 2, 5)
    # group 3:  mean 3, var ((-1)²+(1)²)/1 = 2, std 1.41421        → A = [-0.70711, 0.70711] (rows 1, 3)
    # group 42: size 1                                             → A = 0                  (row 4)
    adv = ADVANTAGE_ESTIMATORS["grpo"](REWARDS, IDS, 1e-8)
    torch.testing.assert_close(adv, torch.tensor([0.0, -0.70711, -1.0, 0.70711, 0.0, 1.0]), atol=1e-5, rtol=0)


def test_grpo_zero_std_gives_exact_zero():
    # 0.1 three times in float64: the mean is 0.10000000000000002, not 0.1, so r − mean is rounding noise
    # (and so is std): without the explicit zeroing A would be ≈ ±0.58. The group has no signal → exactly 0.
    rewards = torch.tensor([0.1, 0.1, 0.1, 1.0, 0.0], dtype=torch.float64)
    adv = ADVANTAGE_ESTIMATORS["grpo"](rewards, torch.tensor([4, 4, 4, 9, 9]), 1e-12)
    assert torch.equal(adv[:3], torch.zeros(3, dtype=torch.float64))
    assert torch.all(adv[3:].abs() > 0.5)


@pytest.mark.parametrize("name", ["grpo", "drgrpo", "rloo"])
def test_row_permutation_permutes_advantages(name):
    perm = torch.tensor([3, 5, 0, 4, 1, 2])
    fn = ADVANTAGE_ESTIMATORS[name]
    torch.testing.assert_close(fn(REWARDS[perm], IDS[perm], 1e-6), fn(REWARDS, IDS, 1e-6)[perm])


def test_drgrpo_hand_numbers():
    # r − mean_g: group 7 (mean 1) → [0, -1, 1]; group 3 (mean 3) → [-1, 1]; group 42 → 0
    adv = ADVANTAGE_ESTIMATORS["drgrpo"](REWARDS, IDS, 1e-6)
    torch.testing.assert_close(adv, torch.tensor([0.0, -1.0, -1.0, 1.0, 0.0, 1.0]))


def test_rloo_hand_numbers():
    # group 7 [1, 0, 2]: 1 − mean(0,2) = 0; 0 − mean(1,2) = -1.5; 2 − mean(1,0) = 1.5
    # group 3 [2, 4]:    2 − 4 = -2; 4 − 2 = 2
    # group 42: size 1 → 0
    adv = ADVANTAGE_ESTIMATORS["rloo"](REWARDS, IDS, 1e-6)
    torch.testing.assert_close(adv, torch.tensor([0.0, -2.0, -1.5, 2.0, 0.0, 1.5]))


def test_dtype_preserved():
    adv = ADVANTAGE_ESTIMATORS["grpo"](REWARDS.double(), IDS, 1e-6)
    assert adv.dtype == torch.float64


def test_zero_variance_groups():
    # group 5: [1, 1] equal; group 2: [0, 1] varies; group 9: single row → no variance
    mask = zero_variance_groups(torch.tensor([1.0, 0.0, 1.0, 1.0, 3.0]), torch.tensor([5, 2, 5, 2, 9]))
    assert mask.tolist() == [True, False, True, False, True]


def test_register_advantage_and_duplicate():
    @register_advantage("_test_const")
    def const(rewards, group_ids, eps):
        return torch.ones_like(rewards)

    try:
        assert ADVANTAGE_ESTIMATORS["_test_const"] is const
        with pytest.raises(ValueError, match="already registered"):
            register_advantage("_test_const")(const)
    finally:
        del ADVANTAGE_ESTIMATORS["_test_const"]


@pytest.mark.parametrize("name", ["grpo", "drgrpo", "rloo"])
def test_non_finite_rewards_are_left_out_of_their_group(name):
    """A NaN/inf reward (e.g. from a user's reward) gets advantage 0 and is not in its group's mean/std: the group's
    other members get exactly the advantages they would get without it."""
    rewards = torch.tensor([0.0, float("nan"), 1.0, 0.0, 1.0, float("inf"), 1.0, 1.0, float("nan")])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2])
    got = compute_advantages(name, rewards, groups, 1e-6)
    finite = torch.isfinite(rewards)
    alone = compute_advantages(name, rewards[finite], groups[finite], 1e-6)
    assert got[~finite].tolist() == [0.0, 0.0, 0.0]
    torch.testing.assert_close(got[finite], alone, atol=0, rtol=0)
    if name == "grpo":  # group 0 without the NaN: [0, 1, 0], mean 1/3, unbiased std √(1/3)
        std = (1 / 3) ** 0.5
        torch.testing.assert_close(got[[0, 2, 3]], torch.tensor([-1 / 3, 2 / 3, -1 / 3]) / (std + 1e-6))
    assert got[4:8].abs().sum() == 0  # group 1's finite rewards are all 1: no signal, not NaN


def test_non_finite_rewards_do_not_make_a_group_look_informative():
    rewards = torch.tensor([1.0, float("nan"), 1.0, float("nan"), float("nan"), 0.0, 1.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    assert zero_variance_groups(rewards, groups).tolist() == [True, True, True, True, True, False, False]

"""Done-when of policy.shared_prefix: one training step of the quickstart config (iGRPO, prompt.draft_content=full,
KL on, so the reference pass runs too) gives the same loss and gradient norm with the shared layout as without it,
alone and with sequence packing."""

from __future__ import annotations

import pytest

from nemo_igrpo.policy import shared_prefix
from nemo_igrpo.tracking import read_metrics
from nemo_igrpo.trainer import train

from test_training import tiny_config

pytestmark = pytest.mark.slow
STEP = ["trainer.max_steps=1", "trainer.eval_every=0", "prompt.draft_content=full", "algorithm.kl_coef=0.05",
        "algorithm.ppo_epochs=2",  # the π_old pass too, and a second update off π_old
        "reward.components={test_alternating: 1.0}"]  # rewards that vary within a group: non-zero advantages


def first_step(run_dir, *overrides):
    train(tiny_config(run_dir, *STEP, *overrides))
    return read_metrics(run_dir / "metrics.jsonl")[-1]


def test_one_step_with_shared_prefix_matches_the_unshared_step(tmp_path, monkeypatch):
    calls = []
    original = shared_prefix.token_stats
    monkeypatch.setattr(shared_prefix, "token_stats", lambda *a, **k: calls.append(1) or original(*a, **k))
    want = first_step(tmp_path / "plain")
    assert not calls and want["train/grad_norm"] > 1e-3 and want["train/last_epoch/kl"] > 0
    packing = ["policy.max_tokens_per_micro_batch=512", "policy.sequence_packing=true"]
    for name, extra in (("alone", []), ("packed", packing)):
        got = first_step(tmp_path / name, "policy.shared_prefix=true", *extra)
        assert calls  # the shared layout computed the update and the reference pass
        calls.clear()
        assert got["reward/refinement_mean"] == want["reward/refinement_mean"]  # the same rollouts
        # float32 model: the shared row changes only the reduction order (attention over a masked row, sums of ~100
        # terms per layer), ~1e-6 relative; 1e-4 leaves room on any CPU while a wrong mask moves these by O(1). The
        # on-policy loss is Σ A·(ratio 1) ≈ 0, so it gets an absolute bound at 1e-5 of its O(1) per-token terms.
        for key in ("loss", "grad_norm", "kl", "entropy", "policy_loss", "ratio_mean"):
            for epoch in ("train/", "train/last_epoch/"):
                assert got[epoch + key] == pytest.approx(want[epoch + key], rel=1e-4, abs=1e-5), (name, epoch, key)


def test_two_torchrun_ranks_with_shared_groups_reproduce_the_unshared_single_rank_step(tmp_path):
    """DP = 2 under torchrun with a token budget (so shards are re-dealt: whole groups, by tokens computed) and
    packing, against one unshared rank on the same global batch; KL and ppo_epochs = 2 as above."""
    from test_distributed import TINY as DP_TINY, _free_port, _run

    steps = ["trainer.max_steps=1", "trainer.eval_every=0", "prompt.draft_content=full", "algorithm.kl_coef=0.05",
             "algorithm.ppo_epochs=2"]
    one, two = tmp_path / "one", tmp_path / "two"
    single = _run(["ENTRY", "train", *DP_TINY, *steps, f"trainer.output_dir={one}"], tmp_path, 600)
    assert single.returncode == 0, single.stdout + single.stderr
    launch = ["-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={_free_port()}"]
    shared = ["policy.shared_prefix=true", "policy.max_tokens_per_micro_batch=256", "policy.sequence_packing=true"]
    double = _run([*launch, "ENTRY", "train", *DP_TINY, *steps, *shared, f"trainer.output_dir={two}"], tmp_path, 600)
    assert double.returncode == 0, double.stdout + double.stderr
    want, got = read_metrics(one / "metrics.jsonl")[-1], read_metrics(two / "metrics.jsonl")[-1]
    assert want["train/grad_norm"] > 1e-3
    assert got["reward/refinement_mean"] == pytest.approx(want["reward/refinement_mean"], rel=1e-6)
    # as above: float32 reduction order only (plus the DP all-reduce), a wrong layout would move these by O(1)
    for key in ("loss", "grad_norm", "kl", "entropy", "policy_loss"):
        for epoch in ("train/", "train/last_epoch/"):
            assert got[epoch + key] == pytest.approx(want[epoch + key], rel=1e-4, abs=1e-5), (epoch, key)

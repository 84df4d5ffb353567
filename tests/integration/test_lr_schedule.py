"""The LR schedule is sized in optimizer steps, so `algorithm.ppo_epochs > 1` decays over the whole run."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from nemo_igrpo.assembly import build_policy
from nemo_igrpo.config import load_config
from nemo_igrpo.models import load_model, load_tokenizer
from nemo_igrpo.policy.optimizer_step import warmup_cosine
from nemo_igrpo.tracking import read_metrics
from nemo_igrpo.trainer import train

REPO = Path(__file__).resolve().parents[2]
TINY = ["model.tiny.hidden_size=32", "model.tiny.intermediate_size=64", "model.tiny.num_layers=1",
        "model.tiny.num_heads=2", "model.tiny.num_kv_heads=1", "warm_start.steps=0", "trainer.progress=false",
        "trainer.loggers=[]", "trainer.eval_every=0", "data.arithmetic.num_train=64", "data.arithmetic.num_heldout=4",
        "trainer.prompts_per_step=2", "generation.max_new_tokens=8", "reward.components={boxed_match: 1.0}"]


def test_schedule_counts_every_epochs_optimizer_step():
    """max_steps=10 with 2 epochs is 20 optimizer steps: warmup 10% of 20, floor reached at the 20th, not the 6th."""
    config = load_config(REPO / "conf" / "quickstart.yaml",
                         [*TINY, "trainer.max_steps=10", "algorithm.ppo_epochs=2", "optim.lr=1e-3",
                          "optim.warmup_ratio=0.1", "optim.min_lr_ratio=0.1"])
    policy = build_policy(config, load_model(config.model, load_tokenizer(config.model)))
    lrs = []
    for _ in range(20):
        lrs.append(policy.optimizer.param_groups[0]["lr"])
        policy.optimizer.step()  # no gradients: a no-op that keeps torch's step-order check quiet
        policy.scheduler.step()
    expected = [1e-3 * warmup_cosine(2, 20, 0.1)(k) for k in range(20)]
    assert lrs == pytest.approx(expected, rel=1e-12)
    assert lrs[:2] == pytest.approx([5e-4, 1e-3])  # warmup: 2 = ceil(0.1 · 20) optimizer steps
    assert all(lr > 1e-4 * (1 + 1e-3) for lr in lrs[:19])  # above the floor until the last optimizer step
    assert lrs[11] == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 9 / 18)))


@pytest.mark.slow
def test_step_metrics_average_every_epoch(tmp_path, single_thread):
    """With 2 epochs a step logs the mean over both updates (lr: the two optimizer steps' LRs) and the last epoch."""
    config = load_config(REPO / "conf" / "quickstart.yaml",
                         [*TINY, "trainer.max_steps=2", "algorithm.ppo_epochs=2", "optim.lr=1e-3",
                          "optim.warmup_ratio=0", "optim.min_lr_ratio=0.1", f"trainer.output_dir={tmp_path}"])
    train(config)
    lr = [1e-3 * warmup_cosine(0, 4, 0.1)(k) for k in range(4)]
    steps = {r["step"]: r for r in read_metrics(tmp_path / "metrics.jsonl")}
    assert steps[1]["train/lr"] == pytest.approx((lr[0] + lr[1]) / 2, rel=1e-9)
    assert steps[2]["train/lr"] == pytest.approx((lr[2] + lr[3]) / 2, rel=1e-9)
    assert steps[2]["train/last_epoch/lr"] == pytest.approx(lr[3], rel=1e-9)
    assert steps[2]["train/epochs"] == 2

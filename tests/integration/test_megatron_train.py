"""A short iGRPO run through ``train()`` with ``policy.backend=megatron`` and HF generation, checked against the HF
policy backend on the same seed (the first step sees identical rollouts, so its loss and gradient norm must agree),
and resumed from its dist checkpoint with ``trainer.resume=auto`` (the resumed step equals the uninterrupted one).

The Megatron run is a subprocess: the CPU patch and megatron's process groups must not leak into pytest.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("megatron.core")
pytestmark = pytest.mark.slow  # trains with both backends, Megatron in a subprocess

HERE = Path(__file__).resolve().parents[1]  # tests/: the shared helpers (megatron_cpu_patch); its parent is the repo
STEPS = ["trainer.max_steps=2", "trainer.save_every=1", "trainer.eval_every=0", "warm_start.steps=0",
         "reward.components={test_alternating: 1.0}",  # every group has reward variance: real gradients
         "algorithm.kl_coef=0.01"]


def run_megatron(root: Path) -> None:
    """``root/megatron``: 2 steps, then resumed (trainer.resume=auto) for a third; ``root/straight``: 3 steps."""
    sys.path.insert(0, str(HERE))
    import megatron_cpu_patch

    megatron_cpu_patch.apply()
    from test_training import tiny_config

    from nemo_igrpo.trainer import train

    train(tiny_config(root / "megatron", *STEPS, "policy.backend=megatron"))
    train(tiny_config(root / "megatron", *STEPS, "policy.backend=megatron", "trainer.max_steps=3",
                      "trainer.resume=auto"))
    train(tiny_config(root / "straight", *STEPS, "policy.backend=megatron", "trainer.max_steps=3"))


def first_records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def test_train_with_megatron_policy_matches_hf_first_step(tmp_path):
    from test_training import tiny_config

    from nemo_igrpo.trainer import train

    train(tiny_config(tmp_path / "hf", *STEPS))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, __file__, str(tmp_path)], env=env, cwd=HERE.parent, check=False,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    hf, mg = first_records(tmp_path / "hf"), first_records(tmp_path / "megatron")
    assert len(hf) == 2 and len(mg) == 3
    for key in ("train/loss", "train/grad_norm", "train/lr", "train/kl"):
        assert mg[0][key] == pytest.approx(hf[0][key], rel=1e-4, abs=1e-6), key
    assert mg[0]["train/grad_norm"] > 0.1  # a real update, not an all-zero-advantage step
    # Step 2 samples from the updated weights (synced to the generator through export_weights): still the same
    # rollouts, so the KL to the reference and the gradient agree too.
    for key in ("train/grad_norm", "train/kl", "train/entropy", "reward/refinement_mean"):
        assert mg[1][key] == pytest.approx(hf[1][key], rel=1e-3, abs=1e-6), key
    assert mg[1]["train/kl"] > 0
    assert mg[0]["train/entropy"] == pytest.approx(hf[0]["train/entropy"], rel=1e-3)
    assert mg[0]["train/skipped"] == 0.0 and mg[1]["train/skipped"] == 0.0
    assert (tmp_path / "megatron" / "final" / "config.json").is_file()  # save_pretrained → HF folder
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "megatron" / "final")

    # Resuming from the step-2 dist checkpoint reproduces the uninterrupted run's third step.
    straight = first_records(tmp_path / "straight")
    for key in ("train/loss", "train/grad_norm", "train/lr", "train/kl", "reward/mean"):
        if key in straight[2]:
            assert mg[2][key] == pytest.approx(straight[2][key], rel=1e-6, abs=1e-9), key


if __name__ == "__main__":
    run_megatron(Path(sys.argv[1]))

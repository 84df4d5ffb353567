"""The embedded default, exactly as `nemo-igrpo train` runs it, must visibly learn."""

from __future__ import annotations

import pytest

from nemo_igrpo.cli import default_config_path
from nemo_igrpo.config import load_config
from nemo_igrpo.tracking import read_metrics
from nemo_igrpo.trainer import train


@pytest.mark.slow
def test_quickstart_raises_heldout_accuracy(tmp_path):
    config = load_config(default_config_path(), [f"trainer.output_dir={tmp_path}", "trainer.progress=false"])
    result = train(config)

    assert result.step == config.trainer.max_steps
    print(f"held-out accuracy {result.initial_accuracy:.3f} -> {result.final_accuracy:.3f}")
    assert result.final_accuracy - result.initial_accuracy >= 0.20
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert records[0]["eval/accuracy"] == result.initial_accuracy
    steps = [r for r in records if r["step"] > 0]
    assert all(r["rollouts_per_prompt/drafts"] == 4 and r["rollouts_per_prompt/refinements"] == 4 for r in steps)
    # iGRPO's bootstrapping: the best of 4 drafts beats a single draft on average
    assert sum(r["reward/best_draft_mean"] - r["reward/draft_mean"] for r in steps) > 0
    assert (tmp_path / "final" / "model.safetensors").is_file()
    assert (tmp_path / "tensorboard").is_dir()

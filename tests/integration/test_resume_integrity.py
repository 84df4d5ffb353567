"""Resumes that land exactly where the run left off (issue 26): a warm-started LoRA + KL run, a finished run whose
export was lost, and a changed prompt stream."""

from __future__ import annotations


import pytest

from nemo_igrpo import faults
from nemo_igrpo.checkpoint import find_latest
from nemo_igrpo.tracking import read_metrics
from nemo_igrpo.trainer import train

from test_training import comparable, tiny_config

pytestmark = pytest.mark.slow  # every test trains


def test_lora_and_kl_resume_after_a_warm_start_reproduce_the_uninterrupted_run(tmp_path):
    """The adapters of a checkpoint belong on the warm-started base, and the KL reference is that base too."""
    steps = ["trainer.max_steps=4", "trainer.save_every=1", "trainer.eval_every=0", "policy.lora.rank=4",
             "algorithm.kl_coef=0.1"]
    reference = tmp_path / "reference"
    train(tiny_config(reference, *steps))

    crashed = tmp_path / "crashed"
    with faults.armed("train.step", "raise", when={"step": 3}), pytest.raises(faults.FaultInjected):
        train(tiny_config(crashed, *steps))
    assert find_latest(crashed / "checkpoints").name == "step_000002"
    assert train(tiny_config(crashed, *steps)).step == 4  # trainer.resume=auto

    expected = comparable(read_metrics(reference / "metrics.jsonl"))
    got = comparable(read_metrics(crashed / "metrics.jsonl"))
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    assert got[2:] == expected[2:]  # steps 3 and 4: rewards, loss and KL to the same (warm-started) reference
    a = (reference / "final" / "model.safetensors").read_bytes()
    assert a == (crashed / "final" / "model.safetensors").read_bytes()  # bitwise-identical merged weights


def test_a_run_killed_after_its_last_checkpoint_writes_final_when_resumed(tmp_path):
    from nemo_igrpo.lifecycle import final_is_current

    steps = ["trainer.max_steps=2", "trainer.save_every=1", "trainer.eval_every=0"]
    run = tmp_path / "run"
    with faults.armed("checkpoint.before_prune", "raise", when={"step": 2}), pytest.raises(faults.FaultInjected):
        train(tiny_config(run, *steps))  # the step-2 checkpoint is complete, the export never ran
    assert find_latest(run / "checkpoints").name == "step_000002" and not (run / "final").exists()
    assert train(tiny_config(run, *steps)).step == 2  # "already finished" — and it exports the missing final/
    assert final_is_current(run / "final", 2) and (run / "final" / "model.safetensors").is_file()

"""SPMD training: a 2-rank torchrun run (gloo, CPU) reproduces the 1-rank run on the same global batch; launch
environments (torchrun, Slurm) are read correctly; bad environments fail fast with clear errors."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nemo_igrpo.distributed import DistributedError, detect_launch, expand_nodelist
from nemo_igrpo.tracking import read_metrics

REPO = Path(__file__).resolve().parents[2]

TINY = [
    "model.tiny.hidden_size=64", "model.tiny.intermediate_size=128", "model.tiny.num_layers=2",
    "model.tiny.num_heads=2", "model.tiny.num_kv_heads=1", "data.arithmetic.num_train=200",
    "data.arithmetic.num_heldout=16", "warm_start.steps=4", "warm_start.batch_size=16", "trainer.prompts_per_step=4",
    "generation.max_new_tokens=12", "eval.samples_per_problem=2", "trainer.progress=false", "trainer.loggers=[]",
    "policy.micro_batch_size=3", "reward.components={test_text_reward: 1.0}", "trainer.resume=none",
]

# The runs need a reward that varies with the sampled text (the tiny model never answers correctly), registered in
# every process torchrun starts: this entry point registers it and then runs the normal CLI.
ENTRY = textwrap.dedent("""
    import sys
    from nemo_igrpo.cli import main
    from nemo_igrpo.rewards import Reward, RewardOutput, register_reward

    @register_reward("test_text_reward")
    class TextReward(Reward):
        def __init__(self, extract="boxed"):
            pass

        def __call__(self, completions, answers):
            return RewardOutput(scores=[(len(set(t)) % 4) / 3 for t in completions], components={})

    if __name__ == "__main__":
        sys.exit(main(sys.argv[1:]))
""")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(command: list[str], tmp_path: Path, timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    entry = tmp_path / "entry.py"
    entry.write_text(ENTRY)
    environ = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_STEP_ID"):
        if env is None or name not in env:
            environ.pop(name, None)
    return subprocess.run([sys.executable, *[str(entry) if c == "ENTRY" else c for c in command]],
                          check=False, capture_output=True, text=True, timeout=timeout, env=environ, cwd=tmp_path)


def comparable(records):
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "throughput/"))} for r in records]


@pytest.mark.slow
def test_two_ranks_reproduce_one_rank_on_the_same_global_batch(tmp_path):
    steps = ["trainer.max_steps=3", "trainer.eval_every=3", "trainer.save_every=2"]
    one, two = tmp_path / "one", tmp_path / "two"
    single = _run(["ENTRY", "train", *TINY, *steps, f"trainer.output_dir={one}"], tmp_path, 600)
    assert single.returncode == 0, single.stdout + single.stderr
    launch = ["-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={_free_port()}"]
    double = _run([*launch, "ENTRY", "train", *TINY, *steps, f"trainer.output_dir={two}"], tmp_path, 600)
    assert double.returncode == 0, double.stdout + double.stderr

    expected, got = comparable(read_metrics(one / "metrics.jsonl")), comparable(read_metrics(two / "metrics.jsonl"))
    assert [r["step"] for r in got] == [0, 1, 2, 3]
    rewards = [r["reward/refinement_mean"] for r in expected[1:]]
    assert len(set(rewards)) > 1 and all(r["train/grad_norm"] > 0 for r in expected[1:])  # a non-trivial run
    for a, b in zip(expected, got):
        assert set(a) == set(b)
        for key in a:
            # Same samples, rewards, eval verdicts and counts; losses differ only by float summation order.
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (a["step"], key)
        # Sampled text (so rewards, lengths, eval verdicts): the same up to float32 mean-of-rank-means rounding.
        exact = [k for k in a if k.startswith(("reward/", "batch/", "eval/", "response_length/", "tokens"))]
        assert {k: a[k] for k in exact} == pytest.approx({k: b[k] for k in exact}, rel=1e-6, abs=1e-9)

    final_one, final_two = load_file(one / "final" / "model.safetensors"), load_file(two / "final" / "model.safetensors")
    assert max((final_one[k] - final_two[k]).abs().max().item() for k in final_one) < 1e-4
    # One writer: rank 0 wrote the metadata, rank 1 only its RNG state.
    checkpoint = two / "checkpoints" / "step_000002"
    assert sorted(p.name for p in checkpoint.iterdir()) == [
        "COMPLETE", "MANIFEST.json", "policy", "rng.json", "rng_rank1.json", "trainer_state.json"]
    assert json.loads((checkpoint / "trainer_state.json").read_text())["step"] == 2


@pytest.mark.slow  # the CLI in a subprocess
def test_an_unreachable_rendezvous_fails_fast_with_the_address(tmp_path):
    port = _free_port()  # nobody listens there: this process is rank 1 waiting for a rank 0 that never comes
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    started = time.time()
    result = _run(["ENTRY", "train", *TINY, "trainer.dist_timeout_s=3", f"trainer.output_dir={tmp_path / 'run'}"],
                  tmp_path, 120, env)
    assert result.returncode == 2, result.stdout + result.stderr
    output = " ".join((result.stdout + result.stderr).split())
    assert f"could not join the rendezvous at 127.0.0.1:{port} within 3 s" in output
    assert "trainer.dist_timeout_s" in output
    assert time.time() - started < 60


@pytest.mark.slow  # the CLI in a subprocess
def test_an_unwritable_output_dir_is_refused_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = _run(["ENTRY", "train", *TINY, f"trainer.output_dir={blocker / 'run'}"], tmp_path, 120)
    assert result.returncode == 2, result.stdout + result.stderr
    output = " ".join((result.stdout + result.stderr).split())
    assert "trainer.output_dir: cannot write checkpoints under" in output and str(blocker) in output
    assert "Warm start" not in output  # refused before any model was built


def test_torchrun_environment():
    launch = detect_launch({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n1",
                            "MASTER_PORT": "29500", "SLURM_PROCID": "0", "SLURM_STEP_ID": "0"})
    assert (launch.rank, launch.world_size, launch.local_rank, launch.launcher) == (3, 8, 1, "torchrun")
    assert (launch.master_addr, launch.master_port) == ("n1", 29500)


def test_slurm_environment_uses_the_first_node_and_a_per_job_port():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5", "SLURM_STEP_ID": "0",
           "SLURM_JOB_NODELIST": "gpu-[007-008]", "SLURM_JOB_ID": "123456"}
    launch = detect_launch(env)
    assert (launch.rank, launch.world_size, launch.local_rank, launch.launcher) == (5, 16, 5, "slurm")
    assert launch.master_addr == "gpu-007" and launch.master_port == 20000 + 123456 % 20000
    assert detect_launch({**env, "MASTER_ADDR": "head", "MASTER_PORT": "4000"}).master_addr == "head"


def test_the_batch_shell_of_a_job_is_a_single_process():
    # sbatch sets SLURM_PROCID/SLURM_NTASKS in the batch script itself; only srun tasks are ranks.
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "16", "SLURM_LOCALID": "0", "SLURM_JOB_NODELIST": "a[1-2]"}
    assert detect_launch(env).world_size == 1
    assert detect_launch({**env, "SLURM_STEP_ID": "batch"}).world_size == 1
    assert detect_launch({}).launcher == "single"


@pytest.mark.parametrize("env, message", [
    ({"RANK": "0", "WORLD_SIZE": "2"}, "incomplete torchrun environment: LOCAL_RANK, MASTER_ADDR, MASTER_PORT not set"),
    ({"SLURM_PROCID": "1", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2"}, "SLURM_LOCALID not set"),
    ({"SLURM_PROCID": "1", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "1"},
     "neither MASTER_ADDR nor SLURM_JOB_NODELIST is set"),
    ({"SLURM_PROCID": "2", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0"},
     r"SLURM_PROCID=2 is not in \[0, SLURM_NTASKS=2\)"),
    ({"RANK": "x", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "a", "MASTER_PORT": "1"},
     "RANK='x' is not an integer"),
])
def test_incomplete_launch_environments_name_what_is_missing(env, message):
    with pytest.raises(DistributedError, match=message):
        detect_launch(env)


def test_slurm_node_lists_expand():
    assert expand_nodelist("gpu-[003-005,010],login1") == ["gpu-003", "gpu-004", "gpu-005", "gpu-010", "login1"]
    assert expand_nodelist("node7") == ["node7"]
    assert expand_nodelist("r[1-2]n[01-02]") == ["r1n01", "r1n02", "r2n01", "r2n02"]


def test_prompts_must_split_evenly_over_ranks(monkeypatch):
    from nemo_igrpo import distributed
    from nemo_igrpo.config import ConfigError, load_config
    from nemo_igrpo.data.dataset import Example, PromptSampler
    from nemo_igrpo.sharding import ShardedSource

    config = load_config(REPO / "conf" / "quickstart.yaml", ["trainer.prompts_per_step=6"])
    sampler = PromptSampler([Example("Q?", "1")])
    monkeypatch.setattr(distributed, "rank", lambda group=None: 0)
    monkeypatch.setattr(distributed, "world_size", lambda group=None: 2)
    assert ShardedSource(sampler, config.trainer.prompts_per_step, group="dp").per_rank == 3
    monkeypatch.setattr(distributed, "world_size", lambda group=None: 4)
    with pytest.raises(ConfigError, match="trainer.prompts_per_step: 6 prompts cannot be split evenly over 4"):
        ShardedSource(sampler, config.trainer.prompts_per_step, group="dp")


@pytest.mark.slow  # trains
def test_stop_file_checkpoints_and_reports_the_stop(tmp_path):
    import nemo_igrpo.trainer as trainer_module
    from nemo_igrpo import faults
    from nemo_igrpo.config import load_config

    run = tmp_path / "run"
    config = load_config(REPO / "conf" / "quickstart.yaml",
                         [*(o for o in TINY if not o.startswith("reward.")), "trainer.max_steps=5",
                          "trainer.eval_every=0", "trainer.save_every=0", f"trainer.output_dir={run}"])

    def request_stop(value, context) -> None:
        (run / trainer_module.STOP_FILE).write_text("")  # what the sbatch script does before its time limit

    with faults.armed("train.step", request_stop, when={"step": 2}):  # during step 2
        result = trainer_module.train(config)
    assert (result.step, result.stop_signal) == (2, "STOP file")
    assert (run / "checkpoints" / "step_000002" / "COMPLETE").is_file() and not (run / "final").exists()
    assert torch.equal(torch.tensor([r["step"] for r in read_metrics(run / "metrics.jsonl")]), torch.tensor([1, 2]))

"""scripts/slurm/igrpo.sbatch on a real one-node Slurm (Debian's slurmctld/slurmd on localhost, installed when
missing): a torchrun job runs to completion, then an srun job (2 tasks) resumes that run, is requeued while
training (``scontrol requeue``: SIGTERM to every task), checkpoints, restarts and finishes where it stopped."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nemo_igrpo.tracking import read_metrics

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "slurm" / "igrpo.sbatch"

pytestmark = pytest.mark.slow

CPU_OVERRIDES = [
    "model.tiny.hidden_size=64", "model.tiny.intermediate_size=128", "model.tiny.num_layers=2",
    "model.tiny.num_heads=2", "model.tiny.num_kv_heads=1", "data.arithmetic.num_train=200",
    "data.arithmetic.num_heldout=8", "warm_start.steps=2", "warm_start.batch_size=8", "trainer.prompts_per_step=2",
    "generation.max_new_tokens=8", "trainer.eval_every=0", "trainer.save_every=0", "trainer.progress=false",
    "trainer.loggers=[]", "policy.micro_batch_size=8", "trainer.dist_timeout_s=120",
]
CPU_RUN = " ".join(CPU_OVERRIDES)  # the sbatch script's OVERRIDES: whitespace-separated


def _install_slurm() -> None:
    if shutil.which("slurmctld") and shutil.which("slurmd") and shutil.which("sbatch"):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("Slurm is not installed and this is not a Debian machine where we are root")
    command = ["apt-get", "install", "-y", "--no-install-recommends", "slurmctld", "slurmd", "slurm-client"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if subprocess.run(command, capture_output=True, timeout=600, env=env, check=False).returncode != 0:
        subprocess.run(["apt-get", "update"], capture_output=True, timeout=600, env=env, check=True)
        subprocess.run(command, capture_output=True, timeout=600, env=env, check=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """slurmctld + slurmd in the foreground on localhost with a generated config; always shut down."""
    _install_slurm()
    root = tmp_path_factory.mktemp("slurm")
    host = socket.gethostname().split(".")[0]
    for sub in ("state", "spool"):
        (root / sub).mkdir()
    conf = root / "slurm.conf"
    conf.write_text("\n".join([
        "ClusterName=igrpotest", f"SlurmctldHost={host}(127.0.0.1)", "AuthType=auth/none", "CredType=cred/none",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU", "AccountingStorageType=accounting_storage/none",
        "JobAcctGatherType=jobacct_gather/none", "MpiDefault=none", "SlurmUser=root", "SlurmdUser=root",
        f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}",
        f"StateSaveLocation={root / 'state'}", f"SlurmdSpoolDir={root / 'spool'}",
        f"SlurmctldPidFile={root / 'slurmctld.pid'}", f"SlurmdPidFile={root / 'slurmd.pid'}",
        f"SlurmctldLogFile={root / 'slurmctld.log'}", f"SlurmdLogFile={root / 'slurmd.log'}",
        "EnforcePartLimits=ALL", "SchedulerParameters=sched_min_interval=100000,batch_sched_delay=0",
        "KillWait=60", "ReturnToService=2", "MinJobAge=600",
        f"NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count() or 2} State=UNKNOWN",
        f"PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP", ""]))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    daemons = [subprocess.Popen([daemon, "-D", "-f", str(conf)], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL) for daemon in ("slurmctld", "slurmd")]
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            state = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True,
                                   timeout=30, check=False).stdout.strip()
            if state in ("idle", "mix", "alloc"):
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"the Slurm node never became idle (state {state!r}); see {root}/*.log")
        yield env
    finally:
        subprocess.run(["scontrol", "shutdown"], env=env, capture_output=True, timeout=30, check=False)
        for daemon in daemons:
            try:
                daemon.wait(timeout=15)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait(timeout=15)


def _job_field(env: dict, job: str, field: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True, timeout=30,
                         check=False).stdout
    match = re.search(rf"\b{field}=(\S+)", out)
    return match.group(1) if match else ""


def _sbatch(env: dict, tmp_path: Path, *args: str, wait: bool) -> subprocess.CompletedProcess:
    command = ["sbatch", "--parsable", *(["--wait"] if wait else []), *args, str(SCRIPT)]
    return subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False)


def test_sbatch_runs_then_a_requeued_job_resumes_from_its_checkpoint(slurm, tmp_path):
    run = tmp_path / "run"
    env = {**slurm, "RUN_DIR": str(run), "PYTHON": sys.executable, "NEMO_IGRPO_REPO": str(REPO),
           "CONTAINER_IMAGE": "", "GPUS_PER_NODE": "", "NPROC_PER_NODE": "2", "OMP_NUM_THREADS": "1",
           "COLUMNS": "400"}  # rich wraps at 80 columns when writing to a file

    # 1. srun → one torchrun on the node → 2 ranks; sbatch --wait returns the job's exit status.
    first = _sbatch({**env, "LAUNCHER": "torchrun", "OVERRIDES": f"{CPU_RUN} trainer.max_steps=2"}, tmp_path,
                    "--nodes=1", "--ntasks=1", "--cpus-per-task=2", wait=True)
    first_job = first.stdout.strip().split(";")[0]
    logs = "\n".join(p.read_text() for p in run.glob("logs/**/*.log")) if run.exists() else ""
    assert first.returncode == 0, first.stdout + first.stderr + logs
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2]
    assert (run / "checkpoints" / "step_000002" / "COMPLETE").is_file()
    assert (run / "final" / "model.safetensors").is_file()
    assert (run / "logs" / f"job-{first_job}" / "attempt-0").is_dir()

    # 2. srun with 2 tasks (ranks from SLURM_PROCID/NTASKS/LOCALID) continues the same run to step 12.
    second = _sbatch({**env, "LAUNCHER": "srun", "OVERRIDES": f"{CPU_RUN} trainer.max_steps=12"}, tmp_path,
                     "--nodes=1", "--ntasks-per-node=2", wait=False)
    assert second.returncode == 0, second.stderr
    job = second.stdout.strip().split(";")[0]
    deadline = time.time() + 300
    while time.time() < deadline and max([r["step"] for r in read_metrics(run / "metrics.jsonl")]) < 4:
        time.sleep(0.2)
    requeue = subprocess.run(["scontrol", "requeue", job], env=slurm, capture_output=True, text=True, timeout=30,
                             check=False)
    assert requeue.returncode == 0, requeue.stderr

    # The tasks got SIGTERM: each finished its step, rank 0 wrote a checkpoint. Start the held job again now.
    deadline = time.time() + 180
    while time.time() < deadline and _job_field(slurm, job, "JobState") not in ("PENDING", "REQUEUED"):
        time.sleep(0.5)
    subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], env=slurm, capture_output=True,
                   timeout=30, check=False)
    deadline = time.time() + 300
    while time.time() < deadline and _job_field(slurm, job, "JobState") not in ("COMPLETED", "FAILED", "CANCELLED"):
        time.sleep(0.5)
        if _job_field(slurm, job, "JobState") == "PENDING":
            subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], env=slurm, capture_output=True,
                           timeout=30, check=False)
    attempts = sorted((run / "logs" / f"job-{job}").glob("attempt-*"))
    logs = {p.name: "\n".join(f.read_text() for f in sorted(p.glob("*.log"))) for p in attempts}
    assert _job_field(slurm, job, "JobState") == "COMPLETED", logs
    assert _job_field(slurm, job, "Restarts") == "1"
    assert [p.name for p in attempts] == ["attempt-0", "attempt-1"]

    stopped = re.search(r"Stop requested \(SIGTERM\) after step (\d+)", logs["attempt-0"])
    assert stopped, logs["attempt-0"]
    stop_step = int(stopped.group(1))
    assert 4 <= stop_step < 12
    assert "Resumed from" in logs["attempt-0"] and "step_000002" in logs["attempt-0"]  # the torchrun job's
    assert re.search(rf"Resumed from \S*step_{stop_step:06d}\S* at step {stop_step}", logs["attempt-1"])
    # One uninterrupted record per step across the three processes' lifetimes.
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == list(range(1, 13))
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if not p.name.startswith(".")) == [
        f"step_{stop_step:06d}", "step_000012"]

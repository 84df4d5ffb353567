"""SPMD process-group setup: rank and world size from torchrun or Slurm, one writer, and the few collectives the
training loop needs.

Launchers supported (the same ``nemo-igrpo train`` command under each):

* nothing: one process, no process group;
* ``torchrun`` (one node, or ``srun`` starting one torchrun per node): ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
  ``MASTER_ADDR``, ``MASTER_PORT`` are set by torchrun;
* ``srun`` starting one task per GPU directly: ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``; the rendezvous
  is the first node of ``SLURM_JOB_NODELIST`` (or ``MASTER_ADDR``) on ``MASTER_PORT`` (default derived from the job
  id, so two jobs sharing a node do not collide).

Backends: NCCL when CUDA is available, gloo on CPU; every collective has the ``trainer.dist_timeout_s`` timeout.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
SLURM_VARIABLES = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")


class DistributedError(RuntimeError):
    """The launch environment is incomplete or the rendezvous failed; the message names what to fix."""


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str | None
    master_port: int | None
    launcher: str  # "single" | "torchrun" | "slurm"


def detect_launch(environ: Mapping[str, str] | None = None) -> LaunchEnv:
    """Rank, world size and rendezvous address from the environment (torchrun's variables win over Slurm's).

    Slurm variables count only inside an ``srun`` step with more than one task (``SLURM_STEP_ID`` set): a batch
    script's own shell also has ``SLURM_PROCID=0`` and ``SLURM_NTASKS``, and a process it starts without ``srun``
    is a single process.
    """
    env = os.environ if environ is None else environ
    if any(name in env for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        missing = [name for name in TORCHRUN_VARIABLES if not env.get(name)]
        if missing:
            raise DistributedError(f"incomplete torchrun environment: {', '.join(missing)} not set (RANK, WORLD_SIZE, "
                                   "LOCAL_RANK, MASTER_ADDR and MASTER_PORT are all needed; launch with torchrun)")
        rank, world, local = (_int(env, name) for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
        _check_rank(rank, world, "RANK", "WORLD_SIZE")
        return LaunchEnv(rank, world, local, env["MASTER_ADDR"], _int(env, "MASTER_PORT"), "torchrun")
    in_step = env.get("SLURM_STEP_ID") not in (None, "", "batch", "extern", "4294967294", "4294967295")
    if in_step and any(name in env for name in SLURM_VARIABLES):
        missing = [name for name in SLURM_VARIABLES if not env.get(name)]
        if missing:
            raise DistributedError(f"incomplete Slurm environment: {', '.join(missing)} not set (srun sets "
                                   "SLURM_PROCID, SLURM_NTASKS and SLURM_LOCALID for every task)")
        rank, world, local = (_int(env, name) for name in SLURM_VARIABLES)
        _check_rank(rank, world, "SLURM_PROCID", "SLURM_NTASKS")
        if world == 1:
            return LaunchEnv(0, 1, 0, None, None, "single")
        return LaunchEnv(rank, world, local, _slurm_master_addr(env), _slurm_master_port(env), "slurm")
    return LaunchEnv(0, 1, 0, None, None, "single")


def init_distributed(timeout_s: float, environ: Mapping[str, str] | None = None) -> LaunchEnv:
    """Join the process group described by the environment (a no-op for a single process or when already joined).

    Raises ``DistributedError`` naming the address when the rendezvous cannot be reached within ``timeout_s``.
    """
    launch = detect_launch(environ)
    if launch.world_size == 1 or dist.is_initialized():
        return launch
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(launch.local_rank)  # so that device "cuda" means this rank's GPU everywhere
    # env:// also picks up torchrun's agent store (TORCHELASTIC_USE_AGENT_STORE); Slurm tasks get the same variables.
    os.environ.update({"RANK": str(launch.rank), "WORLD_SIZE": str(launch.world_size),
                       "LOCAL_RANK": str(launch.local_rank), "MASTER_ADDR": str(launch.master_addr),
                       "MASTER_PORT": str(launch.master_port)})
    try:
        dist.init_process_group(backend, init_method="env://", rank=launch.rank, world_size=launch.world_size,
                                timeout=timedelta(seconds=timeout_s))
    except (RuntimeError, ValueError, TimeoutError, OSError) as error:  # DistStoreError is a RuntimeError
        raise DistributedError(
            f"rank {launch.rank}/{launch.world_size} ({launch.launcher}): could not join the rendezvous at "
            f"{launch.master_addr}:{launch.master_port} within {timeout_s:g} s (trainer.dist_timeout_s); check that "
            f"MASTER_ADDR is the first node's address reachable from this node, that MASTER_PORT is free there, and "
            f"that every rank was started. Cause: {_first_line(error)}") from error
    return launch


@contextmanager
def distributed_session(timeout_s: float) -> Iterator[LaunchEnv]:
    """``init_distributed`` for the duration of a run; destroys the process group only if it created it."""
    created = not dist.is_initialized()
    launch = init_distributed(timeout_s)
    try:
        yield launch
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------- collectives


def world_size(group=None) -> int:
    return dist.get_world_size(group) if dist.is_initialized() else 1


def rank(group=None) -> int:
    return dist.get_rank(group) if dist.is_initialized() else 0


def is_main() -> bool:
    """Global rank 0: the only process that writes logs, metrics, config and checkpoint metadata."""
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (one owned by another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _device() -> torch.device:
    """Where collective buffers live: NCCL needs the rank's GPU, gloo takes CPU tensors."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_values(values: list[float], op: str = "sum", group=None) -> list[float]:
    """Element-wise reduction of a list of floats over ``group`` (float64: counts stay exact)."""
    if not dist.is_initialized() or not values:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=_device())
    dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX,
                                "min": dist.ReduceOp.MIN}[op], group=group)
    return tensor.tolist()


def any_rank(flag: bool) -> bool:
    """True on every rank when it is true on any rank (stop requests must be acted on by all ranks together)."""
    return all_reduce_values([float(flag)], "max")[0] > 0


def all_ok(ok: bool) -> bool:
    """A barrier that also tells every rank whether all ranks succeeded (so one rank's failure is not a hang)."""
    return all_reduce_values([float(ok)], "min")[0] > 0


def all_gather_objects(obj: Any, group=None) -> list[Any]:
    if not dist.is_initialized():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, obj, group=group)
    return gathered


def broadcast_object(obj: Any, src: int = 0, group=None) -> Any:
    """``obj`` of global rank ``src`` on every rank of ``group`` (default: all ranks)."""
    if not dist.is_initialized():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src, group=group)
    return holder[0]


# ---------------------------------------------------------------------------------------------- Slurm helpers


def _slurm_master_addr(env: Mapping[str, str]) -> str:
    if env.get("MASTER_ADDR"):
        return env["MASTER_ADDR"]
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise DistributedError("Slurm launch: neither MASTER_ADDR nor SLURM_JOB_NODELIST is set, so the rendezvous "
                               "node is unknown; export MASTER_ADDR (the first node's hostname) before srun")
    return first_host(nodelist)


def _slurm_master_port(env: Mapping[str, str]) -> int:
    if env.get("MASTER_PORT"):
        return _int(env, "MASTER_PORT")
    job = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")
    # A port per job: two jobs sharing a node must not meet at the same rendezvous.
    return 20000 + int(job) % 20000 if job and job.isdigit() else 29500


def first_host(nodelist: str) -> str:
    """The first hostname of a Slurm node list such as ``gpu-[003-010,012],login1`` (``scontrol`` when present)."""
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                                 timeout=30, check=True).stdout.split()
            if out:
                return out[0]
        except (subprocess.SubprocessError, OSError):
            pass  # fall back to parsing the list ourselves
    return expand_nodelist(nodelist)[0]


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand Slurm's compressed host-list syntax: ``a[01-03,7]b,c`` → ``a01b a02b a03b a7b c``."""
    hosts: list[str] = []
    for item in re.findall(r"[^,\[]+(?:\[[^\]]*\][^,\[]*)*", nodelist):
        expanded = [""]
        for text, ranges in re.findall(r"([^\[]*)(?:\[([^\]]*)\])?", item):
            expanded = [prefix + text for prefix in expanded]
            if ranges:
                expanded = [prefix + value for prefix in expanded for value in _expand_ranges(ranges)]
        hosts.extend(host for host in expanded if host)
    if not hosts:
        raise DistributedError(f"cannot parse the Slurm node list {nodelist!r}")
    return hosts


def _expand_ranges(ranges: str) -> list[str]:
    values = []
    for part in ranges.split(","):
        if "-" in part:
            low, high = part.split("-", 1)
            values.extend(str(n).zfill(len(low)) for n in range(int(low), int(high) + 1))
        else:
            values.append(part)
    return values


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise DistributedError(f"{name}={env[name]!r} is not an integer") from None


def _check_rank(rank_: int, world: int, rank_name: str, world_name: str) -> None:
    if world < 1 or not 0 <= rank_ < world:
        raise DistributedError(f"{rank_name}={rank_} is not in [0, {world_name}={world})")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__

"""A run's directory and its life cycle around the loop: a writable output directory, which checkpoint to resume
from, saving and restoring the loop state, stop requests (signals, a STOP file) and the final Hugging Face export.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from nemo_igrpo import distributed
from nemo_igrpo.checkpoint import find_latest, load_checkpoint, save_checkpoint
from nemo_igrpo.data.dataset import PromptSampler
from nemo_igrpo.errors import ConfigError
from nemo_igrpo.policy.base import PolicyBackend

STOP_FILE = "STOP"  # created in trainer.output_dir (e.g. by the sbatch script before its time limit): stop cleanly


@dataclass
class TrainState:
    step: int = 0
    nan_streak: int = 0  # consecutive skipped (non-finite) steps; the total is the sum of train/skipped


def resume_path(resume: str, run_dir: Path) -> Path | None:
    if resume == "none":
        return None
    if resume == "auto":
        # Rank 0 picks (verifying checksums once) and every rank resumes from that same checkpoint.
        return distributed.broadcast_object(find_latest(run_dir / "checkpoints") if distributed.is_main() else None)
    return Path(resume)


def check_writable(run_dir: Path) -> None:
    """Fail before any model is built when trainer.output_dir (or its checkpoints/) cannot be written, on any rank."""
    error = None
    if distributed.is_main():
        probe = run_dir / "checkpoints" / f".write-test-{os.getpid()}"
        try:
            probe.parent.mkdir(parents=True, exist_ok=True)
            probe.write_text("ok")
            probe.unlink()
        except OSError as caught:
            error = f"trainer.output_dir: cannot write checkpoints under {run_dir} ({caught.strerror or caught}: " \
                    f"{caught.filename or probe}); choose a writable directory"
    error = distributed.broadcast_object(error)
    if error:
        raise ConfigError(error)


def save_state(root: Path, state: TrainState, policy: PolicyBackend, cursor, keep_last: int) -> None:
    """The loop state, the policy and the data cursor: ``cursor.state_dict()`` is the sampler position to resume
    from (the rollout producer's, which leaves out prompts it drew ahead of time)."""
    save_checkpoint(root, state.step, policy.save, {**dataclasses.asdict(state), "sampler": cursor.state_dict()},
                    keep_last)


def restore_state(path: Path, policy: PolicyBackend, sampler: PromptSampler) -> TrainState:
    saved = load_checkpoint(path, policy.load)
    sampler.load_state_dict(saved["sampler"])
    return TrainState(step=saved["step"], nan_streak=saved["nan_streak"])


def export_final(directory: Path, policy: PolicyBackend, tokenizer) -> None:
    """The trained model in Hugging Face format (written beside, then renamed into place by rank 0; every rank
    calls ``save_pretrained``, which a sharded backend needs and a replicated one ignores off rank 0)."""
    tmp = directory.with_name(f".tmp-{directory.name}")
    main = distributed.is_main()
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    distributed.barrier()
    policy.save_pretrained(tmp)
    distributed.barrier()
    if main:
        tokenizer.save_pretrained(tmp)
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    distributed.barrier()


@contextmanager
def stop_requests() -> Iterator:
    """SIGINT/SIGTERM ask the loop to checkpoint and stop after the current step; a second Ctrl-C aborts at once.

    Repeated SIGTERMs are not an abort: under Slurm a task gets one from slurmd and another forwarded by srun, and
    the scheduler's SIGKILL after its grace period is the hard stop. Yields a function returning the name of the
    signal received ("SIGTERM", "SIGINT") or None.
    """
    requested: dict[str, str | None] = {"flag": None}
    previous = {}

    def handler(signum, frame):
        requested["flag"] = requested["flag"] or signal.Signals(signum).name
        if signum == signal.SIGINT:
            signal.signal(signum, previous[signum])  # the next Ctrl-C acts immediately

    for signum in (signal.SIGINT, signal.SIGTERM):
        previous[signum] = signal.getsignal(signum)
        signal.signal(signum, handler)
    try:
        yield lambda: requested["flag"]
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)

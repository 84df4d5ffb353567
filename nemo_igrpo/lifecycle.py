"""A run's directory and its life cycle around the loop: a writable output directory, which checkpoint to resume
from, saving and restoring the loop state, stop requests (signals, a STOP file) and the final Hugging Face export.

A run folder holds one run, written by one process group at a time: ``run_lock`` refuses a second writer, and
``resume_path`` refuses a start that would mix a new run into an older one (see ``nemo_igrpo.run_folder``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from nemo_igrpo import distributed, faults
from nemo_igrpo.checkpoint import fsync_dir, fsync_tree, load_checkpoint, save_checkpoint
from nemo_igrpo.data.dataset import PromptSampler
from nemo_igrpo.errors import ConfigError
from nemo_igrpo.policy.base import PolicyBackend
from nemo_igrpo.run_folder import LOCK_FILE, check_prompt_stream, choose_resume, prompt_stream, run_lock  # noqa: F401

STOP_FILE = "STOP"  # created in trainer.output_dir (e.g. by the sbatch script before its time limit): stop cleanly


@dataclass
class TrainState:
    step: int = 0
    nan_streak: int = 0  # consecutive skipped (non-finite) steps; the total is the sum of train/skipped


EXPORT_MARKER = "nemo_igrpo_export.json"  # in final/: the step it was exported at


def resume_path(resume: str, run_dir: Path) -> Path | None:
    """The checkpoint to resume from (None: start afresh). Rank 0 picks, verifying checksums once, and every rank
    resumes from that same checkpoint; a start that would mix two runs in ``run_dir`` is refused on every rank."""
    found = error = None
    if distributed.is_main():
        try:
            found = choose_resume(resume, run_dir)
        except ConfigError as caught:
            error = str(caught)
    found, error = distributed.broadcast_object((found, error))
    if error:
        raise ConfigError(error)
    return found


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
    save_checkpoint(root, state.step, policy.save, {**dataclasses.asdict(state), "sampler": cursor.state_dict(),
                                                    "prompt_stream": prompt_stream(cursor.sampler)}, keep_last)


def restore_state(path: Path, policy: PolicyBackend, sampler: PromptSampler) -> TrainState:
    saved = load_checkpoint(path, policy.load)
    check_prompt_stream(saved.get("prompt_stream"), sampler, path)  # before a cursor that means other prompts
    sampler.load_state_dict(saved["sampler"])
    return TrainState(step=saved["step"], nan_streak=saved["nan_streak"])


def final_is_current(directory: Path, step: int) -> bool:
    """Whether ``directory`` (final/) holds the export of step ``step`` (a kill after the last checkpoint, or a
    longer resumed run, leaves it missing or older)."""
    try:
        return json.loads((directory / EXPORT_MARKER).read_text()).get("step") == step
    except (OSError, ValueError, AttributeError):
        return False


def export_final(directory: Path, policy: PolicyBackend, tokenizer, step: int) -> None:
    """The trained model in Hugging Face format (written beside, then renamed into place by rank 0; every rank
    calls ``save_pretrained``, which a sharded backend needs and a replicated one ignores off rank 0).

    An older ``directory`` is moved aside, not deleted, until the new one is in place: a failure or kill at any
    moment leaves one complete export (or none yet, then a resumed finished run exports again)."""
    tmp = directory.with_name(f".tmp-{directory.name}")
    old = directory.with_name(f".old-{directory.name}")
    main = distributed.is_main()
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    distributed.barrier()
    policy.save_pretrained(tmp)
    distributed.barrier()
    if main:
        tokenizer.save_pretrained(tmp)
        (tmp / EXPORT_MARKER).write_text(json.dumps({"step": step}))
        fsync_tree(tmp)
        faults.point("export.before_swap", step=step, path=tmp)
        if directory.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(directory, old)
            try:
                os.replace(tmp, directory)
            except BaseException:
                os.replace(old, directory)
                raise
            shutil.rmtree(old)
        else:
            os.replace(tmp, directory)
        fsync_dir(directory.parent)
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

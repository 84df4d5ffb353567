"""Atomic, self-describing checkpoints: ``<run>/checkpoints/step_000010/``.

A checkpoint is written into ``.tmp-step_000010`` and renamed only once every file is on disk, then marked
complete by a ``COMPLETE`` file inside it; anything without that marker (a crash mid-write, a truncated copy) is
never resumed from. ``MANIFEST.json`` records every file's size and SHA-256, so a checkpoint damaged after it was
written (truncated, missing or overwritten bytes) is detected on resume and skipped for the previous one instead of
being loaded. Only after a new checkpoint is complete are old ones beyond ``keep_last`` deleted, so a failure
at any moment leaves the previous checkpoint intact.

Nothing in a checkpoint is unpickled on resume: RNG states are JSON (``rng.json``), weights safetensors, optimizer
states ``torch.load(weights_only=True)``. A ``rng.pt`` of an older version is never loaded (see ``_read_rng``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from nemo_igrpo import faults

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
MANIFEST = "MANIFEST.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (disk full, no permission); the previous one is intact."""


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def save_checkpoint(
    root: Path,
    step: int,
    write_payload: Callable[[Path], None],
    trainer_state: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write a checkpoint for ``step`` atomically and prune old ones; returns its final path.

    ``write_payload(dir)`` saves the backend state (model, optimizer, scheduler) into ``dir``; ``trainer_state``
    (step, data cursor, counters) is stored as JSON next to the RNG states of this process.

    Under a process group this is collective: rank 0 creates the temporary directory, every rank calls
    ``write_payload`` on it (a sharded backend writes its own part; replicas write nothing but on rank 0) and
    stores its RNG state as ``rng_rank<r>.pt``, then rank 0 writes the metadata and renames. A failure on any rank
    fails the save on every rank (no rank is left waiting) and leaves the previous checkpoint intact.
    """
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{final.name}"
    rank = dist.get_rank() if dist.is_initialized() else 0
    faults.point("checkpoint.begin", step=step, path=final)

    def prepare() -> None:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        (tmp / "policy").mkdir()

    def write_shards() -> None:
        write_payload(tmp / "policy")
        if rank > 0:  # ranks may differ in RNG state (e.g. random tie-breaks on their own prompts)
            (tmp / f"rng_rank{rank}.json").write_text(json.dumps(_rng_state()))

    def finish() -> None:
        (tmp / "trainer_state.json").write_text(json.dumps({**trainer_state, "step": step}, indent=2))
        (tmp / "rng.json").write_text(json.dumps(_rng_state()))
        fsync_tree(tmp)
        (tmp / MANIFEST).write_text(json.dumps(_manifest(tmp), indent=1))
        (tmp / COMPLETE).write_text(str(step))
        fsync_tree(tmp)
        faults.point("checkpoint.before_rename", step=step, path=tmp)
        if final.exists():  # a re-save of the same step (e.g. after a resume); replace it only now
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(root)  # the rename itself is durable only once the directory entry is on disk

    for phase, everyone in ((prepare, False), (write_shards, True), (finish, False)):
        error = None
        if everyone or rank == 0:
            try:
                phase()
            except Exception as caught:  # OSError, or a serializer's own error wrapping one (safetensors)
                error = caught
        failures = _gather_failures(error, rank)
        if failures:
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            previous = find_latest(root, verify=False)
            raise CheckpointError(
                f"could not write checkpoint {final}: {'; '.join(failures)}. "
                + (f"The previous checkpoint {previous} is intact; " if previous else "No earlier checkpoint exists; ")
                + "free space or fix permissions, then run again with trainer.resume=auto.") from error
    if rank == 0:
        faults.point("checkpoint.before_prune", step=step, path=final)
        _prune(root, keep_last)
    return final


def newest_step(root: Path) -> int | None:
    """The highest step among the complete checkpoints under ``root`` (sizes checked, not checksums)."""
    steps = [step for step, path in _list(root) if is_complete(path)]
    return max(steps) if steps else None


def find_latest(root: Path, verify: bool = True) -> Path | None:
    """The newest intact checkpoint under ``root``; damaged ones are skipped with a warning saying why.

    ``verify`` also checks every file's SHA-256 against the manifest (reads the whole checkpoint once); without it
    only the marker, the trainer state and the file sizes are checked.
    """
    for _, path in sorted(_list(root), reverse=True):
        problem = damage(path, verify)
        if problem is None:
            return path
        if (path / COMPLETE).exists():  # a missing marker is an interrupted write, not worth a warning
            log.warning("skipping damaged checkpoint %s: %s; trying the previous one", path, problem)
    return None


def is_complete(path: Path, verify: bool = False) -> bool:
    return damage(path, verify) is None


def damage(path: Path, verify: bool = True) -> str | None:
    """Why the checkpoint at ``path`` cannot be resumed from, or None when it is intact."""
    try:
        marker = (path / COMPLETE).read_text().strip()
        state = json.loads((path / "trainer_state.json").read_text())
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as error:
        return f"unreadable marker, trainer state or manifest ({error})"
    if not isinstance(state, dict) or marker != str(state.get("step")):
        return f"{COMPLETE} says step {marker!r}, trainer_state.json says {state!r:.80}"
    if not _well_formed(manifest):
        return f"malformed manifest: {MANIFEST} is not a map of file names to [size, sha256] ({manifest!r:.80})"
    for name, (size, digest) in manifest.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, {size} were written"
        if verify and sha256(file) != digest:
            return f"{name} does not match its checksum"
    return None


def load_checkpoint(path: Path, read_payload: Callable[[Path], None], verify: bool = False) -> dict[str, Any]:
    """Restore backend state via ``read_payload(dir)`` and this process's RNGs; returns the trainer state."""
    problem = damage(path, verify)
    if problem is not None:
        raise FileNotFoundError(f"{path}: not a complete checkpoint: {problem}")
    read_payload(path / "policy")
    rank = dist.get_rank() if dist.is_initialized() else 0
    _read_rng(path, rank)
    return json.loads((path / "trainer_state.json").read_text())


def _list(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return found


def _prune(root: Path, keep_last: int) -> None:
    complete = sorted((s, p) for s, p in _list(root) if is_complete(p))
    for _, path in complete[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)


def _well_formed(manifest: Any) -> bool:
    """``{relative name: [size, sha256]}``; anything else (valid JSON of another shape) is damage, not a crash."""
    return isinstance(manifest, dict) and all(
        isinstance(name, str) and not Path(name).is_absolute() and ".." not in Path(name).parts
        and isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], int) and isinstance(entry[1], str)
        for name, entry in manifest.items())


def _bytes(tensor: torch.Tensor) -> str:
    return base64.b64encode(tensor.numpy().tobytes()).decode()


def _tensor(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def _rng_state() -> dict[str, Any]:
    """Every RNG of this process as plain JSON (no pickle): Python's and NumPy's Mersenne Twister words, torch's
    generator bytes."""
    version, words, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(words), gauss], "numpy": [name, keys.tolist(), pos, has_gauss, cached],
             "torch": _bytes(torch.get_rng_state())}
    if torch.cuda.is_available():
        state["cuda"] = [_bytes(s) for s in torch.cuda.get_rng_state_all()]
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    version, words, gauss = state["python"]
    random.setstate((version, tuple(words), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_tensor(s) for s in state["cuda"]])


def _read_rng(path: Path, rank: int) -> None:
    own = path / f"rng_rank{rank}.json"
    file = own if rank > 0 and own.is_file() else path / "rng.json"
    if file.is_file():
        _set_rng_state(json.loads(file.read_text()))
        return
    # An older version pickled the RNG states into rng.pt; unpickling a run-folder file can run code, and a
    # weights_only load rejects NumPy's state, so it is not read: the run goes on, but its random draws (ties in
    # draft selection, sampling seeds derived from torch's RNG) differ from an uninterrupted run's.
    log.warning("%s: RNG states in the old pickled rng.pt are not loaded (a pickle can run code); the resumed run "
                "continues from trainer.seed's RNG state and will not repeat the interrupted run's random draws", path)


def _gather_failures(error: BaseException | None, rank: int) -> list[str]:
    """Every rank's failure message (empty when all succeeded); also the barrier between save phases."""
    message = None if error is None else (f"rank {rank}: {error}" if dist.is_initialized() else str(error))
    if not dist.is_initialized():
        return [] if message is None else [message]
    gathered: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, message)
    return [m for m in gathered if m is not None]


def _manifest(path: Path) -> dict[str, tuple[int, str]]:
    return {str(file.relative_to(path)): (file.stat().st_size, sha256(file))
            for file in sorted(path.rglob("*")) if file.is_file()}


def sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
    """Make the entries of directory ``path`` (a rename into it, a deletion) durable."""
    handle = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def fsync_tree(path: Path) -> None:
    """Flush file contents before the rename makes the checkpoint visible (a crash must not expose empty files)."""
    for file in path.rglob("*"):
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())

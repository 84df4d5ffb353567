"""Atomic, self-describing checkpoints: ``<run>/checkpoints/step_000010/``.

A checkpoint is written into ``.tmp-step_000010`` and renamed only once every file is on disk, then marked
complete by a ``COMPLETE`` file inside it; anything without that marker (a crash mid-write, a truncated copy) is
never resumed from. Only after a new checkpoint is complete are old ones beyond ``keep_last`` deleted, so a failure
at any moment leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

COMPLETE = "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d+)$")


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
    """
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{final.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    (tmp / "policy").mkdir()
    write_payload(tmp / "policy")
    (tmp / "trainer_state.json").write_text(json.dumps({**trainer_state, "step": step}, indent=2))
    torch.save(_rng_state(), tmp / "rng.pt")
    (tmp / COMPLETE).write_text(str(step))
    _fsync_tree(tmp)
    if final.exists():  # a re-save of the same step (e.g. after a resume); replace it only now
        shutil.rmtree(final)
    os.replace(tmp, final)
    _prune(root, keep_last)
    return final


def find_latest(root: Path) -> Path | None:
    """The newest complete checkpoint under ``root`` (incomplete or unreadable ones are skipped)."""
    for step, path in sorted(_list(root), reverse=True):
        if is_complete(path):
            return path
    return None


def is_complete(path: Path) -> bool:
    try:
        marker = (path / COMPLETE).read_text().strip()
        state = json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return marker == str(state.get("step")) and (path / "rng.pt").is_file() and (path / "policy").is_dir()


def load_checkpoint(path: Path, read_payload: Callable[[Path], None]) -> dict[str, Any]:
    """Restore backend state via ``read_payload(dir)`` and this process's RNGs; returns the trainer state."""
    if not is_complete(path):
        raise FileNotFoundError(f"{path}: not a complete checkpoint (missing {COMPLETE}, trainer_state.json or rng.pt)")
    read_payload(path / "policy")
    _set_rng_state(torch.load(path / "rng.pt", weights_only=False))
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


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_tree(path: Path) -> None:
    """Flush file contents before the rename makes the checkpoint visible (a crash must not expose empty files)."""
    for file in path.rglob("*"):
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())

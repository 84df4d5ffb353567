"""One run per output folder, one writer at a time, and a data cursor that only resumes the stream it was saved in.

* ``choose_resume``: which checkpoint ``trainer.resume`` means, refusing what would mix two runs in one folder
  (checkpoint pruning keeps the highest steps whichever run wrote them, and ``metrics.jsonl`` would hold both) and
  an explicit checkpoint whose checksums do not match.
* ``run_lock``: a lock file naming the holder's pid and host; a second process writing the same folder is refused.
  A holder that died without removing it (SIGKILL, a lost node) is recognised by its pid on the same host, or by its
  heartbeat (the file's mtime, touched every ``HEARTBEAT_S``) having stopped.
* ``prompt_stream`` / ``check_prompt_stream``: a fingerprint of what defines the prompt stream (the sampler's seed,
  the number of training examples and a hash of their contents), stored next to the cursor ``{epoch, position}``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from nemo_igrpo import distributed
from nemo_igrpo.checkpoint import damage, find_latest, newest_step
from nemo_igrpo.data.dataset import PromptSampler
from nemo_igrpo.errors import ConfigError

log = logging.getLogger(__name__)

LOCK_FILE = "RUN_LOCK"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 10 * HEARTBEAT_S  # on another host: no heartbeat for this long means its holder is gone


def choose_resume(resume: str, run_dir: Path) -> Path | None:
    """The checkpoint ``trainer.resume`` resolves to in ``run_dir`` (None: a fresh start); raises ConfigError."""
    checkpoints = run_dir / "checkpoints"
    if resume == "auto":
        return find_latest(checkpoints)
    newest = newest_step(checkpoints)
    if resume == "none":
        if newest is not None:
            raise ConfigError(
                f"trainer.output_dir={run_dir} already holds a run (checkpoints up to step {newest}) and "
                "trainer.resume=none starts a new one: the two would mix (pruning keeps the older run's higher "
                "steps, metrics.jsonl would hold both). Continue it with trainer.resume=auto, or choose another "
                "trainer.output_dir (or move the old run aside).")
        return None
    path = Path(resume)
    problem = damage(path, verify=True)
    if problem is not None:
        raise ConfigError(f"trainer.resume={resume}: not an intact checkpoint: {problem}")
    step = json.loads((path / "trainer_state.json").read_text())["step"]
    if newest is not None and newest > step:
        raise ConfigError(
            f"trainer.output_dir={run_dir} holds checkpoints up to step {newest}, later than the step {step} of "
            f"trainer.resume={resume}: the resumed run would mix with them (pruning keeps the highest steps). Move "
            "them aside or choose another trainer.output_dir.")
    return path


# ------------------------------------------------------------------------------------------------------ the lock


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir``'s lock for the block (global rank 0 takes it for the whole process group)."""
    error, heartbeat = None, None
    if distributed.is_main():
        try:
            heartbeat = _acquire(Path(run_dir) / LOCK_FILE)
        except ConfigError as caught:
            error = str(caught)
    error = distributed.broadcast_object(error)
    if error:
        raise ConfigError(error)
    try:
        yield
    finally:
        if heartbeat is not None:
            heartbeat.set()
            _release(Path(run_dir) / LOCK_FILE)


def _acquire(path: Path) -> threading.Event:
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError:
        return threading.Event()  # an unwritable folder: check_writable names it next
    for _ in range(3):
        try:
            handle = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _holder(path)
            if holder is not None:
                raise ConfigError(
                    f"trainer.output_dir={path.parent} is in use by another run (pid {holder.get('pid')} on host "
                    f"{holder.get('host')}, lock file {path}): two processes writing one run folder corrupt its "
                    "checkpoints and metrics. Wait for it or stop it, or choose another trainer.output_dir; if that "
                    f"process is gone for good, delete {path}.")
            continue  # a dead holder's lock was removed: try again
        except OSError:
            return threading.Event()  # cannot create files here: check_writable names the folder next
        with os.fdopen(handle, "w") as file:
            json.dump(me, file)
        stop = threading.Event()
        threading.Thread(target=_beat, args=(path, stop), name="run-lock-heartbeat", daemon=True).start()
        return stop
    raise ConfigError(f"trainer.output_dir={path.parent}: could not take the lock {path} (another process keeps "
                      "taking it)")


def _holder(path: Path) -> dict[str, Any] | None:
    """The live holder of the lock at ``path``, or None after removing a dead holder's lock."""
    try:
        holder = json.loads(path.read_text())
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        holder, age = {}, 0.0  # torn while being written: its writer is alive, or stale after STALE_AFTER_S
    if not isinstance(holder, dict):
        holder = {}
    same_host = holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int)
    # no heartbeat for STALE_AFTER_S: gone on any host (on this one, also a dead pid, or a pid reused since)
    gone = age > STALE_AFTER_S or (same_host and not distributed.process_alive(holder["pid"]))
    if not gone:
        return holder
    log.warning("removing the lock %s of a run that is gone (%s)", path, holder or "unreadable")
    path.unlink(missing_ok=True)
    return None


def _beat(path: Path, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_S):
        try:
            os.utime(path)
        except OSError:
            return


def _release(path: Path) -> None:
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError, AttributeError):
        pass


# ------------------------------------------------------------------------------------------------ the prompt stream


def prompt_stream(sampler: PromptSampler) -> dict[str, Any]:
    """What the cursor ``{epoch, position}`` is a position in: the shuffle seed and the examples, in order."""
    digest = hashlib.sha256()
    for example in sampler.examples:
        digest.update(json.dumps([example.problem, example.answer]).encode())
        digest.update(b"\n")
    return {"seed": sampler.seed, "examples": len(sampler.examples), "sha256": digest.hexdigest()}


def check_prompt_stream(saved: dict[str, Any] | None, sampler: PromptSampler, path: Path) -> None:
    """Refuse to resume ``path`` into another prompt stream; a checkpoint of an older version has no fingerprint."""
    if saved is None:
        log.warning("%s has no prompt-stream fingerprint (an older version wrote it): the resume cannot check that "
                    "trainer.seed and the data are unchanged", path)
        return
    now = prompt_stream(sampler)
    changes = []
    if saved.get("seed") != now["seed"]:
        changes.append(f"trainer.seed: {saved.get('seed')} → {now['seed']}")
    data = "the data.* settings (source, split, filtering such as data.max_prompt_tokens)"
    if saved.get("examples") != now["examples"]:
        changes.append(f"the training examples: {saved.get('examples')} → {now['examples']} examples ({data})")
    elif saved.get("sha256") != now["sha256"]:
        changes.append(f"the training examples: as many ({now['examples']}) but other problems or answers ({data})")
    if changes:
        raise ConfigError(
            f"{path}: resuming would change the prompt stream its data cursor points into: {'; '.join(changes)}. "
            "The cursor would repeat or skip prompts: resume with the run's settings, or start a new run in "
            "another trainer.output_dir.")

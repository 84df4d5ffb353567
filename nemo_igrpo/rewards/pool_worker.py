"""What a grading worker process runs (``GradingPool`` in ``pool`` is the parent side): set up, announce readiness,
then answer the items of each message one by one, until the parent closes the pipe or goes away."""

from __future__ import annotations

import os
import resource
import signal
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from nemo_igrpo import faults

# Messages from a worker: the handshake after start-up, then one (status, value) reply per item, in order.
READY = "ready"
OK = "ok"
ERROR = "error"
CRASH = "crash"  # the worker is about to exit (MemoryError): its teardown may outlast the item's deadline

_ORPHAN_CHECK_S = 1.0  # how often a worker checks that its parent is alive


def _exit_when_orphaned(parent_pid: int) -> None:
    """Exit once the parent is gone (a SIGKILLed trainer): an item stuck in C code would never read the pipe's EOF."""
    while True:
        time.sleep(_ORPHAN_CHECK_S)
        if os.getppid() != parent_pid:
            os._exit(0)


def worker_main(
    conn: Connection,
    fn: Callable[[Any], Any],
    initializer: Callable[[], None] | None,
    memory_limit_mb: int | None,
) -> None:
    """Worker loop: set up, announce readiness, then answer one item per message until the pipe closes."""
    # Ctrl-C and Slurm's SIGTERM reach the whole process group; the trainer stops gracefully after grading the step
    # (with this worker), and shutting workers down is its job.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(target=_exit_when_orphaned, args=(os.getppid(),), daemon=True).start()
    if memory_limit_mb is not None:
        # Turns a runaway allocation into a MemoryError in this worker instead of memory pressure on the trainer.
        limit = memory_limit_mb * 2**20
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    if initializer is not None:
        initializer()
    conn.send(READY)
    while True:
        try:
            items = conn.recv()
        except EOFError:  # the parent closed the pipe (or died): nothing left to do
            return
        for item in items:
            try:
                faults.point("reward.grade_item")  # armed through the environment, which spawned workers inherit
                reply = (OK, fn(item))
            except MemoryError:
                # The heap may be unusable: exit and let the parent start a fresh worker. Say so first, so that
                # a slow teardown (a loaded machine) is not mistaken for a timeout.
                try:
                    conn.send((CRASH, "MemoryError"))
                except Exception:  # noqa: BLE001 - best effort; the parent still sees the exit
                    pass
                raise
            except Exception as exc:  # noqa: BLE001 - fn failing on one item must not take the worker down
                # Only the type: formatting an exception about hostile input can itself be slow or huge.
                reply = (ERROR, type(exc).__name__)
            conn.send(reply)

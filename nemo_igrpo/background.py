"""One daemon thread that runs submitted callables in order, each returning a ``concurrent.futures.Future``.

The rollout producers run their background jobs here rather than in a ``ThreadPoolExecutor``, whose threads the
interpreter joins at exit: a job that is being discarded (the run stops, fails or is interrupted) must neither
delay ``close()`` nor hold up the process's exit.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from typing import Any, Callable


class DaemonExecutor:
    """``submit(fn)`` → Future, run by one daemon thread in submission order; ``shutdown`` never waits for it."""

    def __init__(self, name: str) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], Any]) -> Future:
        future: Future = Future()
        self._queue.put((future, fn))
        return future

    def shutdown(self) -> None:
        """Cancel what has not started and let the thread end after its current callable (not waited for)."""
        self._queue.put(None)
        while True:  # the sentinel may be behind queued jobs: cancel them so that the thread skips them
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                self._queue.put(None)
                break
            item[0].cancel()

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            future, fn = item
            if not future.set_running_or_notify_cancel():  # cancelled before it started
                continue
            try:
                result = fn()
            except BaseException as error:  # noqa: BLE001 - delivered to whoever waits on the future
                future.set_exception(error)
            else:
                future.set_result(result)

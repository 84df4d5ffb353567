"""A small process pool for untrusted grading work, with a hard wall-clock deadline per item.

Grading model output with a symbolic-math library is untrusted work: an answer such as ``9^{9^{9^{9^{9}}}}`` can
keep a worker busy in C code that no Python-level timeout interrupts, and a parser bug can crash the interpreter.
This pool therefore runs ``fn`` in separate processes and treats each of them as disposable:

- each worker receives a few items per message over its own ``Pipe`` (one message per item would leave it idle
  for a round trip after every item: grading a typical answer takes milliseconds) and answers them one by one;
- the parent dispatches items and watches every pipe, process sentinel and deadline with one
  ``multiprocessing.connection.wait`` call, so it never blocks on a single worker;
- each item has its own deadline, which starts when the worker reaches it (when the previous answer arrives);
- a worker past its item's deadline is killed with SIGKILL and replaced; a worker that dies (segfault,
  ``os._exit``, ``MemoryError``) is replaced; either way its item gets ``default`` and is counted, the items queued
  behind it go back to the queue, and the rest of the batch goes on;
- items queued behind an item that has stalled for ``steal_after_s`` go back to the queue for other workers, so
  one slow item does not hold up the ones sent with it (a late answer to a re-queued item is dropped);
- a replacement that dies or stalls while starting is retried (``max_start_retries`` times, counted in
  ``start_failures``): the first workers started, so no batch is to blame, and one bad start must not end a run;
- workers ignore SIGINT and SIGTERM (Slurm signals the whole process group, and the graceful stop still grades the
  step; the parent kills them on close) and exit on their own once their parent is gone;
- ``map`` is serialised by a lock (async rollouts and evaluation grade from two threads; replies carry no batch id).

Workers are started with the ``spawn`` method so they inherit no state (torch threads, CUDA, locks) from the
trainer. Two consequences: ``fn`` (and ``initializer``) must be picklable by reference, i.e. module-level
functions; and a script that uses the pool needs the ``if __name__ == "__main__":`` guard, because each worker
re-imports the main module (without the guard the worker fails to start and ``map`` raises ``RuntimeError``).
"""

from __future__ import annotations

import atexit
import logging
import math
import multiprocessing
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any, Generic, TypeVar

from nemo_igrpo.rewards.pool_worker import CRASH, OK, READY, worker_main

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

_JOIN_TIMEOUT_S = 5.0  # a SIGKILLed process is reaped within milliseconds; this only bounds a pathological case


@dataclass
class _Worker:
    """The parent's view of one worker process."""

    process: BaseProcess
    conn: Connection
    ready: bool = False  # the start-up handshake has arrived
    started_at: float = 0.0
    attempt: int = 0  # 0: one of the first workers; n >= 1: the n-th try at starting a replacement
    # Positions (in the current batch) of the items sent and not yet answered, in the worker's order; None marks
    # an item that was re-queued for another worker, whose late answer is dropped.
    pending: deque[int | None] = field(default_factory=deque)
    head_since: float = 0.0  # when the worker reached the first pending item
    deadline: float = 0.0  # monotonic time by which that item must be answered

    @property
    def busy(self) -> bool:
        return bool(self.pending)

    @property
    def index(self) -> int | None:
        """Position of the item being graded (None if idle or if that item was re-queued)."""
        return self.pending[0] if self.pending else None

    def start_next(self, now: float, timeout_s: float) -> None:
        self.head_since, self.deadline = now, now + timeout_s

    def take_queued(self) -> list[int]:
        """Hand back the items behind the one being graded (they are marked so that late answers are dropped)."""
        queued = [index for index in list(self.pending)[1:] if index is not None]
        for position in range(1, len(self.pending)):
            self.pending[position] = None
        return queued


class GradingPool(Generic[T, R]):
    """``num_workers`` processes applying ``fn`` to items, each item with a hard ``timeout_s`` deadline.

    ``map`` never raises because of what an item does to a worker: a timed-out, crashed or failing item gets
    ``default`` and is counted in ``timeouts``, ``crashes`` or ``errors``. It raises ``RuntimeError`` only when a
    worker cannot even start (broken ``initializer``, or no handshake within ``startup_timeout_s``): at once for the
    first workers, after ``max_start_retries`` failed tries in a row for a replacement.

    Workers start on the first ``map`` and are reused across calls. ``close`` (also on leaving a ``with`` block and
    at interpreter exit) kills them. ``map`` and ``start`` may be called from several threads; calls run one at a
    time.
    """

    def __init__(
        self,
        fn: Callable[[T], R],
        num_workers: int,
        timeout_s: float,
        *,
        default: R = 0.0,  # type: ignore[assignment]
        initializer: Callable[[], None] | None = None,
        memory_limit_mb: int | None = None,
        startup_timeout_s: float = 60.0,
        max_items_per_message: int = 16,
        steal_after_s: float = 1.0,
        max_start_retries: int = 3,
    ) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.fn = fn
        self.num_workers = num_workers
        self.timeout_s = timeout_s
        self.default = default
        self.initializer = initializer
        self.memory_limit_mb = memory_limit_mb
        self.startup_timeout_s = startup_timeout_s
        self.max_items_per_message = max(1, max_items_per_message)
        # Far above a typical item (milliseconds, or a few hundred on a machine loaded 5x over), below a deadline: only
        # a stalled item triggers re-queuing (a re-queued item may be graded twice, so a low value wastes work).
        self.steal_after_s = steal_after_s
        self.max_start_retries = max_start_retries
        self.start_failures = 0  # replacements that died or stalled while starting (and were retried)
        self._lock = threading.Lock()  # one map (or start) at a time: replies carry no batch identity
        self._context = multiprocessing.get_context("spawn")
        self._workers: list[_Worker] = []
        self._closed = False
        atexit.register(self.close)

    # ----------------------------------------------------------------------------------------------- public API

    def map(self, items: Sequence[T]) -> tuple[list[R], dict[str, int]]:
        """``fn(item)`` for every item, in order, plus ``{"timeouts", "crashes", "errors"}`` counts."""
        results: list[R] = [self.default] * len(items)
        counters = {"timeouts": 0, "crashes": 0, "errors": 0}
        with self._lock:
            if self._closed:
                raise RuntimeError("GradingPool is closed")
            if not items:
                return results, counters
            try:
                if not self._workers:
                    self._workers = [self._start_worker() for _ in range(self.num_workers)]
                self._run(items, results, counters)
            except BaseException:
                # Busy workers would answer items of this batch during the next one (and a start-up failure would
                # recur): an interrupted pool is not reusable.
                self.close()
                raise
        return results, counters

    def start(self) -> None:
        """Start the workers and wait until every one is ready (``map`` otherwise starts them on first use)."""
        no_items: deque[int] = deque()
        with self._lock:
            if self._closed:
                raise RuntimeError("GradingPool is closed")
            try:
                if not self._workers:
                    self._workers = [self._start_worker() for _ in range(self.num_workers)]
                while not all(worker.ready for worker in self._workers):
                    wait(self._watched(), timeout=self._seconds_to_next_event(no_items))
                    for slot in range(len(self._workers)):
                        self._service(slot, no_items, [], {"timeouts": 0, "crashes": 0, "errors": 0})
            except BaseException:
                self.close()
                raise

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Kill all workers. Safe to call more than once; ``map`` raises afterwards."""
        self._closed = True
        for worker in self._workers:
            self._stop(worker)
        self._workers = []
        atexit.unregister(self.close)

    def __enter__(self) -> GradingPool[T, R]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --------------------------------------------------------------------------------------------- worker life

    def _start_worker(self, attempt: int = 0) -> _Worker:
        parent_conn, child_conn = self._context.Pipe(duplex=True)
        process = self._context.Process(
            target=worker_main,
            args=(child_conn, self.fn, self.initializer, self.memory_limit_mb),
            name="grading-worker",
            daemon=True,  # never outlives the trainer, even if close() is skipped
        )
        process.start()
        # Drop our copy of the child's end, so that the worker's death shows up as EOF on parent_conn.
        child_conn.close()
        return _Worker(process=process, conn=parent_conn, started_at=time.monotonic(), attempt=attempt)

    @staticmethod
    def _stop(worker: _Worker) -> None:
        """SIGKILL (no-op if already dead), reap, and release the pipe."""
        if worker.process.is_alive():
            worker.process.kill()
        worker.process.join(_JOIN_TIMEOUT_S)
        if worker.process.exitcode is not None:
            worker.process.close()  # frees the sentinel now rather than at garbage collection
        worker.conn.close()

    def _replace(self, slot: int, attempt: int = 1) -> None:
        self._stop(self._workers[slot])
        self._workers[slot] = self._start_worker(attempt)

    def _on_failed_start(self, slot: int, why: str) -> None:
        """A worker died or stalled before its handshake: nothing from a batch can cause that (fn has not run).
        Raise for the first workers (a broken setup would loop forever) and for a replacement out of retries;
        otherwise count it and try again."""
        worker = self._workers[slot]
        if worker.attempt == 0 or worker.attempt > self.max_start_retries:
            raise RuntimeError(f"grading worker {why}" + (f" ({worker.attempt} tries)" if worker.attempt else ""))
        self.start_failures += 1
        logger.warning("replacement grading worker %s; retrying (%d/%d)", why, worker.attempt, self.max_start_retries)
        self._replace(slot, worker.attempt + 1)

    # ------------------------------------------------------------------------------------------------ the loop

    def _run(self, items: Sequence[T], results: list[R], counters: dict[str, int]) -> None:
        """Until every item is answered or written off: dispatch, sleep until something happens or the next
        deadline passes, then look at every worker."""
        todo = deque(range(len(items)))
        while todo or any(worker.busy for worker in self._workers):
            if self._closed:  # by another thread (the run is ending): without workers this loop would spin
                raise RuntimeError("GradingPool is closed")
            self._dispatch(todo, items)
            wait(self._watched(), timeout=self._seconds_to_next_event(todo))
            for slot in range(len(self._workers)):
                self._service(slot, todo, results, counters)
            self._steal(todo)

    def _dispatch(self, todo: deque[int], items: Sequence[T]) -> None:
        """Hand the next items to ready, idle workers, a share of the queue each (at most
        ``max_items_per_message``); the first item's deadline starts when the message is sent."""
        idle = [slot for slot, worker in enumerate(self._workers) if worker.ready and not worker.busy]
        for position, slot in enumerate(idle):
            if not todo:
                return
            share = math.ceil(len(todo) / (len(idle) - position))
            chunk = [todo.popleft() for _ in range(min(share, self.max_items_per_message))]
            worker = self._workers[slot]
            try:
                worker.conn.send([items[index] for index in chunk])
            except (OSError, ValueError):  # the worker died while idle: retry the items on its replacement
                todo.extendleft(reversed(chunk))
                self._replace(slot)
                continue
            worker.pending = deque(chunk)
            worker.start_next(time.monotonic(), self.timeout_s)

    def _steal(self, todo: deque[int]) -> None:
        """Re-queue the items waiting behind a stalled item, so that idle workers can take them."""
        now = time.monotonic()
        for worker in self._workers:
            if len(worker.pending) > 1 and now - worker.head_since >= self.steal_after_s:
                todo.extendleft(reversed(worker.take_queued()))

    def _watched(self) -> list[Any]:
        """Pipes and process sentinels of workers we are waiting on (busy or still starting)."""
        handles: list[Any] = []
        for worker in self._workers:
            if worker.busy or not worker.ready:
                handles += [worker.conn, worker.process.sentinel]
        return handles

    def _seconds_to_next_event(self, todo: deque[int]) -> float:
        """Time until the earliest item deadline, start-up deadline or re-queuing check (idle workers have none)."""
        events = [worker.deadline for worker in self._workers if worker.busy]
        events += [worker.started_at + self.startup_timeout_s for worker in self._workers if not worker.ready]
        events += [worker.head_since + self.steal_after_s for worker in self._workers
                   if any(index is not None for index in list(worker.pending)[1:])]
        return max(0.0, min(events, default=0.0) - time.monotonic())

    def _service(self, slot: int, todo: deque[int], results: list[R], counters: dict[str, int]) -> None:
        """Take every message a worker has sent, else act on its death or an expired deadline."""
        worker = self._workers[slot]
        if worker.conn.poll():  # replies or a handshake; also true at EOF, which recv turns into EOFError
            while worker.conn.poll():
                try:
                    message = worker.conn.recv()
                except (EOFError, OSError):
                    self._on_death(slot, todo, counters)
                    return
                if isinstance(message, tuple) and message[0] == CRASH:
                    self._on_death(slot, todo, counters, announced=True)
                    return
                self._on_message(worker, message, results, counters)
        elif not worker.process.is_alive():
            self._on_death(slot, todo, counters)
        elif worker.busy and time.monotonic() >= worker.deadline:
            if worker.index is not None:
                logger.warning("grading item %d exceeded %.1fs; killing its worker", worker.index, self.timeout_s)
                counters["timeouts"] += 1
            todo.extendleft(reversed(worker.take_queued()))
            self._replace(slot)
        elif not worker.ready and time.monotonic() >= worker.started_at + self.startup_timeout_s:
            self._on_failed_start(slot, f"did not start within {self.startup_timeout_s:.0f}s")

    def _on_message(self, worker: _Worker, message: Any, results: list[R], counters: dict[str, int]) -> None:
        if message == READY:
            worker.ready = True
            return
        status, value = message
        assert worker.pending, "a reply from a worker that was given no item"
        index = worker.pending.popleft()
        if worker.pending:
            worker.start_next(time.monotonic(), self.timeout_s)
        if index is None:  # re-queued meanwhile: another worker answers it
            return
        if status == OK:
            results[index] = value
        else:
            logger.warning("grading item %d raised %s", index, value)
            counters["errors"] += 1

    def _on_death(self, slot: int, todo: deque[int], counters: dict[str, int], announced: bool = False) -> None:
        """A worker died (or ``announced`` that it is exiting): count its item as a crash, re-queue the items
        behind it, and start a replacement (``_replace`` kills a worker that is still tearing down)."""
        worker = self._workers[slot]
        if not announced:
            worker.process.join(_JOIN_TIMEOUT_S)
        if not worker.ready:
            self._on_failed_start(slot, f"exited during start-up (exit code {worker.process.exitcode})")
            return
        if worker.index is not None:
            logger.warning("grading worker died on item %d (exit code %s)", worker.index, worker.process.exitcode)
            counters["crashes"] += 1
        todo.extendleft(reversed(worker.take_queued()))
        self._replace(slot)

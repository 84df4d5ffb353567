"""Where a step's time goes (``PhaseTimer``) and a rich progress bar for training: step, rewards, held-out accuracy,
seconds per step, ETA."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class TrainingProgress:
    def __init__(self, console: Console, enabled: bool, total: int, start: int):
        self._progress = Progress(
            TextColumn("[bold]step"), MofNCompleteColumn(), BarColumn(), TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console, disable=not enabled)
        self._task = self._progress.add_task("train", total=total, completed=start, status="")
        self._accuracy: float | None = None

    def __enter__(self) -> "TrainingProgress":
        self._progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.__exit__(*exc)

    def update(self, step: int, metrics: dict[str, float]) -> None:
        self._accuracy = metrics.get("eval/accuracy", self._accuracy)
        parts = []
        if "reward/best_draft_mean" in metrics:
            parts.append(f"draft {metrics['reward/draft_mean']:.2f} best {metrics['reward/best_draft_mean']:.2f}")
        parts.append(f"refine {metrics['reward/refinement_mean']:.2f}")
        if self._accuracy is not None:
            parts.append(f"held-out {100 * self._accuracy:.1f}%")
        parts.append(f"{metrics['time/step']:.1f}s/step")
        self._progress.update(self._task, completed=step, status=" · ".join(parts))


class PhaseTimer:
    """``with timer("phase"):`` accumulates wall-clock seconds per phase name."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

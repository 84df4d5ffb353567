"""Problems with verifiable answers: the ``Example`` record, a JSONL loader, and a resumable prompt sampler."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence


@dataclass
class Example:
    """One problem. ``answer`` is the gold final answer as a string; ``solution`` is an optional worked answer."""

    problem: str
    answer: str
    solution: str | None = None
    id: str | None = None


class DatasetError(ValueError):
    """A dataset file that cannot be used; the message says which file and line."""


def load_jsonl(
    path: str | Path,
    problem_key: str = "problem",
    answer_key: str = "answer",
    solution_key: str | None = None,
    id_key: str = "id",
) -> list[Example]:
    """Read one ``Example`` per non-blank line of a JSON-lines file.

    Raises ``DatasetError`` naming the file and 1-based line for malformed JSON, a row that is not an object, or a
    row without a problem/answer, and naming the file when it holds no rows at all. Numeric answers (common in
    math sets, e.g. ``"answer": 42``) become strings. ``solution_key`` and ``id_key`` are optional per row.
    """
    path = Path(path)
    examples = []
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue  # blank lines (typically a trailing newline) are not rows
            where = f"{path}:{line_number}"
            row = _parse_row(line, where)
            examples.append(_example_from_row(row, where, problem_key, answer_key, solution_key, id_key))
    if not examples:
        raise DatasetError(f"{path}: the file contains no examples")
    return examples


def examples_from_rows(
    rows: Iterable[dict[str, Any]],
    source: str,
    problem_key: str = "problem",
    answer_key: str = "answer",
    solution_key: str | None = None,
    id_key: str = "id",
) -> list[Example]:
    """``load_jsonl``'s field mapping for rows that are already parsed (a Parquet file, a Hugging Face dataset).

    Errors name the row as ``source[index]``, with the 0-based index that ``dataset[index]`` would take.
    """
    examples = [_example_from_row(row, f"{source}[{index}]", problem_key, answer_key, solution_key, id_key)
                for index, row in enumerate(rows)]
    if not examples:
        raise DatasetError(f"{source}: the dataset contains no examples")
    return examples


def _parse_row(line: str, where: str) -> dict[str, Any]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        raise DatasetError(f"{where}: malformed JSON ({error.msg})") from None
    if not isinstance(row, dict):
        raise DatasetError(f"{where}: expected a JSON object, got {type(row).__name__}")
    return row


def _example_from_row(
    row: dict[str, Any], where: str, problem_key: str, answer_key: str, solution_key: str | None, id_key: str
) -> Example:
    for key in (problem_key, answer_key):
        if row.get(key) is None:
            raise DatasetError(f"{where}: missing key {key!r}")
    solution = row.get(solution_key) if solution_key else None
    row_id = row.get(id_key)
    return Example(
        problem=str(row[problem_key]),
        answer=str(row[answer_key]),
        solution=None if solution is None else str(solution),
        id=None if row_id is None else str(row_id),
    )


class PromptSampler:
    """Endless, deterministic, shuffled batches of examples.

    Epoch ``e`` visits every example once in the order given by ``random.Random(seed + e)``; a batch that runs off
    the end of an epoch continues into the next one. The whole state is two integers, so a resumed run that loads
    ``state_dict()`` draws exactly the examples the interrupted run would have drawn next.
    """

    def __init__(self, examples: Sequence[Example], seed: int = 0) -> None:
        if not examples:
            raise ValueError("PromptSampler needs at least one example")
        self.examples = list(examples)
        self.seed = seed
        self.epoch = 0
        self.position = 0  # index into the current epoch's order of the next example to hand out
        self._order = self._epoch_order(0)

    def __len__(self) -> int:
        return len(self.examples)

    def next_batch(self, n: int) -> list[Example]:
        """The next ``n`` examples (``n`` may exceed the dataset size: it then spans several epochs)."""
        if n < 0:
            raise ValueError(f"batch size must be non-negative, got {n}")
        batch = []
        while len(batch) < n:
            if self.position == len(self.examples):
                self._start_epoch(self.epoch + 1)
            take = min(n - len(batch), len(self.examples) - self.position)
            batch.extend(self.examples[i] for i in self._order[self.position : self.position + take])
            self.position += take
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= len(self.examples):
            raise ValueError(f"invalid sampler state {state} for a dataset of {len(self.examples)} examples")
        self._start_epoch(epoch)
        self.position = position

    def _start_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.position = 0
        self._order = self._epoch_order(epoch)

    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.examples)))
        random.Random(self.seed + epoch).shuffle(order)
        return order

"""Named training sets, used as ``data.train: preset:NAME``: where each lives on the hub and how a row becomes an
``Example``.

The paper trains on MATH train (7.5k problems) for its main table, AceReason-Math for its strongest run and
OpenR1-Math (94k) for one 14B run; DAPO-Math-17k is the usual training set of the DAPO wrapper. This module only
describes the sets and maps rows; ``nemo_igrpo.data.sources.load_preset`` reads them (from the hub, or from a local
copy given as a path).

Field names were checked against the datasets' cards and public loaders; a row missing one raises ``DatasetError``
naming the row, so schema drift upstream fails loudly instead of training on empty strings.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

from nemo_igrpo.data.dataset import DatasetError, Example
from nemo_igrpo.rewards.answer import extract_boxed

log = logging.getLogger(__name__)

Row = Mapping[str, Any]


class RowError(ValueError):
    """A row that does not fit its preset's schema; the preset loader adds which dataset and row."""


@dataclass(frozen=True)
class Preset:
    """A hub dataset (name, config, split), the columns read from it, and its row → ``Example`` mapping."""

    hub_name: str
    config_name: str | None
    split: str
    columns: tuple[str, ...]  # read only these: some sets carry gigabytes of reasoning traces we never use
    to_example: Callable[[Row], Example | None]  # None: the row has no usable answer and is skipped
    deduplicate: bool = False  # keep the first row of each distinct problem text

    def examples(self, rows: Iterable[Row], source: str) -> list[Example]:
        """Map ``rows`` to examples, skipping unusable rows (count logged) and, if asked, repeated problems."""
        examples, skipped = [], 0
        for index, row in enumerate(rows):
            try:
                example = self.to_example(row)
            except RowError as error:
                raise DatasetError(f"{source}[{index}]: {error}") from None
            if example is None:
                skipped += 1
            else:
                examples.append(example)
        if skipped:
            log.warning("%s: skipped %d rows without a usable answer", source, skipped)
        if self.deduplicate:
            examples = deduplicate(examples, source)
        if not examples:
            raise DatasetError(f"{source}: the dataset contains no usable examples")
        return examples


def deduplicate(examples: list[Example], source: str) -> list[Example]:
    """The first example of each distinct problem text, in order (the count of dropped repeats is logged)."""
    first: dict[str, Example] = {}
    for example in examples:
        first.setdefault(example.problem, example)  # dicts keep insertion order: the order of first occurrence
    unique = list(first.values())
    if len(unique) < len(examples):
        log.info("%s: dropped %d repeated problems, %d unique remain", source, len(examples) - len(unique), len(unique))
    return unique


# ---------------------------------------------------------------------------------------------- row mappings


def math_row(row: Row) -> Example | None:
    """MATH (Hendrycks et al.): the gold answer is the last ``\\boxed{}`` of the reference solution."""
    solution = _text(row, "solution")
    answer = extract_boxed(solution)
    if not answer:  # a handful of MATH solutions state the answer without \boxed{}: no verifiable gold, skip
        return None
    return Example(problem=_text(row, "problem"), answer=answer, solution=solution)


def problem_answer_row(row: Row) -> Example | None:
    """Sets that already give ``problem`` and a short ``answer`` (AceReason-Math, OpenR1-Math)."""
    answer = _text(row, "answer").strip()
    return Example(problem=_text(row, "problem"), answer=answer) if answer else None


# DAPO-Math-17k wraps every problem in an instruction to end with "Answer: ..."; our prompt template asks for
# \boxed{} instead, so the wrapper is removed and the bare problem kept (which also makes duplicates comparable).
DAPO_PREFIX = ("Solve the following math problem step by step. The last line of your response should be of the form "
               "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n")
DAPO_SUFFIX = '\n\nRemember to put your answer on its own line after "Answer:".'


def dapo_row(row: Row) -> Example | None:
    """DAPO-Math-17k: the problem is the user turn of the chat-format ``prompt``, the answer
    ``reward_model.ground_truth``."""
    messages = row.get("prompt")
    if not isinstance(messages, list):
        raise RowError(f"field 'prompt' should be a list of chat messages, got {type(messages).__name__}")
    user = [m.get("content") for m in messages if isinstance(m, Mapping) and m.get("role") == "user"]
    if not user or not isinstance(user[0], str):
        raise RowError("field 'prompt' has no user message")
    reward_model = row.get("reward_model")
    if not isinstance(reward_model, Mapping) or reward_model.get("ground_truth") is None:
        raise RowError("missing field 'reward_model.ground_truth'")
    answer = str(reward_model["ground_truth"]).strip()
    return Example(problem=strip_dapo_instructions(user[0]), answer=answer) if answer else None


def strip_dapo_instructions(text: str) -> str:
    """The problem inside DAPO's "Solve the following…" wrapper (text without the wrapper is returned as is)."""
    text = text.removeprefix(DAPO_PREFIX).removesuffix(DAPO_SUFFIX)
    return text.strip()


def _text(row: Row, key: str) -> str:
    value = row.get(key)
    if value is None:
        raise RowError(f"missing field {key!r}")
    return str(value)


# ---------------------------------------------------------------------------------------------- the presets


PRESETS: dict[str, Preset] = {
    # MATH train, 7,500 problems (the paper's main training set), all seven subjects in one config.
    "math_train": Preset("DigitalLearningGmbH/MATH-lighteval", "default", "train", ("problem", "solution"),
                         math_row),
    # ~49.6k problems (NuminaMath + DeepScaleR) with short verified answers; the paper used ~9.4k of them.
    "acereason_math": Preset("nvidia/AceReason-Math", None, "train", ("problem", "answer"), problem_answer_row),
    # ~1.79M rows but ~17.4k distinct problems: the upstream file repeats each ~100 times (BytedTsinghua-SIA/DAPO#36).
    "dapo_math_17k": Preset("BytedTsinghua-SIA/DAPO-Math-17k", None, "train", ("prompt", "reward_model"), dapo_row,
                            deduplicate=True),
    # The "default" config: 93.7k problems (the paper's "OpenR1-Math (94k)"); "extended" adds 131k easier ones.
    "openr1_math": Preset("open-r1/OpenR1-Math-220k", "default", "train", ("problem", "answer"), problem_answer_row),
}


def get_preset(name: str) -> Preset:
    """The preset called ``name``; an unknown name raises ``DatasetError`` listing the known ones."""
    if name not in PRESETS:
        raise DatasetError(f"unknown dataset preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]

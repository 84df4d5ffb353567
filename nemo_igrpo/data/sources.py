"""Turn ``data.train`` / ``data.eval`` strings into examples: the built-in arithmetic task or a JSONL file."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Literal

from nemo_igrpo.config import DataConfig
from nemo_igrpo.data.arithmetic import arithmetic_train_and_heldout
from nemo_igrpo.data.dataset import DatasetError, Example, load_jsonl

log = logging.getLogger(__name__)

BUILTIN_ARITHMETIC = "builtin:arithmetic"


def load_examples(source: str, config: DataConfig, split: Literal["train", "eval"]) -> list[Example]:
    """Examples of ``source``; for the built-in task, ``split`` picks its training or held-out part."""
    if source == BUILTIN_ARITHMETIC:
        a = config.arithmetic
        train, heldout = arithmetic_train_and_heldout(a.num_train, a.num_heldout, a.seed, a.max_operand,
                                                      a.unboxed_fraction)
        return train if split == "train" else heldout
    path = Path(source)
    if path.suffix == ".jsonl":
        return load_jsonl(path, problem_key=config.problem_key, answer_key=config.answer_key,
                          solution_key=config.solution_key)
    raise DatasetError(f"data.{split}: unsupported source {source!r} (expected {BUILTIN_ARITHMETIC} or a .jsonl file)")


def drop_long_prompts(examples: list[Example], prompt_length: Callable[[str], int], limit: int,
                      where: str) -> list[Example]:
    """Drop problems whose rendered prompt exceeds ``limit`` tokens, logging the count; error if none remain."""
    kept = [e for e in examples if prompt_length(e.problem) <= limit]
    if len(kept) < len(examples):
        log.warning("%s: dropped %d of %d prompts longer than data.max_prompt_tokens=%d",
                    where, len(examples) - len(kept), len(examples), limit)
    if not kept:
        raise DatasetError(f"{where}: every prompt is longer than data.max_prompt_tokens={limit}")
    return kept

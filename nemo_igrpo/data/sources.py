"""Turn ``data.train`` / ``data.eval`` strings into examples.

A source is one of:

* ``builtin:arithmetic``: the generated task (``split`` picks its training or held-out part);
* ``builtin:chain``: the generated multi-step task (``nemo_igrpo.data.chain``; 2-4 operations by default, set by
  ``data.arithmetic.min_steps`` / ``max_steps``), split as ``builtin:arithmetic``;
* ``PATH.jsonl`` or ``PATH.parquet``: one problem per row, fields named by ``data.problem_key``, ``data.answer_key``
  and ``data.solution_key`` (an ``id`` field is kept when present);
* a folder: one written by ``datasets``' ``save_to_disk`` (of a ``DatasetDict``, the split named by
  ``data.train_split`` / ``data.eval_split`` is used), or a folder of data files that ``datasets.load_dataset`` reads;
* ``hf:NAME`` or ``hf:NAME@SPLIT``: a Hugging Face dataset, by hub name (downloaded only because a user named it)
  or local folder; without ``@SPLIT`` the split is ``data.train_split`` / ``data.eval_split``;
* ``preset:NAME``: a known training set with its own hub name, split and field mapping
  (``nemo_igrpo.data.presets``); the ``data.*_key`` and ``data.*_split`` settings do not apply to it.

Parquet needs ``pyarrow`` and the ``datasets``-backed sources need ``datasets`` (``pip install datasets``, which
brings ``pyarrow``). Both are imported only when such a source is used, so the built-in task and JSONL need neither.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Literal

from nemo_igrpo.data.arithmetic import arithmetic_train_and_heldout
from nemo_igrpo.data.chain import chain_train_and_heldout
from nemo_igrpo.data.dataset import DatasetError, Example, examples_from_rows, load_jsonl
from nemo_igrpo.data.presets import get_preset

if TYPE_CHECKING:  # annotations only: data sits below the config and must not import it (import cycles)
    from nemo_igrpo.config import DataConfig

log = logging.getLogger(__name__)

BUILTIN_ARITHMETIC = "builtin:arithmetic"
BUILTIN_CHAIN = "builtin:chain"
HF_PREFIX = "hf:"
PRESET_PREFIX = "preset:"

_BATCH_ROWS = 8192  # rows converted from Arrow to Python at a time: bounded memory, ~5x faster than row by row

Row = dict[str, Any]


def load_examples(source: str, config: DataConfig, split: Literal["train", "eval"]) -> list[Example]:
    """Examples of ``source`` (see the module docstring); ``split`` says whether it is ``data.train`` or
    ``data.eval``, which picks the built-in task's part and the default split of ``datasets`` sources."""
    if source == BUILTIN_ARITHMETIC:
        a = config.arithmetic
        train, heldout = arithmetic_train_and_heldout(a.num_train, a.num_heldout, a.seed, a.max_operand,
                                                      a.unboxed_fraction)
        return train if split == "train" else heldout
    if source == BUILTIN_CHAIN:
        a = config.arithmetic
        try:
            train, heldout = chain_train_and_heldout(a.num_train, a.num_heldout, a.seed, a.max_operand, a.min_steps,
                                                     a.max_steps, a.unboxed_fraction)
        except ValueError as error:  # e.g. min_steps > max_steps: name the keys
            raise DatasetError(f"data.{split}: {BUILTIN_CHAIN} with data.arithmetic.*: {error}") from None
        return train if split == "train" else heldout
    if source.startswith(PRESET_PREFIX):
        return load_preset(source.removeprefix(PRESET_PREFIX))

    keys = dict(problem_key=config.problem_key, answer_key=config.answer_key, solution_key=config.solution_key)
    default_split = config.train_split if split == "train" else config.eval_split
    columns = Columns(required=(config.problem_key, config.answer_key), optional=(config.solution_key, "id"),
                      hint="set data.problem_key / data.answer_key to the right ones")
    if source.startswith(HF_PREFIX):
        name, hf_split = parse_hf_source(source)
        rows = _hf_rows(name, hf_split or default_split, None, columns, source)
    elif Path(source).suffix == ".jsonl":
        return load_jsonl(source, **keys)
    elif Path(source).suffix == ".parquet" or Path(source).is_dir():
        rows = _local_rows(Path(source), default_split, columns, source)
    else:
        raise DatasetError(f"data.{split}: unsupported source {source!r} (expected {BUILTIN_ARITHMETIC}, "
                           f"{BUILTIN_CHAIN}, a .jsonl or .parquet file, a datasets folder, {HF_PREFIX}NAME[@SPLIT] "
                           f"or {PRESET_PREFIX}NAME)")
    return examples_from_rows(rows, source, **keys)


def load_preset(name: str, path: str | Path | None = None) -> list[Example]:
    """The examples of preset ``name``, read from its hub dataset, or from ``path``: a local copy with the hub
    set's columns (a .parquet file or a datasets folder), e.g. on a machine without network access, or in tests."""
    preset = get_preset(name)
    columns = Columns(required=preset.columns, hint=f"preset {name} expects the columns of {preset.hub_name}")
    if path is None:
        source = f"{PRESET_PREFIX}{name} ({preset.hub_name})"
        rows = _hf_rows(preset.hub_name, preset.split, preset.config_name, columns, source)
    else:
        source = str(path)
        rows = _local_rows(Path(path), preset.split, columns, source)
    return preset.examples(rows, source)


def parse_hf_source(source: str) -> tuple[str, str | None]:
    """``hf:NAME@SPLIT`` → (NAME, SPLIT); ``hf:NAME`` → (NAME, None)."""
    body = source.removeprefix(HF_PREFIX)
    if "@" not in body:
        return body, None
    name, _, split = body.rpartition("@")
    return name, split


# ---------------------------------------------------------------------------------------------- readers


@dataclass(frozen=True)
class Columns:
    """The columns a loader reads: ``required`` ones must exist; ``optional`` ones (None entries ignored) are read
    when present. Reading only these matters: some sets carry gigabytes of columns we never use."""

    required: tuple[str, ...]
    optional: tuple[str | None, ...] = ()
    hint: str = ""  # what to do when a required column is missing

    def select(self, available: Iterable[str], source: str) -> list[str]:
        available = list(available)
        for name in self.required:
            if name not in available:
                raise DatasetError(f"{source}: no column {name!r} (columns: {', '.join(available)}); {self.hint}")
        return [*self.required, *(name for name in self.optional if name and name in available)]


def _local_rows(path: Path, split: str, columns: Columns, source: str) -> Iterator[Row]:
    """Rows of a local .parquet file or datasets folder."""
    if path.suffix == ".parquet":
        return _parquet_rows(path, columns, source)
    if path.is_dir():
        return _hf_rows(str(path), split, None, columns, source)
    raise DatasetError(f"{source}: expected a .parquet file or a datasets folder")


def _parquet_rows(path: Path, columns: Columns, source: str) -> Iterator[Row]:
    pyarrow = _optional_import("pyarrow", "reading .parquet files")
    parquet = _optional_import("pyarrow.parquet", "reading .parquet files")
    try:
        file = parquet.ParquetFile(path)
    except pyarrow.ArrowInvalid as error:
        raise DatasetError(f"{source}: not a readable Parquet file ({error})") from None
    names = columns.select(file.schema_arrow.names, source)
    return _python_rows(file.iter_batches(batch_size=_BATCH_ROWS, columns=names))


def _hf_rows(name: str, split: str, config_name: str | None, columns: Columns, source: str) -> Iterator[Row]:
    dataset = _open_hf_dataset(name, split, config_name, source)
    names = columns.select(dataset.column_names, source)
    return _python_rows(dataset.select_columns(names).with_format("arrow").iter(batch_size=_BATCH_ROWS))


def _open_hf_dataset(name: str, split: str, config_name: str | None, source: str) -> Any:
    """A ``datasets.Dataset``: ``load_from_disk`` for a ``save_to_disk`` folder, else ``load_dataset`` (a hub name
    or a folder of data files)."""
    datasets = _optional_import("datasets", f"reading {source}")
    folder = Path(name)
    if (folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file():  # save_to_disk's markers
        loaded = datasets.load_from_disk(str(folder))
        if not isinstance(loaded, datasets.DatasetDict):
            return loaded  # a single saved split is the data, whatever split was asked for
        if split not in loaded:
            raise DatasetError(f"{source}: no split {split!r} (splits: {', '.join(loaded)})")
        return loaded[split]
    try:
        return datasets.load_dataset(name, config_name, split=split)
    except ValueError as error:  # e.g. an unknown split or config; hub/network errors keep their own types
        raise DatasetError(f"{source}: {error}") from error


def _python_rows(batches: Iterable[Any]) -> Iterator[Row]:
    """Rows of Arrow record batches or tables, as dicts."""
    for batch in batches:
        yield from batch.to_pylist()


def _optional_import(module: str, purpose: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"{purpose} needs the optional dependency {module.split('.')[0]!r}: "
                          f"pip install datasets (which also installs pyarrow)") from None


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

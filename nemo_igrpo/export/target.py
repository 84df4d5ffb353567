"""Writing an export safely: refuse an existing target unless asked, stage beside it, rename into place."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from nemo_igrpo.export.source import ExportError


def _looks_like(path: Path, fmt: str) -> bool:
    """Whether ``path`` is an earlier export of ``fmt`` (the only thing --overwrite may delete)."""
    if fmt == "hf":
        return path.is_dir() and (path / "config.json").is_file()
    if fmt == "nemo2":
        return path.is_dir() and (path / "context").is_dir() and (path / "weights").is_dir()
    return path.is_file() and path.suffix == ".nemo"


def check_target(output: Path, fmt: str, overwrite: bool) -> None:
    """Raise ExportError if writing ``output`` would replace something it must not."""
    if fmt == "nemo" and output.suffix != ".nemo":
        raise ExportError(f"--output: a .nemo archive's name must end in .nemo, got {output}")
    if not output.exists() and not output.is_symlink():
        return
    if output.is_dir() and not any(output.iterdir()):
        return  # an empty folder holds nothing to lose
    if not overwrite:
        raise ExportError(f"{output} already exists; pass --overwrite to replace it")
    if not _looks_like(output, fmt):
        what = {"hf": "a Hugging Face folder (config.json)", "nemo2": "a NeMo 2 checkpoint (context/, weights/)",
                "nemo": "a .nemo file"}[fmt]
        raise ExportError(f"{output} exists and is not {what}; not replacing it even with --overwrite")


@contextmanager
def staged(output: Path, fmt: str, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary path beside ``output``; on success it replaces ``output`` (old one removed only after the
    rename), on failure it is deleted and ``output`` is untouched."""
    check_target(output, fmt, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    _remove(staging)
    try:
        yield staging
        if output.exists() and not (output.is_dir() and not any(output.iterdir())):
            old = output.with_name(f".{output.name}.old-{os.getpid()}")
            _remove(old)
            os.replace(output, old)
            os.replace(staging, output)
            _remove(old)
        else:
            if output.is_dir():
                output.rmdir()
            os.replace(staging, output)
    except BaseException:
        _remove(staging)
        raise


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()

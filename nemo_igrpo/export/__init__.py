"""``nemo-igrpo export``: a run's policy as a Hugging Face folder, a NeMo 2 checkpoint directory or a ``.nemo`` file.

The source is a run directory (its ``final/`` model when the run finished, else its newest complete checkpoint), one
checkpoint directory (``<run>/checkpoints/step_N``, HF or Megatron backend), or a Hugging Face model folder. Every
format is written into a temporary sibling of the target and renamed into place once complete; an existing target
is replaced only with ``overwrite`` and only if it looks like an earlier export of the same format.
"""

from __future__ import annotations

from pathlib import Path

from nemo_igrpo.export.source import ExportError, SourceModel, load_source

FORMATS = ("hf", "nemo2", "nemo")

__all__ = ["FORMATS", "ExportError", "SourceModel", "export", "load_source"]


def export(source: str | Path, fmt: str, output: str | Path, overwrite: bool = False) -> Path:
    """Export the policy of ``source`` to ``output`` in format ``fmt`` (one of FORMATS); returns ``output``."""
    from nemo_igrpo.export.target import check_target

    if fmt not in FORMATS:
        raise ExportError(f"--format: {fmt!r} is not one of {', '.join(FORMATS)}")
    output = Path(output)
    check_target(output, fmt, overwrite)  # before the (slow) load, so a refusal is immediate
    loaded = load_source(Path(source))
    if fmt == "hf":
        from nemo_igrpo.export.hf import export_hf

        export_hf(loaded, output, overwrite)
    elif fmt == "nemo2":
        from nemo_igrpo.export.nemo import export_nemo2

        export_nemo2(loaded, output, overwrite)
    else:
        from nemo_igrpo.export.nemo import export_nemo_archive

        export_nemo_archive(loaded, output, overwrite)
    return output

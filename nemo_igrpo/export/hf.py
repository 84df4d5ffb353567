"""Export as a Hugging Face folder: safetensors weights, config.json, generation config and tokenizer files."""

from __future__ import annotations

from pathlib import Path

from nemo_igrpo.export.source import SourceModel
from nemo_igrpo.export.target import staged


def export_hf(source: SourceModel, output: Path, overwrite: bool = False) -> None:
    with staged(output, "hf", overwrite) as staging:
        staging.mkdir()
        source.model.save_pretrained(staging)  # safetensors; tied weights stored once
        source.tokenizer.save_pretrained(staging)

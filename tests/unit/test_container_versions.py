"""The NGC images the Dockerfile builds on, against the package's version ranges, without the images.

docs/launch.md records, per image tag, the Python, torch, vLLM and transformers it ships (NVIDIA's release notes)
and whether our ranges admit them. These tests recompute that verdict from pyproject.toml (and megatron-core's own
torch requirement), check that the Dockerfile's default base image has a row, and that the supported vLLM range is
one range everywhere. tests/integration/test_container_resolution.py then asks pip to resolve the install itself.
"""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from nemo_igrpo.generation.vllm import SUPPORTED_VLLM, UnsupportedVLLMError, check_vllm_version

REPO = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
COLUMNS = ["image", "python", "torch", "vllm", "transformers", "transformer engine", "admitted"]


def dockerfile_args() -> dict[str, str]:
    """The Dockerfile's ``ARG NAME=default`` values."""
    text = (REPO / "Dockerfile").read_text()
    return dict(re.findall(r"^ARG\s+(\w+)=(\S+)\s*$", text, flags=re.MULTILINE))


def image_table() -> dict[str, dict[str, str]]:
    """docs/launch.md's image table: image tag -> {column: cell}, with backticks and notes in brackets removed."""
    lines = (REPO / "docs" / "launch.md").read_text().splitlines()
    header = next(i for i, line in enumerate(lines)
                  if [c.strip().lower() for c in line.strip().strip("|").split("|")] == COLUMNS)
    rows = {}
    for line in lines[header + 2:]:
        if not line.startswith("|"):
            break
        cells = [re.sub(r"\(.*?\)", "", c).replace("`", "").strip() for c in line.strip().strip("|").split("|")]
        rows[cells[0]] = dict(zip(COLUMNS, cells))
    return rows


def requirement(name: str, extra: str | None = None) -> Requirement:
    """The package's requirement on ``name``: from the core dependencies, or from ``extra``."""
    listed = PROJECT["optional-dependencies"][extra] if extra else PROJECT["dependencies"]
    found = [Requirement(r) for r in listed if Requirement(r).name == name]
    assert len(found) == 1, (name, extra, listed)
    return found[0]


def installed_megatron_torch() -> SpecifierSet | None:
    """megatron-core's own torch requirement (from the installed wheel's metadata), if it is installed."""
    try:
        requires = metadata.requires("megatron-core") or []
    except metadata.PackageNotFoundError:
        return None
    torch = [Requirement(r) for r in requires if Requirement(r).name == "torch" and Requirement(r).marker is None]
    return torch[0].specifier if torch else SpecifierSet()


def admits(row: dict[str, str]) -> dict[str, bool]:
    """Whether each of our ranges admits the row's version. The NGC torch is a pre-release build (2.15.0a0): pip
    accepts an installed pre-release (it keeps it), hence ``prereleases=True``; local labels (+nv…) do not count."""
    def within(specifier: SpecifierSet, version: str) -> bool:
        return specifier.contains(Version(version).public, prereleases=True)

    verdict = {
        "python": within(SpecifierSet(PROJECT["requires-python"]), row["python"]),
        "torch": within(requirement("torch").specifier, row["torch"]),
        "transformers": within(requirement("transformers").specifier, row["transformers"]),
    }
    if row["vllm"] not in ("", "-", "no"):
        verdict["vllm"] = within(requirement("vllm", "vllm").specifier, row["vllm"])
    megatron_torch = installed_megatron_torch()
    if megatron_torch is not None:
        verdict["megatron-core torch"] = within(megatron_torch, row["torch"])
    return verdict


def test_the_dockerfiles_default_image_has_a_row():
    table = image_table()
    assert dockerfile_args()["BASE_IMAGE"] in table, (dockerfile_args(), sorted(table))


@pytest.mark.parametrize("image", sorted(image_table()))
def test_the_admitted_column_is_what_our_ranges_say(image):
    row = image_table()[image]
    verdict = admits(row)
    expected = "yes" if all(verdict.values()) else "no"
    assert row["admitted"] == expected, (image, verdict)


def test_the_default_image_is_admitted():
    """The Dockerfile must build on its default image: every range admits what that image ships."""
    verdict = admits(image_table()[dockerfile_args()["BASE_IMAGE"]])
    assert all(verdict.values()), verdict


def test_a_range_that_leaves_out_the_images_vllm_is_caught(monkeypatch):
    """The check has teeth: the old `vllm>=0.32,<0.33` extra does not admit the 26.10 image's vLLM 0.31.0."""
    extras = {**PROJECT["optional-dependencies"], "vllm": ["vllm>=0.32,<0.33"]}
    monkeypatch.setitem(PROJECT, "optional-dependencies", extras)
    assert admits(image_table()["nvcr.io/nvidia/vllm:26.10-py3"])["vllm"] is False


def test_the_supported_vllm_range_is_the_extras_range_and_the_docs():
    assert str(requirement("vllm", "vllm").specifier) == str(SpecifierSet(SUPPORTED_VLLM))
    assert f"vllm{SUPPORTED_VLLM}" in (REPO / "docs" / "vllm.md").read_text()


@pytest.mark.parametrize("version", ["0.31.0", "0.31.1", "0.32.0", "0.32.0+cpu", "0.31.0+nv26.10", "0.32.1.dev3+g1a"])
def test_supported_vllm_versions_pass(version):
    assert check_vllm_version(version) == version


@pytest.mark.parametrize("version", ["0.30.1", "0.33.0", "0.33.0rc1", "1.0.0", "not-a-version"])
def test_an_unsupported_vllm_fails_naming_the_range(version):
    with pytest.raises(UnsupportedVLLMError, match=re.escape(f"vLLM {version} is not supported: nemo-igrpo needs "
                                                             f"vllm{SUPPORTED_VLLM}")):
        check_vllm_version(version)

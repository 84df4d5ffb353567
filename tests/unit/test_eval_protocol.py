"""`eval.protocol`: the paper's benchmarks, k and sampling; the avg@k interval; an end-to-end protocol run."""

from __future__ import annotations

import hashlib
import json
import math
import re
import subprocess
from pathlib import Path

import pytest

from nemo_igrpo.cli import main as cli_main
from nemo_igrpo.config import ConfigError, EvalConfig, load_config
from nemo_igrpo.evaluation.metrics import avg_at_k_ci95, markdown_table
from nemo_igrpo.evaluation.protocols import PAPER, EvalRun, dataset_name, packaged_benchmarks, plan_runs
from nemo_igrpo.models import load_model, load_tokenizer

REPO = Path(__file__).resolve().parents[2]
BENCHMARKS = packaged_benchmarks()  # shipped inside the package (a user's clone has nothing beside it)

TINY_MODEL = ["model.tiny.hidden_size=64", "model.tiny.intermediate_size=128", "model.tiny.num_layers=2",
              "model.tiny.num_heads=2", "model.tiny.num_kv_heads=1", "generation.max_new_tokens=12",
              "trainer.progress=false", "trainer.loggers=[]"]


def paper(**overrides) -> EvalConfig:
    return EvalConfig(protocol="paper", **overrides)  # no eval.benchmarks_dir: the packaged files


# ---------------------------------------------------------------------------------------------- the protocol


def test_paper_protocol_k_and_sampling():
    runs = plan_runs(paper(), default_source="builtin:arithmetic")
    assert {run.name: run.samples for run in runs} == {
        "aime24": 64, "aime25": 64, "math500": 8, "amc23": 8, "gsm8k": 8, "minerva": 8}
    assert all((run.temperature, run.top_p) == (0.6, 0.95) for run in runs)
    assert [Path(run.source).name for run in runs] == [
        "aime24.jsonl", "aime25.jsonl", "math500.jsonl", "amc23.jsonl", "gsm8k_test.jsonl", "minerva_math.jsonl"]
    assert all(Path(run.source).parent == BENCHMARKS for run in runs)


def test_subsets_caps_and_what_samples_per_problem_means():
    # eval.datasets picks benchmarks by name, file stem or path, in the order given; samples_per_problem is not k.
    runs = plan_runs(paper(datasets=["gsm8k_test", str(BENCHMARKS / "aime25.jsonl")], samples_per_problem=3), None)
    assert [(r.name, r.samples, r.source) for r in runs] == [
        ("gsm8k", 8, str(BENCHMARKS / "gsm8k_test.jsonl")), ("aime25", 64, str(BENCHMARKS / "aime25.jsonl"))]
    capped = plan_runs(paper(datasets=["aime24", "math500"], max_samples_per_problem=10), None)
    assert [r.samples for r in capped] == [10, 8]  # a cap only lowers k
    # Without a protocol the runs are exactly the old ones: eval.datasets (default data.eval) at samples_per_problem.
    assert plan_runs(EvalConfig(samples_per_problem=2, temperature=1.0), "builtin:arithmetic") == [
        EvalRun("arithmetic", "builtin:arithmetic", 2, 1.0, 0.95)]
    assert plan_runs(EvalConfig(samples_per_problem=4, max_samples_per_problem=2), "x.jsonl")[0].samples == 2


@pytest.mark.parametrize("config, error, message", [
    (paper(temperature=1.0), ConfigError, "eval.temperature: 1.0 conflicts with eval.protocol=paper"),
    (paper(top_p=1.0), ConfigError, "eval.top_p: 1.0 conflicts"),
    (EvalConfig(protocol="papr"), ConfigError, "eval.protocol: 'papr' is not one of paper"),
    (paper(datasets=["olympiadbench"]), ConfigError, "'olympiadbench' is not a benchmark of eval.protocol=paper"),
    (paper(max_samples_per_problem=0), ConfigError, "eval.max_samples_per_problem: must be >= 1"),
    (EvalConfig(protocol="paper", benchmarks_dir="/nonexistent"), FileNotFoundError, "/nonexistent/aime24.jsonl"),
    (EvalConfig(), ConfigError, "eval.datasets: nothing to evaluate"),
])
def test_protocol_mistakes_are_rejected_by_key(config, error, message):
    with pytest.raises(error, match=re.escape(message)):
        plan_runs(config, None)


def test_packaged_benchmarks_match_their_manifest():
    """The shipped copies are the recorded ones: every row, byte for byte (sha256 from the manifest)."""
    manifest = json.loads((BENCHMARKS / "MANIFEST.json").read_text())
    assert {entry["name"] for entry in manifest} >= {Path(b.file).stem for b in PAPER.benchmarks}
    for entry in manifest:
        data = (BENCHMARKS / f"{entry['name']}.jsonl").read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]
        assert len(data.splitlines()) == entry["rows"]
        assert entry["repo"] in (BENCHMARKS / "README.md").read_text()  # each source named beside the files


def test_nothing_reads_the_workplace_shared_folder():
    """A user's clone has no shared folder beside it: no file of the project may refer to one."""
    pattern = re.compile(r"\.\./shared|[\"'/]shared[\"']?\s*/\s*[\"']?data|parent\s*/\s*[\"']shared")
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split()  # tracked + new, not ignored
    offenders = []
    for name in listed:
        path = REPO / name
        if path.suffix in {".py", ".md", ".yaml", ".sh", ".toml", ".sbatch", ".txt", ".cfg"} and path.is_file():
            offenders += [f"{name}: {m.group(0)}" for m in pattern.finditer(path.read_text(errors="replace"))]
    assert offenders == []


def test_dataset_names_are_file_safe():
    assert [dataset_name(s) for s in ["a/b/math500.jsonl", "builtin:arithmetic", "hf:org/set@test", "d/x.parquet",
                                      "preset:math_train", "data/folder"]] == [
        "math500", "arithmetic", "org_set@test", "x", "math_train", "folder"]
    assert PAPER.benchmark("minerva_math").name == "minerva"


# ---------------------------------------------------------------------------------------------- the interval


def test_avg_at_k_interval_hand_values():
    # Per-problem accuracies 1, 1/2, 0: mean 1/2, s = 1/2 (ddof 1), half-width 1.96 * 0.5 / sqrt(3) = 0.565803...
    assert avg_at_k_ci95([[True, True], [True, False], [False, False]]) == pytest.approx(0.5658032638058333)
    # Accuracies 3/4, 1/4, 1/2, 1/2: mean 1/2, s^2 = (1/16 + 1/16 + 0 + 0) / 3 = 1/24, half-width 1.96 / sqrt(96)
    correct = [[True, True, True, False], [True, False, False, False], [True, True, False, False],
               [False, True, False, True]]
    assert avg_at_k_ci95(correct) == pytest.approx(1.96 / math.sqrt(96))
    assert avg_at_k_ci95([[True, False], [False, True]]) == 0.0  # no spread between problems
    with pytest.raises(ValueError, match="at least 2 problems"):
        avg_at_k_ci95([[True, False]])


def test_markdown_table_shows_intervals():
    table = markdown_table({"aime24 (k=64)": {"avg@k": 0.5, "pass@1": 0.5}, "gsm8k (k=8)": {"avg@k": 0.25}},
                           {"aime24 (k=64)": {"avg@k": 0.0565803}})
    assert table.splitlines()[2:] == ["| aime24 (k=64) | 50.00 ± 5.66 | 50.00 |", "| gsm8k (k=8) | 25.00 | - |"]


# ---------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The built-in tiny Llama and its character tokenizer saved as an HF folder (random weights: the test checks
    the protocol's plumbing, not accuracy, so no training step is needed)."""
    config = load_config(REPO / "conf" / "quickstart.yaml", TINY_MODEL)
    tokenizer = load_tokenizer(config.model)
    folder = tmp_path_factory.mktemp("tiny_model")
    load_model(config.model, tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_eval_command_runs_the_paper_protocol(tiny_model_dir, tmp_path, single_thread):
    out = tmp_path / "eval"
    code = cli_main(["eval", *TINY_MODEL, f"eval.model={tiny_model_dir}", "eval.protocol=paper",
                     "eval.datasets=[aime24,math500]", "eval.num_problems=2",
                     "eval.max_samples_per_problem=9", f"eval.output_dir={out}"])
    assert code == 0
    report = json.loads((out / "results.json").read_text())
    assert (report["protocol"], report["temperature"], report["top_p"]) == ("paper", 0.6, 0.95)
    assert report["max_new_tokens"] == 12  # the budget comes from the config, not the protocol
    assert report["benchmarks"]["aime24"] == {"source": str(BENCHMARKS / "aime24.jsonl"), "samples_per_problem": 9}
    assert report["benchmarks"]["math500"]["samples_per_problem"] == 8  # below the cap: the protocol's k
    results = report["results"]
    assert set(results["aime24"]) == {"avg@9", "avg@9_ci95", "pass@1", "pass@2", "pass@4", "pass@8", "problems",
                                     "no_answer"}
    assert set(results["math500"]) == {"avg@8", "avg@8_ci95", "pass@1", "pass@2", "pass@4", "pass@8", "problems",
                                      "no_answer"}
    assert results["math500"]["problems"] == 2

    records = [json.loads(line) for line in (out / "aime24.samples.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(len(r["completions"]) == len(r["extracted"]) == len(r["correct"]) == 9
                                     for r in records)
    assert results["aime24"]["avg@9_ci95"] == pytest.approx(avg_at_k_ci95([r["correct"] for r in records]))

    markdown = (out / "results.md").read_text()
    assert "Protocol `paper`: temperature 0.6, top-p 0.95, at most 12 new tokens" in markdown
    assert "not comparable with full-protocol numbers" in markdown
    assert "| aime24 (k=9) | " in markdown and " ± " in markdown

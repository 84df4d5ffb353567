"""What ``nemo-igrpo eval`` evaluates: a list of runs (dataset, k samples per problem, sampling settings).

Without ``eval.protocol`` the runs are ``eval.datasets`` (default ``data.eval``), each with
``eval.samples_per_problem`` samples at ``eval.temperature`` / ``eval.top_p``.

An evaluation *protocol* fixes the benchmarks, k per benchmark and the sampling, so results are comparable across
runs. ``eval.protocol: paper`` is the iGRPO paper's (arXiv 2602.09000, §4.1): single pass, temperature 0.6, top-p
0.95, avg@k with k = 64 for AIME24 and AIME25 and k = 8 for MATH-500, AMC23, GSM8K and Minerva. The completion
budget is not part of it: it comes from ``eval.max_new_tokens`` (else ``generation.max_new_tokens``); the paper
allows up to 65k tokens. Under a protocol:

* k is the protocol's, per benchmark. ``eval.samples_per_problem`` is not used (it is the k of runs without a
  protocol, and its default cannot be told apart from a deliberate choice). For quick runs,
  ``eval.max_samples_per_problem`` caps k (with or without a protocol); the report records the k actually used.
* ``eval.temperature`` and ``eval.top_p`` must equal the protocol's values (their defaults do): a different value
  is an error rather than silently ignored.
* ``eval.datasets`` picks a subset, by benchmark name (``aime24``) or by file (``path/to/aime24.jsonl``); empty
  means all of them. Names are looked up in ``eval.benchmarks_dir``, by default the copies shipped inside the
  package (``nemo_igrpo/evaluation/benchmarks/``, sources and licences in its README), so the protocol runs offline
  after a plain ``pip install``.
* ``eval.num_problems`` still evaluates only the first N problems of each benchmark (smoke tests).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from typing import TYPE_CHECKING

from nemo_igrpo.errors import ConfigError
from nemo_igrpo.registry import Registry

if TYPE_CHECKING:
    from nemo_igrpo.config import EvalConfig


@dataclass(frozen=True)
class Benchmark:
    name: str  # in reports
    file: str  # JSONL file in eval.benchmarks_dir (default: the package's own copies, PACKAGED_BENCHMARKS)
    samples: int  # k: samples per problem for avg@k and pass@k

    def matches(self, entry: str) -> bool:
        """Whether an ``eval.datasets`` entry names this benchmark: ``gsm8k``, ``gsm8k_test`` or a path to the file."""
        return Path(entry).stem in (self.name, Path(self.file).stem)


@dataclass(frozen=True)
class Protocol:
    name: str
    temperature: float
    top_p: float
    benchmarks: tuple[Benchmark, ...]

    def benchmark(self, entry: str) -> Benchmark:
        """The benchmark an ``eval.datasets`` entry names; an unknown one is a ``ConfigError`` listing the names."""
        for benchmark in self.benchmarks:
            if benchmark.matches(entry):
                return benchmark
        names = ", ".join(b.name for b in self.benchmarks)
        raise ConfigError(f"eval.datasets: {entry!r} is not a benchmark of eval.protocol={self.name} ({names})")


PROTOCOLS: Registry[Protocol] = Registry("evaluation protocol", "eval.protocol")  # null: no protocol

PAPER = Protocol("paper", temperature=0.6, top_p=0.95, benchmarks=(
    Benchmark("aime24", "aime24.jsonl", 64),
    Benchmark("aime25", "aime25.jsonl", 64),
    Benchmark("math500", "math500.jsonl", 8),
    Benchmark("amc23", "amc23.jsonl", 8),  # the 40-problem AMC 2023 set that NeMo-Skills-style evaluation uses
    Benchmark("gsm8k", "gsm8k_test.jsonl", 8),
    Benchmark("minerva", "minerva_math.jsonl", 8),
))

PROTOCOLS.register(PAPER.name, PAPER)


def packaged_benchmarks() -> Path:
    """The benchmark files shipped inside the package (public sets; sources, commits and licences in the README
    and MANIFEST.json beside them)."""
    return Path(str(resources.files("nemo_igrpo.evaluation").joinpath("benchmarks")))


@dataclass(frozen=True)
class EvalRun:
    """One dataset to evaluate, and how."""

    name: str  # in reports and file names
    source: str  # anything ``load_examples`` accepts
    samples: int  # k
    temperature: float
    top_p: float


def plan_runs(ev: EvalConfig, default_source: str | None) -> list[EvalRun]:
    """The runs of ``nemo-igrpo eval`` (``default_source``: ``data.eval``). Configuration mistakes raise
    ``ConfigError`` and missing benchmark files ``FileNotFoundError``, before any model is loaded."""
    cap = ev.max_samples_per_problem
    if cap is not None and cap < 1:
        raise ConfigError(f"eval.max_samples_per_problem: must be >= 1 (or null), got {cap}")
    runs = _protocol_runs(ev, get_protocol(ev.protocol)) if ev.protocol is not None \
        else _plain_runs(ev, default_source)
    return [dataclasses.replace(run, samples=min(run.samples, cap)) for run in runs] if cap else runs


def get_protocol(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise ConfigError(f"eval.protocol: {name!r} is not one of {', '.join(PROTOCOLS)} (or null)")
    return PROTOCOLS[name]


def dataset_name(source: str) -> str:
    """A short, file-name-safe name for a source in reports: a file's stem, or what follows the scheme."""
    scheme, _, rest = source.partition(":")
    if rest and scheme in ("builtin", "preset", "hf"):
        return rest.strip("/").replace("/", "_")  # hf:org/name@test → org_name@test
    return Path(source).stem  # path.jsonl, path.parquet, a folder


def _plain_runs(ev: EvalConfig, default_source: str | None) -> list[EvalRun]:
    sources = ev.datasets or ([default_source] if default_source else [])
    if not sources:
        raise ConfigError("eval.datasets: nothing to evaluate (give eval.datasets=[path.jsonl,...])")
    return [EvalRun(dataset_name(s), s, ev.samples_per_problem, ev.temperature, ev.top_p) for s in sources]


def _protocol_runs(ev: EvalConfig, protocol: Protocol) -> list[EvalRun]:
    _check_sampling(ev, protocol)
    entries = ev.datasets or [b.name for b in protocol.benchmarks]
    runs = []
    for entry in entries:
        benchmark = protocol.benchmark(entry)
        source = entry if Path(entry).suffix == ".jsonl" else _benchmark_file(benchmark, ev.benchmarks_dir)
        if not Path(source).is_file():
            raise FileNotFoundError(f"eval.protocol={protocol.name}: benchmark file {source} not found")
        runs.append(EvalRun(benchmark.name, source, benchmark.samples, protocol.temperature, protocol.top_p))
    return runs


def _benchmark_file(benchmark: Benchmark, benchmarks_dir: str | None) -> str:
    return str(Path(benchmarks_dir or packaged_benchmarks()) / benchmark.file)


def _check_sampling(ev: EvalConfig, protocol: Protocol) -> None:
    for key, value, required in (("eval.temperature", ev.temperature, protocol.temperature),
                                 ("eval.top_p", ev.top_p, protocol.top_p)):
        if not math.isclose(value, required):
            raise ConfigError(f"{key}: {value} conflicts with eval.protocol={protocol.name}, which samples at "
                              f"{required}; drop one of the two")

#!/usr/bin/env python
"""Multi-seed study: GRPO (8 samples) vs iGRPO (4 drafts + 4 refinements) on the embedded default task.

Both arms consume the same number of rollouts per problem (8) and per step (trainer.prompts_per_step × 8), and
for a given seed start from the same warm-started model: the quickstart's warm start (warm_start.steps supervised
steps with trainer.seed = seed) runs once per seed and is saved to ROOT/warm-sSEED, and both arms load it
(model.path=ROOT/warm-sSEED warm_start.steps=0), so each seed is a paired comparison. Each run is a plain
``nemo-igrpo train`` in its own output directory under --root; finished warm starts and runs (a ``final/`` folder)
are reused, so the script can be re-run to only rebuild the report.

    python scripts/study_igrpo_vs_grpo.py --seeds 0 1 2 --root /tmp/igrpo_study --jobs 2
    python scripts/study_igrpo_vs_grpo.py --report-only --root /tmp/igrpo_study   # tables + plots from existing runs

Writes ``docs/study.md`` (--markdown), PNG plots under ``docs/study/`` (--plots) and the numbers as JSON (--json).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nemo_igrpo.plotting import Run

# The study's settings on top of conf/quickstart.yaml (whose training settings are used unchanged): no TensorBoard,
# no progress bar (logs go to a file); add e.g. trainer.eval_every=5 for denser accuracy curves (costs more evals).
STUDY_OVERRIDES = ["trainer.loggers=[]", "trainer.progress=false", "trainer.resume=auto"]
ARMS = {"grpo": "GRPO 8", "igrpo": "iGRPO 4+4", "dapo": "DAPO 8", "igrpo_dapo": "iGRPO-DAPO 4+4"}


@dataclass
class RunSpec:
    arm: str  # an algorithm.preset
    seed: int
    root: Path
    warm_seed: int | None = None  # whose warm start the run loads; None = its own seed's

    @property
    def directory(self) -> Path:
        return self.root / f"{self.arm}-s{self.seed}"

    @property
    def warm_directory(self) -> Path:
        return self.root / f"warm-s{self.seed if self.warm_seed is None else self.warm_seed}"

    def command(self, extra: list[str]) -> list[str]:
        return [sys.executable, "-m", "nemo_igrpo.cli", "train", f"algorithm.preset={self.arm}",
                f"trainer.seed={self.seed}", f"trainer.output_dir={self.directory}",
                f"model.path={self.warm_directory}", "warm_start.steps=0", *STUDY_OVERRIDES, *extra]

    def warm_command(self, extra: list[str]) -> list[str]:
        return [sys.executable, os.path.abspath(__file__), "--warm-start-to", str(self.warm_directory),
                "--seeds", str(self.seed if self.warm_seed is None else self.warm_seed), *extra]


def _run_logged(command: list[str], log_path: Path, timeout_s: float, nice: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    started = time.perf_counter()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log:
        log.write("$ " + shlex.join(command) + "\n")
        log.flush()
        subprocess.run(["nice", "-n", str(nice), *command], stdout=log, stderr=subprocess.STDOUT, env=env,
                       timeout=timeout_s, check=True)
    return time.perf_counter() - started


def warm_one(spec: RunSpec, extra: list[str], timeout_s: float, nice: int) -> tuple[RunSpec, float | None]:
    """The seed's warm-started model, unless already saved; returns wall-clock seconds (None when reused)."""
    if (spec.warm_directory / "config.json").is_file():
        return spec, None
    return spec, _run_logged(spec.warm_command(extra), spec.warm_directory.with_suffix(".log"), timeout_s, nice)


def run_one(spec: RunSpec, extra: list[str], timeout_s: float, nice: int) -> tuple[RunSpec, float | None]:
    """Train one arm × seed unless it already finished; returns its wall-clock seconds (None when reused)."""
    if (spec.directory / "final").is_dir():
        return spec, None
    return spec, _run_logged(spec.command(extra), spec.directory / "train.log", timeout_s, nice)


def schedule(seeds: list[int], arms: list[str], jobs: int,
             warm_seed: int | None = None) -> list[tuple[str, int, str | None]]:
    """Task order that keeps ``jobs`` workers busy: warm starts of the first ``jobs`` seeds, then each seed's runs
    followed by the warm start of the seed ``jobs`` places later (ready by the time its runs come up). With a
    shared warm start (``warm_seed``), that one warm start comes first and every run waits for it."""
    if warm_seed is not None:
        return [("warm", warm_seed, None)] + [("run", seed, arm) for seed in seeds for arm in arms]
    order: list[tuple[str, int, str | None]] = [("warm", seed, None) for seed in seeds[:jobs]]
    for index, seed in enumerate(seeds):
        order += [("run", seed, arm) for arm in arms]
        if index + jobs < len(seeds):
            order.append(("warm", seeds[index + jobs], None))
    return order


def train_all(seeds: list[int], arms: list[str], root: Path, jobs: int, call,
              warm_seed: int | None = None) -> dict[str, float | None]:
    """Warm starts and runs on a pool of ``jobs`` workers; a run waits for its seed's warm start. ``call(task)``
    runs ``warm_one``/``run_one`` bound to a spec with the remaining arguments."""
    wall: dict[str, float | None] = {}
    warm_done = {}
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = []
        for kind, seed, arm in schedule(seeds, arms, jobs, warm_seed):
            spec = RunSpec(arm or arms[0], seed, root, warm_seed)
            if kind == "warm":
                warm_done[spec.warm_directory] = pool.submit(call, lambda *a, spec=spec: warm_one(spec, *a))
                futures.append((spec.warm_directory.name, warm_done[spec.warm_directory]))
            else:
                def after_warm(*a, spec=spec):
                    warm_done[spec.warm_directory].result()  # raises if the warm start failed
                    return run_one(spec, *a)
                futures.append((spec.directory.name, pool.submit(call, after_warm)))
        for name, future in futures:
            _, seconds = future.result()
            wall[name] = seconds
            print(f"{name}: " + ("reused" if seconds is None else f"{seconds:.0f} s"), flush=True)
    return wall


def save_warm_start(seed: int, directory: Path, overrides: list[str]) -> None:
    """The quickstart's warm start from random init with trainer.seed = seed (as ``nemo-igrpo train`` runs it
    before RL), saved as an HF folder (written beside, then renamed, so a half-written folder is never reused)."""
    import shutil

    from rich.console import Console

    from nemo_igrpo.cli import default_config_path
    from nemo_igrpo.config import load_config
    from nemo_igrpo.data.sources import load_examples
    from nemo_igrpo.models import load_model, load_tokenizer
    from nemo_igrpo.assembly import build_template, seed_everything, warm_start_model

    config = load_config(default_config_path(), [f"trainer.seed={seed}", *overrides])
    seed_everything(seed)
    tokenizer = load_tokenizer(config.model)
    model = load_model(config.model, tokenizer)
    warm_start_model(config, model, load_examples(config.data.train, config.data, "train"),
                     build_template(config.prompt, tokenizer), tokenizer, Console())
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, directory)


# --------------------------------------------------------------------------------------------------- analysis

def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def final_accuracy(records: list[dict]) -> tuple[float | None, float | None]:
    """Held-out accuracy at the first and the last evaluation of a run."""
    evals = [r["eval/accuracy"] for r in records if "eval/accuracy" in r]
    return (evals[0], evals[-1]) if evals else (None, None)


def best_draft_vs_prediction(records: list[dict]) -> dict[str, float]:
    """Proposition 3.1 over a run, on the binary accuracy reward: observed best-of-N success vs 1 − (1 − p)^N,
    averaged over the steps.

    The trainer logs per step ``reward/accuracy/any_draft_correct`` (fraction of problems with a right draft),
    ``reward/accuracy/best_draft_predicted`` (mean over problems of 1 − (1 − p_q)^N with p_q the fraction of that
    problem's own N drafts that are right) and ``reward/accuracy/draft_mean`` (p averaged over problems). Also
    returned: the prediction from the step-level p alone, 1 − (1 − p̄)^N, which over-estimates when p varies
    between problems (Jensen). Runs logged before these keys existed fall back to the total-reward keys.
    """
    steps = [r for r in records if "reward/best_draft_mean" in r]
    if not steps:
        return {}
    prefix = "reward/accuracy/" if "reward/accuracy/draft_mean" in steps[0] else "reward/"
    observed_key = "reward/accuracy/any_draft_correct" if prefix != "reward/" else "reward/best_draft_mean"
    n = steps[0]["rollouts_per_prompt/drafts"]
    observed = statistics.fmean(r[observed_key] for r in steps)
    per_problem = statistics.fmean(r[f"{prefix}best_draft_predicted"] for r in steps)
    pooled = statistics.fmean(1 - (1 - min(max(r[f"{prefix}draft_mean"], 0.0), 1.0)) ** n for r in steps)
    return {"num_drafts": n, "draft_mean": statistics.fmean(r[f"{prefix}draft_mean"] for r in steps),
            "observed_best_draft": observed, "predicted_per_problem_p": per_problem, "predicted_pooled_p": pooled,
            "refinement_mean": statistics.fmean(r["reward/refinement_mean"] for r in steps)}


def summarize(runs: dict[str, dict[int, list[dict]]]) -> dict:
    """Per arm: accuracy before/after per seed, mean ± std, entropy and Proposition 3.1 numbers."""
    summary = {}
    for arm, by_seed in runs.items():
        before, after, entropy_first, entropy_last, prop = {}, {}, {}, {}, {}
        for seed, records in sorted(by_seed.items()):
            before[seed], after[seed] = final_accuracy(records)
            entropies = [r["train/entropy"] for r in records if "train/entropy" in r]
            if entropies:
                entropy_first[seed], entropy_last[seed] = entropies[0], entropies[-1]
            prop[seed] = best_draft_vs_prediction(records)
        finals = [v for v in after.values() if v is not None]
        starts = [v for v in before.values() if v is not None]
        summary[arm] = {
            "label": ARMS.get(arm, arm), "seeds": sorted(by_seed), "accuracy_before": before,
            "accuracy_final": after, "final_mean_std": mean_std(finals), "before_mean_std": mean_std(starts),
            "entropy_first": entropy_first, "entropy_last": entropy_last,
            "entropy_last_mean_std": mean_std(list(entropy_last.values())), "proposition_3_1": prop,
            "last_step": {seed: max(r["step"] for r in records) for seed, records in sorted(by_seed.items())},
        }
    return summary


def paired_differences(summary: dict, arm_a: str, arm_b: str) -> list[float]:
    """Final accuracy of arm_b minus arm_a, per seed both have."""
    a, b = summary[arm_a]["accuracy_final"], summary[arm_b]["accuracy_final"]
    return [b[s] - a[s] for s in sorted(set(a) & set(b)) if a[s] is not None and b[s] is not None]


def _pct(value: float) -> str:
    return "–" if value is None or math.isnan(value) else f"{100 * value:.1f}"


def markdown_table(summary: dict) -> str:
    lines = [("| arm | seeds | accuracy before RL (%) | final accuracy (%) per seed | final mean ± std (%) | "
              "final entropy (mean ± std) |"), "|---|---|---|---|---|---|"]
    # a run that stopped before the longest one (unfinished, reported with --partial) shows its last step
    longest = max(step for s in summary.values() for step in s["last_step"].values())
    for s in summary.values():
        per_seed = ", ".join(f"s{k}: {_pct(v)}" + (f" (step {s['last_step'][k]})" if s["last_step"][k] < longest
                                                     else "") for k, v in s["accuracy_final"].items())
        bm, bs = s["before_mean_std"]
        fm, fs = s["final_mean_std"]
        em, es = s["entropy_last_mean_std"]
        lines.append(f"| {s['label']} | {len(s['seeds'])} | {_pct(bm)} ± {_pct(bs)} | {per_seed} | "
                     f"**{_pct(fm)} ± {_pct(fs)}** | {em:.3f} ± {es:.3f} |")
    return "\n".join(lines)


def proposition_table(summary: dict) -> str:
    lines = [("| arm | seed | mean draft reward p̄ | observed best-of-N | 1 − (1 − p_q)^N (per problem) | "
              "1 − (1 − p̄)^N (pooled) | refinement reward |"), "|---|---|---|---|---|---|---|"]
    for s in summary.values():
        for seed, p in s["proposition_3_1"].items():
            if p:
                lines.append(f"| {s['label']} | {seed} | {p['draft_mean']:.3f} | {p['observed_best_draft']:.3f} | "
                             f"{p['predicted_per_problem_p']:.3f} | {p['predicted_pooled_p']:.3f} | "
                             f"{p['refinement_mean']:.3f} |")
    return "\n".join(lines)


def load_runs(root: Path, arms: list[str], seeds: list[int], partial: bool = False) -> dict[str, dict[int, Run]]:
    """Finished runs (a final/ folder); with ``partial``, unfinished ones too (labelled, reported up to their last
    logged step)."""
    from nemo_igrpo.plotting import load_run

    runs: dict[str, dict[int, Run]] = {}
    for arm in arms:
        for seed in seeds:
            directory = RunSpec(arm, seed, root).directory
            finished = (directory / "final").is_dir()
            if finished or (partial and (directory / "metrics.jsonl").is_file()):
                label = f"{ARMS.get(arm, arm)} s{seed}" + ("" if finished else " (unfinished)")
                runs.setdefault(arm, {})[seed] = load_run(directory, label)
            else:
                print(f"skipping {directory}: not a finished run", file=sys.stderr)
    return runs


def write_plots(runs: dict[str, dict[int, Run]], directory: Path) -> list[Path]:
    """Per-run overlays of every curve, plus mean ± std over seeds of accuracy, entropy and best-draft reward."""
    from nemo_igrpo.plotting import plot_mean_std, plot_runs

    everything = [run for by_seed in runs.values() for run in by_seed.values()]
    written = [f.path for f in plot_runs(everything, directory, prefix="runs_")]
    groups = {ARMS.get(arm, arm): list(by_seed.values()) for arm, by_seed in runs.items()}
    for key, name, title, ylabel in [
            ("eval/accuracy", "accuracy_vs_rollouts", "Held-out accuracy", "avg@4"),
            ("train/entropy", "entropy_vs_rollouts", "Policy entropy", "nats / token"),
            ("reward/refinement_mean", "reward_vs_rollouts", "Training reward (refinements / GRPO samples)",
             "mean reward")]:
        written.append(plot_mean_std(groups, key, directory / f"{name}.png", title, ylabel).path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", default=["grpo", "igrpo"], choices=sorted(ARMS))
    parser.add_argument("--root", type=Path, default=Path("/tmp/igrpo_study"), help="one output dir per run here")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel (each gets OMP_NUM_THREADS=1)")
    parser.add_argument("--nice", type=int, default=5, help="niceness of the training processes")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds before one run is killed")
    parser.add_argument("--report-only", action="store_true", help="do not train; report the finished runs")
    parser.add_argument("--markdown", type=Path, default=Path("docs/study.md"))
    parser.add_argument("--plots", type=Path, default=Path("docs/study"))
    parser.add_argument("--json", type=Path, default=None, help="numbers as JSON (default: ROOT/study.json)")
    parser.add_argument("--partial", action="store_true",
                        help="also report unfinished runs (up to their last logged step), marked as such")
    parser.add_argument("--warm-seed", type=int, default=None,
                        help="one warm start (with this seed) shared by every run; default: one per seed")
    parser.add_argument("--warm-start-to", type=Path, default=None, help=argparse.SUPPRESS)  # internal: one seed
    parser.add_argument("overrides", nargs="*", help="extra config overrides for every run")
    args = parser.parse_args()
    if args.warm_start_to is not None:
        save_warm_start(args.seeds[0], args.warm_start_to, args.overrides)
        return

    wall = {}
    if not args.report_only:
        wall = train_all(args.seeds, args.arms, args.root, args.jobs,
                         lambda task: task(args.overrides, args.timeout, args.nice), args.warm_seed)

    runs = load_runs(args.root, args.arms, args.seeds, args.partial)
    if not runs:
        sys.exit(f"no finished runs under {args.root}")
    summary = summarize({arm: {seed: run.records for seed, run in by_seed.items()} for arm, by_seed in runs.items()})
    print(markdown_table(summary))
    print(proposition_table(summary))

    written = write_plots(runs, args.plots)
    result = {"machine": machine_info(), "command": shlex.join(sys.argv), "overrides": STUDY_OVERRIDES + args.overrides,
              "root": str(args.root), "wall_seconds": wall, "summary": summary,
              "plots": [str(p) for p in written]}
    json_path = args.json or args.root / "study.json"
    json_path.write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {json_path} and {len(written)} plots under {args.plots}")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(render_markdown(result, summary, args))
        print(f"wrote {args.markdown}")


def machine_info() -> dict:
    import torch
    import transformers

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "torch_threads_per_run": os.environ.get("OMP_NUM_THREADS", "1")}


def render_markdown(result: dict, summary: dict, args) -> str:
    """The generated part of docs/study.md: tables and plot links (the discussion is appended by hand below the
    marker, and kept when the file is regenerated)."""
    marker = "<!-- discussion -->"
    discussion = ""
    if args.markdown.is_file() and marker in args.markdown.read_text():
        discussion = args.markdown.read_text().split(marker, 1)[1]
    m = result["machine"]
    diffs = paired_differences(summary, "grpo", "igrpo") if {"grpo", "igrpo"} <= summary.keys() else []
    diff_line = ""
    if diffs:
        dm, ds = mean_std(diffs)
        diff_line = (f"\nPaired difference iGRPO − GRPO in final accuracy (same seed = same warm-started model): "
                     f"{', '.join(f'{100 * d:+.1f}' for d in diffs)} points; mean {100 * dm:+.1f} ± {100 * ds:.1f}.\n")
    warm_text = (f"one shared warm start (trainer.seed={args.warm_seed}, warm_start.steps of the quickstart) loaded by "
                 "every run; seeds differ in RL sampling, prompt order and evaluation samples"
                 if args.warm_seed is not None else
                 "one per seed (the quickstart's, with trainer.seed = seed), shared by both arms of that seed")
    rel = os.path.relpath(args.plots, args.markdown.parent)
    plots = "\n\n".join(f"![{Path(p).stem}]({rel}/{Path(p).name})" for p in result["plots"])
    return f"""# iGRPO vs GRPO on the embedded default task (multi-seed study)

Generated by `scripts/study_igrpo_vs_grpo.py`; numbers are re-derived from the runs' `metrics.jsonl` each time.

- Command: `{result['command']}`
- Settings: `conf/quickstart.yaml` + `{' '.join(result['overrides'])}`; arms differ only in `algorithm.preset`.
  Warm start: {warm_text}.
  Both arms use 8 rollouts per problem (GRPO: 8 samples; iGRPO: 4 drafts + 4 refinements) and the same problems
  per step, so rollouts consumed = step × prompts_per_step × 8 for both.
- Machine: {m['platform']}, {m['cpus']} CPUs ({m['processor']}), Python {m['python']}, torch {m['torch']},
  transformers {m['transformers']}, OMP_NUM_THREADS={m['torch_threads_per_run']} per run, `--jobs {args.jobs}`,
  CPU shared with other work (wall times are not benchmarks).

## Final held-out accuracy (200 held-out problems × 4 samples, temperature 0.6)

{markdown_table(summary)}
{diff_line}
## Proposition 3.1: best-draft success vs 1 − (1 − p)^N (averaged over the training steps)

{proposition_table(summary)}

## Plots

{plots}

{marker}{discussion}"""


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Learning parity of overlapped rollouts: synchronous vs draft-ahead vs asynchronous k = 1, several seeds each.

Does overlapping generation with training cost accuracy? Every run trains the quickstart task (conf/quickstart.yaml,
its 30 steps and held-out evaluations unchanged) through one ``nemo-igrpo serve`` process, as the overlapped modes
require, and the modes differ only in the ``rollout`` keys (bench_async.MODES):

* ``sync``: rollout → update → weight sync, one after the other (the default loop);
* ``draft-ahead``: ``rollout.draft_ahead=true`` (step t+1's drafts on the weights before step t's update);
* ``k=1``: ``rollout.max_off_policy_steps=1`` (whole rollouts up to one version behind).

Every mode uses ``algorithm.importance_correction=token`` (k > 0 requires it; the same loss everywhere). One warm
start (the quickstart's, trainer.seed 0) is run once and loaded by every run, so a seed is a paired comparison: the
same model, problem order and sampling seeds, and (at step 0) the same held-out evaluation. The server and the
trainer are pinned to one core each, as in bench_async.py; runs go one after another.

The report: final held-out accuracy per mode and seed, mean ± 95% interval (t over seeds), the synchronous seeds'
range and whether each overlapped run falls inside it, the paired difference to sync per seed with its interval
and an exact sign-flip test, accuracy at every evaluation, and per mode the seconds per step, staleness and the
importance-weight statistics. Resumable: a finished run (its ``final/`` folder) is reused, and --report-only
rebuilds the report from the runs' metrics.jsonl (keeping the --markdown file's text below ``<!-- discussion -->``).

With --equal-time, a fourth mode, ``k=1 equal time``, runs k=1 for as many steps as the sync runs' training took
(their mean training seconds over k=1's mean seconds per step), with the quickstart's schedule stretched to them:
what k=1 reaches in the same wall-clock, having consumed more rollouts.

    python scripts/study_async_parity.py --seeds 0 1 2 3 4 5 --equal-time --root /tmp/async_parity \\
        --markdown docs/study_async.md
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_async import COMMON, MODES, TOKEN, PinnedServer, environment, pinned  # noqa: E402
from study_igrpo_vs_grpo import (  # noqa: E402
    final_accuracy,
    interval95,
    interval_text,
    mean_of,
    save_warm_start,
    sign_flip_p_value,
)

PARITY_MODES = ["sync", "draft-ahead", "k=1"]
DISCUSSION = "<!-- discussion -->"  # text below it in the --markdown file is written by hand and kept
EQUAL_TIME = "k=1 equal time"  # k=1 for as many steps as the sync runs' training time allows
# bench_async's settings, but with the quickstart's evaluations and checkpoints (resumable runs).
SETTINGS = [o for o in COMMON if not o.startswith(("trainer.eval_every", "trainer.save_every", "trainer.resume"))]
SETTINGS.append("trainer.resume=auto")
RUN_MEANS = {"s/step": "time/step", "staleness": "rollout/staleness", "stale tokens": "rollout/stale_token_fraction",
             "IS weight": "train/mismatch/is_weight_mean", "IS capped": "train/mismatch/is_capped_fraction",
             "sampler–trainer KL": "train/mismatch/seq_kl"}


# ------------------------------------------------------------------------------------------ pure parts (tested)

def run_summary(records: list[dict]) -> dict:
    """One run's metrics.jsonl records → first and final held-out accuracy, accuracy at every evaluation, and the
    per-step means of RUN_MEANS (steps that did not log a key are left out of its mean)."""
    before, final = final_accuracy(records)
    means = {name: mean_of(records, key) for name, key in RUN_MEANS.items()}
    curve = {r["step"]: r["eval/accuracy"] for r in records if "eval/accuracy" in r}
    seconds = sum(float(r.get("time/step", 0.0)) for r in records)
    return {"before": before, "final": final, "curve": curve, "means": means, "training_seconds": seconds,
            "steps": max((r["step"] for r in records), default=0)}


def equal_time_steps(summaries: dict[str, dict[int, dict]]) -> int:
    """Steps of k=1 that take as long as the sync runs' training: their mean training seconds (the sum of
    time/step, evaluations excluded) over k=1's mean seconds per step."""
    sync, k1 = list(summaries.get("sync", {}).values()), list(summaries.get("k=1", {}).values())
    if not sync or not k1:
        raise ValueError("--equal-time needs finished sync and k=1 runs")
    sync_seconds = statistics.fmean(s["training_seconds"] for s in sync)
    return round(sync_seconds / statistics.fmean(s["means"]["s/step"] for s in k1))


def parity(summaries: dict[str, dict[int, dict]], baseline: str = "sync") -> dict[str, dict]:
    """Per mode: final accuracies by seed, mean ± 95% half-width, and against the baseline: its seed range
    [min, max], which seeds fall inside it, and the paired differences (same seed) with mean ± 95% half-width."""
    base = {seed: s["final"] for seed, s in summaries.get(baseline, {}).items() if s["final"] is not None}
    low, high = (min(base.values()), max(base.values())) if base else (math.nan, math.nan)
    result = {}
    for mode, by_seed in summaries.items():
        finals = {seed: s["final"] for seed, s in sorted(by_seed.items()) if s["final"] is not None}
        diffs = {seed: acc - base[seed] for seed, acc in finals.items() if seed in base}
        mean, half = interval95(list(finals.values())) if finals else (math.nan, math.nan)
        diff_mean, diff_half = interval95(list(diffs.values())) if diffs else (math.nan, math.nan)
        result[mode] = {"finals": finals, "mean": mean, "half_width": half, "baseline_range": [low, high],
                        "inside_range": {seed: low <= acc <= high for seed, acc in finals.items()},
                        "differences": diffs, "difference_mean": diff_mean, "difference_half_width": diff_half}
    return result


def parity_table(result: dict[str, dict], baseline: str = "sync") -> str:
    lines = [f"| mode | final accuracy per seed (%) | mean ± 95% interval (%) | inside {baseline}'s seed range | "
             f"paired difference to {baseline} per seed (points) | mean ± 95% interval (points) | sign-flip p |",
             "|---|---|---|---|---|---|---|"]
    for mode, r in result.items():
        per_seed = ", ".join(f"s{seed}: {100 * acc:.1f}" for seed, acc in r["finals"].items())
        inside = sum(r["inside_range"].values())
        diffs = "—" if mode == baseline else ", ".join(f"{100 * d:+.1f}" for d in r["differences"].values())
        diff_ci = "—" if mode == baseline else interval_text(list(r["differences"].values()))
        p = "—" if mode == baseline else f"{sign_flip_p_value(list(r['differences'].values())):.3f}"
        lines.append(f"| {mode} | {per_seed} | {interval_text(list(r['finals'].values()))} | "
                     f"{inside}/{len(r['inside_range'])} | {diffs} | {diff_ci} | {p} |")
    return "\n".join(lines)


def curve_table(summaries: dict[str, dict[int, dict]]) -> str:
    """Held-out accuracy at every evaluation step, mean ± 95% interval over seeds, a column per mode."""
    steps = sorted({step for by_seed in summaries.values() for s in by_seed.values() for step in s["curve"]})
    lines = ["| step | " + " | ".join(summaries) + " |", "|---" * (len(summaries) + 1) + "|"]
    for step in steps:
        cells = [interval_text([s["curve"][step] for s in by_seed.values() if step in s["curve"]])
                 for by_seed in summaries.values()]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def dynamics_table(summaries: dict[str, dict[int, dict]]) -> str:
    """Per mode: steps, training seconds (the sum of time/step) and the per-step means of RUN_MEANS, each as mean ±
    95% interval over seeds (unscaled)."""
    lines = ["| mode | steps | training s | " + " | ".join(RUN_MEANS) + " |", "|---" * (len(RUN_MEANS) + 3) + "|"]
    for mode, by_seed in summaries.items():
        cells = [interval_text([s["steps"] for s in by_seed.values()], scale=1.0, digits=0),
                 interval_text([s["training_seconds"] for s in by_seed.values()], scale=1.0, digits=0)]
        cells += [interval_text([s["means"][name] for s in by_seed.values()], scale=1.0, digits=3)
                  for name in RUN_MEANS]
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ running

def run_directory(root: Path, mode: str, seed: int) -> Path:
    return root / f"{mode.replace('=', '').replace(' ', '-')}-s{seed}"


def train_run(mode: str, seed: int, server: PinnedServer, model_dir: Path, core: int | None, out: Path,
              overrides: list[str]) -> None:
    """One quickstart run with trainer.seed = ``seed`` and ``overrides`` (the mode's first), in a pinned subprocess
    logged to out/train.log."""
    command = pinned(core, [sys.executable, "-m", "nemo_igrpo.cli", "train", *SETTINGS, f"model.path={model_dir}",
                            f"generation.server.url={server.url}", f"trainer.seed={seed}", f"trainer.output_dir={out}",
                            *overrides, "warm_start.steps=0"])  # the warm start is model_dir
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "NEMO_IGRPO_SERVER_TOKEN": TOKEN, "OMP_NUM_THREADS": "1"}
    with open(out / "train.log", "a") as log:
        log.write("$ " + shlex.join(command) + "\n")
        log.flush()
        if subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT).returncode != 0:
            raise RuntimeError(f"{mode} seed {seed}: training failed; see {out / 'train.log'}")


def warm_start(root: Path, overrides: list[str]) -> Path:
    """The quickstart's warm start (trainer.seed 0), once (the study script's, which never leaves a half-written
    folder behind)."""
    directory = root / "warm"
    if not (directory / "config.json").is_file():
        save_warm_start(0, directory, overrides)
    return directory


def render_markdown(result: dict, summaries: dict, table: str, kept: str = "") -> str:
    """The report; ``kept`` is the hand-written text below DISCUSSION of the file it replaces."""
    env = result["environment"]
    return f"""# Learning parity of overlapped rollouts (sync vs draft-ahead vs asynchronous k = 1)

Generated by `scripts/study_async_parity.py` from the runs' `metrics.jsonl`.

- Command: `{result['command']}`
- Settings: `conf/quickstart.yaml` (30 steps of 32 problems × 4 drafts + 4 refinements; the 200 held-out problems
  × 4 samples evaluated every 10 steps and at the end) + `{' '.join(SETTINGS)}`.
  Modes differ only in the `rollout` keys (and `{EQUAL_TIME}` in `trainer.max_steps`, the steps column below).
  One warm start (trainer.seed=0) is shared by every run, so a seed is a paired comparison.
- Machine: {env.get('cpu_model', '?')}, {env.get('cpus', '?')} CPUs, torch {env.get('torch', '?')}; the server and
  the trainer are pinned to one core each, one torch thread each.

## Final held-out accuracy

{table}

## Held-out accuracy at every evaluation (%, mean ± 95% interval over seeds)

{curve_table(summaries)}

## Per-step means (mean ± 95% interval over seeds)

{dynamics_table(summaries)}

{DISCUSSION}{kept}"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="trainer.seed of the runs")
    parser.add_argument("--modes", nargs="+", default=PARITY_MODES, choices=list(MODES),
                        help="rollout modes to run (bench_async.MODES; sync is the baseline of the comparison)")
    parser.add_argument("--equal-time", action="store_true",
                        help=f"also run '{EQUAL_TIME}': k=1 for as many steps as fit in the sync runs' training time "
                             "(after the sync and k=1 runs, from their mean times)")
    parser.add_argument("--root", type=Path, default=Path("/tmp/async_parity"), help="one output dir per run here")
    parser.add_argument("--server-core", type=int, default=1, help="CPU core of the server (-1: not pinned)")
    parser.add_argument("--trainer-core", type=int, default=0, help="CPU core of the trainer (-1: not pinned)")
    parser.add_argument("--report-only", action="store_true", help="do not train; report the finished runs")
    parser.add_argument("--markdown", type=Path, default=None, help="write the report here too")
    parser.add_argument("overrides", nargs="*", help="config overrides for every run (and the warm start)")
    args = parser.parse_args()
    if args.equal_time and not {"sync", "k=1"} <= set(args.modes):
        parser.error("--equal-time needs the sync and k=1 modes")
    server_core = None if args.server_core < 0 else args.server_core
    trainer_core = None if args.trainer_core < 0 else args.trainer_core

    from nemo_igrpo.tracking import read_metrics

    def finished(modes: list[str]) -> dict[str, dict[int, dict]]:
        return {mode: {seed: run_summary(read_metrics(run_directory(args.root, mode, seed) / "metrics.jsonl"))
                       for seed in args.seeds if (run_directory(args.root, mode, seed) / "final").is_dir()}
                for mode in modes}

    args.root.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        model_dir = warm_start(args.root, args.overrides)
        with PinnedServer(model_dir, server_core, args.root / "server.log") as server:
            def train(mode: str, seed: int, mode_overrides: list[str]) -> None:
                out = run_directory(args.root, mode, seed)
                if not (out / "final").is_dir():
                    train_run(mode, seed, server, model_dir, trainer_core, out, [*mode_overrides, *args.overrides])
                print(f"{out.name}: done", flush=True)

            for seed in args.seeds:  # seed-major: an interrupted study still has whole pairs
                for mode in args.modes:
                    train(mode, seed, MODES[mode])
            if args.equal_time:
                steps = equal_time_steps(finished(["sync", "k=1"]))
                for seed in args.seeds:
                    train(EQUAL_TIME, seed, [*MODES["k=1"], f"trainer.max_steps={steps}"])

    modes = args.modes + ([EQUAL_TIME] if args.equal_time else [])
    summaries = finished(modes)
    result = {"parity": parity(summaries), "summaries": summaries, "environment": environment(),
              "command": shlex.join(["python", "scripts/study_async_parity.py", *sys.argv[1:]])}
    table = parity_table(result["parity"])
    print(table)
    (args.root / "parity.json").write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {args.root / 'parity.json'}")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        old = args.markdown.read_text() if args.markdown.is_file() else ""
        kept = old.split(DISCUSSION, 1)[1] if DISCUSSION in old else ""
        args.markdown.write_text(render_markdown(result, summaries, table, kept))
        print(f"wrote {args.markdown}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Overlapping generation with training, in the server layout: synchronous vs draft-ahead vs asynchronous k = 1, 2.

A ``nemo-igrpo serve`` process and a trainer process, each pinned to its own CPU core (``taskset``; one torch
thread each), train the same warm-started quickstart model on the same problems (same trainer.seed) for the same
number of steps in each mode:

* ``sync``: rollout → update → weight sync, one after the other (the default loop);
* ``draft-ahead``: ``rollout.draft_ahead=true`` (step t+1's drafts during step t's update);
* ``k=1``, ``k=2``: ``rollout.max_off_policy_steps=k`` (whole rollouts up to k versions ahead).

Every mode uses ``algorithm.importance_correction=token`` (required by k > 0; the same loss everywhere). The first
step of every run is warm-up (nothing overlaps it) and not counted. Per mode: seconds per step (the trainer's
``time/step``, every phase of the loop's thread), steps per hour, and the idle fractions of the two processes:

* generator idle = 1 − (seconds the server had requests in flight, ``time/rollout/generation``) / step;
* trainer idle = 1 − (seconds the trainer computed: update, extra log-prob passes, weight push) / step (the rest it
  waits for generation, or scores the samples).

Prints a table and writes JSON (the per-step records included).

    python scripts/bench_async.py --steps 8 --output bench_async.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

MODES = {
    "sync": [],
    "draft-ahead": ["rollout.draft_ahead=true"],
    "k=1": ["rollout.max_off_policy_steps=1"],
    "k=2": ["rollout.max_off_policy_steps=2"],
    # rollout.inflight_updates=keep: a sync does not wait for the job in flight (issue 31)
    "draft-ahead/keep": ["rollout.draft_ahead=true", "rollout.inflight_updates=keep"],
    "k=1/keep": ["rollout.max_off_policy_steps=1", "rollout.inflight_updates=keep"],
}
COMMON = ["generation.backend=server", "algorithm.importance_correction=token", "trainer.eval_every=0",
          "trainer.save_every=0", "trainer.progress=false", "trainer.loggers=[]", "trainer.resume=none"]
TRAINER_WORK = ("time/update", "time/old_logprobs", "time/reference_logprobs", "time/weight_sync")
TOKEN = "bench-async-token"


# ------------------------------------------------------------------------------------------ pure parts (tested)

def summarize(records: list[dict]) -> dict[str, float]:
    """Measured steps (metrics.jsonl records) → mean s/step, steps/hour, generator- and trainer-idle fractions.

    Means rather than medians: with overlap, steps alternate between waiting and not, and the mean is what sets
    the steps per hour."""
    if not records:
        raise ValueError("no measured steps (use --steps ≥ 2: the first step of each run is warm-up)")
    step = statistics.fmean(float(r["time/step"]) for r in records)
    generating = statistics.fmean(float(r.get("time/rollout/generation", 0.0)) for r in records)
    working = statistics.fmean(sum(float(r.get(key, 0.0)) for key in TRAINER_WORK) for r in records)
    return {"s_per_step": step, "steps_per_hour": 3600.0 / step,
            "generator_idle": max(0.0, 1.0 - generating / step), "trainer_idle": max(0.0, 1.0 - working / step),
            "staleness_mean": statistics.fmean(float(r.get("rollout/staleness", 0.0)) for r in records),
            "sync_wait": statistics.fmean(float(r.get("time/sync_wait", r.get("time/draft_wait", 0.0)))
                                          for r in records),
            "version_span": statistics.fmean(float(r.get("rollout/version_span", 0.0)) for r in records),
            "steps": len(records)}


def render_table(results: dict[str, dict[str, float]], title: str) -> str:
    base = results.get("sync", {}).get("steps_per_hour")
    lines = [title, "", "| mode | s/step | steps/hour | vs sync | generator idle | trainer idle | staleness | "
             "job wait (s) | version span |", "|---|---|---|---|---|---|---|---|---|"]
    for mode, r in results.items():
        speedup = f"{r['steps_per_hour'] / base:.2f}×" if base else "—"
        lines.append(f"| {mode} | {r['s_per_step']:.2f} | {r['steps_per_hour']:.0f} | {speedup} | "
                     f"{100 * r['generator_idle']:.0f}% | {100 * r['trainer_idle']:.0f}% | "
                     f"{r['staleness_mean']:.2f} | {r.get('sync_wait', 0.0):.2f} | {r.get('version_span', 0.0):.2f} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ measuring

def pinned(core: int | None, command: list[str]) -> list[str]:
    return command if core is None else ["taskset", "-c", str(core), *command]


class PinnedServer:
    """``nemo-igrpo serve`` of ``model_dir`` on a free port, pinned to ``core``, stopped on exit."""

    def __init__(self, model_dir: Path, core: int | None, log: Path):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.model_dir, self.core, self.log_path = model_dir, core, log

    def __enter__(self) -> "PinnedServer":
        from nemo_igrpo.serve import wait_until_healthy

        self.log = open(self.log_path, "w")  # noqa: SIM115  (closed in __exit__)
        env = {**os.environ, "NEMO_IGRPO_SERVER_TOKEN": TOKEN, "OMP_NUM_THREADS": "1"}
        self.process = subprocess.Popen(
            pinned(self.core, [sys.executable, "-m", "nemo_igrpo.cli", "serve", str(self.model_dir), "--port",
                               str(self.port), "--enforce-eager", "--dtype", "float32"]),
            env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_until_healthy(self.url, self.process, 900, log=self.log_path)
        return self

    def __exit__(self, *exc_info) -> None:
        from nemo_igrpo.serve import stop_process_group

        stop_process_group(self.process)
        self.log.close()


def measure(mode: str, server: PinnedServer, model_dir: Path, steps: int, core: int | None, overrides: list[str],
            out: Path) -> list[dict]:
    """Train ``steps`` steps in ``mode`` in a pinned subprocess; the measured (post-warm-up) metrics records."""
    from nemo_igrpo.tracking import read_metrics

    command = pinned(core, [sys.executable, "-m", "nemo_igrpo.cli", "train", *COMMON, f"model.path={model_dir}",
                            f"generation.server.url={server.url}", f"trainer.max_steps={steps}",
                            f"trainer.output_dir={out}", *MODES[mode], *overrides,
                            "warm_start.steps=0"])  # the overrides' warm start was done once, into model_dir
    env = {**os.environ, "NEMO_IGRPO_SERVER_TOKEN": TOKEN, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{mode}: training failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    return [r for r in read_metrics(out / "metrics.jsonl") if r["step"] > 1]  # step 1 = warm-up


def environment() -> dict:
    """bench_igrpo_overhead's record of the machine (one torch thread per process here), plus the CPU model."""
    from bench_igrpo_overhead import environment as machine

    info = machine(threads=1)
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            info["cpu_model"] = next(line.split(":", 1)[1].strip() for line in cpuinfo if "model name" in line)
    except (OSError, StopIteration):
        pass
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8, help="steps per run (the first is warm-up)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per mode (modes alternate)")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--model", type=Path, default=None, help="HF folder to train (default: the quickstart's "
                                                                    "warm start, run here once)")
    parser.add_argument("--server-core", type=int, default=1, help="CPU core of the server (-1: not pinned)")
    parser.add_argument("--trainer-core", type=int, default=0, help="CPU core of the trainer (-1: not pinned)")
    parser.add_argument("--output", type=Path, default=Path("bench_async.json"))
    parser.add_argument("overrides", nargs="*", help="config overrides for every run (and the warm start)")
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be ≥ 2 (the first step of each run is warm-up)")
    server_core = None if args.server_core < 0 else args.server_core
    trainer_core = None if args.trainer_core < 0 else args.trainer_core

    from nemo_igrpo.cli import default_config_path
    from nemo_igrpo.config import load_config

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_igrpo_overhead import warm_started_model

    config = load_config(default_config_path(), args.overrides)
    env = environment()
    records: dict[str, list[dict]] = {mode: [] for mode in args.modes}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = args.model
        if model_dir is None:
            model_dir = work / "warm"
            warm_started_model(config, model_dir)
        with PinnedServer(model_dir, server_core, work / "server.log") as server:
            for repeat in range(args.repeats):
                for mode in args.modes:
                    got = measure(mode, server, model_dir, args.steps, trainer_core, args.overrides,
                                  work / f"{mode}-{repeat}")
                    records[mode] += got
                    print(f"{mode} repeat {repeat}: {summarize(got)['s_per_step']:.2f} s/step", flush=True)

    results = {mode: summarize(records[mode]) for mode in args.modes}
    title = (f"server layout, server on core {server_core}, trainer on core {trainer_core}; mean of "
             f"{args.repeats} × {args.steps - 1} steps per mode; {config.trainer.prompts_per_step} problems × "
             f"{config.algorithm.num_drafts} drafts + {config.algorithm.num_refinements} refinements, "
             f"≤ {config.generation.max_new_tokens} tokens")
    table = render_table(results, title)
    print(table)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"results": results, "environment": env, "command": " ".join(sys.argv),
                                       "table": table, "records": records}, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()

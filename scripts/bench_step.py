#!/usr/bin/env python
"""Seconds per phase and tokens/s of GRPO (8 samples) vs iGRPO (4 drafts + 4 refinements) on the embedded default.

Both runs start from the same warm-started model and take the same number of steps; the table shows the median
over the measured steps (the first step is treated as warm-up and dropped). Writes the numbers as JSON.

    python scripts/bench_step.py --steps 6 --output bench_step.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
from pathlib import Path

import torch
import transformers
from rich.console import Console
from rich.table import Table

from nemo_igrpo.cli import default_config_path
from nemo_igrpo.config import load_config
from nemo_igrpo.tracking import read_metrics
from nemo_igrpo.trainer import train

PHASES = ["rollout/drafts", "rollout/refinements", "rollout/reward", "update", "weight_sync", "step"]


def measure(preset: str, steps: int, overrides: list[str], workdir: Path) -> dict[str, float]:
    config = load_config(default_config_path(), [
        f"algorithm.preset={preset}", f"trainer.max_steps={steps + 1}", "trainer.eval_every=0",
        "trainer.save_every=0", "trainer.progress=false", "trainer.loggers=[]", "trainer.resume=none",
        f"trainer.output_dir={workdir / preset}", *overrides])
    train(config, Console(quiet=True))
    records = read_metrics(workdir / preset / "metrics.jsonl")[1:]  # drop the warm-up step
    keys = [f"time/{p}" for p in PHASES] + ["throughput/tokens_per_s", "throughput/generated_tokens_per_s",
                                            "throughput/trained_tokens_per_s"]
    return {key: statistics.median(r.get(key, 0.0) for r in records) for key in keys}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="measured steps per algorithm (after 1 warm-up step)")
    parser.add_argument("--output", type=Path, default=Path("bench_step.json"), help="JSON file to write")
    parser.add_argument("overrides", nargs="*", help="config overrides applied to both runs")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        results = {preset: measure(preset, args.steps, args.overrides, Path(tmp)) for preset in ("grpo", "igrpo")}

    table = Table(title=f"seconds per step phase (median of {args.steps} steps), embedded default")
    table.add_column("metric")
    for preset in results:
        table.add_column(preset, justify="right")
    table.add_column("igrpo / grpo", justify="right")
    for key in results["grpo"]:
        grpo, igrpo = results["grpo"][key], results["igrpo"][key]
        ratio = f"{igrpo / grpo:.2f}" if grpo else "-"
        table.add_row(key, f"{grpo:.3f}", f"{igrpo:.3f}", ratio)
    Console().print(table)

    args.output.write_text(json.dumps({
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "steps": args.steps, "overrides": args.overrides, "results": results}, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()

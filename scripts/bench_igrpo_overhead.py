#!/usr/bin/env python
"""Wall-clock cost of iGRPO (4 drafts + 4 refinements) over GRPO (8 samples), per step and per phase.

Both algorithms train the same warm-started model (warm-started once here, or --model DIR) on the same problems
(same trainer.seed, so the same prompt order) for the same number of steps, with every generation backend that is
available: ``hf`` always, ``vllm`` when ``import vllm`` works and the backend is registered. Repetitions alternate
GRPO / iGRPO; the first step of every run is warm-up and not counted. Phases are the trainer's own ``time/*``
metrics: drafts (Stage-1 generation), reward (grading, both stages), refinements (Stage-2 generation; GRPO's whole
generation), log-probs (separate old/reference log-prob passes: none with ppo_epochs=1 and kl_coef=0, the paper's
setting, where the only forward pass is inside the update), update (forward + backward + optimizer) and
weight sync (policy → generator). The paper reports +13% GPU-hours for iGRPO over GRPO.

    python scripts/bench_igrpo_overhead.py --steps 4 --repeats 2 --output bench_igrpo_overhead.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

ARMS = ("grpo", "igrpo")
# column → the time/* metrics it sums
PHASES = {
    "drafts": ["time/rollout/drafts"],
    "reward": ["time/rollout/reward"],
    "refinements": ["time/rollout/refinements"],
    "log-probs": ["time/old_logprobs", "time/reference_logprobs"],
    "update": ["time/update"],
    "weight sync": ["time/weight_sync"],
    "step": ["time/step"],
}


# ------------------------------------------------------------------------------------------ pure parts (tested)

def phase_seconds(record: dict) -> dict[str, float]:
    """One metrics.jsonl record → seconds per phase column (absent metrics count as 0)."""
    return {phase: sum(float(record.get(key, 0.0)) for key in keys) for phase, keys in PHASES.items()}


def median_phases(records: list[dict]) -> dict[str, float]:
    """Median over steps of each phase column."""
    if not records:
        raise ValueError("no measured steps (use --steps ≥ 2: the first step of each run is warm-up)")
    per_step = [phase_seconds(r) for r in records]
    return {phase: statistics.median(step[phase] for step in per_step) for phase in PHASES}


def overhead(grpo: dict[str, float], igrpo: dict[str, float]) -> dict[str, float]:
    """iGRPO / GRPO of the step time, and iGRPO's extra seconds per phase (positive = iGRPO slower)."""
    return {"step_ratio": igrpo["step"] / grpo["step"] if grpo["step"] else float("nan"),
            "step_overhead_pct": 100 * (igrpo["step"] / grpo["step"] - 1) if grpo["step"] else float("nan"),
            **{f"extra_s/{phase}": igrpo[phase] - grpo[phase] for phase in PHASES}}


def generated_tokens(record: dict) -> float:
    """Tokens sampled in one step, both stages: mean length × number of samples per stage."""
    problems = record["batch/sequences"] / record["rollouts_per_prompt/refinements"]
    return (record["response_length/refinement_mean"] * record["batch/sequences"]
            + record.get("response_length/draft_mean", 0.0) * problems * record["rollouts_per_prompt/drafts"])


def render_table(results: dict[str, dict[str, dict[str, float]]], title: str) -> str:
    """Markdown: one row per (backend, algorithm), one column per phase, then the overhead row per backend."""
    header = "| backend | algorithm | " + " | ".join(PHASES) + " |"
    rows = [f"**{title}**", "", header, "|" + "---|" * (len(PHASES) + 2)]
    for backend, arms in results.items():
        for arm in ARMS:
            rows.append(f"| {backend} | {arm} | " + " | ".join(f"{arms[arm][p]:.3f}" for p in PHASES) + " |")
        o = overhead(arms["grpo"], arms["igrpo"])
        rows.append(f"| {backend} | **iGRPO / GRPO** | " + " | ".join(
            f"{o[f'extra_s/{p}']:+.3f}" for p in PHASES if p != "step") + f" | **{o['step_ratio']:.2f}× "
            f"({o['step_overhead_pct']:+.0f}%)** |")
    return "\n".join(rows)


# ------------------------------------------------------------------------------------------ measurement

def available_backends() -> list[str]:
    """hf, plus vllm when the engine imports and nemo-igrpo registers a builder for it."""
    from nemo_igrpo.backends import GENERATION_BACKENDS

    backends = ["hf"]
    if "vllm" in GENERATION_BACKENDS:
        try:
            import vllm  # noqa: F401

            import nemo_igrpo.generation.vllm  # noqa: F401
        except Exception as error:  # noqa: BLE001 - any import failure means "not available here"
            print(f"vllm backend not measured: {type(error).__name__}: {error}", file=sys.stderr)
        else:
            backends.append("vllm")
    return backends


def warm_started_model(config, directory: Path) -> None:
    """The quickstart's warm start (warm_start.steps supervised steps from random init), saved as an HF folder."""
    from rich.console import Console

    from nemo_igrpo.data.sources import load_examples
    from nemo_igrpo.models import load_model, load_tokenizer
    from nemo_igrpo.assembly import build_template, seed_everything, warm_start_model

    seed_everything(config.trainer.seed)
    tokenizer = load_tokenizer(config.model)
    template = build_template(config.prompt, tokenizer)
    model = load_model(config.model, tokenizer)
    warm_start_model(config, model, load_examples(config.data.train, config.data, "train"), template, tokenizer,
                     Console())
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def measure(arm: str, backend: str, model_dir: Path, steps: int, overrides: list[str], out: Path) -> list[dict]:
    from rich.console import Console

    from nemo_igrpo.cli import default_config_path
    from nemo_igrpo.config import load_config
    from nemo_igrpo.tracking import read_metrics
    from nemo_igrpo.trainer import train

    config = load_config(default_config_path(), [
        f"algorithm.preset={arm}", f"generation.backend={backend}", f"model.path={model_dir}", "warm_start.steps=0",
        f"trainer.max_steps={steps}", "trainer.eval_every=0", "trainer.save_every=0", "trainer.progress=false",
        "trainer.loggers=[]", "trainer.resume=none", f"trainer.output_dir={out}", *overrides])
    train(config, Console(quiet=True))
    return [r for r in read_metrics(out / "metrics.jsonl") if r["step"] > 1]  # step 1 = warm-up


def environment(threads: int) -> dict:
    import torch
    import transformers

    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch_threads": threads, "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "cuda": torch.cuda.is_available(),
            "loadavg_at_start": os.getloadavg()}
    try:
        import vllm

        info["vllm"] = vllm.__version__
    except Exception:  # noqa: BLE001
        info["vllm"] = None
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4, help="steps per run (the first is warm-up)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per (backend, algorithm)")
    parser.add_argument("--backends", nargs="+", default=None, help="default: every available one")
    parser.add_argument("--model", type=Path, default=None, help="HF folder to train (default: warm start here)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--output", type=Path, default=Path("bench_igrpo_overhead.json"))
    parser.add_argument("overrides", nargs="*",
                        help="config overrides for every run (e.g. trainer.prompts_per_step=16)")
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be ≥ 2 (the first step of each run is warm-up)")

    import torch
    from transformers.utils import logging as hf_logging

    from nemo_igrpo.cli import default_config_path
    from nemo_igrpo.config import load_config

    hf_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    backends = args.backends or available_backends()
    env = environment(torch.get_num_threads())
    config = load_config(default_config_path(), args.overrides)
    records: dict[str, dict[str, list[dict]]] = {b: {arm: [] for arm in ARMS} for b in backends}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model_dir = args.model
        if model_dir is None:
            model_dir = workdir / "warm"
            warm_started_model(config, model_dir)
        for backend in backends:
            for repeat in range(args.repeats):
                for arm in ARMS:
                    got = measure(arm, backend, model_dir, args.steps, args.overrides,
                                  workdir / f"{backend}-{arm}-{repeat}")
                    records[backend][arm] += got
                    print(f"{backend} {arm} repeat {repeat}: "
                          f"{statistics.median(r['time/step'] for r in got):.3f} s/step", flush=True)

    results = {b: {arm: median_phases(records[b][arm]) for arm in ARMS} for b in backends}
    title = (f"seconds per step and phase, median of {args.repeats} × {args.steps - 1} steps, "
             f"{config.trainer.prompts_per_step} problems × 8 rollouts, "
             f"≤ {config.generation.max_new_tokens} tokens, "
             f"{env['torch_threads']} torch threads")
    table = render_table(results, title)
    print(table)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({
        "command": " ".join(sys.argv), "environment": env, "title": title, "overrides": args.overrides,
        "model": str(args.model or "warm-started here"), "results": results,
        "overhead": {b: overhead(results[b]["grpo"], results[b]["igrpo"]) for b in backends},
        "generated_tokens_per_step": {b: {arm: statistics.median(generated_tokens(r) for r in records[b][arm])
                                          for arm in ARMS} for b in backends},
        "table": table}, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()

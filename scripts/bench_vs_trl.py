#!/usr/bin/env python
"""nemo-igrpo (GRPO mode, HF backends) vs TRL's ``GRPOTrainer`` on the same job, in one process.

Both trainers get the same randomly initialised tiny Llama (built from ``model.tiny`` of conf/quickstart.yaml and
saved to a local folder, with the character tokenizer), the same problems in the same order (nemo-igrpo's prompt
sampler order, fed to TRL unshuffled), the same chat-rendered prompt tokens, the same reward (nemo-igrpo's
``boxed_match``), group size 8, completion budget, temperature, one rollout batch per optimizer step, the same
micro-batch, AdamW settings, warm-up + cosine schedule, PPO clip 0.2, no KL (no reference model) and sequence-mean
token-mean loss (TRL ``loss_type="grpo"``). Repetitions alternate nemo-igrpo / TRL so that load from other
processes hits both alike. The first step of every repetition is warm-up and is not counted.

    pip install -e '.[bench]'    # trl==1.16.0
    python scripts/bench_vs_trl.py --steps 6 --repeats 3 --output bench_vs_trl.json

seconds/step: nemo-igrpo's ``time/step`` (rollout + update + weight sync); TRL: wall-clock between the trainer's
``on_step_begin`` and ``on_step_end`` callbacks (generation, reward, loss, backward, optimizer step).
tokens/s: completion tokens generated in the step / seconds of the step (the same definition for both).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

SYSTEMS = ("nemo-igrpo", "trl")


# ------------------------------------------------------------------------------------------ pure parts (tested)

def summarize(steps: list[dict[str, float]]) -> dict[str, float]:
    """Median s/step and tokens/s over measured steps (each ``{"seconds": s, "tokens": n}``), plus spread."""
    if not steps:
        raise ValueError("no measured steps (use --steps ≥ 2: the first step of each repetition is warm-up)")
    seconds = [s["seconds"] for s in steps]
    rates = [s["tokens"] / s["seconds"] for s in steps]
    return {"steps": len(steps), "median_s_per_step": statistics.median(seconds),
            "min_s_per_step": min(seconds), "max_s_per_step": max(seconds),
            "median_tokens_per_s": statistics.median(rates),
            "median_tokens_per_step": statistics.median(s["tokens"] for s in steps)}


def ratios(results: dict[str, dict[str, float]]) -> dict[str, float]:
    """nemo-igrpo / TRL: seconds per step (< 1 = nemo-igrpo faster) and tokens/s (> 1 = nemo-igrpo faster)."""
    ours, theirs = results["nemo-igrpo"], results["trl"]
    return {"s_per_step": ours["median_s_per_step"] / theirs["median_s_per_step"],
            "tokens_per_s": ours["median_tokens_per_s"] / theirs["median_tokens_per_s"]}


def paired_ratios(per_repeat: dict[str, list[dict[str, float]]]) -> list[float]:
    """nemo-igrpo / TRL seconds per step within each repetition (the two ran back to back, so a load change
    between repetitions cancels out); robust to a machine shared with other work."""
    return [ours["median_s_per_step"] / theirs["median_s_per_step"]
            for ours, theirs in zip(per_repeat["nemo-igrpo"], per_repeat["trl"])]


def render_table(results: dict[str, dict[str, float]], title: str, paired: list[float] | None = None) -> str:
    """A Markdown table (printed, and pasted into docs/performance.md)."""
    rows = [f"**{title}**", "", ("| system | measured steps | median s/step (min–max) | median tokens/s | "
                                 "tokens/step |"), "|---|---|---|---|---|"]
    for name in SYSTEMS:
        r = results[name]
        rows.append(f"| {name} | {r['steps']} | {r['median_s_per_step']:.3f} ({r['min_s_per_step']:.3f}–"
                    f"{r['max_s_per_step']:.3f}) | {r['median_tokens_per_s']:.0f} | "
                    f"{r['median_tokens_per_step']:.0f} |")
    ratio = ratios(results)
    rows.append(f"| **nemo-igrpo / TRL** | | **{ratio['s_per_step']:.2f}** (time) | "
                f"**{ratio['tokens_per_s']:.2f}** (throughput) | |")
    if paired:
        listed = ", ".join(f"{r:.2f}" for r in paired)
        rows += ["", (f"Per-repetition time ratios (back-to-back pairs): {listed}; "
                      f"median **{statistics.median(paired):.2f}**.")]
    return "\n".join(rows)


def environment() -> dict:
    import torch
    import transformers

    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "cuda": torch.cuda.is_available(), "loadavg_at_start": os.getloadavg()}
    try:
        import trl

        info["trl"] = trl.__version__
    except ImportError:
        info["trl"] = None
    return info


# ------------------------------------------------------------------------------------------ the two trainers

def base_config(overrides: list[str]):
    from nemo_igrpo.cli import default_config_path
    from nemo_igrpo.config import load_config

    return load_config(default_config_path(), overrides)


def save_model(config, directory: Path, seed: int) -> None:
    """The quickstart's tiny Llama, randomly initialised with ``seed``, and the character tokenizer, as an HF
    folder both trainers load."""
    import torch

    from nemo_igrpo.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(config.model)
    torch.manual_seed(seed)
    model = load_model(config.model, tokenizer)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def problem_order(config, prompts_per_step: int, steps: int, seed: int) -> list:
    """The problems nemo-igrpo's sampler hands out (trainer.seed = seed), flattened, so TRL sees the same ones."""
    from nemo_igrpo.data.dataset import PromptSampler
    from nemo_igrpo.data.sources import load_examples

    sampler = PromptSampler(load_examples(config.data.train, config.data, "train"), seed=seed)
    return sampler.next_batch(prompts_per_step * steps)


NEMO_PHASES = ("time/rollout/generation", "time/rollout/reward", "time/update", "time/weight_sync")


def run_nemo(common: list[str], model_dir: Path, workdir: Path, steps: int, seed: int) -> list[dict[str, float]]:
    from rich.console import Console

    from nemo_igrpo.tracking import read_metrics
    from nemo_igrpo.trainer import train

    out = workdir / f"nemo-{seed}"
    config = base_config([*common, f"model.path={model_dir}", f"trainer.seed={seed}", f"trainer.output_dir={out}",
                          f"trainer.max_steps={steps}"])
    train(config, Console(quiet=True))
    records = [r for r in read_metrics(out / "metrics.jsonl") if r["step"] > 0]
    return [{"seconds": r["time/step"], "tokens": r["response_length/refinement_mean"] * r["batch/sequences"],
             **{key: r.get(key, 0.0) for key in NEMO_PHASES}} for r in records]


def run_trl(config, model_dir: Path, workdir: Path, steps: int, seed: int, prompts_per_step: int,
            group: int) -> list[dict[str, float]]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from nemo_igrpo.assembly import build_training_reward

    problems = problem_order(config, prompts_per_step, steps, seed)
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": p.problem}], "answer": p.answer}
                                 for p in problems])
    reward = build_training_reward(config)

    def boxed_match(prompts, completions, answer, **_):
        return list(reward([c[-1]["content"] for c in completions], list(answer)).scores)

    gen, opt = config.generation, config.optim
    batch = prompts_per_step * group
    micro = min(config.policy.micro_batch_size, batch)
    if batch % micro:
        raise ValueError(f"prompts_per_step × 8 = {batch} must be a multiple of policy.micro_batch_size={micro}")
    args = GRPOConfig(
        output_dir=str(workdir / f"trl-{seed}"), max_steps=steps, seed=seed, use_cpu=True, bf16=False,
        per_device_train_batch_size=micro, gradient_accumulation_steps=batch // micro,
        steps_per_generation=batch // micro,  # one generation per optimizer step, as nemo-igrpo
        num_generations=group, max_completion_length=gen.max_new_tokens, temperature=gen.temperature,
        top_p=gen.top_p, top_k=0, shuffle_dataset=False, beta=0.0, num_iterations=1, loss_type="grpo",
        epsilon=config.algorithm.eps_low, epsilon_high=config.algorithm.eps_high, scale_rewards="group",
        learning_rate=opt.lr, adam_beta1=opt.betas[0], adam_beta2=opt.betas[1], weight_decay=opt.weight_decay,
        max_grad_norm=opt.max_grad_norm, lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": opt.min_lr_ratio},
        warmup_steps=math.ceil(opt.warmup_ratio * steps),  # as nemo_igrpo.assembly.build_policy rounds it
        logging_steps=1, report_to="none",
        save_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.started, self.seconds, self.lengths = 0.0, [], []

        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.append(time.perf_counter() - self.started)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "completions/mean_length" in logs:
                self.lengths.append(logs["completions/mean_length"])

    timer = StepTimer()
    trainer = GRPOTrainer(model=model, reward_funcs=boxed_match, args=args, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[timer])
    try:
        trainer.train()
    finally:
        reward.close()
    if len(timer.lengths) != len(timer.seconds):
        raise RuntimeError(f"TRL logged {len(timer.lengths)} completion lengths for {len(timer.seconds)} steps")
    return [{"seconds": s, "tokens": n * batch} for s, n in zip(timer.seconds, timer.lengths)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per repetition (first = warm-up)")
    parser.add_argument("--repeats", type=int, default=3, help="repetitions per system (alternating)")
    parser.add_argument("--prompts", type=int, default=8, help="problems per step (× 8 completions)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for both (default: torch's choice)")
    parser.add_argument("--output", type=Path, default=Path("bench_vs_trl.json"))
    parser.add_argument("overrides", nargs="*", help="extra nemo-igrpo overrides (model shape, lengths, ...)")
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be ≥ 2 (the first step of each repetition is warm-up)")
    try:
        import trl  # noqa: F401
    except ImportError:
        sys.exit("TRL is not installed: pip install -e '.[bench]' (trl==1.16.0)")

    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    common = ["algorithm.preset=grpo", f"trainer.prompts_per_step={args.prompts}", "warm_start.steps=0",
              "trainer.eval_every=0", "trainer.save_every=0", "trainer.progress=false", "trainer.loggers=[]",
              "trainer.resume=none", *args.overrides]
    config = base_config(common)
    group = config.algorithm.num_refinements
    env = environment()
    measured: dict[str, list[dict[str, float]]] = {name: [] for name in SYSTEMS}
    per_repeat: dict[str, list[dict[str, float]]] = {name: [] for name in SYSTEMS}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for repeat in range(args.repeats):
            seed = repeat
            model_dir = workdir / f"model-{seed}"
            save_model(config, model_dir, seed)
            for name in SYSTEMS:
                if name == "nemo-igrpo":
                    steps = run_nemo(common, model_dir, workdir, args.steps, seed)
                else:
                    steps = run_trl(config, model_dir, workdir, args.steps, seed, args.prompts, group)
                measured[name] += steps[1:]
                per_repeat[name].append(summarize(steps[1:]))
                print(f"repeat {repeat} {name}: {per_repeat[name][-1]['median_s_per_step']:.3f} s/step", flush=True)

    results = {name: summarize(steps) for name, steps in measured.items()}
    title = (f"GRPO, {args.prompts} problems × {group} completions ≤ {config.generation.max_new_tokens} tokens, "
             f"tiny Llama ({config.model.tiny.hidden_size}×{config.model.tiny.num_layers}), "
             f"{args.repeats} × {args.steps - 1} measured steps, {env['torch_threads']} torch threads")
    paired = paired_ratios(per_repeat)
    phases = {key: statistics.median(s[key] for s in measured["nemo-igrpo"]) for key in NEMO_PHASES}
    table = render_table(results, title, paired)
    print(table)
    write_json(args.output, {"command": " ".join(sys.argv), "environment": env, "title": title,
                             "settings": {"steps": args.steps, "repeats": args.repeats, "prompts": args.prompts,
                                          "group": group, "overrides": common},
                             "results": results, "ratio": ratios(results), "paired_ratios": paired,
                             "nemo_igrpo_phases_median_s": phases, "per_repeat": per_repeat,
                             "table": table})
    print(f"wrote {args.output}")


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()

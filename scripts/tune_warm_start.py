#!/usr/bin/env python
"""Tune ``warm_start.steps`` for a study: how good is the policy's draft after the warm start?

Runs the config's warm start once and, at every fifth of it (where the warm start logs its loss), samples
``--samples`` answers per held-out problem at the RL sampling settings (``generation.temperature`` / ``top_p``, the
distribution Stage-1 drafts come from) and prints

* p: the per-draft success rate (avg@k), the quantity the study wants at about 0.3-0.6;
* best-of-k: the share of problems with at least one right answer among k (what iGRPO's best-draft selection
  achieves with the binary reward, Proposition 3.1), and its complement, the share where the best draft is wrong.

The checkpoints inside one run see a learning rate that has not yet decayed as far as a run of that length would, so
confirm the chosen step count with ``--steps N`` (the last line is then exactly what a study run starts from).
With ``--two-pass N`` the final model is also evaluated draft → refine (``nemo_igrpo.evaluation.two_pass``).
One JSON line per probe goes to ``--out``.

    OMP_NUM_THREADS=1 nice -n 10 timeout 3600 python scripts/tune_warm_start.py --config conf/study/chain.yaml \\
        --steps 300 --problems 100 --out /tmp/tune.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from rich.console import Console


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=None, help="warm_start.steps (default: the config's)")
    parser.add_argument("--problems", type=int, default=100, help="held-out problems per probe")
    parser.add_argument("--samples", type=int, default=4, help="answers per problem (k of best-of-k)")
    parser.add_argument("--seed", type=int, default=0, help="trainer.seed: warm-start batches and sampling")
    parser.add_argument("--two-pass", type=int, default=0, help="drafts for a final draft → refine evaluation")
    parser.add_argument("--out", type=Path, default=None, help="append one JSON line per probe")
    parser.add_argument("--save", type=Path, default=None,
                        help="save the warm-started model here (an HF folder; as ROOT/warm-sSEED of the study "
                             "script, with the same --seed and config, the study reuses it instead of redoing it)")
    parser.add_argument("overrides", nargs="*", help="config overrides, section.key=value")
    args = parser.parse_args()

    from nemo_igrpo.assembly import (
        build_generation,
        build_template,
        build_training_reward,
        seed_everything,
        warm_start_model,
    )
    from nemo_igrpo.config import load_config
    from nemo_igrpo.data.sources import load_examples
    from nemo_igrpo.evaluation.run import evaluate
    from nemo_igrpo.evaluation.two_pass import evaluate_two_pass
    from nemo_igrpo.generation.base import SamplingParams
    from nemo_igrpo.models import load_model, load_tokenizer, stop_token_ids

    overrides = [f"trainer.seed={args.seed}", *args.overrides]
    if args.steps is not None:
        overrides.append(f"warm_start.steps={args.steps}")
    config = load_config(args.config, overrides)
    seed_everything(config.trainer.seed)
    tokenizer = load_tokenizer(config.model)
    model = load_model(config.model, tokenizer)
    template = build_template(config.prompt, tokenizer)
    reward = build_training_reward(config)
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    heldout = load_examples(config.data.eval, config.data, "eval")[: args.problems]
    params = SamplingParams(n=args.samples, temperature=config.generation.temperature, top_p=config.generation.top_p,
                            max_new_tokens=config.generation.max_new_tokens,
                            stop_token_ids=stop_token_ids(tokenizer, model))
    started = time.perf_counter()
    params_count = sum(p.numel() for p in model.parameters())
    print(f"model: {params_count / 1e6:.2f}M parameters; warm start {config.warm_start.steps} steps", flush=True)

    def probe(step: int) -> dict:
        generator = build_generation(config, model, tokenizer.pad_token_id)  # a fresh copy of the current weights
        with torch.random.fork_rng(), torch.inference_mode():  # probing must not change the warm start's draws
            torch.manual_seed(config.trainer.seed + 7919 * step)
            result = evaluate(heldout, generator, template.problem_ids, reward, decode, params)
        row = {"config": str(args.config), "overrides": overrides, "warm_step": step,
               "warm_steps": config.warm_start.steps, "problems": len(heldout), "samples": args.samples,
               "p": result.accuracy, "best_of_k": result.summary[f"pass@{args.samples}"],
               "seconds": round(time.perf_counter() - started, 1)}
        print(f"  step {step}: p {row['p']:.3f}, best-of-{args.samples} {row['best_of_k']:.3f} "
              f"(best draft wrong on {1 - row['best_of_k']:.1%}); {row['seconds']:.0f} s", flush=True)
        if args.out:
            with open(args.out, "a") as handle:
                handle.write(json.dumps(row) + "\n")
        return row

    class ProbingConsole(Console):
        """warm_start logs its loss at every fifth of the run: probe the policy there."""

        def print(self, *objects, **kwargs):  # noqa: A003
            super().print(*objects, **kwargs)
            text = " ".join(str(o) for o in objects)
            if "warm start " in text and "/" in text:
                probe(int(text.split("warm start ", 1)[1].split("/", 1)[0]))

    warm_start_model(config, model, load_examples(config.data.train, config.data, "train"), template, tokenizer,
                     ProbingConsole())
    if args.save is not None:  # written beside, then renamed: a half-written folder is never reused
        tmp = args.save.with_name(args.save.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, args.save)
        print(f"saved the warm-started model to {args.save}", flush=True)
    if args.two_pass:
        generator = build_generation(config, model, tokenizer.pad_token_id)
        for selection in ("oracle", "majority"):
            with torch.random.fork_rng(), torch.inference_mode():
                torch.manual_seed(config.trainer.seed + 104729)
                result = evaluate_two_pass(heldout, generator, template, reward, decode, params, args.two_pass,
                                           selection=selection)
            row = {"config": str(args.config), "overrides": overrides, "warm_step": config.warm_start.steps,
                   "two_pass": args.two_pass, "selection": selection, **result.summary,
                   "seconds": round(time.perf_counter() - started, 1)}
            print(f"  two-pass ({selection}, {args.two_pass} drafts): " +
                  ", ".join(f"{k} {v:.3f}" for k, v in result.summary.items()), flush=True)
            if args.out:
                with open(args.out, "a") as handle:
                    handle.write(json.dumps(row) + "\n")
    reward.close()


if __name__ == "__main__":
    sys.exit(main())

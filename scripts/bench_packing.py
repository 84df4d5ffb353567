#!/usr/bin/env python
"""One policy update over a length-skewed batch: row micro-batches (padded) vs a token budget vs sequence packing,
and LoRA vs full fine-tuning memory.

The batch has 64 sequences whose lengths are long-tailed like reasoning traces (log-normal, median about 10% of the
maximum, a few at the maximum), in rollout (random) order. Each mode runs ``HFPolicy.train_step`` once (forward,
backward, AdamW step) and reports trained (completion) tokens per second and the peak of live tensor memory, tracked
op by op with the TorchDispatchMode of scripts/bench_memory.py (exact and device-independent; the model's own
parameters exist beforehand and are not counted; gradients, Adam state and activations are).

    python scripts/bench_packing.py --shapes tiny --max-length 128 --output bench_packing_tiny.json
    python scripts/bench_packing.py --shapes 100m --max-length 128 --timing tracked --output bench_packing_100m.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

MiB = 1024 ** 2
SHAPES = {  # Llama-shaped; "100m" is ≈110M parameters (hidden 768 × 12 layers, vocab 16k, untied head)
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1),
    "100m": dict(vocab_size=16384, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                 num_attention_heads=12, num_key_value_heads=4),
}


# ------------------------------------------------------------------------------------------ pure parts (tested)

def skewed_lengths(count: int, max_length: int, at_max: int = 3, seed: int = 0) -> list[int]:
    """Long-tailed sequence lengths: log-normal around 10% of ``max_length`` (σ = 1), ``at_max`` of them at the
    maximum, clipped to [8, max_length], in random order."""
    import random

    rng = random.Random(seed)
    lengths = [min(max_length, max(8, round(max_length * 0.1 * math.exp(rng.gauss(0.0, 1.0)))))
               for _ in range(count - at_max)]
    lengths += [max_length] * at_max
    rng.shuffle(lengths)
    return lengths


def render_table(rows: list[dict], title: str) -> str:
    lines = [f"**{title}**", "", "| shape | mode | micro-batches | tokens run (padded) | trained tokens | seconds | "
             "trained tokens/s | × padded | peak MiB | × padded |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['mode']} | {r['micro_batches']} | {r['tokens_run']} | {r['trained_tokens']}"
                     f" | {r['seconds']:.2f} | {r['tokens_per_s']:.0f} | {r['speedup']:.2f}× | "
                     f"{r['peak_bytes'] / MiB:.1f} | {r['memory_ratio']:.2f}× |")
    return "\n".join(lines)


def render_lora_table(rows: list[dict], title: str) -> str:
    lines = [f"**{title}**", "", "| shape | fine-tuning | trainable params | peak MiB | × full |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['mode']} | {r['trainable']:,} | {r['peak_bytes'] / MiB:.1f} | "
                     f"{r['memory_ratio']:.2f}× |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ measurement

def _tracker():
    spec = importlib.util.spec_from_file_location("bench_memory", Path(__file__).with_name("bench_memory.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.PeakTensorMemory


def build_batch(lengths: list[int], vocab: int, prompt: int, seed: int = 0):
    import torch

    from nemo_igrpo.algorithms.batch import RolloutBatch, pad_sequences

    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, vocab, (min(prompt, n - 1),), generator=g).tolist() for n in lengths]
    completions = [torch.randint(1, vocab, (n - len(p),), generator=g).tolist() for n, p in zip(lengths, prompts)]
    ids, attention, loss_mask, _ = pad_sequences(prompts, completions, pad_token_id=0)
    rows = len(lengths)
    return RolloutBatch(ids, attention, loss_mask, torch.randn(rows, generator=g), torch.arange(rows) // 8,
                        torch.zeros(ids.shape))


def pg_loss(batch):
    tokens = float(batch.loss_mask.sum())

    def loss_fn(stats, part):
        loss = -(stats.logprobs * part.loss_mask * part.advantages[:, None]).sum() / tokens
        return loss, {}

    return loss_fn


def make_policy(shape: str, max_length: int, seed: int = 0, lora=None, **options):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from nemo_igrpo.policy.hf import HFPolicy

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**SHAPES[shape], max_position_embeddings=max_length,
                                         tie_word_embeddings=False))
    defaults = dict(lr=1e-5, weight_decay=0.0, betas=(0.9, 0.999), max_grad_norm=1.0, warmup_steps=0, total_steps=10,
                    min_lr_ratio=1.0, micro_batch_size=8, logprob_chunk_size=1024, temperature=1.0,
                    use_reference=False, gradient_checkpointing=False, autocast_dtype=None, device="cpu", lora=lora)
    return HFPolicy(model, **{**defaults, **options})


def run_mode(shape: str, mode: str, batch, args) -> dict:
    options = {"micro_batch_size": args.micro_batch_size}
    if mode != "padded":
        options.update(max_tokens_per_micro_batch=args.budget or 4 * args.max_length,
                       sequence_packing=mode == "packed")
    policy = make_policy(shape, args.max_length, **options)
    parts = policy._micro_batches(batch)
    tokens_run = sum(int(p.attention_mask.sum()) if mode == "packed" else p.input_ids.numel() for _, p in parts)
    if args.timing == "separate":  # timed without the tracker: its per-op Python hook dominates small models
        started = time.perf_counter()
        policy.train_step(batch, pg_loss(batch))
        seconds = time.perf_counter() - started
        policy = make_policy(shape, args.max_length, **options)  # fresh: the first step allocates Adam's state
    tracker = _tracker()()
    started = time.perf_counter()
    with tracker:
        policy.train_step(batch, pg_loss(batch))
    if args.timing == "tracked":  # one run: the hook's cost is small next to a ~100M model's matmuls
        seconds = time.perf_counter() - started
    trained = int(batch.loss_mask.sum())
    return {"shape": shape, "mode": mode, "micro_batches": len(parts), "tokens_run": tokens_run,
            "trained_tokens": trained, "seconds": seconds, "tokens_per_s": trained / seconds,
            "peak_bytes": tracker.peak}


def run_lora(shape: str, mode: str, batch, args) -> dict:
    from types import SimpleNamespace

    lora = SimpleNamespace(rank=args.lora_rank, alpha=2.0 * args.lora_rank, dropout=0.0,
                           target_modules=["all-linear"]) if mode != "full" else None
    policy = make_policy(shape, args.max_length, lora=lora, micro_batch_size=args.micro_batch_size,
                         gradient_checkpointing=args.lora_gradient_checkpointing)
    trainable = sum(p.numel() for p in policy.model.parameters() if p.requires_grad)
    tracker = _tracker()()
    with tracker:
        policy.train_step(batch, pg_loss(batch))
    return {"shape": shape, "mode": mode, "trainable": trainable, "peak_bytes": tracker.peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["tiny", "100m"], choices=sorted(SHAPES))
    parser.add_argument("--sequences", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--prompt", type=int, default=16, help="prompt tokens per sequence (not trained)")
    parser.add_argument("--micro-batch-size", type=int, default=8, help="policy.micro_batch_size of the padded mode")
    parser.add_argument("--budget", type=int, default=0, help="policy.max_tokens_per_micro_batch (0: 4 × max length)")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--lora-sequences", type=int, default=8, help="sequences in the LoRA-vs-full memory batch")
    parser.add_argument("--lora-gradient-checkpointing", action="store_true",
                        help="recompute activations in both LoRA and full runs (leaves weights + optimizer memory)")
    parser.add_argument("--modes", nargs="*", default=["padded", "budget", "packed"],
                        choices=["padded", "budget", "packed"], help="none: only the LoRA-vs-full comparison")
    parser.add_argument("--timing", choices=["separate", "tracked"], default="separate",
                        help="separate: time a run without the memory tracker, then measure memory in a second run")
    parser.add_argument("--output", type=Path, default=Path("bench_packing.json"))
    args = parser.parse_args()

    import torch
    import transformers

    torch.manual_seed(0)
    lengths = skewed_lengths(args.sequences, args.max_length)
    rows, lora_rows = [], []
    for shape in args.shapes:
        batch = build_batch(lengths, SHAPES[shape]["vocab_size"], args.prompt)
        results = [run_mode(shape, mode, batch, args) for mode in args.modes]
        for r in results:
            r["speedup"] = r["tokens_per_s"] / results[0]["tokens_per_s"]
            r["memory_ratio"] = r["peak_bytes"] / results[0]["peak_bytes"]
            print(f"{shape} {r['mode']}: {r['tokens_per_s']:.0f} trained tokens/s, {r['peak_bytes'] / MiB:.1f} MiB",
                  flush=True)
        rows += results
        small = build_batch(lengths[:args.lora_sequences], SHAPES[shape]["vocab_size"], args.prompt)
        pair = [run_lora(shape, mode, small, args) for mode in ("full", f"LoRA r{args.lora_rank}")]
        for r in pair:
            r["memory_ratio"] = r["peak_bytes"] / pair[0]["peak_bytes"]
        lora_rows += pair
    median = sorted(lengths)[len(lengths) // 2]
    title = (f"one update, {args.sequences} sequences, lengths {min(lengths)}–{max(lengths)} (median {median}), "
             f"padded = {args.micro_batch_size} rows per micro-batch, budget = "
             f"{args.budget or 4 * args.max_length} tokens, fp32, CPU ({os.cpu_count()} cores), timing {args.timing}")
    table = render_table(rows, title)
    lora_title = (f"LoRA vs full fine-tuning: peak training memory of one update, {args.lora_sequences} sequences"
                  + (", gradient checkpointing" if args.lora_gradient_checkpointing else ""))
    lora_table = render_lora_table(lora_rows, lora_title)
    print(table + "\n\n" + lora_table)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({
        "command": " ".join(sys.argv), "lengths": lengths, "rows": rows, "lora_rows": lora_rows, "table": table,
        "lora_table": lora_table,
        "environment": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                        "transformers": transformers.__version__, "python": platform.python_version(),
                        "load_average": os.getloadavg()}}, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()

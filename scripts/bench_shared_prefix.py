#!/usr/bin/env python
"""The update on Stage-2 rows with ``policy.shared_prefix`` on and off: trained tokens/s and peak memory.

Each Stage-2 group is G refinements of one prefix (prompt + selected draft). Unshared, every row runs the prefix;
shared, the group is one row computing the prefix once (docs/algorithm.md). Both modes run forward and backward
(``HFPolicy._accumulate_gradients``: the update minus the optimizer step, which is the same in both) over the SAME
rows with the SAME ~110M-parameter Llama-shaped model (scripts/bench_packing.py's ``100m``), repetitions alternating
unshared / shared so that load from other processes hits both alike; the median per mode is reported, in wall-clock
time (``ratio``) and in this process's CPU time (``cpu_ratio``: robust to other processes on shared cores, use
``--threads 1`` there so that no thread spins waiting for a descheduled peer). Peak memory is
the peak of live tensor storage in one extra pass per mode (scripts/bench_memory.py's tracker: exact and
device-independent; parameters are not counted, gradients and activations are).

Default shapes: prefix 512 (prompt 64 + draft 448) and prefix 1024 (prompt 64 + draft 960), refinements of 512, G = 4.
The default shape computes (4 × 1024) / (512 + 4 × 512) = 1.6× fewer tokens (attention gains more: its cost is
not linear in the row). Targets: at least 1.4× at the default shape, and peak memory at most 1.0× the unshared
mode's.

    python scripts/bench_shared_prefix.py                       # ~2.5 minutes on 2 idle CPU cores
    python scripts/bench_shared_prefix.py --model tiny --prefixes 64:64 --refinement 32 --repeats 1
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

MiB = 1024 ** 2
MODES = ("unshared", "shared")


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------ pure parts (tested)

def parse_prefix(text: str) -> tuple[int, int]:
    """``PROMPT:DRAFT`` token counts of a prefix, e.g. ``64:448``."""
    prompt, draft = (int(x) for x in text.split(":"))
    if prompt < 1 or draft < 0:
        raise ValueError(f"prefix {text!r}: need PROMPT >= 1 and DRAFT >= 0")
    return prompt, draft


def computed_tokens(prefix: int, refinement: int, group: int, groups: int, shared: bool) -> int:
    """Tokens through the model: the prefix once per group when shared, once per row otherwise."""
    per_group = prefix + group * refinement if shared else group * (prefix + refinement)
    return groups * per_group


def summarise(rows: list[dict]) -> dict:
    """Per shape: shared / unshared trained tokens/s and peak memory; ``ratio`` of the first (default) shape."""
    out = {}
    for shape in dict.fromkeys(r["shape"] for r in rows):
        pair = {r["mode"]: r for r in rows if r["shape"] == shape}
        base, shared = pair["unshared"], pair["shared"]
        out[shape] = {"ratio": shared["tokens_per_s"] / base["tokens_per_s"],
                      "cpu_ratio": shared["cpu_tokens_per_s"] / base["cpu_tokens_per_s"],
                      "memory_ratio": shared["peak_bytes"] / base["peak_bytes"]}
    return out


def render_table(rows: list[dict], summary: dict, title: str) -> str:
    lines = [f"**{title}**", "", "| shape | mode | tokens computed | trained tokens | median s | trained tokens/s | "
             "× unshared | CPU-time tokens/s | × unshared | peak MiB | × unshared |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratios = summary[r["shape"]] if r["mode"] == "shared" else {"ratio": 1.0, "cpu_ratio": 1.0, "memory_ratio": 1.0}
        lines.append(f"| {r['shape']} | {r['mode']} | {r['computed_tokens']} | {r['trained_tokens']} | "
                     f"{r['seconds']:.2f} | {r['tokens_per_s']:.0f} | {ratios['ratio']:.2f}× | "
                     f"{r['cpu_tokens_per_s']:.0f} | "
                     f"{ratios['cpu_ratio']:.2f}× | "
                     f"{r['peak_bytes'] / MiB:.0f} | {ratios['memory_ratio']:.2f}× |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ measurement

def build_batch(prompt: int, draft: int, refinement: int, group: int, groups: int, vocab: int, seed: int = 0):
    """``groups`` Stage-2 groups: G rows of one prompt + draft prefix, each with its own refinement."""
    import torch

    from nemo_igrpo.algorithms.batch import RolloutBatch, pad_sequences

    g = torch.Generator().manual_seed(seed)
    prompts, completions, group_ids = [], [], []
    for gid in range(groups):
        prefix = torch.randint(1, vocab, (prompt + draft,), generator=g).tolist()
        for _ in range(group):
            prompts.append(prefix)
            completions.append(torch.randint(1, vocab, (refinement,), generator=g).tolist())
            group_ids.append(gid)
    ids, attention, loss_mask, _ = pad_sequences(prompts, completions, pad_token_id=0)
    rows = len(prompts)
    return RolloutBatch(ids, attention, loss_mask, torch.randn(rows, generator=g), torch.tensor(group_ids),
                        torch.zeros(ids.shape))


def forward_backward(policy, batch, loss_fn) -> None:
    policy.optimizer.zero_grad(set_to_none=True)
    policy._accumulate_gradients(batch, loss_fn)


def run_shape(name: str, prompt: int, draft: int, args, packing) -> list[dict]:
    batch = build_batch(prompt, draft, args.refinement, args.group, args.groups,
                        packing.SHAPES[args.model]["vocab_size"])
    length = prompt + draft + args.refinement
    policies = {mode: packing.make_policy(args.model, length, micro_batch_size=args.group if mode == "unshared" else 1,
                                          shared_prefix=mode == "shared") for mode in MODES}
    loss_fn = packing.pg_loss(batch)
    seconds = {mode: [] for mode in MODES}
    cpu = {mode: [] for mode in MODES}
    for repeat in range(args.repeats):  # alternating, so background load hits both modes alike
        for mode in MODES:
            started, cpu_started = time.perf_counter(), time.process_time()
            forward_backward(policies[mode], batch, loss_fn)
            seconds[mode].append(time.perf_counter() - started)
            cpu[mode].append(time.process_time() - cpu_started)
            print(f"{name} {mode} repeat {repeat + 1}: {seconds[mode][-1]:.2f} s wall, {cpu[mode][-1]:.2f} s CPU",
                  flush=True)
    trained = int(batch.loss_mask.sum())
    rows = []
    for mode in MODES:
        tracker = packing._tracker()()
        with tracker:
            forward_backward(policies[mode], batch, loss_fn)
        median = statistics.median(seconds[mode])
        rows.append({"shape": name, "mode": mode, "prefix": prompt + draft, "prompt": prompt, "draft": draft,
                     "refinement": args.refinement, "group": args.group, "groups": args.groups,
                     "computed_tokens": computed_tokens(prompt + draft, args.refinement, args.group, args.groups,
                                                        mode == "shared"),
                     "trained_tokens": trained, "seconds": median, "all_seconds": seconds[mode],
                     "tokens_per_s": trained / median, "cpu_seconds": statistics.median(cpu[mode]),
                     "all_cpu_seconds": cpu[mode], "cpu_tokens_per_s": trained / statistics.median(cpu[mode]),
                     "peak_bytes": tracker.peak})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="100m", choices=["tiny", "100m"], help="Llama shape (bench_packing.py)")
    parser.add_argument("--prefixes", nargs="+", default=["64:448", "64:960"],
                        help="PROMPT:DRAFT token counts per shape; the first is the default shape behind `ratio`")
    parser.add_argument("--refinement", type=int, default=512, help="tokens per refinement")
    parser.add_argument("--group", type=int, default=4, help="G: refinements per group")
    parser.add_argument("--groups", type=int, default=1, help="groups per update")
    parser.add_argument("--repeats", type=int, default=2, help="timed repetitions per mode (alternating)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--output", type=Path, default=Path("bench_shared_prefix.json"))
    args = parser.parse_args()

    import torch
    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    packing = _script("bench_packing")
    rows = []
    for text in args.prefixes:
        prompt, draft = parse_prefix(text)
        rows += run_shape(f"prefix {prompt + draft} ({prompt}+{draft})", prompt, draft, args, packing)
    summary = summarise(rows)
    default = summary[rows[0]["shape"]]
    title = (f"forward + backward of one update, {args.groups} group(s) of G = {args.group} refinements of "
             f"{args.refinement} tokens, {args.model} Llama, fp32 sdpa, CPU ({os.cpu_count()} cores, "
             f"{torch.get_num_threads()} threads), median of {args.repeats} alternating repetitions")
    table = render_table(rows, summary, title)
    print(table)
    print(f"ratio (default shape): {default['ratio']:.2f}× trained tokens/s, {default['cpu_ratio']:.2f}× per CPU "
          "second (target ≥ 1.4), "
          f"peak memory {default['memory_ratio']:.2f}× (target ≤ 1.0)")
    peaks = {r["mode"]: r["peak_bytes"] for r in rows if r["shape"] == rows[0]["shape"]}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({
        "ratio": default["ratio"], "cpu_ratio": default["cpu_ratio"], "memory_ratio": default["memory_ratio"],
        "peak_bytes": peaks, "peak_mib": {k: v / MiB for k, v in peaks.items()},
        "shapes": summary, "rows": rows, "table": table, "command": " ".join(sys.argv),
        "environment": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
                        "torch": torch.__version__, "transformers": transformers.__version__,
                        "python": platform.python_version(), "load_average": os.getloadavg()}}, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()

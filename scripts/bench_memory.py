#!/usr/bin/env python
"""Peak memory of the log-prob path vs sequence length and vocabulary size, against the size of full logits.

For each (sequence length L, vocabulary V) a one-layer Llama body with that vocabulary scores every token of a
[B, L] batch forward + backward twice:

* nemo-igrpo: ``nemo_igrpo.policy.logprobs.token_logprobs_and_entropy`` (gathered hidden states, lm head in
  checkpointed chunks of ``--chunk`` rows: no [B·L × V] tensor lives longer than one chunk);
* naive: ``model(...).logits`` → ``log_softmax`` → gather (the textbook way; keeps [B, L, V] logits and their
  softmax for backward).

Memory is the peak of live tensor storage created during the pass, tracked op by op with a TorchDispatchMode
(exact and device-independent; parameters that exist beforehand are not counted, their gradients are). On CUDA
``torch.cuda.max_memory_allocated`` is reported as well.

    python scripts/bench_memory.py --batch 4 --lengths 256 512 1024 2048 --vocabs 8192 32768 --chunk 1024
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import weakref
from pathlib import Path

MiB = 1024 ** 2


# ------------------------------------------------------------------------------------------ pure parts (tested)

def full_logits_bytes(batch: int, length: int, vocab: int, bytes_per_element: int = 4) -> int:
    """Size of one [B, L, V] logits tensor (float32 by default)."""
    return batch * length * vocab * bytes_per_element


def chunk_logits_bytes(chunk: int, vocab: int, bytes_per_element: int = 4) -> int:
    """Size of one [chunk, V] logits block, the largest vocab-sized tensor of the chunked path."""
    return chunk * vocab * bytes_per_element


def render_table(rows: list[dict], title: str) -> str:
    lines = [f"**{title}**", "", ("| L | V | full logits [B,L,V] fp32 (MiB) | nemo-igrpo peak (MiB) | "
                                  "naive peak (MiB) | naive / nemo-igrpo |"), "|---|---|---|---|---|---|"]
    for r in rows:
        naive = r.get("naive_peak_bytes")
        naive_text = f"{naive / MiB:.1f}" if naive is not None else "skipped"
        ratio = f"{naive / r['chunked_peak_bytes']:.1f}×" if naive is not None else "–"
        lines.append(f"| {r['length']} | {r['vocab']} | {r['full_logits_bytes'] / MiB:.1f} | "
                     f"{r['chunked_peak_bytes'] / MiB:.1f} | {naive_text} | {ratio} |")
    return "\n".join(lines)


class PeakTensorMemory:
    """Context manager: peak bytes of tensor storage allocated inside it and still alive, op by op.

    Every op's outputs are recorded by storage (views share one); a storage is released when its last Python and
    C++ reference dies (weakref finalizer). Backward ops on CPU run under the same mode, so saved activations and
    gradients are counted.
    """

    def __init__(self) -> None:
        self.current = 0
        self.peak = 0
        self._live: dict[int, int] = {}
        self._mode = None

    def __enter__(self) -> PeakTensorMemory:  # noqa: PYI034 - the class is not subclassed
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for tensor in tree_flatten(out)[0]:
                    if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
                        tracker._add(tensor.untyped_storage())
                return out

        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)

    def _add(self, storage) -> None:
        key = storage.data_ptr()
        if not key or key in self._live:
            return
        self._live[key] = storage.nbytes()
        self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)


# ------------------------------------------------------------------------------------------ measurement

def build_model(vocab: int, hidden: int, layers: int, length: int, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=max(hidden // 32, 1), num_key_value_heads=max(hidden // 64, 1),
        max_position_embeddings=length, tie_word_embeddings=False))


def chunked_pass(model, input_ids, mask, chunk: int) -> None:
    from nemo_igrpo.policy.logprobs import token_logprobs_and_entropy

    stats = token_logprobs_and_entropy(model, input_ids, mask, mask, temperature=1.0, chunk_size=chunk)
    (stats.logprobs.sum() + 0.0 * stats.entropy.sum()).backward()


def naive_pass(model, input_ids, mask) -> None:
    import torch

    logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits.float()
    logprobs = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    logprobs.sum().backward()


def measure(kind: str, vocab: int, length: int, args) -> dict:
    import torch

    device = torch.device(args.device)
    model = build_model(vocab, args.hidden, args.layers, length).to(device)
    input_ids = torch.randint(0, vocab, (args.batch, length), device=device)
    mask = torch.ones_like(input_ids)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    started = time.perf_counter()
    with PeakTensorMemory() as tracker:
        if kind == "chunked":
            chunked_pass(model, input_ids, mask, args.chunk)
        else:
            naive_pass(model, input_ids, mask)
    result = {"peak_bytes": tracker.peak, "seconds": time.perf_counter() - started}
    if device.type == "cuda":
        result["cuda_peak_bytes"] = torch.cuda.max_memory_allocated() - base
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048])
    parser.add_argument("--vocabs", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=64, help="body width (small: the head is what matters)")
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--chunk", type=int, default=1024, help="policy.logprob_chunk_size")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-naive-gib", type=float, default=2.0,
                        help="skip the naive pass when its full logits alone would exceed this")
    parser.add_argument("--output", type=Path, default=Path("bench_memory.json"))
    args = parser.parse_args()

    import torch
    import transformers

    rows = []
    for vocab in args.vocabs:
        for length in args.lengths:
            full = full_logits_bytes(args.batch, length, vocab)
            row = {"length": length, "vocab": vocab, "full_logits_bytes": full,
                   "chunk_logits_bytes": chunk_logits_bytes(min(args.chunk, args.batch * length), vocab)}
            chunked = measure("chunked", vocab, length, args)
            row.update(chunked_peak_bytes=chunked["peak_bytes"], chunked_seconds=chunked["seconds"])
            if full <= args.max_naive_gib * 1024 ** 3:
                naive = measure("naive", vocab, length, args)
                row.update(naive_peak_bytes=naive["peak_bytes"], naive_seconds=naive["seconds"])
            rows.append(row)
            print(f"L={length} V={vocab}: nemo-igrpo {row['chunked_peak_bytes'] / MiB:.1f} MiB, naive "
                  + (f"{row['naive_peak_bytes'] / MiB:.1f} MiB" if "naive_peak_bytes" in row else "skipped"),
                  flush=True)
    title = (f"peak tensor memory of one log-prob forward+backward, B={args.batch}, Llama body {args.hidden}×"
             f"{args.layers}, chunk {args.chunk}, {args.device}")
    table = render_table(rows, title)
    print(table)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({
        "command": " ".join(sys.argv), "title": title, "rows": rows, "table": table,
        "environment": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                        "transformers": transformers.__version__, "python": platform.python_version()}}, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()

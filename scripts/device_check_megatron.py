"""Device check for the Megatron policy backend (run by scripts/device_check_megatron.sh).

Modes (each in its own process, so peak memory and process groups never mix):
  parity    HF vs Megatron logits/log-probs in bf16 on the same random weights and tokens
  hf        HF policy backend train_step throughput (tokens/s, MFU, peak memory)
  megatron  Megatron policy backend train_step throughput
  table     read the JSON results and print one table

Model: Qwen2-shaped, ~0.5B parameters (Qwen2.5-0.5B's shape: hidden 896, 24 layers, 14 heads, 2 KV heads, FFN 4864,
vocab 151936, tied embeddings), random weights (no hub access needed). ``--tiny`` shrinks everything for a CPU smoke
run (then tests/megatron_cpu_patch.py is applied when CUDA is absent).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parent.parent
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16, SXM


def model_config(tiny: bool):
    from transformers import Qwen2Config

    if tiny:
        return Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                           tie_word_embeddings=True)
    return Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                       rope_theta=1e6, tie_word_embeddings=True)


def build_hf(tiny: bool, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = model_config(tiny)
    config._attn_implementation = "sdpa"
    return AutoModelForCausalLM.from_config(config, dtype=dtype)


def batch_of(batch: int, seq: int, vocab: int, device):
    from nemo_igrpo.algorithms.batch import RolloutBatch

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    attention = torch.ones_like(ids)
    loss_mask = torch.ones(batch, seq)
    loss_mask[:, : seq // 4] = 0  # a prompt quarter without loss
    return RolloutBatch(ids, attention, loss_mask, torch.randn(batch, generator=g), torch.arange(batch),
                        torch.zeros(batch, seq)).to(device)


def loss_fn_for(batch):
    from nemo_igrpo.algorithms.aggregation import LossNormalizer
    from nemo_igrpo.algorithms.loss import make_loss_fn

    return make_loss_fn(policy_loss="ppo", eps_low=0.2, eps_high=0.28, dual_clip=None, loss_agg="token-mean",
                        kl_coef=0.0, kl_estimator="k3", kl_clamp=None, importance_correction="none",
                        importance_cap=2.0,
                        normalizer=LossNormalizer.from_mask(batch.loss_mask, batch.input_ids.shape[1]))


def megatron_settings():
    return SimpleNamespace(tensor_model_parallel_size=1, pipeline_model_parallel_size=1, context_parallel_size=1,
                           sequence_parallel=False, use_distributed_optimizer=True, recompute="none",
                           transformer_impl="auto", fp8="none", fp8_recipe="delayed", async_save=False)


OPTIM = {"lr": 1e-6, "weight_decay": 0.0, "betas": (0.9, 0.999), "max_grad_norm": 1.0, "warmup_steps": 0, "total_steps": 100,
             "min_lr_ratio": 0.1, "temperature": 1.0, "use_reference": False}


def make_policy(backend: str, tiny: bool, micro_batch: int):
    on_gpu = torch.cuda.is_available()
    if backend == "hf":
        from nemo_igrpo.policy.hf import HFPolicy

        model = build_hf(tiny, torch.bfloat16 if on_gpu else torch.float32)
        return HFPolicy(model, micro_batch_size=micro_batch, logprob_chunk_size=2048, gradient_checkpointing=False,
                        autocast_dtype="bfloat16" if on_gpu else None, device="cuda" if on_gpu else "cpu",
                        **OPTIM)
    from nemo_igrpo.policy.megatron.policy import MegatronPolicy

    model = build_hf(tiny, torch.float32)
    return MegatronPolicy(model, megatron=megatron_settings(), micro_batch_size=micro_batch, bf16=on_gpu, seed=0,
                          **OPTIM)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_throughput(args) -> dict:
    policy = make_policy(args.mode, args.tiny, args.micro_batch)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = model_config(args.tiny)
    batch = batch_of(args.batch, args.seq, config.vocab_size, device)
    loss_fn = loss_fn_for(batch)
    for _ in range(args.warmup):
        policy.train_step(batch, loss_fn)
    sync()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        metrics = policy.train_step(batch, loss_fn)
    sync()
    seconds = (time.perf_counter() - start) / args.steps
    params = sum(p.numel() for p in build_hf(args.tiny, torch.float32).parameters())
    tokens = args.batch * args.seq
    # 6·N per token (forward + backward) plus causal attention: 6 · layers · S · hidden (half of 12·L·S·h)
    flops_per_token = 6 * params + 6 * config.num_hidden_layers * args.seq * config.hidden_size
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
    tokens_per_s = tokens / seconds
    return {"backend": args.mode, "device": name, "params": params, "batch": args.batch, "seq": args.seq,
            "seconds_per_step": seconds, "tokens_per_s": tokens_per_s,
            "mfu": None if peak is None else flops_per_token * tokens_per_s / peak,
            "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
            "loss": metrics["loss"], "skipped": metrics["skipped"]}


def run_parity(args) -> dict:
    """Same random weights in both; log-probs compared on the completion positions."""
    from nemo_igrpo.policy.hf import HFPolicy
    from nemo_igrpo.policy.megatron.policy import MegatronPolicy

    on_gpu = torch.cuda.is_available()
    dtype = torch.bfloat16 if on_gpu else torch.float32
    device = "cuda" if on_gpu else "cpu"
    config = model_config(args.tiny)
    batch = batch_of(2, min(args.seq, 512), config.vocab_size, device)
    hf = HFPolicy(build_hf(args.tiny, dtype), micro_batch_size=1, logprob_chunk_size=2048,
                  gradient_checkpointing=False, autocast_dtype="bfloat16" if on_gpu else None, device=device,
                  **OPTIM)
    reference = hf.compute_logprobs(batch)
    fp32 = HFPolicy(build_hf(args.tiny, torch.float32), micro_batch_size=1, logprob_chunk_size=2048,
                    gradient_checkpointing=False, autocast_dtype=None, device=device, **OPTIM).compute_logprobs(batch)
    del hf
    mg = MegatronPolicy(build_hf(args.tiny, torch.float32), megatron=megatron_settings(), micro_batch_size=1,
                        bf16=on_gpu, seed=0, **OPTIM).compute_logprobs(batch)
    mask = batch.loss_mask[:, 1:] > 0

    def stats(a, b):
        diff = (a[:, 1:] - b[:, 1:]).abs()[mask]
        return {"mean_abs": diff.mean().item(), "max_abs": diff.max().item()}

    return {"dtype": str(dtype), "megatron_vs_hf": stats(mg.logprobs, reference.logprobs),
            "hf_bf16_vs_hf_fp32": stats(reference.logprobs, fp32.logprobs),
            "megatron_vs_hf_fp32": stats(mg.logprobs, fp32.logprobs)}


def print_table(out: Path) -> None:
    rows = [json.loads((out / f"{name}.json").read_text()) for name in ("hf", "megatron")
            if (out / f"{name}.json").is_file()]
    parity = json.loads((out / "parity.json").read_text()) if (out / "parity.json").is_file() else None
    if parity:
        print(f"log-prob parity ({parity['dtype']}), mean / max |Δ| on completion tokens:")
        for key in ("megatron_vs_hf", "hf_bf16_vs_hf_fp32", "megatron_vs_hf_fp32"):
            print(f"  {key:22s} {parity[key]['mean_abs']:.4f} / {parity[key]['max_abs']:.4f}")
    if rows:
        print(f"device: {rows[0]['device']}   params: {rows[0]['params'] / 1e6:.0f}M   batch × seq: "
              f"{rows[0]['batch']} × {rows[0]['seq']}")
        print(f"{'backend':10s} {'s/step':>8s} {'tokens/s':>10s} {'MFU':>7s} {'peak GiB':>9s}")
        for r in rows:
            mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
            mem = "n/a" if r["peak_memory_gb"] is None else f"{r['peak_memory_gb']:.1f}"
            print(f"{r['backend']:10s} {r['seconds_per_step']:8.3f} {r['tokens_per_s']:10.0f} {mfu:>7s} {mem:>9s}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["parity", "hf", "megatron", "table"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.mode == "table":
        print_table(args.out)
        return
    if not torch.cuda.is_available():
        if not args.tiny:
            sys.exit("no CUDA device: use --tiny for a CPU smoke run")
        sys.path.insert(0, str(REPO / "tests"))
        import megatron_cpu_patch

        megatron_cpu_patch.apply()
    try:
        result = run_parity(args) if args.mode == "parity" else run_throughput(args)
    except torch.cuda.OutOfMemoryError as error:  # a result too: the table says which backend did not fit
        result = {"backend": args.mode, "error": f"out of memory: {str(error)[:200]}", "seconds_per_step": math.nan,
                  "tokens_per_s": 0.0, "mfu": None, "peak_memory_gb": None, "device": torch.cuda.get_device_name(),
                  "params": 0, "batch": args.batch, "seq": args.seq}
    (args.out / f"{args.mode}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""Megatron policy backend on CPU over gloo: HF parity and equal loss/gradients across TP=2 (+sequence parallel),
PP=2 (3 micro-batches), DP=2 (distributed optimizer), a checkpoint saved at TP=2 loaded at TP=1, save_pretrained.

Every layout runs in fresh processes (``python tests/integration/test_megatron_parallel.py MODE RANK WORLD PORT
OUT``): the CPU patch (tests/megatron_cpu_patch.py) and megatron's global parallel state must not leak into the
pytest process.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from worker_launch import launch, worker_main

pytest.importorskip("megatron.core")
pytestmark = pytest.mark.slow  # every test's fixture launches Megatron workers (2 processes per layout)

TIMEOUT_S = 240

SHAPE = {"vocab_size": 64, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "max_position_embeddings": 128, "tie_word_embeddings": True,
             "pad_token_id": 0}  # nn.Embedding(padding_idx=0); token 0 also occurs as a real token in the batch
OPTIM = {"lr": 1e-3, "weight_decay": 0.01, "betas": (0.9, 0.999), "max_grad_norm": 1.0, "warmup_steps": 1, "total_steps": 10,
             "min_lr_ratio": 0.1, "temperature": 0.9}


# ---------------------------------------------------------------------------------------------- worker side


def hf_model(seed: int = 0, **overrides):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(**{**SHAPE, **overrides}))


def rollout_batch():
    from nemo_igrpo.algorithms.batch import RolloutBatch

    g = torch.Generator().manual_seed(1)
    rows, length = 5, 14
    lengths = torch.tensor([14, 9, 7, 12, 5])
    attention = (torch.arange(length)[None] < lengths[:, None]).long()
    loss_mask = attention.float().clone()
    loss_mask[:, :4] = 0
    ids = torch.randint(0, SHAPE["vocab_size"], (rows, length), generator=g) * attention
    return RolloutBatch(ids, attention, loss_mask, torch.randn(rows, generator=g), torch.arange(rows),
                        -torch.rand(rows, length, generator=g) * loss_mask)


def loss_fn_for(batch):
    from nemo_igrpo.algorithms.aggregation import LossNormalizer
    from nemo_igrpo.algorithms.loss import make_loss_fn

    return make_loss_fn(policy_loss="ppo", eps_low=0.2, eps_high=0.28, dual_clip=None,
                        loss_agg="seq-mean-token-mean", kl_coef=0.05, kl_estimator="k3", kl_clamp=None,
                        importance_correction="none", importance_cap=2.0,
                        normalizer=LossNormalizer.from_mask(batch.loss_mask, 16))


def megatron_settings(**overrides):
    values = {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1, "context_parallel_size": 1,
                  "sequence_parallel": False, "use_distributed_optimizer": True, "recompute": "none",
                  "transformer_impl": "auto", "fp8": "none", "fp8_recipe": "delayed", "async_save": False,
                  "make_vocab_size_divisible_by": 1}
    return SimpleNamespace(**{**values, **overrides})


LAYOUTS = {
    "tp2": {"tensor_model_parallel_size": 2, "sequence_parallel": True},
    "pp2": {"pipeline_model_parallel_size": 2},
    "dp2": {},
    "tp1": {},
}


# An odd vocabulary (the quickstart char tokenizer's 101) with an untied head: TP=2 pads it to 102 rows, or to
# 16 × ⌈101/16⌉ = 112 with make_vocab_size_divisible_by=8 (TP rank 1 then holds 45 real and 11 padding rows); the
# padding must be invisible.
ODD = {"vocab_size": 101, "tie_word_embeddings": False}


def odd_batch():
    batch = rollout_batch()
    batch.input_ids[0, 10] = ODD["vocab_size"] - 1  # the last real token is scored too
    return batch


def odd_vocab_worker(out: Path) -> None:
    """TP=2 (+SP) on an odd vocabulary: log-probs, entropy, loss, gradients, export (compared with HF in pytest)."""
    import megatron_cpu_patch
    import torch.distributed as dist

    megatron_cpu_patch.apply()
    from nemo_igrpo.policy.megatron.policy import MegatronPolicy

    torch.set_num_threads(1)
    batch = odd_batch()
    result = {}
    for divisible_by in (1, 8):
        policy = MegatronPolicy(hf_model(**ODD), megatron=megatron_settings(
            tensor_model_parallel_size=2, sequence_parallel=True, make_vocab_size_divisible_by=divisible_by),
            bf16=False, micro_batch_size=2, use_reference=False, seed=0, **OPTIM)
        stats = policy.compute_logprobs(batch)
        if batch.ref_logprobs is None:  # the reference is the initial policy (kl_coef > 0 in loss_fn_for)
            batch.ref_logprobs = stats.logprobs.clone()
        loss, _ = policy.accumulate_gradients(batch, loss_fn_for(batch))
        result[divisible_by] = {"logprobs": stats.logprobs, "entropy": stats.entropy, "loss": loss,
                                "grads": policy.gradients_as_hf(),
                                "rows": policy.unwrapped.embedding.word_embeddings.weight.shape[0],
                                "weights": {n: t.clone() for n, t in policy.export_weights()}}
        policy.save_pretrained(out / f"odd_pretrained_{divisible_by}")
    if dist.get_rank() == 0:
        torch.save(result, out / "odd.pt")
    dist.barrier()


def worker(mode: str, out: Path) -> None:
    if mode == "odd":
        return odd_vocab_worker(out)
    import megatron_cpu_patch
    import torch.distributed as dist

    megatron_cpu_patch.apply()
    from nemo_igrpo.policy.megatron.policy import MegatronPolicy

    torch.set_num_threads(1)
    batch = rollout_batch()
    full_batch = batch
    policy = MegatronPolicy(hf_model(), megatron=megatron_settings(**LAYOUTS[mode]), bf16=False,
                            micro_batch_size=2, use_reference=True, seed=0, **OPTIM)
    rank = dist.get_rank()
    if mode == "dp2":  # each data-parallel rank gets its rows; the loss keeps the whole step's counts
        batch = batch.select(slice(0, 3) if rank == 0 else slice(3, 5))
    result = {}
    stats = policy.compute_logprobs(batch)
    result["logprobs"], result["entropy"] = stats.logprobs, stats.entropy
    batch.ref_logprobs = policy.compute_logprobs(batch, reference=True).logprobs
    loss_fn = loss_fn_for(full_batch)
    if mode != "dp2":  # with DP the distributed optimizer shards the reduced gradient buffer
        result["loss"], result["metrics"] = policy.accumulate_gradients(batch, loss_fn)
        result["grads"] = policy.gradients_as_hf()
    result["step"] = policy.train_step(batch, loss_fn)
    result["weights"] = {n: t.clone() for n, t in policy.export_weights()}
    result["ref_after_step"] = policy.compute_logprobs(batch, reference=True).logprobs
    if mode == "tp2":
        (out / "ckpt_tp2").mkdir(exist_ok=True)
        policy.save(out / "ckpt_tp2")
    if mode == "tp1":
        tp1_checks(policy, batch, out, result, loss_fn)
    if rank == 0:
        torch.save(result, out / f"{mode}.pt")
    dist.barrier()


def tp1_checks(policy, batch, out: Path, result: dict, loss_fn) -> None:
    """HF parity (logits, log-probs, gradients), save_pretrained round trip, and loading the TP=2 checkpoint."""
    from transformers import AutoModelForCausalLM

    from nemo_igrpo.policy.megatron.checkpoint import read_checkpoint_as_hf
    from nemo_igrpo.policy.megatron.model import build_model, load_hf_weights

    hf = hf_model()
    ids = batch.input_ids
    with torch.no_grad():
        model = build_model(hf.config, policy.config, policy.impl)
        load_hf_weights(model, hf.state_dict(), hf.config, policy.impl)
        positions = torch.arange(ids.shape[1]).expand_as(ids)
        result["logits_diff"] = (model(ids, positions, None) - hf(ids).logits).abs().max().item()
    from helpers import make_policy

    hf_policy = make_policy(hf_model(), temperature=OPTIM["temperature"], micro_batch_size=2)
    hf_stats = hf_policy.compute_logprobs(batch)
    result["hf_logprobs"], result["hf_entropy"] = hf_stats.logprobs, hf_stats.entropy
    hf_policy.optimizer.zero_grad()
    result["hf_loss"], _ = hf_policy._accumulate_gradients(batch, loss_fn)
    tied = {"lm_head.weight": "model.embed_tokens.weight"}
    result["hf_grads"] = {n: hf_policy.model.get_parameter(tied.get(n, n)).grad.clone() for n in result["grads"]}

    policy.save_pretrained(out / "pretrained")
    reloaded = AutoModelForCausalLM.from_pretrained(out / "pretrained")
    with torch.no_grad():
        exported = hf_model()
        exported.load_state_dict(result["weights"], strict=False)
        result["pretrained_diff"] = (reloaded(ids).logits - exported(ids).logits).abs().max().item()

    # The TP=2 run saved after its step: load at TP=1, and read it back as HF tensors without a process group.
    result["ckpt_read"] = read_checkpoint_as_hf(out / "ckpt_tp2", hf.config)
    policy.load(out / "ckpt_tp2")
    result["ckpt_loaded"] = {n: t.clone() for n, t in policy.export_weights()}
    result["after_load_step"] = policy.step


# ---------------------------------------------------------------------------------------------- pytest side


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("megatron")
    for mode, world in (("tp2", 2), ("pp2", 2), ("dp2", 2), ("tp1", 1)):
        launch(__file__, mode, world, out, TIMEOUT_S)
    return {mode: torch.load(out / f"{mode}.pt", weights_only=False) for mode in LAYOUTS}


def max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_logits_and_logprobs_match_hugging_face(runs):
    ref = runs["tp1"]
    assert ref["logits_diff"] < 1e-5
    assert (ref["logprobs"] - ref["hf_logprobs"]).abs().max() < 1e-5
    assert (ref["entropy"] - ref["hf_entropy"]).abs().max() < 1e-5
    assert ref["logprobs"].abs().sum() > 1  # scored something


def test_loss_and_gradients_match_hugging_face(runs):
    ref = runs["tp1"]
    assert ref["loss"] == pytest.approx(ref["hf_loss"], rel=1e-5)
    scale = max(g.abs().max().item() for g in ref["hf_grads"].values())
    assert max_diff(ref["grads"], ref["hf_grads"]) < 1e-5 * scale  # incl. the padding row of the tied embedding


@pytest.mark.parametrize("mode", ["tp2", "pp2", "dp2"])
def test_layouts_give_the_same_logprobs(runs, mode):
    ref, got = runs["tp1"], runs[mode]
    rows = slice(0, 3) if mode == "dp2" else slice(None)  # rank 0 of DP=2 scored rows 0-2
    assert (got["logprobs"] - ref["logprobs"][rows]).abs().max() < 1e-5
    assert (got["entropy"] - ref["entropy"][rows]).abs().max() < 1e-5


@pytest.mark.parametrize("mode", ["tp2", "pp2"])
def test_layouts_give_the_same_loss_and_gradients(runs, mode):
    ref, got = runs["tp1"], runs[mode]
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5, abs=1e-7)
    for name in ref["metrics"]:
        assert got["metrics"][name] == pytest.approx(ref["metrics"][name], rel=1e-5, abs=1e-6), name
    scale = max(g.abs().max().item() for g in ref["grads"].values())
    assert max_diff(got["grads"], ref["grads"]) < 1e-5 * scale
    assert scale > 0


@pytest.mark.parametrize("mode", ["tp2", "pp2", "dp2"])
def test_optimizer_step_is_layout_independent(runs, mode):
    ref, got = runs["tp1"], runs[mode]
    for key in ("loss", "grad_norm", "lr", "skipped", "kl", "policy_loss"):
        assert got["step"][key] == pytest.approx(ref["step"][key], rel=1e-5, abs=1e-7), key
    assert ref["step"]["skipped"] == 0.0 and ref["step"]["lr"] == pytest.approx(OPTIM["lr"])
    initial = dict(hf_model().state_dict())
    moved = max_diff(ref["weights"], {k: initial[k] for k in ref["weights"]})
    assert moved > 0.5 * OPTIM["lr"]  # the step changed the weights (Adam's first step moves each by ≈ lr) ...
    # ... identically in every layout, up to rounding. Adam's first step is lr·g/(|g| + eps): where |g| is near eps
    # (1e-8) it amplifies the reduction-order noise of g (different on every CPU: 2.6e-6 seen on AMD EPYC) to a
    # fraction of lr, so the bound is relative to the step size. A wrong step (lost gradient, wrong sign, wrong
    # lr) is off by ≈ lr, 100× this bound.
    assert max_diff(got["weights"], ref["weights"]) < 1e-2 * OPTIM["lr"]


def test_reference_policy_stays_at_the_initial_weights(runs):
    for run in runs.values():
        assert (run["ref_after_step"] - run["logprobs"]).abs().max() < 1e-6


def test_checkpoint_saved_at_tp2_loads_at_tp1(runs):
    ref = runs["tp1"]
    assert max_diff(ref["ckpt_loaded"], runs["tp2"]["weights"]) < 1e-7
    assert max_diff(ref["ckpt_read"], runs["tp2"]["weights"]) < 1e-7
    assert ref["after_load_step"] == 1


def test_save_pretrained_loads_in_transformers_with_identical_logits(runs):
    assert runs["tp1"]["pretrained_diff"] < 1e-6


@pytest.fixture(scope="module")
def odd(tmp_path_factory):
    out = tmp_path_factory.mktemp("odd_vocab")
    launch(__file__, "odd", 2, out, TIMEOUT_S)
    return out, torch.load(out / "odd.pt", weights_only=False)


def test_an_odd_vocabulary_is_padded_at_tp2_and_the_padding_is_invisible(odd):
    from helpers import make_policy

    out, runs = odd
    batch = odd_batch()
    batch.ref_logprobs = runs[1]["logprobs"]  # the initial policy's, as in the workers (HF's equal them to 1e-5)
    hf_policy = make_policy(hf_model(**ODD), temperature=OPTIM["temperature"], micro_batch_size=2)
    stats = hf_policy.compute_logprobs(batch)
    hf_policy.optimizer.zero_grad()
    loss, _ = hf_policy._accumulate_gradients(batch, loss_fn_for(batch))
    hf = {"logprobs": stats.logprobs, "entropy": stats.entropy, "loss": loss,
          "grads": {n: p.grad.clone() for n, p in hf_policy.model.named_parameters()},
          "weights": dict(hf_model(**ODD).state_dict())}
    scale = max(g.abs().max().item() for g in hf["grads"].values())
    for divisible_by, rows in ((1, 51), (8, 56)):  # per TP rank: 102 / 2 and 112 / 2
        got = runs[divisible_by]
        assert got["rows"] == rows
        # Same tolerances as the TP=2 ↔ HF checks above (fp32, the same math summed in another order).
        assert (got["logprobs"] - hf["logprobs"]).abs().max() < 1e-5
        assert (got["entropy"] - hf["entropy"]).abs().max() < 1e-5
        assert got["loss"] == pytest.approx(hf["loss"], rel=1e-5)
        assert max_diff(got["grads"], hf["grads"]) < 1e-5 * scale  # no gradient leaks into padding rows
        # Export (weight sync, save_pretrained) strips the padding: exactly the HF shapes and values.
        assert max_diff(got["weights"], hf["weights"]) == 0.0
        from safetensors.torch import load_file

        saved = load_file(out / f"odd_pretrained_{divisible_by}" / "model.safetensors")
        assert saved["model.embed_tokens.weight"].shape == (101, SHAPE["hidden_size"])
        assert saved["lm_head.weight"].shape == (101, SHAPE["hidden_size"])
    assert scale > 0 and hf["logprobs"].abs().sum() > 1


if __name__ == "__main__":
    worker_main(worker)

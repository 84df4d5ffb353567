"""LoRA on the HF policy backend (PEFT): only adapters train and checkpoint, the reference is the base model with
adapters disabled, the generator and final/ get merged weights, Megatron + LoRA is refused."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import safetensors
import torch
from helpers import make_policy, tiny_llama

from nemo_igrpo.algorithms.batch import RolloutBatch
from nemo_igrpo.policy.hf import ADAPTER_FILE

pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("single_thread")
LORA = SimpleNamespace(rank=4, alpha=8.0, dropout=0.0, target_modules=["all-linear"])
SEQUENCE = [1, 5, 9, 13, 17, 21, 25, 29, 33, 37, 41, 45]


def batch() -> RolloutBatch:
    from test_token_budget import long_tailed_batch

    return long_tailed_batch()


def pg_loss(stats, micro_batch):
    mask = micro_batch.loss_mask
    loss = -(stats.logprobs * mask * micro_batch.advantages[:, None]).sum() / 100.0
    return loss, {"pg": loss.detach()}


def lora_policy(seed: int = 0, steps: int = 1, **options):
    torch.manual_seed(seed)  # the adapters' A init
    policy = make_policy(tiny_llama(seed=3), lora=LORA, lr=5e-2, **options)
    for _ in range(steps):
        policy.train_step(batch(), pg_loss)
    return policy


def test_only_adapters_train_and_the_reference_is_the_base_model():
    base = make_policy(tiny_llama(seed=3))
    policy = lora_policy(steps=0, use_reference=True)
    assert policy.reference is None  # no second copy of the model
    trainable = {n for n, p in policy.model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    optimized = sum(p.numel() for g in policy.optimizer.param_groups for p in g["params"])
    assert optimized == sum(p.numel() for n, p in policy.model.named_parameters() if n in trainable)
    frozen = {n: p.detach().clone() for n, p in policy.model.named_parameters() if not p.requires_grad}

    rollout = batch()
    before = base.compute_logprobs(rollout)
    # B = 0 at start: the adapted model equals the base model
    torch.testing.assert_close(policy.compute_logprobs(rollout).logprobs, before.logprobs, atol=1e-6, rtol=0)
    for _ in range(2):
        policy.train_step(rollout, pg_loss)
    for name, tensor in frozen.items():
        assert torch.equal(policy.model.get_parameter(name), tensor), name  # the base never moves
    moved = (policy.compute_logprobs(rollout).logprobs - before.logprobs).abs().max()
    assert moved > 1e-2
    # reference = adapters disabled = the untouched base model, to float32 rounding of the same computation
    torch.testing.assert_close(policy.compute_logprobs(rollout, reference=True).logprobs, before.logprobs,
                               atol=1e-6, rtol=0)
    assert (policy.compute_logprobs(rollout).logprobs - before.logprobs).abs().max() == moved  # adapters back on


def test_merged_export_and_final_model_score_like_the_trainer(tmp_path):
    from transformers import AutoModelForCausalLM

    policy = lora_policy(steps=2)
    rollout = batch()
    trained = policy.compute_logprobs(rollout).logprobs
    exported = dict(policy.export_weights())
    assert set(exported) == set(tiny_llama().state_dict())  # base-model names, no adapter tensors
    fresh = tiny_llama(seed=7)
    fresh.load_state_dict(exported)
    # merged W + scale·B·A vs the adapter path x·W + scale·(x·A)·B: float32 rounding of O(1) log-probs
    torch.testing.assert_close(make_policy(fresh).compute_logprobs(rollout).logprobs, trained, atol=1e-5, rtol=0)

    policy.save_pretrained(tmp_path / "final")
    with safetensors.safe_open(str(tmp_path / "final" / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "lora" in k]
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    torch.testing.assert_close(make_policy(final).compute_logprobs(rollout).logprobs, trained, atol=1e-5, rtol=0)


def test_checkpoints_hold_only_the_adapters_and_resume_exactly(tmp_path):
    policy = lora_policy(steps=2)
    policy.save(tmp_path)
    assert sorted(os.listdir(tmp_path)) == [ADAPTER_FILE, "optimizer.pt"]
    with safetensors.safe_open(str(tmp_path / ADAPTER_FILE), "pt") as f:
        keys = list(f.keys())
    assert keys and all(".lora_" in k for k in keys)
    resumed = lora_policy(seed=5, steps=0)  # different adapter init, overwritten by the load
    resumed.load(tmp_path)
    rollout = batch()
    assert torch.equal(resumed.compute_logprobs(rollout).logprobs, policy.compute_logprobs(rollout).logprobs)
    a, b = policy.train_step(rollout, pg_loss), resumed.train_step(rollout, pg_loss)
    assert a == b  # same adapters, Adam moments and schedule: the same next step


def test_megatron_with_lora_is_refused():
    from nemo_igrpo.config import ConfigError, load_config

    assert load_config(overrides=["policy.lora.rank=16"]).policy.lora.rank == 16
    with pytest.raises(ConfigError, match=r"policy\.lora\.rank > 0: LoRA is only supported with policy\.backend=hf"):
        load_config(overrides=["policy.lora.rank=16", "policy.backend=megatron"])
    with pytest.raises(ConfigError, match=r"policy\.lora\.rank: must be >= 0"):
        load_config(overrides=["policy.lora.rank=-1"])


@pytest.mark.slow
def test_vllm_engine_scores_like_the_trainer_after_a_lora_sync():
    pytest.importorskip("vllm")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from test_vllm import TOLERANCE, VLLM, engine_sequence_logprobs

    from nemo_igrpo.assembly import build_generation
    from nemo_igrpo.config import load_config

    policy = lora_policy(steps=2)
    generator = build_generation(load_config(None, VLLM), tiny_llama(seed=3), pad_token_id=0)
    try:
        before = engine_sequence_logprobs(generator, SEQUENCE)
        generator.update_weights(policy.export_weights())
        after = engine_sequence_logprobs(generator, SEQUENCE)
    finally:
        generator.close()
    ids = torch.tensor([SEQUENCE])
    one = torch.ones_like(ids)
    rollout = RolloutBatch(ids, one, one.float(), torch.zeros(1), torch.zeros(1, dtype=torch.long),
                           torch.zeros(ids.shape))
    trainer = policy.compute_logprobs(rollout).logprobs[0, 1:]
    torch.testing.assert_close(after, trainer, atol=TOLERANCE, rtol=0)  # fp32 on both sides (see test_vllm)
    assert (after - before).abs().max() > 1e-2  # the adapters changed what the engine computes


def test_warm_start_adapters_fold_into_the_model_that_rl_adapts_afresh():
    """The policy adapts a copy (the caller's model stays plain); warm_start folds merged weights back into it."""
    model = tiny_llama(seed=3)
    initial = {n: t.clone() for n, t in model.state_dict().items()}
    warm = make_policy(model, lora=LORA, lr=5e-2)
    warm.train_step(batch(), pg_loss)
    scored = warm.compute_logprobs(batch()).logprobs
    assert set(model.state_dict()) == set(initial)  # no adapter modules injected into the caller's model
    assert all(torch.equal(t, initial[n]) for n, t in model.state_dict().items())
    with torch.no_grad():
        model.load_state_dict(dict(warm.export_weights()))  # what warm_start does
    rl = make_policy(model, lora=LORA, use_reference=True)  # fresh adapters (B = 0) on the warm-started weights
    torch.testing.assert_close(rl.compute_logprobs(batch()).logprobs, scored, atol=1e-5, rtol=0)
    torch.testing.assert_close(rl.compute_logprobs(batch(), reference=True).logprobs, scored, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_training_with_token_budget_packing_and_lora(tmp_path):
    """Through train(): budget + packing takes the row run's steps; a LoRA run writes a merged final/ and exports."""
    from test_training import tiny_config

    from nemo_igrpo.export import export
    from nemo_igrpo.export.source import ExportError
    from nemo_igrpo.tracking import read_metrics
    from nemo_igrpo.trainer import train

    steps = ["trainer.max_steps=2", "trainer.save_every=1", "trainer.eval_every=0", "warm_start.steps=0",
             "reward.components={test_alternating: 1.0}", "algorithm.kl_coef=0.01"]
    train(tiny_config(tmp_path / "rows", *steps))
    train(tiny_config(tmp_path / "packed", *steps, "policy.max_tokens_per_micro_batch=96",
                      "policy.sequence_packing=true"))
    rows, packed = (read_metrics(tmp_path / name / "metrics.jsonl") for name in ("rows", "packed"))
    for a, b in zip(rows, packed):
        for key in ("train/loss", "train/grad_norm", "train/kl", "train/entropy"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key  # float32 model
    assert rows[0]["train/grad_norm"] > 0.1

    # with a warm start: its adapters are folded into the model that RL then adapts afresh
    train(tiny_config(tmp_path / "lora", *steps, "policy.lora.rank=4", "optim.lr=1e-2", "warm_start.steps=2"))
    lora = read_metrics(tmp_path / "lora" / "metrics.jsonl")
    assert lora[1]["train/kl"] > 0  # the adapters moved the policy away from the reference (adapters off)
    with safetensors.safe_open(str(tmp_path / "lora" / "final" / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "lora" in k]
    export(tmp_path / "lora", "hf", tmp_path / "exported")
    assert (tmp_path / "exported" / "config.json").is_file()
    with pytest.raises(ExportError, match="LoRA checkpoint holds the adapters only"):
        export(tmp_path / "lora" / "checkpoints" / "step_000002", "hf", tmp_path / "from_checkpoint")

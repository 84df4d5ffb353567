"""HFPolicy: optimizer steps, micro-batch invariance, skipped steps, LR schedule, checkpoints, reference policy."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers import make_policy, tiny_llama
from transformers import LlamaForCausalLM

from nemo_igrpo.algorithms.batch import RolloutBatch, pad_sequences
from nemo_igrpo.policy.hf import HFPolicy
from nemo_igrpo.policy.logprobs import token_logprobs_and_entropy

pytestmark = pytest.mark.usefixtures("single_thread")


def make_batch(rows: int = 8, seed: int = 0) -> RolloutBatch:
    generator = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, 64, (int(n),), generator=generator).tolist() for n in torch.randint(2, 6, (rows,))]
    completions = [torch.randint(1, 64, (int(n),), generator=generator).tolist() for n in torch.randint(1, 9, (rows,))]
    input_ids, attention_mask, loss_mask, _ = pad_sequences(prompts, completions, pad_token_id=0)
    return RolloutBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        loss_mask=loss_mask,
        advantages=torch.randn(rows, generator=generator),
        group_ids=torch.arange(rows) // 4,
        gen_logprobs=torch.zeros(input_ids.shape),
    )


def pg_loss(batch: RolloutBatch):
    """−(advantage × log-prob) averaged over the completion tokens of the *whole* batch, plus an entropy metric."""
    tokens = batch.loss_mask.sum()

    def loss_fn(stats, micro_batch):
        mask = micro_batch.loss_mask
        loss = -(micro_batch.advantages[:, None] * stats.logprobs * mask).sum() / tokens
        return loss, {"entropy": (stats.entropy * mask).sum().detach() / tokens}

    return loss_fn


def weights(policy: HFPolicy) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in policy.export_weights()}


def test_train_step_lowers_the_loss_and_reports_floats() -> None:
    policy, batch = make_policy(), make_batch()
    before = weights(policy)
    results = [policy.train_step(batch, pg_loss(batch)) for _ in range(4)]

    assert all(isinstance(v, float) for v in results[0].values())
    assert set(results[0]) == {"loss", "entropy", "grad_norm", "lr", "skipped"}
    assert [r["skipped"] for r in results] == [0.0] * 4
    assert results[-1]["loss"] < results[0]["loss"]
    assert any(not torch.equal(before[name], after) for name, after in weights(policy).items())


@pytest.mark.parametrize("micro_batch_size, checkpointing", [(2, False), (3, True)])
def test_micro_batching_and_checkpointing_give_the_same_update(micro_batch_size: int, checkpointing: bool) -> None:
    model, batch = tiny_llama(), make_batch()
    # Adam's first update is lr·g/(|g| + eps): for gradients near eps (1e-8) float32 summation-order noise moves it
    # by up to ~lr·1e-3, so the weights are compared at a small lr; the gradients themselves match at any lr.
    options = dict(lr=1e-3, gradient_checkpointing=checkpointing)
    whole = make_policy(copy.deepcopy(model), micro_batch_size=8, lr=1e-3)
    split = make_policy(copy.deepcopy(model), micro_batch_size=micro_batch_size, **options)

    whole_metrics = whole.train_step(batch, pg_loss(batch))
    split_metrics = split.train_step(batch, pg_loss(batch))

    for name in ("loss", "entropy", "grad_norm"):
        assert split_metrics[name] == pytest.approx(whole_metrics[name], abs=1e-5)
    for (name, p), (_, q) in zip(whole.model.named_parameters(), split.model.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)
        torch.testing.assert_close(q, p, atol=1e-5, rtol=0, msg=name)


def test_non_finite_loss_skips_the_update() -> None:
    policy, batch = make_policy(warmup_steps=2, total_steps=10), make_batch()
    before = weights(policy)

    def nan_loss(stats, micro_batch):
        loss, metrics = pg_loss(batch)(stats, micro_batch)
        return loss * float("nan"), metrics

    result = policy.train_step(batch, nan_loss)

    assert result["skipped"] == 1.0 and math.isnan(result["loss"])
    assert all(torch.equal(before[name], after) for name, after in weights(policy).items())
    assert not policy.optimizer.state  # Adam's moments untouched
    # The schedule still advanced: the next step runs at warmup step 1's lr.
    assert policy.train_step(batch, pg_loss(batch))["lr"] == pytest.approx(1e-2)


def test_lr_follows_warmup_then_cosine() -> None:
    policy, batch = make_policy(lr=1e-3, warmup_steps=2, total_steps=10, min_lr_ratio=0.1), make_batch(rows=2)
    lrs = [policy.train_step(batch, pg_loss(batch))["lr"] for _ in range(12)]

    assert lrs[0] == pytest.approx(0.5e-3)  # warmup: (step + 1) / warmup_steps
    assert lrs[1] == pytest.approx(1e-3)
    assert lrs[2] == pytest.approx(1e-3)  # cosine starts at the peak
    assert lrs[4] == pytest.approx(1e-3 * (0.1 + 0.45 * (1 + math.cos(math.pi / 4))))  # progress 2/8
    assert lrs[6] == pytest.approx(0.55e-3)  # halfway: (1 + 0.1) / 2
    assert lrs[10] == pytest.approx(1e-4) and lrs[11] == pytest.approx(1e-4)  # floor at min_lr_ratio
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))


def test_save_load_round_trip(tmp_path) -> None:
    batch = make_batch()
    original = make_policy(tiny_llama(tie_word_embeddings=True), warmup_steps=3, total_steps=10)
    for _ in range(2):
        original.train_step(batch, pg_loss(batch))
    original.save(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"model.safetensors", "optimizer.pt"}

    restored = make_policy(tiny_llama(seed=1, tie_word_embeddings=True), warmup_steps=3, total_steps=10)
    restored.load(tmp_path)

    for name, tensor in weights(original).items():
        assert torch.equal(weights(restored)[name], tensor), name
    assert restored.model.lm_head.weight is restored.model.model.embed_tokens.weight  # still tied
    assert restored.scheduler.last_epoch == original.scheduler.last_epoch == 2
    for p, q in zip(original.model.parameters(), restored.model.parameters()):
        for key, value in original.optimizer.state[p].items():
            assert torch.equal(restored.optimizer.state[q][key], value), key
    # Identical state ⇒ identical next step.
    assert restored.train_step(batch, pg_loss(batch)) == original.train_step(batch, pg_loss(batch))
    for name, tensor in weights(original).items():
        assert torch.equal(weights(restored)[name], tensor), name


def test_save_pretrained_round_trip(tmp_path) -> None:
    policy = make_policy()
    policy.save_pretrained(tmp_path)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path)
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, policy.model.state_dict()[name]), name


def test_compute_logprobs_is_micro_batched_to_full_width() -> None:
    policy, batch = make_policy(micro_batch_size=3), make_batch()
    stats = policy.compute_logprobs(batch)
    with torch.no_grad():
        expected = token_logprobs_and_entropy(
            policy.model, batch.input_ids, batch.attention_mask, batch.loss_mask, temperature=1.0, chunk_size=64
        )
    assert stats.logprobs.shape == batch.input_ids.shape and not stats.logprobs.requires_grad
    torch.testing.assert_close(stats.logprobs, expected.logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(stats.entropy, expected.entropy, atol=1e-5, rtol=0)


def test_reference_policy_exists_only_when_asked_for() -> None:
    batch = make_batch()
    without = make_policy()
    assert without.reference is None
    with pytest.raises(RuntimeError, match="reference"):
        without.compute_logprobs(batch, reference=True)

    policy = make_policy(use_reference=True)
    initial = policy.compute_logprobs(batch).logprobs
    policy.train_step(batch, pg_loss(batch))
    assert not torch.allclose(policy.compute_logprobs(batch).logprobs, initial)
    torch.testing.assert_close(policy.compute_logprobs(batch, reference=True).logprobs, initial, atol=1e-6, rtol=0)
    assert not any(p.requires_grad for p in policy.reference.parameters())


def test_bfloat16_autocast_step_is_finite() -> None:
    policy, batch = make_policy(autocast_dtype="bfloat16"), make_batch()
    result = policy.train_step(batch, pg_loss(batch))
    assert result["skipped"] == 0.0 and math.isfinite(result["loss"])
    assert policy.compute_logprobs(batch).logprobs.dtype == torch.float32

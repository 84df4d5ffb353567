"""The hybrid Mamba2 + attention Nemotron-H runs through both HF backends (torch fallbacks of the Mamba kernels)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers import make_policy
from transformers import NemotronHConfig, NemotronHForCausalLM

from nemo_igrpo.algorithms.batch import RolloutBatch, pad_sequences
from nemo_igrpo.generation import SamplingParams
from nemo_igrpo.generation.hf import HFGeneration
from nemo_igrpo.policy.logprobs import token_logprobs_and_entropy

PROMPTS = [[1, 5, 7], [2, 9, 4, 4, 11, 30, 8], [6]]


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def model() -> NemotronHForCausalLM:
    torch.manual_seed(0)
    config = NemotronHConfig(
        vocab_size=64,
        hidden_size=64,
        hybrid_override_pattern="M*M-",  # Mamba2, attention, Mamba2, MLP
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        intermediate_size=128,
        mamba_num_heads=4,
        mamba_head_dim=16,
        ssm_state_size=16,
        n_groups=1,
        chunk_size=8,  # smaller than the sequences, so the chunked scan crosses chunk boundaries
        max_position_embeddings=256,
    )
    return NemotronHForCausalLM(config)


def generate(model, params: SamplingParams):
    generation = HFGeneration(copy.deepcopy(model), pad_token_id=0, batch_size=2, device="cpu")
    return generation.generate(PROMPTS, params)


def to_batch(completions) -> RolloutBatch:
    rows = [(prompt, c) for prompt, group in zip(PROMPTS, completions) for c in group]
    input_ids, attention_mask, loss_mask, gen_logprobs = pad_sequences(
        [p for p, _ in rows], [c.token_ids for _, c in rows], 0, [c.logprobs for _, c in rows]
    )
    return RolloutBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        loss_mask=loss_mask,
        advantages=torch.linspace(-1, 1, len(rows)),
        group_ids=torch.arange(len(rows)) // 2,
        gen_logprobs=gen_logprobs,
    )


def test_generation_logprobs_match_the_policy(model) -> None:
    torch.manual_seed(1)
    completions = generate(model, SamplingParams(n=2, temperature=0.7, max_new_tokens=12, stop_token_ids=(3,)))
    assert [len(group) for group in completions] == [2, 2, 2]

    batch = to_batch(completions)
    with torch.no_grad():
        stats = token_logprobs_and_entropy(model, batch.input_ids, batch.attention_mask, batch.loss_mask, 0.7, 8)
    torch.testing.assert_close(stats.logprobs, batch.gen_logprobs, atol=1e-4, rtol=0)


def test_chunked_logprobs_match_naive_with_gradients(model) -> None:
    batch = to_batch(generate(model, SamplingParams(n=2, max_new_tokens=10)))
    weights = torch.randn(batch.input_ids.shape, generator=torch.Generator().manual_seed(2))

    stats = token_logprobs_and_entropy(model, batch.input_ids, batch.attention_mask, batch.loss_mask, 1.0, 5)
    ((weights * stats.logprobs).sum() + stats.entropy.sum()).backward()
    chunked = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1].float()
    log_probs = torch.log_softmax(logits, dim=-1)
    mask = batch.loss_mask[:, 1:]
    naive = log_probs.gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1) * mask
    entropy = -(log_probs.exp() * log_probs).sum(-1) * mask
    ((weights[:, 1:] * naive).sum() + entropy.sum()).backward()

    torch.testing.assert_close(stats.logprobs[:, 1:], naive, atol=1e-5, rtol=0)
    torch.testing.assert_close(stats.entropy[:, 1:], entropy, atol=1e-5, rtol=0)
    for name, p in model.named_parameters():
        torch.testing.assert_close(chunked[name], p.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_policy_train_step_changes_the_weights(model) -> None:
    torch.manual_seed(3)
    batch = to_batch(generate(model, SamplingParams(n=2, max_new_tokens=10)))
    policy = make_policy(model, lr=1e-3, weight_decay=0.01, micro_batch_size=4, logprob_chunk_size=16,
                         use_reference=True, gradient_checkpointing=True)
    before = {name: t.clone() for name, t in policy.export_weights()}
    tokens = batch.loss_mask.sum()

    def loss_fn(stats, micro_batch):
        loss = -(micro_batch.advantages[:, None] * stats.logprobs * micro_batch.loss_mask).sum() / tokens
        return loss, {}

    result = policy.train_step(batch, loss_fn)

    assert result["skipped"] == 0.0 and math.isfinite(result["loss"]) and result["grad_norm"] > 0
    changed = [name for name, t in policy.export_weights() if not torch.equal(before[name], t)]
    assert any("mixer.A_log" in name for name in changed)  # the Mamba2 parameters train too
    assert any("mixer.q_proj" in name for name in changed)
    reference = policy.compute_logprobs(batch, reference=True).logprobs
    torch.testing.assert_close(reference, batch.gen_logprobs, atol=1e-4, rtol=0)  # the frozen initial policy

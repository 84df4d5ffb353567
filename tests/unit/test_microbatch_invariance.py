"""Summing the loss over micro-batches must give the full-batch loss, gradient and metrics, for every
aggregation mode × policy loss, with and without KL (the denominators are step-global)."""

import pytest
import torch

from nemo_igrpo.algorithms.aggregation import AGGREGATIONS, LossNormalizer
from nemo_igrpo.algorithms.batch import RolloutBatch, pad_sequences
from nemo_igrpo.algorithms.loss import make_loss_fn
from nemo_igrpo.algorithms.policy_losses import POLICY_LOSSES
from nemo_igrpo.policy.base import TokenStats

VOCAB, MAX_NEW = 11, 9
# prompt + completion lengths: 12, 11, 7, 7, 4, 4, 10, 10 → micro-batches of 2 are trimmed to 12, 7, 4, 10 columns
PROMPT_LENS = [3, 2, 4, 2, 3, 2, 3, 4]
COMPLETION_LENS = [9, 9, 3, 5, 1, 2, 7, 6]
DUAL_CLIP = {"ppo": 2.0, "gspo": 2.0, "cispo": None}  # dual clip does not apply to cispo


class TinyLM(torch.nn.Module):
    """Embedding + linear head: log p(token t | token t−1), aligned with input_ids (position 0 gets 0)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(VOCAB, 5, dtype=torch.float64)
        self.head = torch.nn.Linear(5, VOCAB, dtype=torch.float64)

    def forward(self, input_ids: torch.Tensor) -> TokenStats:
        logp = torch.log_softmax(self.head(torch.tanh(self.embed(input_ids[:, :-1]))), dim=-1)  # [B, L-1, V]
        token_lp = logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
        entropy = -(logp.exp() * logp).sum(-1)
        pad = token_lp.new_zeros(input_ids.shape[0], 1)
        return TokenStats(logprobs=torch.cat([pad, token_lp], 1), entropy=torch.cat([pad, entropy], 1))


def _batch(model: TinyLM, on_policy: bool) -> RolloutBatch:
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in PROMPT_LENS]
    completions = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in COMPLETION_LENS]
    input_ids, attention_mask, loss_mask, _ = pad_sequences(prompts, completions, pad_token_id=0)
    loss_mask = loss_mask.double()
    with torch.no_grad():
        lp = model(input_ids).logprobs
    # stale / reference log-probs: current ones plus noise, so ratios leave the clip range
    old = (lp + 0.4 * torch.randn(lp.shape, generator=gen, dtype=torch.float64)) * loss_mask
    ref = (lp + 0.3 * torch.randn(lp.shape, generator=gen, dtype=torch.float64)) * loss_mask
    return RolloutBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        loss_mask=loss_mask,
        advantages=torch.randn(len(prompts), generator=gen, dtype=torch.float64),
        group_ids=torch.arange(len(prompts)) // 4,
        gen_logprobs=torch.zeros_like(lp),
        old_logprobs=None if on_policy else old,
        ref_logprobs=ref,
    )


def _run(model: TinyLM, parts: list[RolloutBatch], loss_fn) -> tuple[torch.Tensor, dict, list[torch.Tensor]]:
    """Backend-style step: forward/backward per micro-batch, summing losses, metrics and gradients."""
    model.zero_grad()
    total, metrics = torch.zeros((), dtype=torch.float64), {}
    for part in parts:
        loss, part_metrics = loss_fn(model(part.input_ids), part)
        loss.backward()
        total = total + loss.detach()
        for key, value in part_metrics.items():
            metrics[key] = metrics.get(key, 0.0) + value
    return total, metrics, [p.grad.clone() for p in model.parameters()]


def _check(policy_loss: str, loss_agg: str, kl_coef: float, on_policy: bool) -> dict:
    model = TinyLM()
    batch = _batch(model, on_policy)
    loss_fn = make_loss_fn(
        policy_loss=policy_loss,
        eps_low=0.2,
        eps_high=0.28,
        dual_clip=DUAL_CLIP[policy_loss],
        loss_agg=loss_agg,
        kl_coef=kl_coef,
        kl_estimator="k3",
        kl_clamp=10.0,
        normalizer=LossNormalizer.from_mask(batch.loss_mask, MAX_NEW),
        importance_correction="none",
        importance_cap=2.0,
    )
    parts = batch.split(2)
    assert [p.input_ids.shape[1] for p in parts] == [12, 7, 4, 10]  # trimming is exercised

    full_loss, full_metrics, full_grads = _run(model, [batch], loss_fn)
    micro_loss, micro_metrics, micro_grads = _run(model, parts, loss_fn)

    assert any(g.abs().max() > 1e-3 for g in full_grads)  # a non-trivial gradient is being compared
    torch.testing.assert_close(micro_loss, full_loss, atol=1e-6, rtol=0)
    for full, micro in zip(full_grads, micro_grads):
        torch.testing.assert_close(micro, full, atol=1e-6, rtol=0)
    for key in full_metrics:
        torch.testing.assert_close(micro_metrics[key], full_metrics[key], atol=1e-6, rtol=0)
    return full_metrics


@pytest.mark.parametrize("kl_coef", [0.0, 0.1])
@pytest.mark.parametrize("loss_agg", AGGREGATIONS)
@pytest.mark.parametrize("policy_loss", sorted(POLICY_LOSSES))
def test_microbatch_invariance(policy_loss, loss_agg, kl_coef):
    metrics = _check(policy_loss, loss_agg, kl_coef, on_policy=False)
    assert metrics["clip_fraction"] > 0  # the clipped regime is part of what is compared
    assert (metrics["kl"] != 0) == (kl_coef > 0)


@pytest.mark.parametrize("loss_agg", AGGREGATIONS)
def test_microbatch_invariance_on_policy(loss_agg):
    metrics = _check("ppo", loss_agg, 0.1, on_policy=True)
    assert metrics["ratio_mean"].item() == pytest.approx(1.0)

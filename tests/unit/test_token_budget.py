"""Token-budget micro-batches and sequence packing on the HF backend: the same log-probs, loss, metrics, gradients
and optimizer step as row micro-batches (the loss is normalised by step-global counts), and data-parallel shards
balanced by tokens give the single-process step.

The model runs in float64; the head's softmax math is float32 (policy.logprobs), so per-token values agree to
float32 rounding (~1e-7 of O(1) log-probs) and 1e-6 is the bound for every compared quantity.
"""

from __future__ import annotations

import pytest
import torch
from helpers import make_policy, tiny_llama

from nemo_igrpo.algorithms.aggregation import LossNormalizer
from nemo_igrpo.algorithms.batch import RolloutBatch, pad_sequences
from nemo_igrpo.algorithms.loss import make_loss_fn
from nemo_igrpo.policy.microbatch import token_budget_groups
from nemo_igrpo.sharding import balance_by_tokens

pytestmark = pytest.mark.usefixtures("single_thread")
TOL = 1e-6
# Long-tailed like reasoning traces: mostly short, a couple near the maximum.
PROMPTS = [3, 5, 2, 4, 3, 6, 2, 5, 4, 3]
COMPLETIONS = [40, 3, 5, 2, 37, 6, 1, 4, 9, 2]
BUDGET = 48


def long_tailed_batch(seed: int = 0) -> RolloutBatch:
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, 64, (n,), generator=g).tolist() for n in PROMPTS]
    completions = [torch.randint(1, 64, (n,), generator=g).tolist() for n in COMPLETIONS]
    input_ids, attention_mask, loss_mask, _ = pad_sequences(prompts, completions, pad_token_id=0)
    rows = len(prompts)
    noise = 0.3 * torch.randn(input_ids.shape, generator=g)
    return RolloutBatch(input_ids=input_ids, attention_mask=attention_mask, loss_mask=loss_mask,
                        advantages=torch.randn(rows, generator=g), group_ids=torch.arange(rows) // 5,
                        gen_logprobs=(-4.2 + 0.3 * torch.randn(input_ids.shape, generator=g)) * loss_mask,
                        old_logprobs=None,
                        ref_logprobs=(-4.2 + noise) * loss_mask)  # near log(1/64): an O(0.1) KL


def loss_for(batch: RolloutBatch):
    return make_loss_fn(policy_loss="ppo", eps_low=0.2, eps_high=0.28, dual_clip=None, loss_agg="seq-mean-token-mean",
                        kl_coef=0.05, kl_estimator="k3", kl_clamp=None, importance_correction="none",
                        importance_cap=2.0, normalizer=LossNormalizer.from_mask(batch.loss_mask, 64))


def policy(**options):
    model = tiny_llama(seed=3).double()  # sdpa attention (the default)
    return make_policy(model, micro_batch_size=3, lr=1e-2, **options)


def test_token_budget_groups_cover_every_row_within_the_budget():
    lengths = [p + c for p, c in zip(PROMPTS, COMPLETIONS)]
    for packed in (False, True):
        groups = token_budget_groups(lengths, BUDGET, packed=packed)
        assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
        for g in groups:
            cost = sum(lengths[i] for i in g) if packed else len(g) * max(lengths[i] for i in g)
            assert cost <= BUDGET or len(g) == 1
    # lengths 43, 8, 7, 6, 40, 12, 3, 9, 13, 5; padded: the two long rows apart (2 × 43 > 48), short rows together
    assert token_budget_groups(lengths, BUDGET) == [[0], [4], [8, 5, 7], [1, 2, 3, 9, 6]]  # 3 × 13, 5 × 8 tokens
    assert token_budget_groups([100, 5], BUDGET) == [[0], [1]]  # longer than the budget: alone


def test_balance_by_tokens_equalises_tokens_not_rows():
    lengths = [900, 100, 120, 80, 90, 110, 95, 105]
    shares = balance_by_tokens(lengths, 2)
    assert sorted(i for s in shares for i in s) == list(range(8))
    tokens = [sum(lengths[i] for i in s) for s in shares]
    assert tokens == [900, 700]  # best possible: the 900-token row alone against the seven short rows
    assert [len(s) for s in shares] == [1, 7]
    assert all(balance_by_tokens([5, 5, 5], 4)[r] for r in range(3))  # every rank gets a row while rows last


@pytest.mark.parametrize("mode", ["budget", "packed"])
def test_token_budget_and_packing_equal_row_micro_batches(mode):
    options = {"max_tokens_per_micro_batch": BUDGET, "sequence_packing": mode == "packed"}
    batch = long_tailed_batch()
    loss_fn = loss_for(batch)
    rows, other = policy(), policy(**options)

    def padded_tokens(p):  # tokens the forward runs over (a packed micro-batch is one row without padding)
        return sum(int(part.attention_mask.sum()) if p.sequence_packing else part.input_ids.numel()
                   for _, part in p._micro_batches(batch))

    # 3 rows at a time pad to 293 tokens; the budget groups similar lengths (162); packing pads nothing (146)
    assert (padded_tokens(rows), padded_tokens(other)) == (293, 146 if mode == "packed" else 162)

    ref, got = rows.compute_logprobs(batch), other.compute_logprobs(batch)
    assert ref.logprobs.abs().sum() > 1  # something was scored
    torch.testing.assert_close(got.logprobs, ref.logprobs, atol=TOL, rtol=0)
    torch.testing.assert_close(got.entropy, ref.entropy, atol=TOL, rtol=0)

    before = {n: p.detach().clone() for n, p in rows.model.named_parameters()}
    m_ref, m_got = rows.train_step(batch, loss_fn), other.train_step(batch, loss_fn)
    for key in m_ref:
        assert m_got[key] == pytest.approx(m_ref[key], abs=TOL), key
    assert m_ref["grad_norm"] > 0.1 and m_ref["kl"] > 0
    moved = max((rows.model.get_parameter(n) - w).abs().max().item() for n, w in before.items())
    assert moved > 1e-3  # the step changed the weights ... identically (Adam's first step is ~lr·sign(g)):
    for name, param in rows.model.named_parameters():
        torch.testing.assert_close(other.model.get_parameter(name), param, atol=TOL, rtol=0)


def test_packing_is_refused_for_models_that_leak_across_sequences():
    model = tiny_llama(seed=3)
    model.config._attn_implementation = "paged|sdpa"  # an implementation whose mask ignores position ids
    with pytest.raises(ValueError, match=r"policy\.sequence_packing.*'paged\|sdpa'"):
        make_policy(model, max_tokens_per_micro_batch=64, sequence_packing=True)
    with pytest.raises(ValueError, match=r"policy\.sequence_packing=true needs policy\.max_tokens_per_micro_batch"):
        make_policy(tiny_llama(), sequence_packing=True)


def test_data_parallel_shards_balanced_by_tokens_sum_to_the_single_process_step(monkeypatch):
    """Two simulated DP ranks (the exchange is an all-gather; DP gradient summing is tested in
    test_distributed_policy): the balanced shares partition the rows, carry equal tokens, and their summed
    gradients equal the whole batch's."""
    from nemo_igrpo import distributed
    from nemo_igrpo.sharding import balance_across_ranks

    batch = long_tailed_batch()
    rollout_shards = [batch.select(torch.arange(r, batch.size, 2)) for r in range(2)]  # equal rows, not tokens
    assert [int(s.attention_mask.sum()) for s in rollout_shards] == [106, 40]
    monkeypatch.setattr(distributed, "all_gather_objects", lambda obj, group=None: rollout_shards)
    monkeypatch.setattr(distributed, "world_size", lambda group=None: 2)
    shares = []
    for r in range(2):
        monkeypatch.setattr(distributed, "rank", lambda group=None, r=r: r)
        shares.append(balance_across_ranks(rollout_shards[r], group="dp"))
    assert [int(s.attention_mask.sum()) for s in shares] == [74, 72]
    rows = sorted(tuple(row.tolist()) for s in shares for row in s.input_ids[:, :4])
    assert rows == sorted(tuple(row.tolist()) for row in batch.input_ids[:, :4])

    loss_fn = loss_for(batch)
    single, sharded = policy(), policy(max_tokens_per_micro_batch=BUDGET)
    single.optimizer.zero_grad()
    loss, metrics = single._accumulate_gradients(batch, loss_fn)
    sharded.optimizer.zero_grad()
    parts = [sharded._accumulate_gradients(share, loss_fn) for share in shares]  # gradients accumulate = DP sum
    assert sum(p[0] for p in parts) == pytest.approx(loss, rel=TOL, abs=TOL)
    for key in metrics:
        assert sum(p[1][key] for p in parts) == pytest.approx(metrics[key], rel=TOL, abs=TOL), key
    scale = max(p.grad.abs().max().item() for p in single.model.parameters())
    assert scale > 1e-3
    for name, param in single.model.named_parameters():
        torch.testing.assert_close(sharded.model.get_parameter(name).grad, param.grad, atol=TOL * scale, rtol=0)


def test_packing_is_refused_for_mamba_hybrids():
    """Nemotron-H's Mamba2 mixers carry their state from one packed sequence into the next."""
    from transformers import NemotronHConfig, NemotronHForCausalLM

    torch.manual_seed(0)
    model = NemotronHForCausalLM(NemotronHConfig(
        vocab_size=64, hidden_size=64, hybrid_override_pattern="M*M-", num_attention_heads=2, num_key_value_heads=1,
        head_dim=32, intermediate_size=128, mamba_num_heads=4, mamba_head_dim=16, ssm_state_size=16, n_groups=1,
        chunk_size=8, max_position_embeddings=256))
    with pytest.raises(ValueError, match=r"policy\.sequence_packing=true: NemotronHForCausalLM .* does not keep"):
        make_policy(model, max_tokens_per_micro_batch=64, sequence_packing=True)


def test_config_keys_are_checked():
    from nemo_igrpo.config import ConfigError, load_config

    config = load_config(overrides=["policy.max_tokens_per_micro_batch=4096", "policy.sequence_packing=true"])
    assert config.policy.max_tokens_per_micro_batch == 4096 and config.policy.sequence_packing
    with pytest.raises(ConfigError, match=r"policy\.sequence_packing: needs policy\.max_tokens_per_micro_batch"):
        load_config(overrides=["policy.sequence_packing=true"])
    with pytest.raises(ConfigError, match=r"policy\.max_tokens_per_micro_batch: must be >= 1"):
        load_config(overrides=["policy.max_tokens_per_micro_batch=0"])


def test_benchmark_lengths_are_long_tailed_like_reasoning_traces():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "scripts" / "bench_packing.py"
    spec = importlib.util.spec_from_file_location("bench_packing", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    lengths = bench.skewed_lengths(64, 1000)
    assert len(lengths) == 64 and max(lengths) == 1000 and lengths.count(1000) >= 3
    median = sorted(lengths)[32]
    assert 70 <= median <= 150  # about 10% of the maximum
    assert lengths != sorted(lengths)  # rollout order, not sorted

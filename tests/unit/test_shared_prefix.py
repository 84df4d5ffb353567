"""policy.shared_prefix on the HF backend: a group's common prefix computed once gives the unshared rows' log-probs,
entropy, loss, metrics, gradients and optimizer step, alone and with token budgets, packing, the reference pass,
π_old (ppo_epochs > 1), KL and LoRA.

The model runs in float64; the head's softmax math is float32 (policy.logprobs), so per-token values agree to float32
rounding (~1e-7 of O(1..5) log-probs, whatever the reduction order of the attention kernels) and 1e-6 bounds every
compared per-token quantity; gradients are compared at 1e-6 of their largest entry.
"""

from __future__ import annotations

import pytest
import torch
from helpers import make_policy, tiny_llama

from nemo_igrpo.algorithms.aggregation import LossNormalizer
from nemo_igrpo.algorithms.batch import RolloutBatch, pad_sequences
from nemo_igrpo.algorithms.loss import make_loss_fn
from nemo_igrpo.policy import shared_prefix

pytestmark = pytest.mark.usefixtures("single_thread")
TOL = 1e-6
# (prompt + draft length, refinement lengths): iGRPO groups of G = 4, a G = 3 group, a lone row, a G = 2 group
GROUPS = [(9, [5, 11, 2, 7]), (14, [3, 9, 6]), (5, [8]), (7, [10, 1])]


def igrpo_batch(seed: int = 0, groups=GROUPS) -> RolloutBatch:
    """Rows of a group share their prompt + draft (the prefix); a refinement may start with the same token too."""
    g = torch.Generator().manual_seed(seed)
    prompts, completions, group_ids = [], [], []
    for gid, (prefix, lengths) in enumerate(groups):
        shared = torch.randint(1, 64, (prefix,), generator=g).tolist()
        for n in lengths:
            prompts.append(shared)
            completions.append(torch.randint(1, 64, (n,), generator=g).tolist())
            group_ids.append(gid)
    completions[1][0] = completions[0][0]  # equal first completion tokens must not be shared (they are scored)
    input_ids, attention_mask, loss_mask, _ = pad_sequences(prompts, completions, pad_token_id=0)
    if len(prompts) > 5:
        loss_mask[5] = 0.0  # a truncated row (overlong filter): in its group's prefix, without loss
    rows = len(prompts)
    noise = 0.3 * torch.randn(input_ids.shape, generator=g)
    return RolloutBatch(input_ids=input_ids, attention_mask=attention_mask, loss_mask=loss_mask,
                        advantages=torch.randn(rows, generator=g), group_ids=torch.tensor(group_ids),
                        gen_logprobs=(-4.2 + 0.3 * torch.randn(input_ids.shape, generator=g)) * loss_mask,
                        ref_logprobs=(-4.2 + noise) * loss_mask)  # near log(1/64): an O(0.1) KL


def loss_for(batch: RolloutBatch):
    return make_loss_fn(policy_loss="ppo", eps_low=0.2, eps_high=0.28, dual_clip=None, loss_agg="seq-mean-token-mean",
                        kl_coef=0.05, kl_estimator="k3", kl_clamp=None, importance_correction="none", importance_cap=2.0,
                        normalizer=LossNormalizer.from_mask(batch.loss_mask, 64))


def policy(attn="sdpa", dtype=torch.float64, **options):
    model = tiny_llama(seed=3, attn_implementation=attn).to(dtype)
    return make_policy(model, micro_batch_size=3, lr=1e-2, use_reference=True, **options)


def test_units_share_the_prefix_up_to_the_first_scored_token():
    batch = igrpo_batch()
    units = shared_prefix.units(batch)
    assert [u.rows for u in units] == [[0, 1, 2, 3], [4, 5, 6], [7], [8, 9]]
    # rows 0 and 1 also share their first completion token, which is scored, so it stays in each suffix
    assert [u.prefix for u in units] == [9, 14, 5, 7]
    assert [u.tokens for u in units] == [9 + 25, 14 + 18, 13, 7 + 11]
    assert sum(u.tokens for u in units) < int(batch.attention_mask.sum())  # 97 computed instead of 154


def test_block_mask_position_ids_and_predictors():
    """Hand-checked on a 2-token prefix with suffixes of 2 and 1 tokens: [p0 p1 | a0 a1 | b0]."""
    ids = torch.tensor([[5, 6, 7, 8], [5, 6, 9, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    batch = RolloutBatch(input_ids=ids, attention_mask=mask, loss_mask=torch.tensor([[0, 0, 1, 1], [0, 0, 1, 0.]]),
                         advantages=torch.zeros(2), group_ids=torch.tensor([3, 3]), gen_logprobs=torch.zeros(2, 4))
    layout = shared_prefix.layout(batch, packed=False)
    assert layout.input_ids.tolist() == [[5, 6, 7, 8, 9]]
    assert layout.position_ids.tolist() == [[0, 1, 2, 3, 2]]  # each suffix continues from the prefix's end
    allowed = shared_prefix.allowed(layout.segment, layout.branch)[0, 0].int().tolist()
    assert allowed == [[1, 0, 0, 0, 0],
                       [1, 1, 0, 0, 0],
                       [1, 1, 1, 0, 0],
                       [1, 1, 1, 1, 0],
                       [1, 1, 0, 0, 1]]  # b0 sees the prefix and itself, never a0/a1
    # scored tokens (0,2) (0,3) (1,2): predicted by p1, a0, and p1 again (the prefix's last position)
    assert list(zip(layout.rows.tolist(), layout.cols.tolist())) == [(0, 2), (0, 3), (1, 2)]
    assert layout.predictor[1].tolist() == [1, 2, 1]
    assert layout.spans == [[(0, 2, [(2, 2), (4, 1)])]]  # what the span-by-span SDPA path runs


def test_sdpa_models_switch_to_span_attention_and_stay_plain_elsewhere():
    """sdpa models score shared rows span by span; every other forward (generation shares the model) is plain SDPA."""
    from nemo_igrpo.policy import prefix_attention

    model = tiny_llama(seed=3).double()
    ids = torch.randint(1, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    before = model(input_ids=ids, attention_mask=mask).logits
    greedy = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    generated = model.generate(ids[:1], attention_mask=mask[:1], **greedy)
    shared = make_policy(model, shared_prefix=True)
    assert shared.model.config._attn_implementation == prefix_attention.IMPLEMENTATION
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, before, atol=0, rtol=0)
    assert torch.equal(model.generate(ids[:1], attention_mask=mask[:1], **greedy), generated)  # KV-cache decoding


def test_packed_units_do_not_see_each_other():
    layout = shared_prefix.layout(igrpo_batch(), packed=True)
    assert layout.input_ids.shape == (1, 97)
    allowed = shared_prefix.allowed(layout.segment, layout.branch)[0, 0]
    seg = layout.segment[0]
    crossing = allowed & (seg[:, None] != seg[None, :])
    assert not crossing.any()
    assert layout.position_ids[0, 34].item() == 0  # the second unit restarts its positions


@pytest.mark.parametrize("mode", ["rows", "budget", "packed", "checkpointed"])
def test_shared_prefix_equals_unshared_rows(mode):
    options = {"rows": {}, "budget": {"max_tokens_per_micro_batch": 40},
               "packed": {"max_tokens_per_micro_batch": 40, "sequence_packing": True},
               # activation checkpointing recomputes each layer in backward: the spans ride on the mask it replays
               "checkpointed": {"max_tokens_per_micro_batch": 40, "sequence_packing": True,
                                "gradient_checkpointing": True}}[mode]
    batch = igrpo_batch()
    loss_fn = loss_for(batch)
    plain, shared = policy(), policy(shared_prefix=True, **options)

    for reference in (False, True):  # π_old / on-policy scores, and the frozen reference (KL)
        want, got = plain.compute_logprobs(batch, reference), shared.compute_logprobs(batch, reference)
        assert want.logprobs.abs().sum() > 50  # something was scored
        torch.testing.assert_close(got.logprobs, want.logprobs, atol=TOL, rtol=0)
        torch.testing.assert_close(got.entropy, want.entropy, atol=TOL, rtol=0)

    plain.optimizer.zero_grad()
    shared.optimizer.zero_grad()
    loss, metrics = plain._accumulate_gradients(batch, loss_fn)
    shared_loss, shared_metrics = shared._accumulate_gradients(batch, loss_fn)
    assert shared_loss == pytest.approx(loss, abs=TOL) and abs(loss) > 1e-3
    for key in metrics:
        assert shared_metrics[key] == pytest.approx(metrics[key], abs=TOL), key
    assert metrics["kl"] > 0
    scale = max(p.grad.abs().max().item() for p in plain.model.parameters())
    assert scale > 1e-3
    for name, param in plain.model.named_parameters():
        torch.testing.assert_close(shared.model.get_parameter(name).grad, param.grad, atol=TOL * scale, rtol=0)


def test_ppo_epochs_with_old_logprobs_step_identically():
    """Two optimizer steps on one batch with π_old from a scoring pass (ppo_epochs = 2), packed."""
    batch = igrpo_batch(seed=1)
    loss_fn = loss_for(batch)
    plain = policy()
    shared = policy(shared_prefix=True, max_tokens_per_micro_batch=64, sequence_packing=True)
    batch.old_logprobs = plain.compute_logprobs(batch).logprobs
    torch.testing.assert_close(shared.compute_logprobs(batch).logprobs, batch.old_logprobs, atol=TOL, rtol=0)
    for epoch in range(2):
        want, got = plain.train_step(batch, loss_fn), shared.train_step(batch, loss_fn)
        for key in want:
            assert got[key] == pytest.approx(want[key], abs=TOL), (epoch, key)
        assert want["grad_norm"] > 0.1
    # The second epoch ran off π_old with equal loss and gradient norm. (Its weights are not compared entry-wise: Adam
    # divides by sqrt(v), which turns 1e-12 differences of near-zero gradient entries into O(lr) ones.)
    assert want["ratio_mean"] != pytest.approx(1.0, abs=1e-4)


def test_grpo_groups_share_only_the_prompt():
    """GRPO: no draft, so the prefix is the prompt; same code, same numbers."""
    batch = igrpo_batch(seed=2, groups=[(4, [12, 9, 15, 7]), (6, [10, 10])])
    plain, shared = policy(), policy(shared_prefix=True)
    assert [u.prefix for u in shared_prefix.units(batch)] == [4, 6]
    torch.testing.assert_close(shared.compute_logprobs(batch).logprobs, plain.compute_logprobs(batch).logprobs,
                               atol=TOL, rtol=0)


def test_eager_attention_equals_unshared_rows():
    batch = igrpo_batch()
    plain, shared = policy("eager"), policy("eager", shared_prefix=True, max_tokens_per_micro_batch=64,
                                             sequence_packing=True)
    want, got = plain.compute_logprobs(batch), shared.compute_logprobs(batch)
    torch.testing.assert_close(got.logprobs, want.logprobs, atol=TOL, rtol=0)
    torch.testing.assert_close(got.entropy, want.entropy, atol=TOL, rtol=0)


def test_lora_adapters_get_the_unshared_gradients():
    pytest.importorskip("peft")
    from nemo_igrpo.config import LoraConfig

    batch = igrpo_batch()
    loss_fn = loss_for(batch)
    lora = LoraConfig(rank=4, alpha=8.0, dropout=0.0, target_modules=["all-linear"])
    plain, shared = policy(lora=lora), policy(lora=lora, shared_prefix=True)
    for p in (plain, shared):  # non-zero B matrices, so the adapters change the forward
        torch.manual_seed(7)
        for name, param in p.model.named_parameters():
            if "lora_B" in name:
                param.data.normal_(0, 0.05)
    for reference in (False, True):  # the reference is the base model with the adapters disabled
        torch.testing.assert_close(shared.compute_logprobs(batch, reference).logprobs,
                                   plain.compute_logprobs(batch, reference).logprobs, atol=TOL, rtol=0)
    want, got = plain.train_step(batch, loss_fn), shared.train_step(batch, loss_fn)
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=TOL), key
    for name, param in plain.model.named_parameters():
        torch.testing.assert_close(shared.model.get_parameter(name), param, atol=TOL, rtol=0)


def test_refused_for_flash_attention_and_mamba_hybrids():
    model = tiny_llama(seed=3)
    model.config._attn_implementation_internal = "flash_attention_2"  # (the setter would load the kernel)
    with pytest.raises(ValueError, match=r"policy\.shared_prefix=true: attention implementation 'flash_attention_2'"):
        make_policy(model, shared_prefix=True)
    model.config._attn_implementation = "paged|sdpa"  # honours no explicit mask
    with pytest.raises(ValueError, match=r"policy\.shared_prefix=true"):
        make_policy(model, shared_prefix=True)

    from transformers import NemotronHConfig, NemotronHForCausalLM

    torch.manual_seed(0)
    hybrid = NemotronHForCausalLM(NemotronHConfig(
        vocab_size=64, hidden_size=64, hybrid_override_pattern="M*M-", num_attention_heads=2, num_key_value_heads=1,
        head_dim=32, intermediate_size=128, mamba_num_heads=4, mamba_head_dim=16, ssm_state_size=16, n_groups=1,
        chunk_size=8, max_position_embeddings=256))
    with pytest.raises(ValueError, match=r"policy\.shared_prefix=true: NemotronHForCausalLM .*Mamba"):
        make_policy(hybrid, shared_prefix=True)


@pytest.mark.slow
def test_flex_attention_block_mask_equals_unshared_rows():
    """flex_attention (compiled by inductor on CPU, float32 only there): float32 attention sums of O(1) terms over
    ~100 keys agree to ~1e-5 of the log-probs' O(5) scale between kernels, hence 1e-4."""
    from torch.nn.attention import flex_attention  # noqa: F401  (torch without it cannot run this test)

    batch = igrpo_batch()
    plain = policy("sdpa", torch.float32)
    shared = policy("flex_attention", torch.float32, shared_prefix=True, max_tokens_per_micro_batch=64,
                    sequence_packing=True)
    want, got = plain.compute_logprobs(batch), shared.compute_logprobs(batch)
    torch.testing.assert_close(got.logprobs, want.logprobs, atol=1e-4, rtol=0)
    torch.testing.assert_close(got.entropy, want.entropy, atol=1e-4, rtol=0)


def test_data_parallel_shares_keep_groups_whole_and_balance_computed_tokens(monkeypatch):
    """Two simulated DP ranks, each numbering its groups from 0: whole groups are dealt by the tokens the shared layout
    computes, and the two shares' summed gradients equal the single-process step's."""
    from nemo_igrpo import distributed
    from nemo_igrpo.sharding import balance_across_ranks

    rank_batches = [igrpo_batch(seed=4, groups=GROUPS[:2]), igrpo_batch(seed=5, groups=GROUPS[2:])]
    monkeypatch.setattr(distributed, "all_gather_objects", lambda obj, group=None: rank_batches)
    monkeypatch.setattr(distributed, "world_size", lambda group=None: 2)
    shares = []
    for r in range(2):
        monkeypatch.setattr(distributed, "rank", lambda group=None, r=r: r)
        shares.append(balance_across_ranks(rank_batches[r], group="dp", shared_prefix=True))
    computed = [sum(u.tokens for u in shared_prefix.units(s)) for s in shares]
    # units of 34, 32 (rank 0) and 13, 18 (rank 1) tokens: LPT deals 34 + 13 and 32 + 18
    assert computed == [47, 50]
    for share in shares:  # every group whole on one rank: its prefix computed once
        for unit in shared_prefix.units(share):
            assert len(unit.rows) == {9: 4, 14: 3, 5: 1, 7: 2}[unit.prefix]

    whole = RolloutBatch(**{f: torch.cat([getattr(s, f) if getattr(s, f).dim() == 1 else
                                          torch.nn.functional.pad(getattr(s, f), (0, 30 - getattr(s, f).shape[1]))
                                          for s in shares]) for f in ("input_ids", "attention_mask", "loss_mask",
                                                                       "advantages", "group_ids", "gen_logprobs",
                                                                       "ref_logprobs")})
    loss_fn = loss_for(whole)
    single, sharded = policy(), policy(shared_prefix=True, max_tokens_per_micro_batch=64, sequence_packing=True)
    single.optimizer.zero_grad()
    loss, _ = single._accumulate_gradients(whole, loss_fn)
    sharded.optimizer.zero_grad()
    parts = [sharded._accumulate_gradients(share, loss_fn) for share in shares]  # gradients accumulate = DP sum
    assert sum(p[0] for p in parts) == pytest.approx(loss, abs=TOL)
    scale = max(p.grad.abs().max().item() for p in single.model.parameters())
    for name, param in single.model.named_parameters():
        torch.testing.assert_close(sharded.model.get_parameter(name).grad, param.grad, atol=TOL * scale, rtol=0)


def test_config_key_and_megatron_refusal():
    from nemo_igrpo.config import ConfigError, load_config

    assert not load_config().policy.shared_prefix  # off by default
    assert load_config(overrides=["policy.shared_prefix=true"]).policy.shared_prefix
    with pytest.raises(ConfigError, match=r"policy\.shared_prefix=true: only policy\.backend=hf .*docs/megatron\.md"):
        load_config(overrides=["policy.shared_prefix=true", "policy.backend=megatron"])

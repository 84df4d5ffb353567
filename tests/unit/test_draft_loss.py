"""algorithm.draft_loss_weight: draft rows join the batch so that the loss is L_refinements + w · L_drafts."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from test_igrpo_rollout import TOKENIZER, ScriptedGenerator, drafts_then_refinements, run, settings

from nemo_igrpo.algorithms.aggregation import LossNormalizer
from nemo_igrpo.algorithms.batch import RolloutBatch, TokenStats, pad_sequences
from nemo_igrpo.algorithms.draft_loss import part_scales, with_draft_rows
from nemo_igrpo.algorithms.loss import make_loss_fn
from nemo_igrpo.config import ConfigError, load_config
from nemo_igrpo.data.dataset import Example
from nemo_igrpo.generation.base import Completion


def test_part_scales_by_hand():
    refinements = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])  # 3 rows, 6 tokens
    drafts = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # 2 rows, 5 tokens
    # sequences: 3 + 2 = 5 → 5/3 and 0.5 · 5/2
    assert part_scales("seq-mean-token-mean", refinements, drafts, 0.5) == pytest.approx((5 / 3, 1.25))
    assert part_scales("seq-mean-token-sum-norm", refinements, drafts, 0.5) == pytest.approx((5 / 3, 1.25))
    # tokens: 6 + 5 = 11 → 11/6 and 0.5 · 11/5
    assert part_scales("token-mean", refinements, drafts, 0.5) == pytest.approx((11 / 6, 1.1))


def _part(rows, width, seed):
    """A random batch part: rows of (prompt, completion) lengths, log-probs and advantages."""
    generator = torch.Generator().manual_seed(seed)
    prompts = [[5] * p for p, _ in rows]
    completions = [[6] * c for _, c in rows]
    input_ids, attention_mask, loss_mask, _ = pad_sequences(prompts, completions, 0)
    pad = width - input_ids.shape[1]
    input_ids, attention_mask, loss_mask = (torch.nn.functional.pad(t, (0, pad)) for t in
                                            (input_ids, attention_mask, loss_mask))
    advantages = torch.randn(len(rows), generator=generator)
    old = -torch.rand(input_ids.shape, generator=generator)
    new = old + 0.4 * torch.randn(input_ids.shape, generator=generator)  # some ratios beyond the clip
    return RolloutBatch(input_ids, attention_mask, loss_mask, advantages, torch.arange(len(rows)),
                        torch.zeros_like(loss_mask), old_logprobs=old), new


def _loss(batch, logprobs, agg):
    fn = make_loss_fn(policy_loss="ppo", eps_low=0.2, eps_high=0.2, dual_clip=None, loss_agg=agg, kl_coef=0.0,
                      kl_estimator="k3", kl_clamp=None, importance_correction="none", importance_cap=2.0,
                      normalizer=LossNormalizer.from_mask(batch.loss_mask, 8))
    return fn(TokenStats(logprobs, torch.zeros_like(logprobs)), batch)[0]


@pytest.mark.parametrize("agg", ["seq-mean-token-mean", "token-mean", "seq-mean-token-sum"])
def test_one_aggregation_over_both_parts_is_the_weighted_sum_of_the_two_losses(agg):
    refinements, lp_r = _part([(3, 4), (2, 6), (4, 2)], 10, seed=0)
    drafts, lp_d = _part([(2, 3), (2, 7), (3, 5), (2, 1)], 10, seed=1)
    weight = 0.5
    r_scale, d_scale = part_scales(agg, refinements.loss_mask, drafts.loss_mask, weight)
    joined = RolloutBatch(*(torch.cat([a, b]) for a, b in (
        (refinements.input_ids, drafts.input_ids), (refinements.attention_mask, drafts.attention_mask),
        (refinements.loss_mask, drafts.loss_mask),
        (refinements.advantages * r_scale, drafts.advantages * d_scale), (refinements.group_ids, drafts.group_ids),
        (refinements.gen_logprobs, drafts.gen_logprobs))), old_logprobs=torch.cat([refinements.old_logprobs,
                                                                                   drafts.old_logprobs]))
    expected = _loss(refinements, lp_r, agg) + weight * _loss(drafts, lp_d, agg)
    # float32 sums of ~30 terms of size ~1: agreement to 1e-5 is ~100 ulps of slack
    torch.testing.assert_close(_loss(joined, torch.cat([lp_r, lp_d]), agg), expected, atol=1e-5, rtol=1e-5)


def test_the_rollout_appends_one_row_per_draft_with_scaled_group_advantages():
    # drafts answer 7, 1, 1, 1 (answer 7): rewards [1, 0, 0, 0]; refinements 7, 1: rewards [1, 0]
    generator = ScriptedGenerator(drafts_then_refinements(["7", "1", "1", "1"], ["7", "1"]))
    batch, _ = run(generator, [Example("Q?", "7")], settings(4, 2, draft_loss_weight=0.5))
    assert batch.size == 2 + 4 and batch.group_ids.tolist() == [0, 0, 1, 1, 1, 1]
    # 2 refinement + 4 draft sequences: scales 6/2 = 3 and 0.5 · 6/4 = 0.75 (seq-mean-token-mean)
    # refinements: mean 0.5, std 0.7071 → ±0.7071 · 3
    # drafts: mean 0.25, std 0.5 → [1.5, -0.5, -0.5, -0.5] · 0.75
    root = 1 / math.sqrt(2)
    expected = torch.tensor([3 * root, -3 * root, 1.125, -0.375, -0.375, -0.375])
    torch.testing.assert_close(batch.advantages, expected, atol=1e-4, rtol=0)
    plain = TOKENIZER.encode("<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    for row in range(2, 6):  # a draft row: the plain prompt (no loss) then the draft (loss), as Stage 1 sampled it
        assert batch.input_ids[row, :len(plain)].tolist() == plain
        assert batch.loss_mask[row, :len(plain)].sum() == 0
        assert batch.loss_mask[row].sum() == int(batch.attention_mask[row].sum()) - len(plain)
    assert torch.equal(batch.gen_logprobs != 0, batch.loss_mask.bool())
    default, _ = run(ScriptedGenerator(drafts_then_refinements(["7", "1", "1", "1"], ["7", "1"])),
                     [Example("Q?", "7")], settings(4, 2))
    assert default.size == 2  # weight 0 (the default): refinements only, as the paper


def test_truncated_drafts_carry_no_loss_under_the_overlong_filter():
    completions = [[Completion([7, 8], [-0.1, -0.2], "stop"), Completion([7, 8, 9], [-0.1] * 3, "length")]]
    samples = SimpleNamespace(draft_completions=completions, draft_prompts=[[1, 2]], draft_rewards=[[1.0, 0.0]])
    refinements = RolloutBatch(torch.ones(2, 4, dtype=torch.long), torch.ones(2, 4, dtype=torch.long),
                               torch.tensor([[0, 0, 1, 1], [0, 0, 1, 0.0]]), torch.tensor([1.0, -1.0]),
                               torch.tensor([0, 0]), torch.zeros(2, 4))
    options = dict(advantage="grpo", adv_eps=1e-6, loss_agg="seq-mean-token-mean", draft_loss_weight=1.0)
    batch = with_draft_rows(refinements, samples, SimpleNamespace(overlong_filter=True, **options), 0)
    assert batch.loss_mask[2:].sum(dim=1).tolist() == [2.0, 0.0]
    assert batch.input_ids.shape == (4, 5) and batch.input_ids[0, 4] == 0  # refinement rows padded to the drafts'


def test_draft_loss_weight_is_validated():
    assert load_config(None).algorithm.draft_loss_weight == 0.0
    for overrides, message in [
        (["algorithm.draft_loss_weight=-1"], "must be >= 0"),  # the schema's range (validation.check_ranges)
        (["algorithm.draft_loss_weight=0.5", "algorithm.preset=grpo"], "num_drafts >= 2"),
        (["algorithm.draft_loss_weight=0.5", "algorithm.dynamic_sampling=true"], "algorithm.dynamic_sampling"),
    ]:
        with pytest.raises(ConfigError, match=f"algorithm.draft_loss_weight.*{message}"):
            load_config(None, overrides)

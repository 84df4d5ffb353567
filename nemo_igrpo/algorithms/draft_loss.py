"""``algorithm.draft_loss_weight``: a GRPO loss on the Stage-1 drafts as well (a variant beyond the paper).

The paper trains on refinements only, so nothing trains the plain-prompt policy that Stage 1 samples and that
single-pass evaluation measures. With weight w > 0 the step's objective becomes

    L = L_refinements + w · L_drafts

where L_drafts is the same policy loss on the drafts, with the N drafts of a problem as one group (advantages over
their N rewards, prompt = the plain problem). Both parts keep the configured aggregation over their own rows: the
draft rows join the batch, and each part's advantages are scaled so that the one aggregation over the whole batch
(``algorithm.loss_agg``: a mean over sequences or over tokens) equals the sum above. Every registered policy loss is
linear in a positive scale of the advantage (PPO's min of two clipped terms, GSPO, CISPO, dual-clip), so the scale
carries through. A KL penalty (``algorithm.kl_coef``) applies to every row, drafts included, averaged over all.
Nearest published relative: ThinkTwice (arXiv 2604.01591), which alternates GRPO steps on solving and on refining.
"""

from __future__ import annotations

import torch

from nemo_igrpo.algorithms.advantages import compute_advantages
from nemo_igrpo.algorithms.batch import RolloutBatch, pad_sequences


def part_scales(loss_agg: str, refinement_mask: torch.Tensor, draft_mask: torch.Tensor,
                weight: float) -> tuple[float, float]:
    """(refinement scale, draft scale) for advantages, so that aggregating both parts together gives
    L_refinements + weight · L_drafts. ``token-mean`` divides by the tokens of the whole batch, every other
    aggregation by its sequences (rows with a masked token): with C_r and C_d those counts of each part, the scales
    are (C_r + C_d) / C_r and weight · (C_r + C_d) / C_d. On several data-parallel ranks the counts are this
    rank's: exact for sequences (every rank holds the same number of problems), approximate for token-mean."""
    def count(mask: torch.Tensor) -> float:
        return float(mask.sum()) if loss_agg == "token-mean" else float(((mask > 0).sum(dim=1) > 0).sum())

    refinements, drafts = count(refinement_mask), count(draft_mask)
    total = refinements + drafts
    return (total / refinements if refinements else 1.0), (weight * total / drafts if drafts else 0.0)


def with_draft_rows(batch: RolloutBatch, samples, settings, pad_token_id: int) -> RolloutBatch:
    """``batch`` (the refinement rows) followed by one row per draft, advantages scaled by :func:`part_scales`.

    ``samples`` (``StageSamples``): ``draft_prompts`` (the plain problem prompt) and ``draft_completions`` /
    ``draft_rewards`` ([problem][N]) in the order of the batch's groups; ``settings`` (``RolloutSettings``):
    ``advantage``, ``adv_eps``, ``overlong_filter``, ``loss_agg`` and ``draft_loss_weight``. Draft groups get ids
    after the refinement groups'."""
    completions = [c for group in samples.draft_completions for c in group]
    if not completions:
        return batch
    n = len(samples.draft_completions[0])
    prompts = [list(p) for p in samples.draft_prompts for _ in range(n)]
    first = int(batch.group_ids.max()) + 1 if batch.size else 0
    group_ids = torch.tensor([first + p for p in range(len(samples.draft_prompts)) for _ in range(n)])
    rewards = torch.tensor([r for group in samples.draft_rewards for r in group], dtype=torch.float32)
    advantages = compute_advantages(settings.advantage, rewards, group_ids, settings.adv_eps)
    input_ids, attention_mask, loss_mask, gen_logprobs = pad_sequences(
        prompts, [c.token_ids for c in completions], pad_token_id, [c.logprobs for c in completions])
    if settings.overlong_filter:  # as for refinements: truncated drafts stay in their group but carry no loss
        loss_mask[torch.tensor([c.finish_reason == "length" for c in completions])] = 0.0
    refine_scale, draft_scale = part_scales(settings.loss_agg, batch.loss_mask, loss_mask, settings.draft_loss_weight)
    width = max(batch.input_ids.shape[1], input_ids.shape[1])

    def joined(a: torch.Tensor, b: torch.Tensor, fill: float) -> torch.Tensor:
        pad = [torch.nn.functional.pad(t, (0, width - t.shape[1]), value=fill) for t in (a, b)]
        return torch.cat(pad)

    return RolloutBatch(
        input_ids=joined(batch.input_ids, input_ids, pad_token_id),
        attention_mask=joined(batch.attention_mask, attention_mask, 0),
        loss_mask=joined(batch.loss_mask, loss_mask, 0.0),
        advantages=torch.cat([batch.advantages * refine_scale, advantages * draft_scale]),
        group_ids=torch.cat([batch.group_ids, group_ids]),
        gen_logprobs=joined(batch.gen_logprobs, gen_logprobs, 0.0))

"""Log-probs and entropy straight from Megatron's vocab-parallel logits (each TP rank holds a slice of the vocab)."""

from __future__ import annotations

import torch

from nemo_igrpo.policy.base import TokenStats


def vocab_parallel_stats(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor,
                         temperature: float, vocab_size: int | None = None) -> TokenStats:
    """Log-probs and entropy [B, L] from vocab-split logits [B, L, V/TP], never gathering the vocab.

    ``vocab_size``: the real vocabulary; columns at or beyond it are Megatron's padding rows and are excluded from
    the softmax (probability 0, no gradient), so log-probs and entropy are those of the unpadded model.

    Position t scores token t with the logits of position t−1 (the alignment of ``algorithms.batch``); values are 0
    where ``mask`` is 0. Cross-rank sums go through ``reduce_from_tensor_model_parallel_region`` (all-reduce forward,
    identity backward): every TP rank computes the same loss, so each keeps its own copy of the upstream gradient.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

    z = logits[:, :-1].float() / temperature  # [B, L-1, V/TP]
    targets = input_ids[:, 1:]
    width = z.shape[-1]
    start = parallel_state.get_tensor_model_parallel_rank() * width
    valid = None  # padded vocab columns on this rank, if any
    if vocab_size is not None and start + width > vocab_size:
        valid = torch.arange(start, start + width, device=z.device) < vocab_size
        # a finite stand-in (not -inf): where() then gives padding exactly 0 probability and 0 gradient, no NaN
        z = torch.where(valid, z, 0.0)
    with torch.no_grad():  # the max cancels out of every formula; it only keeps exp() finite
        top = (z if valid is None else z.masked_fill(~valid, -torch.inf)).max(dim=-1).values
        if parallel_state.get_tensor_model_parallel_world_size() > 1:
            dist.all_reduce(top, op=dist.ReduceOp.MAX, group=parallel_state.get_tensor_model_parallel_group())
    shifted = z - top.unsqueeze(-1)
    exp = shifted.exp()
    if valid is not None:
        exp = torch.where(valid, exp, 0.0)
    sum_exp = reduce_from_tensor_model_parallel_region(exp.sum(dim=-1))
    local = targets - start
    here = (local >= 0) & (local < width)
    picked = shifted.gather(-1, local.clamp(0, width - 1).unsqueeze(-1)).squeeze(-1) * here
    picked = reduce_from_tensor_model_parallel_region(picked)
    log_norm = sum_exp.log()
    # H = log Σe^z − Σ softmax(z)·z (with z shifted by the max on both sides)
    expected = reduce_from_tensor_model_parallel_region((exp * shifted).sum(dim=-1)) / sum_exp
    on = mask[:, 1:] > 0
    zero = torch.zeros_like(log_norm[:, :1])
    logprobs = torch.cat([zero, torch.where(on, picked - log_norm, 0.0)], dim=1)
    entropy = torch.cat([zero, torch.where(on, log_norm - expected, 0.0)], dim=1)
    return TokenStats(logprobs, entropy)

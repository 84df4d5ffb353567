"""Shared-prefix rows for the HF backend (``policy.shared_prefix``): a group's common prefix is computed once.

In iGRPO's Stage 2 the G refinements of a problem all start with the same prefix (the prompt plus the selected
draft); in GRPO they share the prompt. Instead of G rows that each run that prefix through the model, a group becomes
ONE *unit*: the prefix once, then the G refinement suffixes, with

* a block attention mask: a prefix token attends causally within the prefix; a suffix token attends to the whole
  prefix and causally to its own suffix, never to another suffix (nor to another unit of the same packed row);
* position ids continuing from the prefix's end for every suffix (P, P+1, ... for each of them);
* every scored token predicted by the hidden state of the token before it *in its own sequence*: the first suffix
  token by the prefix's last position, the others by their predecessor in the suffix.

Each suffix token thus sees exactly the keys/values, at exactly the positions, of its unshared row, so its hidden
state, log-prob and entropy are the unshared ones, and the loss is the same function of the parameters. The prefix's
hidden states now feed G suffixes, so backward sums the G rows' prefix gradients there: the same sum the unshared
rows form over their G copies of the prefix. Only the number of prefix tokens computed changes (1 instead of G).

The prefix is found from the data: the longest common token prefix of a group's rows, cut at the first completion
(loss-mask) token of any of them, so no scored token ever lies in the shared part.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from nemo_igrpo.algorithms.batch import RolloutBatch, TokenStats
from nemo_igrpo.policy import prefix_attention
from nemo_igrpo.policy.logprobs import final_hidden_states, final_logit_softcap, head_stats
from nemo_igrpo.policy.microbatch import token_budget_groups
from nemo_igrpo.algorithms.prefix_groups import Unit, units  # noqa: F401  (re-exported: the layout's groups)

KEY = "policy.shared_prefix"
# Implementations that take an explicit (block) mask; sdpa runs span by span (policy.prefix_attention).
MASKED_ATTENTION = ("sdpa", prefix_attention.IMPLEMENTATION, "eager", "flex_attention")
# Non-attention mixers carry state from the prefix's end into EVERY suffix in sequence order, i.e. across suffixes.
_RECURRENT_MODEL_TYPES = ("nemotron_h", "mamba", "mamba2", "falcon_mamba", "jamba", "zamba", "zamba2", "bamba",
                          "falcon_h1", "granitemoehybrid", "lfm2", "qwen3_next", "rwkv", "recurrent_gemma")


def micro_batch_rows(batch: RolloutBatch, micro_batch_size: int, max_tokens: int | None,
                     packed: bool) -> list[list[int]]:
    """Rows per micro-batch, whole groups only: ``micro_batch_size`` shared rows (groups) at a time, or groups under
    the token budget counted in tokens actually computed (a group costs its prefix once plus its suffixes)."""
    groups = units(batch)
    if max_tokens is None:
        chunks = [list(range(s, min(s + micro_batch_size, len(groups)))) for s in range(0, len(groups),
                                                                                      micro_batch_size)]
    else:
        chunks = token_budget_groups([u.tokens for u in groups], max_tokens, packed=packed)
    return [[r for i in chunk for r in groups[i].rows] for chunk in chunks]


def token_stats(model: nn.Module, batch: RolloutBatch, packed: bool, temperature: float,
                chunk_size: int) -> TokenStats:
    """Log-probs and entropy [B, L] of ``batch``'s completion tokens, computed on its shared layout."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 to score tokens, got {temperature}")
    shared = layout(batch, packed)
    device = batch.input_ids.device
    mask = attention_mask(model, shared, device, model.get_input_embeddings().weight.dtype)
    hidden = final_hidden_states(model, shared.input_ids.to(device), mask, shared.position_ids.to(device))
    rows, cols = shared.rows.to(device), shared.cols.to(device)
    predictors = hidden[shared.predictor[0].to(device), shared.predictor[1].to(device)]
    return head_stats(model, predictors, batch.input_ids[rows, cols], rows, cols, batch.input_ids.shape,
                      temperature, chunk_size, final_logit_softcap(model))


@dataclass
class Layout:
    """A micro-batch laid out as shared rows [R, T]; ``predictor`` / ``rows`` / ``cols`` index the scored tokens."""

    input_ids: torch.Tensor  # [R, T]
    position_ids: torch.Tensor  # [R, T]
    segment: torch.Tensor  # [R, T] unit id within its shared row (-1 on padding)
    branch: torch.Tensor  # [R, T] 0 on a prefix, i + 1 on the unit's i-th suffix (-1 on padding)
    predictor: tuple[torch.Tensor, torch.Tensor]  # (shared row, column) of the hidden state predicting each token
    spans: prefix_attention.Spans  # per shared row: (start, prefix, [(suffix start, length)]) of each unit
    rows: torch.Tensor  # [N] the scored token's row in the micro-batch
    cols: torch.Tensor  # [N] and its column there


def layout(batch: RolloutBatch, packed: bool) -> Layout:
    """The shared layout of ``batch``: every unit in its own row, or (``packed``) all units end to end in one row."""
    groups = units(batch)
    rows_of_units = [groups] if packed else [[u] for u in groups]
    width = max(sum(u.tokens for u in row) for row in rows_of_units)
    shape = (len(rows_of_units), width)
    input_ids = torch.zeros(shape, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    segment = torch.full(shape, -1, dtype=torch.long)
    branch = torch.full(shape, -1, dtype=torch.long)
    # where[(row, col)] of the batch -> (shared row, column), for every real token
    where_row = torch.zeros(batch.input_ids.shape, dtype=torch.long)
    where_col = torch.zeros(batch.input_ids.shape, dtype=torch.long)
    ids = batch.input_ids.cpu()
    spans: prefix_attention.Spans = []
    for shared_row, unit_list in enumerate(rows_of_units):
        start = 0
        spans.append([])
        for seg, unit in enumerate(unit_list):
            p = unit.prefix
            first = unit.rows[0]
            input_ids[shared_row, start:start + p] = ids[first, :p]
            position_ids[shared_row, start:start + p] = torch.arange(p)
            segment[shared_row, start:start + unit.tokens] = seg
            branch[shared_row, start:start + p] = 0
            for r in unit.rows:
                where_row[r, :p], where_col[r, :p] = shared_row, torch.arange(start, start + p)
            at = start + p
            spans[-1].append((start, p, []))
            for i, (r, n) in enumerate(zip(unit.rows, unit.lengths)):
                m = n - p
                spans[-1][-1][2].append((at, m))
                input_ids[shared_row, at:at + m] = ids[r, p:n]
                position_ids[shared_row, at:at + m] = torch.arange(p, n)
                branch[shared_row, at:at + m] = i + 1
                where_row[r, p:n], where_col[r, p:n] = shared_row, torch.arange(at, at + m)
                at += m
            start = at
    rows, cols = batch.loss_mask[:, 1:].cpu().nonzero(as_tuple=True)
    cols = cols + 1  # position 0 has no predecessor and is never scored
    predictor = (where_row[rows, cols - 1], where_col[rows, cols - 1])
    return Layout(input_ids, position_ids, segment, branch, predictor, spans, rows, cols)


def allowed(segment: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    """[R, 1, T, T] bool: query q may attend key k (same unit, k ≤ q, k in the prefix or in q's own suffix).

    Padding queries attend to themselves only, so no softmax row is empty (an all-masked row gives NaN, whose
    backward would poison the gradient even though nothing reads those outputs).
    """
    t = segment.shape[1]
    q_seg, k_seg = segment[:, :, None], segment[:, None, :]
    q_br, k_br = branch[:, :, None], branch[:, None, :]
    causal = torch.ones(t, t, dtype=torch.bool, device=segment.device).tril()
    mask = causal & (q_seg == k_seg) & (q_seg >= 0) & ((k_br == 0) | (k_br == q_br))
    return (mask | torch.eye(t, dtype=torch.bool, device=segment.device)).unsqueeze(1)


def use_span_attention(model: nn.Module) -> None:
    """Switch an ``sdpa`` model to :mod:`policy.prefix_attention` (SDPA span by span for shared rows, plain SDPA for
    every other call, so generation from the same model is unchanged)."""
    if model.config._attn_implementation == "sdpa":
        model.config._attn_implementation_internal = prefix_attention.IMPLEMENTATION


def attention_mask(model: nn.Module, shared: Layout, device: torch.device, dtype: torch.dtype):
    """The mask in the form ``model``'s attention implementation takes as a prepared 4D mask (transformers 5.19
    passes a 4D tensor or BlockMask through ``masking_utils`` untouched)."""
    implementation = model.config._attn_implementation
    if implementation == prefix_attention.IMPLEMENTATION:
        return prefix_attention.span_mask(shared.spans, *shared.segment.shape, device)
    segment, branch = shared.segment.to(device), shared.branch.to(device)
    if implementation == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask

        def mask_mod(b, h, q, k):
            return (k <= q) & (segment[b, q] == segment[b, k]) & (segment[b, q] >= 0) & (
                (branch[b, k] == 0) | (branch[b, k] == branch[b, q]) | (q == k))

        r, t = segment.shape
        return create_block_mask(mask_mod, r, None, t, t, device=segment.device)
    mask = allowed(segment, branch)
    if implementation == "eager":  # an additive float mask
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    return mask  # sdpa: boolean, True = attend


def check_implementation(model: nn.Module) -> None:
    """Refuse (naming the key) models whose layers or attention kernel cannot take the shared layout; cheap, so it
    runs before anything calls the model."""
    config = model.config.get_text_config()
    model_type = getattr(config, "model_type", "")
    if model_type in _RECURRENT_MODEL_TYPES or getattr(config, "layers_block_type", None) is not None:
        raise ValueError(f"{KEY}=true: {type(model).__name__} ({model_type}) has recurrent (Mamba/SSM) layers whose "
                         "state runs across the prefix/refinement boundaries in the shared row, so refinements would "
                         f"see each other; set {KEY}=false")
    if "sliding_attention" in (getattr(config, "layer_types", None) or []) or (
            getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)):
        raise ValueError(f"{KEY}=true: {type(model).__name__} has sliding-window attention layers, which the "
                         f"shared-prefix mask (full attention to the prefix) would widen; set {KEY}=false")
    implementation = getattr(model.config, "_attn_implementation", None)
    if implementation not in MASKED_ATTENTION:
        raise ValueError(f"{KEY}=true: attention implementation {implementation!r} of {type(model).__name__} has no "
                         "path for a prefix-sharing block mask (flash-attention's varlen kernel only separates whole "
                         f"sequences); use one of {', '.join(MASKED_ATTENTION)} or set {KEY}=false")


def check_supported(model: nn.Module, tolerance: float = 1e-4) -> None:
    """Raise ValueError (naming the key) unless a shared forward equals separate forwards on a small group.

    ``tolerance`` is relative to the hidden states' scale: reduction order differs between the forwards, while a
    mask the model ignores, or a recurrent state crossing from one suffix into the next, changes the second suffix by
    O(1) of that scale.
    """
    check_implementation(model)
    device = model.get_input_embeddings().weight.device
    vocab = model.get_input_embeddings().weight.shape[0]
    prefix = ((torch.arange(4) * 7919 + 3) % vocab).tolist()
    suffixes = [((torch.arange(n) * 104729 + 11 * n) % vocab).tolist() for n in (3, 5)]
    ids = torch.tensor([prefix + s + [0] * (5 - len(s)) for s in suffixes])
    mask = torch.tensor([[1] * (4 + len(s)) + [0] * (5 - len(s)) for s in suffixes])
    batch = RolloutBatch(input_ids=ids, attention_mask=mask, loss_mask=torch.zeros(2, 9), advantages=torch.zeros(2),
                         group_ids=torch.zeros(2, dtype=torch.long), gen_logprobs=torch.zeros(2, 9))
    batch.loss_mask[:, 4:] = mask[:, 4:].float()
    shared = layout(batch, packed=False)
    with torch.no_grad():
        hidden = final_hidden_states(model, shared.input_ids.to(device),
                                     attention_mask(model, shared, device, model.get_input_embeddings().weight.dtype),
                                     shared.position_ids.to(device))[0, 4:].float()
        alone = torch.cat([final_hidden_states(model, ids[i:i + 1, :4 + len(s)].to(device),
                                               mask[i:i + 1, :4 + len(s)].to(device))[0, 4:]
                           for i, s in enumerate(suffixes)]).float()
    scale = alone.abs().max().clamp_min(1e-6)
    error = (hidden - alone).abs().max()
    if not error <= tolerance * scale:  # NaN included
        raise ValueError(f"{KEY}=true: {type(model).__name__} ({implementation}) does not honour the shared-prefix "
                         f"block mask (max error {error.item():.3g} at scale {scale.item():.3g}); set {KEY}=false")

"""Shared-prefix attention on SDPA kernels, span by span (the ``sdpa`` path of ``policy.shared_prefix``).

One SDPA call over a whole shared row with a [T, T] block mask computes every (query, key) pair, masked or not (the
CPU and memory-efficient kernels skip nothing for an arbitrary mask), i.e. each suffix against every other suffix too,
and the mask itself is O(T²). Here each unit of a shared row is split into its spans instead:

* the prefix attends causally to itself (``is_causal``: the kernels' causal path);
* each suffix attends to [prefix keys; its own keys] with a [n, P + n] mask (all prefix keys, causal on its own),

so the work is the needed pairs plus half of each suffix's own square, and no [T, T] tensor exists. The keys and
values are the layer's (after RoPE at the shared positions), so the outputs equal the block-masked attention's.

The spans ride on the 4D mask tensor that the model passes, untouched, to every attention layer (an expanded
zero-storage tensor carrying them as an attribute), so activation checkpointing's recomputation sees them too.
Registered with transformers under :data:`IMPLEMENTATION`; calls without spans go to transformers' own SDPA.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

IMPLEMENTATION = "sdpa_shared_prefix"
_SPANS = "_nemo_igrpo_spans"
# per shared row: its units as (start, prefix length, [(suffix start, suffix length), ...])
Spans = list[list[tuple[int, int, list[tuple[int, int]]]]]


def span_mask(spans: Spans, rows: int, width: int, device: torch.device) -> torch.Tensor:
    """A [rows, 1, width, width] stand-in mask (no storage) that carries ``spans`` to :func:`attention`."""
    mask = torch.ones((), dtype=torch.bool, device=device).expand(rows, 1, width, width)
    setattr(mask, _SPANS, spans)
    return mask


def attention(module, query, key, value, attention_mask, **kwargs):
    """transformers attention-function interface: query [B, H, T, D], key/value [B, Hkv, T, D] -> ([B, T, H, D],
    None)."""
    spans = getattr(attention_mask, _SPANS, None)
    if spans is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    kwargs.pop("is_causal", None)
    rows = []
    width = query.shape[2]
    for b, units in enumerate(spans):
        q, k, v = query[b:b + 1], key[b:b + 1], value[b:b + 1]
        pieces = []
        end = 0
        for start, prefix, suffixes in units:
            keys, values = k[:, :, start:start + prefix], v[:, :, start:start + prefix]
            if prefix:
                pieces.append(sdpa_attention_forward(module, q[:, :, start:start + prefix], keys, values, None,
                                                     is_causal=True, **kwargs)[0])
            end = start + prefix
            for s, n in suffixes:
                if n == 0:
                    continue
                allowed = torch.ones(n, prefix + n, dtype=torch.bool, device=query.device)
                allowed[:, prefix:] = torch.ones(n, n, dtype=torch.bool, device=query.device).tril()
                pieces.append(sdpa_attention_forward(
                    module, q[:, :, s:s + n], torch.cat([keys, k[:, :, s:s + n]], dim=2),
                    torch.cat([values, v[:, :, s:s + n]], dim=2), allowed[None, None], is_causal=False, **kwargs)[0])
                end = s + n
        if end < width:  # padding: zeros (no real token attends to it)
            pieces.append(query.new_zeros(1, width - end, query.shape[1], query.shape[3]))
        rows.append(torch.cat(pieces, dim=1))
    return torch.cat(rows), None


AttentionInterface.register(IMPLEMENTATION, attention)
AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)  # masks for ordinary calls are SDPA's

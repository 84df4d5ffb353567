"""Weights sent to an engine in buckets of bounded size that never split a fused projection group.

vLLM fuses each layer's q/k/v (and gate/up) HF projections into one parameter, so all members of a group must
arrive in the same reload call. Used by the colocated engine (``vllm``) and the generation-server client.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import torch

# vLLM fuses these HF projections into one parameter; all members must arrive in the same reload call.
_FUSED_GROUPS = (re.compile(r"^(.*\.)(q_proj|k_proj|v_proj)(\.[^.]+)$"),
                 re.compile(r"^(.*\.)(gate_proj|up_proj)(\.[^.]+)$"))
_GROUP_SIZES = (3, 2)


def weight_buckets(weights: Iterable[tuple[str, torch.Tensor]],
                   bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Consecutive lists of (name, tensor) of about ``bucket_bytes`` each, never splitting a fused group.

    A q/k/v (or gate/up) group is held back until all its members arrived, so a bucket is closed only at a point
    where no group is half-sent; tensors arrive in the policy's state-dict order, where a group's members are close.
    """
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    open_groups: dict[str, int] = {}  # group key -> members still missing
    for name, tensor in weights:
        key, members = _fused_group(name)
        if key is not None:
            open_groups[key] = open_groups.get(key, members) - 1
            if open_groups[key] == 0:
                del open_groups[key]
        bucket.append((name, tensor))
        size += tensor.numel() * tensor.element_size()
        if size >= bucket_bytes and not open_groups:
            yield bucket
            bucket, size = [], 0
    if open_groups:
        raise ValueError(f"update_weights: incomplete fused groups {sorted(open_groups)} (every q/k/v and gate/up "
                         "projection must be sent)")
    if bucket:
        yield bucket


def _fused_group(name: str) -> tuple[str | None, int]:
    for pattern, members in zip(_FUSED_GROUPS, _GROUP_SIZES):
        match = pattern.match(name)
        if match:
            return f"{match.group(1)}{members}{match.group(3)}", members
    return None, 0

"""Per-prompt sampling keys, shared by every generation backend.

A prompt's key hashes a per-call seed (one draw from torch's global RNG, as every rank draws it and checkpoints
restore it), the prompt's tokens and how often the same prompt came before in the call. A prompt therefore samples
the same completions whichever rank, batch or chunk it lands in. Completion j uses key + j, so keys leave room for
that inside int64.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import torch


def call_seed() -> int:
    """One draw from torch's global RNG per generation call."""
    return int(torch.randint(0, 2**62, (1,)).item())


def prompt_keys(seed: int, prompts: Sequence[Sequence[int]]) -> list[int]:
    """A 60-bit key per prompt from the call seed, its tokens and its repeat index within the call."""
    seen: dict[bytes, int] = {}
    keys = []
    for prompt in prompts:
        digest = hashlib.blake2b(repr(list(prompt)).encode(), digest_size=16).digest()
        repeat = seen.get(digest, 0)
        seen[digest] = repeat + 1
        key = hashlib.blake2b(digest + seed.to_bytes(8, "little") + repeat.to_bytes(8, "little"),
                              digest_size=8).digest()
        keys.append(int.from_bytes(key, "little") >> 4)  # fits int64 with room for + j
    return keys


def derived_key(seed: int, key: int) -> int:
    """A Stage-2 key from a second call seed and the prompt's Stage-1 key: known as soon as that prompt's drafts are
    done, whatever order the drafts finish in, and the same on every rank."""
    digest = hashlib.blake2b(seed.to_bytes(8, "little") + key.to_bytes(8, "little"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 4

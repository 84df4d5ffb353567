"""Guards around vLLM's side effects on process-global state: torch's global RNG and the default process group.

Both are the trainer's: the colocated engine must leave them as it found them (see each function for what vLLM
0.32.0 does to them).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def keep_default_group(keep: bool) -> Iterator[None]:
    """While the engine shuts down, refuse to destroy the default process group when ``keep`` (the trainer made it).

    vLLM 0.32.0 (checked in its source): ``init_distributed_environment`` reuses an already initialised default group
    (``if not torch.distributed.is_initialized(): init_process_group(...)``) and builds its own groups from it with
    ``new_group``; but ``EngineCore.shutdown`` → ``cleanup_dist_env_and_memory`` → ``destroy_distributed_environment``
    ends with ``torch.distributed.destroy_process_group()`` — the default group, whoever created it. Destroying vLLM's
    own sub-groups (``destroy_model_parallel``, ``_WORLD.destroy()``) is left to vLLM. When no group existed before
    the engine (one process, HF policy), vLLM created a one-rank group for itself and may destroy it.
    """
    if not keep:
        yield
        return
    import torch.distributed as dist

    original = dist.destroy_process_group

    def destroy(group=None):
        if group is None or group is dist.GroupMember.WORLD:
            return  # the trainer's default group: the trainer destroys it when it is done
        original(group)

    dist.destroy_process_group = destroy
    try:
        yield
    finally:
        dist.destroy_process_group = original


@contextmanager
def engine_rng() -> Iterator[None]:
    """Run the engine on a fork of torch's global RNG. vLLM 0.32.0's sampler draws exponential noise for every row of
    the batch from the global generator (seeded rows then redraw from their own), so the trainer's RNG would advance
    by an amount that depends on how many requests this rank ran — and a 2-rank run would stop matching a 1-rank
    run from the second call on. The call seeds are drawn outside, once per call, as the HF backend draws them."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        yield

"""Test-only patch that lets megatron-core 0.16.1 run on CPU over gloo. Never imported by the package.

megatron-core assumes CUDA in a handful of places (see ENVIRONMENT.md): the CUDA RNG tracker, ``current_device()``
in the rotary embedding and the DDP buffers, ``device='cuda'`` in the optimizer, ``torch.cuda.synchronize`` in
dist_checkpointing, and ``tensor.type()`` string checks for ``'torch.cuda.*'`` in grad clipping and the optimizers.
:func:`apply` redirects each of them to the CPU for the rest of the process.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

_applied = False


def _cpu(device):
    if device is None:
        return None
    if isinstance(device, int):
        return torch.device("cpu")
    text = str(device)
    return torch.device("cpu") if text.startswith("cuda") else device


class _CudaToCpu(TorchFunctionMode):
    """Rewrites ``device="cuda"`` keyword arguments, ``.cuda()`` and ``.to("cuda")`` to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs:
            kwargs["device"] = _cpu(kwargs["device"])
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to:
            args = tuple(_cpu(a) if isinstance(a, (str, torch.device)) else a for a in args)
        return func(*args, **kwargs)


_original_type = torch.Tensor.type


def _type(self, dtype=None, non_blocking=False, **kwargs):
    # Megatron tests `param.type() in ('torch.cuda.FloatTensor', ...)`; report CPU tensors under the CUDA names.
    if dtype is None and not kwargs:
        name = _original_type(self)
        # (the call can pass through _CudaToCpu and reach this function twice)
        return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
    return _original_type(self, dtype, non_blocking, **kwargs)


def apply() -> None:
    """Idempotent; call before building any megatron object."""
    global _applied
    if _applied:
        return
    _applied = True
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    torch.cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    torch.cuda.manual_seed_all = lambda seed: None  # torch.manual_seed calls it: redirecting would recurse
    torch.cuda.manual_seed = lambda seed: torch.manual_seed(seed)
    torch.cuda.device_count = lambda: 1
    torch.cuda.memory_allocated = lambda *a, **k: 0
    torch.cuda.max_memory_allocated = lambda *a, **k: 0
    torch.Tensor.type = _type

    from megatron.core.tensor_parallel import random as mpu_random

    mpu_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mpu_random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)

    _CudaToCpu().__enter__()  # for the rest of the process (each test process is spawned for megatron alone)

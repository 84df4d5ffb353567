"""Weights sent to an engine in buckets of bounded size that never split a fused projection group, and the bucket
files of the same-host transport (``nemo_igrpo_shm``) under /dev/shm.

vLLM fuses each layer's q/k/v (and gate/up) HF projections into one parameter; its layerwise reload waits for a whole
layer, but a bucket that never splits a group keeps every bucket loadable on its own. Used by the colocated engine
and the generation-server client (both in ``vllm``).
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from nemo_igrpo import distributed

SHM_DIR = "/dev/shm"
BUCKET_PREFIX = "nemo-igrpo-weights-"  # then the writer's pid: a SIGKILLed writer's files are found by the next one

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


def write_bucket(bucket: list[tuple[str, torch.Tensor]]) -> Path:
    """One bucket as a safetensors file under /dev/shm (readable by this user only)."""
    from safetensors.torch import save_file

    root = SHM_DIR if os.path.isdir(SHM_DIR) else None
    handle, name = tempfile.mkstemp(prefix=f"{BUCKET_PREFIX}{os.getpid()}-", suffix=".safetensors", dir=root)
    os.close(handle)
    path = Path(name)
    try:
        # contiguous CPU copies; tied tensors (embed_tokens / lm_head) must not share storage in one file
        save_file({name: t.detach().to("cpu").contiguous().clone() for name, t in bucket}, str(path))
        os.chmod(path, 0o600)  # save_file may recreate the file with the umask's mode
    except Exception as error:  # safetensors reports a full /dev/shm as "File too large" (EFBIG), naming nothing
        path.unlink(missing_ok=True)
        size = sum(t.numel() * t.element_size() for _, t in bucket) / 2**20
        raise OSError(f"weight sync: could not write a {size:.0f} MiB weight bucket to {path.parent} ({error}); "
                      f"is {path.parent} full? Free space there, or lower generation.vllm.weight_bucket_mb") from error
    return path


def bucket_path(path: str) -> Path:
    """``path`` if it names a bucket file (in the bucket folder, with our prefix), else an error: the server's
    engine loads nothing else."""
    resolved = Path(path).resolve()
    root = Path(SHM_DIR if os.path.isdir(SHM_DIR) else tempfile.gettempdir()).resolve()
    if resolved.parent != root or not resolved.name.startswith(BUCKET_PREFIX):
        raise PermissionError(f"{path} is not a weight bucket file ({root}/{BUCKET_PREFIX}*)")
    return resolved


def remove_stale_buckets() -> None:
    """Delete bucket files whose writing process is gone (killed mid-push, they would hold RAM until reboot)."""
    root = Path(SHM_DIR)
    if not root.is_dir():
        return
    for path in root.glob(f"{BUCKET_PREFIX}*"):
        pid = path.name[len(BUCKET_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not distributed.process_alive(int(pid)):
            path.unlink(missing_ok=True)

"""Reading a torch.distributed.checkpoint (Megatron's ``torch_dist`` format) without running code from the files.

The format pickles its ``.metadata`` and the non-tensor entries of the state; torch reads them with ``pickle.load``
and ``torch.load`` with ``weights_only`` off, so a tampered run folder could execute code on resume (the checkpoint
manifest's SHA-256 detects corruption, not tampering). :func:`no_code_unpickling` swaps both for loaders that only
rebuild what these files hold: the checkpoint-metadata dataclasses, torch sizes/dtypes and plain containers for
``.metadata``; tensors and plain values (``torch.load(weights_only=True)``) for the state's entries.
"""

from __future__ import annotations

import contextlib
import io
import pickle
import types
from collections.abc import Iterator

import torch

_METADATA_MODULES = ("torch.distributed.checkpoint.",)
_PLAIN = {("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"),
          ("torch", "Size"), ("torch.serialization", "_get_layout"),
          ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath")}  # StorageMeta.checkpoint_id


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module.startswith(_METADATA_MODULES) or (module, name) in _PLAIN:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout,
                                                                           torch.memory_format)):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"checkpoint metadata refers to {module}.{name}, which a distributed checkpoint "
                                     "does not hold: the file was not written by torch.distributed.checkpoint "
                                     "(or was tampered with); it is not loaded")


def load_metadata(handle) -> object:
    """``pickle.load`` for a ``.metadata`` file, refusing any global but the checkpoint's own classes."""
    return _MetadataUnpickler(handle).load()


@contextlib.contextmanager
def no_code_unpickling() -> Iterator[None]:
    """Within the block, torch.distributed.checkpoint loads unpickle no code (see the module docstring)."""
    from torch.distributed.checkpoint import default_planner, filesystem

    safe_pickle = types.SimpleNamespace(**{k: getattr(pickle, k) for k in dir(pickle) if not k.startswith("__")})
    safe_pickle.load = load_metadata
    original_pickle, original_load_bytes = filesystem.pickle, default_planner.DefaultLoadPlanner.load_bytes

    def load_bytes(self, read_item, value: io.BytesIO) -> None:  # DefaultLoadPlanner's, with weights_only=True
        loaded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            default_planner.set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded

    filesystem.pickle = safe_pickle
    default_planner.DefaultLoadPlanner.load_bytes = load_bytes
    try:
        yield
    finally:
        filesystem.pickle = original_pickle
        default_planner.DefaultLoadPlanner.load_bytes = original_load_bytes

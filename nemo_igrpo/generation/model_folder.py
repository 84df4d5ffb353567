"""The Hugging Face model folder a vLLM engine starts from."""

from __future__ import annotations

from pathlib import Path

import torch


def write_model_folder(model: torch.nn.Module, directory: Path) -> None:
    """``config.json`` + ``model.safetensors``: what vLLM needs to start, written on *every* rank.

    transformers 5.19's ``save_pretrained`` writes only on global rank 0 once a process group exists
    (``distributed/mixin.py: should_save_on_this_rank``), which left the other ranks' engine folders empty. Tied
    tensors are stored once under their first name (the input embedding), as ``save_pretrained`` does; vLLM ties
    the head itself from ``tie_word_embeddings``.
    """
    from safetensors.torch import save_file

    model.config.save_pretrained(directory)
    tensors, seen = {}, set()
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen:
            continue
        seen.add(key)
        tensors[name] = tensor.detach().contiguous()
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})

"""Sequence packing for the HF backend: a micro-batch's rows laid end to end in ONE row without padding.

Position ids restart at 0 for every sequence and no 2D attention mask is passed. transformers 5.19 then confines
attention to each sequence itself: ``masking_utils.find_packed_sequence_indices`` turns restarting position ids into a
block-causal mask for the ``sdpa``, ``eager`` and ``flex_attention`` mask builders, and the flash-attention path
(``modeling_flash_attention_utils._is_packed_sequence``) switches to the varlen kernel, but only for a batch of
one row, hence one packed row per micro-batch. Layers that are not attention (Mamba mixers, e.g. Nemotron-H) carry
state across the boundary, so :func:`check_packing_supported` also compares a packed forward against separate ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

KEY = "policy.sequence_packing"
# Attention implementations whose transformers 5.19 code paths honour packed position ids (see the module docstring).
PACKING_ATTENTION = ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3", "flash_attention_4")


@dataclass
class Packed:
    input_ids: torch.Tensor  # [1, T]
    position_ids: torch.Tensor  # [1, T], restarting at 0 for each sequence
    loss_mask: torch.Tensor  # [1, T], never set on a sequence's first token (nothing in it predicts that token)
    rows: torch.Tensor  # [T] the padded row each packed token came from
    cols: torch.Tensor  # [T] and its column there


def pack(input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor) -> Packed:
    """Concatenate the real (attention_mask == 1, right-padded) tokens of every row."""
    rows, cols = attention_mask.nonzero(as_tuple=True)  # row-major: each row's tokens in order
    mask = loss_mask[rows, cols].clone()
    mask[cols == 0] = 0
    return Packed(input_ids[rows, cols].unsqueeze(0), cols.unsqueeze(0), mask.unsqueeze(0), rows, cols)


def unpack(values: torch.Tensor, packed: Packed, shape: torch.Size) -> torch.Tensor:
    """[1, T] per-token values back to the padded [B, L] layout (zeros on padding), differentiably."""
    out = torch.zeros(shape, dtype=values.dtype, device=values.device)
    return out.index_put((packed.rows, packed.cols), values[0])


@torch.no_grad()
def check_packing_supported(model: nn.Module, tolerance: float = 1e-4) -> None:
    """Raise ValueError (naming the key) unless a packed forward equals separate forwards on two short sequences.

    ``tolerance`` is relative to the hidden states' scale: reduction order differs between the two forwards, a
    leaked cross-sequence attention or recurrent state changes the second sequence by O(1) of that scale.
    """
    from nemo_igrpo.policy.logprobs import final_hidden_states

    implementation = getattr(model.config, "_attn_implementation", None)
    if implementation not in PACKING_ATTENTION:
        raise ValueError(f"{KEY}=true: attention implementation {implementation!r} of {type(model).__name__} does not "
                         f"honour packed position ids in transformers 5.19; use one of {', '.join(PACKING_ATTENTION)} "
                         "or set it to false")
    if implementation.startswith("flash_attention"):
        return  # needs a GPU to run; its varlen path is selected by the position ids themselves
    device = model.get_input_embeddings().weight.device
    vocab = model.get_input_embeddings().weight.shape[0]
    first = (torch.arange(5, device=device) * 7919 + 3) % vocab
    second = (torch.arange(7, device=device) * 104729 + 11) % vocab
    ids = torch.cat([first, second]).unsqueeze(0)
    positions = torch.cat([torch.arange(5), torch.arange(7)]).to(device).unsqueeze(0)
    packed = final_hidden_states(model, ids, None, positions)[0].float()
    alone = torch.cat([final_hidden_states(model, s.unsqueeze(0), torch.ones_like(s).unsqueeze(0))[0]
                       for s in (first, second)]).float()
    scale = alone.abs().max().clamp_min(1e-6)
    error = (packed - alone).abs().max()
    if error > tolerance * scale:
        raise ValueError(f"{KEY}=true: {type(model).__name__} ({implementation}) does not keep packed sequences "
                         f"apart (max error {error.item():.3g} at scale {scale.item():.3g}; non-attention layers such "
                         "as Mamba mixers carry state across sequences); set it to false")

"""LoRA adapters (PEFT) for the HF policy backend.

PEFT injects its ``lora.Linear`` wrappers into the causal LM in place (HFPolicy hands it a copy, so the caller's model
stays plain for the generator; the frozen copy costs one more set of weights, no gradients or optimizer state). The
policy keeps scoring the inner ``*ForCausalLM`` (its body and head, as ``policy.logprobs`` expects) and holds the
``PeftModel`` beside it for ``disable_adapter()`` (the reference policy: the base model, no second copy) and merging.

The generator always receives merged weights under the base model's names (W + scale·B·A, computed without touching
W, so the trained base stays bit-identical); ``final/`` is a merged plain HF model. Checkpoints hold the adapters only.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

KEY = "policy.lora"
ADAPTER = "default"


def apply_lora(model: nn.Module, rank: int, alpha: float, dropout: float, target_modules: list[str]) -> Any:
    """Wrap ``model`` with fresh LoRA adapters (B = 0: the wrapped model starts equal to ``model``); only they train."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ImportError(f"{KEY}.rank > 0 needs PEFT: pip install 'nemo-igrpo[lora]'") from None
    targets: Any = "all-linear" if list(target_modules) == ["all-linear"] else list(target_modules)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none")
    return get_peft_model(model, config)


def is_adapter_key(name: str) -> bool:
    return ".lora_" in name


def adapter_state(peft_model: Any) -> dict[str, torch.Tensor]:
    """The trainable adapter tensors (the checkpoint), keyed as in the inner model's state dict."""
    return {n: t.detach() for n, t in peft_model.get_base_model().state_dict().items() if is_adapter_key(n)}


@torch.no_grad()
def merged_weights(peft_model: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """Base-model-named tensors with each adapter folded in (what an engine without LoRA support needs)."""
    from peft.tuners.lora import LoraLayer

    inner = peft_model.get_base_model()
    deltas = {}
    for name, module in inner.named_modules():
        if isinstance(module, LoraLayer) and ADAPTER in module.lora_A:
            deltas[f"{name}.weight"] = module.get_delta_weight(ADAPTER)
    for name, tensor in inner.state_dict().items():
        if is_adapter_key(name):
            continue
        name = name.replace(".base_layer.", ".")
        if name in deltas:
            tensor = tensor + deltas[name].to(tensor.dtype)
        yield name, tensor.detach()


def merged_model(peft_model: Any) -> nn.Module:
    """A plain HF model with the adapters merged in (a copy: training continues on the adapters)."""
    return copy.deepcopy(peft_model).merge_and_unload()

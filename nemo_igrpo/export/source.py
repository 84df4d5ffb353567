"""Find and load what to export: a run directory, one of its checkpoints, or a Hugging Face model folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
import yaml

from nemo_igrpo.checkpoint import COMPLETE, find_latest, is_complete


class ExportError(ValueError):
    """An export that cannot be done, naming the path and what is wrong with it."""


@dataclass
class SourceModel:
    """The policy to export as a Hugging Face model in its stored dtype, its tokenizer and where it came from."""

    model: Any  # transformers PreTrainedModel
    tokenizer: Any  # transformers tokenizer
    origin: Path


HF_WEIGHTS = "model.safetensors"  # nemo_igrpo.policy.hf.WEIGHTS_FILE (not imported: that module pulls in training)


def load_source(path: Path) -> SourceModel:
    """Resolve ``path`` (see the package docstring) and load its model and tokenizer on CPU."""
    if not path.exists():
        raise ExportError(f"{path}: no such run directory, checkpoint or model folder")
    if (path / "config.json").is_file():  # a Hugging Face folder, e.g. <run>/final
        return _from_hf_folder(path)
    if (path / "config.yaml").is_file():  # a run directory
        final = path / "final"
        if (final / "config.json").is_file():
            return _from_hf_folder(final)
        latest = find_latest(path / "checkpoints")
        if latest is None:
            raise ExportError(f"{path}: a run directory without final/ and without a complete checkpoint under "
                              f"{path / 'checkpoints'}")
        return _from_checkpoint(latest)
    if (path / "policy").exists() or (path / COMPLETE).exists() or (path / "trainer_state.json").exists():
        return _from_checkpoint(path)
    raise ExportError(f"{path}: not a run directory (config.yaml), a checkpoint (policy/, {COMPLETE}) or a "
                      "Hugging Face model folder (config.json)")


def _from_hf_folder(folder: Path) -> SourceModel:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        raise ExportError(f"{folder}: config.json but no weights (*.safetensors)")
    config = AutoConfig.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=_stored_dtype(folder) or config.dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as error:
        raise ExportError(f"{folder}: no loadable tokenizer ({error})") from None
    return SourceModel(model.eval(), tokenizer, folder)


def _from_checkpoint(checkpoint: Path) -> SourceModel:
    """A checkpoint ``<run>/checkpoints/step_N``: weights from ``policy/``, model config and tokenizer from the run."""
    if not is_complete(checkpoint):
        raise ExportError(f"{checkpoint}: not a complete checkpoint (needs {COMPLETE}, trainer_state.json, rng.json "
                          "and policy/; an interrupted save leaves them out)")
    run_dir = checkpoint.parent.parent
    if not (run_dir / "config.yaml").is_file():
        raise ExportError(f"{checkpoint}: the run's config ({run_dir / 'config.yaml'}) is missing, so the model "
                          "architecture is unknown")
    model_config = _run_model_config(run_dir / "config.yaml")
    tokenizer = _run_tokenizer(run_dir, model_config)
    hf_config = _hf_config(model_config, tokenizer)
    policy = checkpoint / "policy"
    if (policy / "adapter.safetensors").is_file():  # nemo_igrpo.policy.hf.ADAPTER_FILE (policy.lora)
        raise ExportError(f"{checkpoint}: a LoRA checkpoint holds the adapters only; export the run's final/ (the "
                          "merged model), or resume the run and let it finish")
    if (policy / HF_WEIGHTS).is_file():  # the HF backend's save()
        dtype = _stored_dtype(policy) or torch.float32
        model = _empty_model(hf_config, dtype)
        missing, unexpected = safetensors.torch.load_model(model, str(policy / HF_WEIGHTS), strict=False)
        _check_keys(policy / HF_WEIGHTS, model, missing, unexpected)
    else:  # the Megatron backend's distributed checkpoint
        model = _empty_model(hf_config, torch.float32)
        state = _read_megatron(policy, hf_config)
        dtype = next(iter(state.values())).dtype
        model = model.to(dtype)
        missing, unexpected = model.load_state_dict(state, strict=False)
        _check_keys(policy, model, missing, unexpected)
    return SourceModel(model.eval(), tokenizer, checkpoint)


def _check_keys(where: Path, model, missing, unexpected) -> None:
    tied = set(getattr(model, "_tied_weights_keys", None) or ())
    if isinstance(getattr(model, "_tied_weights_keys", None), dict):
        tied = set(model._tied_weights_keys)
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ExportError(f"{where}: weights do not match the run's model config (missing {missing[:3]}, "
                          f"unexpected {list(unexpected)[:3]})")


def _read_megatron(policy: Path, hf_config) -> dict[str, torch.Tensor]:
    try:
        from nemo_igrpo.policy.megatron.checkpoint import read_checkpoint_as_hf
    except ImportError as error:
        raise ExportError(f"{policy}: holds no {HF_WEIGHTS}, and reading a Megatron-backend checkpoint needs "
                          f"nemo_igrpo.policy.megatron.checkpoint and megatron-core ({error})") from None
    try:
        return read_checkpoint_as_hf(policy, hf_config)
    except (FileNotFoundError, ValueError, KeyError) as error:  # not a Megatron checkpoint, or another model's
        raise ExportError(f"{policy}: no {HF_WEIGHTS} and not a readable Megatron-backend checkpoint: "
                          f"{error}") from None


def _run_model_config(path: Path):
    """The run's ``model`` section (only that: the rest of a run's config may name rewards registered at run time)."""
    from omegaconf import OmegaConf

    from nemo_igrpo.config import ModelConfig

    try:
        section = (yaml.safe_load(path.read_text()) or {}).get("model") or {}
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), section))
    except Exception as error:  # noqa: BLE001 - any parse/merge failure means the same thing here
        raise ExportError(f"{path}: cannot read its model section ({error})") from None


def _run_tokenizer(run_dir: Path, model_config):
    """The tokenizer the run saved with its final model if there is one (no network), else the configured one."""
    from transformers import AutoTokenizer

    from nemo_igrpo.models import load_tokenizer

    final = run_dir / "final"
    if (final / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(final)
    return load_tokenizer(model_config)


def _hf_config(model_config, tokenizer):
    from transformers import AutoConfig

    from nemo_igrpo.models import BUILTIN_TINY_LLAMA, _tiny_llama, is_gguf_source, resolve_gguf

    if model_config.path == BUILTIN_TINY_LLAMA:
        with torch.device("meta"):  # only its config is needed
            return _tiny_llama(model_config, tokenizer).config
    if is_gguf_source(model_config.path):
        gguf = resolve_gguf(model_config.path)
        config = AutoConfig.from_pretrained(gguf.directory, gguf_file=gguf.filename)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        return config
    return AutoConfig.from_pretrained(model_config.path)


def _empty_model(hf_config, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(hf_config, dtype=dtype)


def _stored_dtype(folder: Path) -> torch.dtype | None:
    """The dtype of the first floating tensor in ``folder``'s safetensors files (what the run trained in)."""
    for file in sorted(folder.glob("*.safetensors")):
        with safetensors.safe_open(str(file), framework="pt") as handle:
            names = handle.keys()  # safe_open is not iterable itself
            for key in names:
                tensor = handle.get_slice(key)
                dtype = getattr(torch, {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}.get(
                    tensor.get_dtype(), ""), None)
                if isinstance(dtype, torch.dtype):
                    return dtype
    return None

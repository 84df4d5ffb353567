"""Regenerate nemo_igrpo/export/nemo_defaults.json from NeMo itself (run with the NeMo 2.7.3 venv's python).

NeMo 2 writes ``context/model.yaml`` with every argument of the model, its config and its tokenizer, defaults
included (``IOMixin._io_dump_yaml``). The export writes the same key set without NeMo, so it needs those defaults:
this script renders them with NeMo's own YAML dumper for each model/config class the export uses and stores the
Llama one whole and the others as differences. ``tests/integration/test_nemo_oracle.py`` checks that the export's
model.yaml equals what NeMo renders from the export's io.json.

    python scripts/nemo_config_defaults.py nemo_igrpo/export/nemo_defaults.json
"""

import json
import sys

import fiddle as fdl
import yaml
from nemo.collections.common.tokenizers.huggingface.auto_tokenizer import AutoTokenizer
from nemo.collections.llm.gpt.model import llama, mistral, qwen2, qwen3
from nemo.lightning.io.mixin import IOMixin

import nemo

CLASSES = {  # HF model_type (and variant) -> (model class, config class), as NeMo's HF importers choose them
    "llama": (llama.LlamaModel, llama.LlamaConfig),
    "llama31": (llama.LlamaModel, llama.Llama31Config),
    "qwen2": (qwen2.Qwen2Model, qwen2.Qwen2Config),
    "qwen3": (qwen3.Qwen3Model, qwen3.Qwen3Config),
    "mistral": (mistral.MistralModel, mistral.MistralConfig7B),
}


class _Holder:
    model = None


def render(model_cls, config_cls):
    holder = _Holder()
    holder.model = fdl.Config(model_cls, config=fdl.Config(config_cls),
                              tokenizer=fdl.Config(AutoTokenizer, pretrained_model_name="nemo_tokenizer"))
    return yaml.safe_load(IOMixin._io_dump_yaml(None, holder, attrs=["model"])["model"])


def main(out):
    rendered = {name: render(*classes) for name, classes in CLASSES.items()}
    base = rendered["llama"]
    classes = {}
    for name, model in rendered.items():
        config = model["config"]
        classes[name] = {
            "model": model["_target_"],
            "set": {k: v for k, v in config.items() if base["config"].get(k, object()) != v},
            "drop": sorted(set(base["config"]) - set(config)),
        }
    data = {"nemo_version": nemo.__version__, "model": {k: v for k, v in base.items() if k != "_target_"},
            "classes": classes}
    with open(out, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main(sys.argv[1])

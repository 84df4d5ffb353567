"""Run by tests/integration/test_nemo_oracle.py with the NeMo 2.7.3 venv's python (not ours): loads our exports
with NeMo's own readers and writes what they returned to OUT (a torch file) for the test to compare.

    python nemo_oracle_check.py NEMO2_DIR NEMO_EXTRACTED_DIR INPUTS.pt OUT.pt

NeMo calls made (and the one patch): see the docstring of tests/integration/test_nemo_oracle.py.
"""

import os
import sys
import tempfile
from pathlib import Path

import torch



def load_and_score(model, weights: Path, ids: torch.Tensor) -> dict:
    """NeMo's model from the context, its weights loaded as MegatronStrategy.load_checkpoint does, and its logits."""
    from nemo.lightning.io.pl import MegatronCheckpointIO
    from nemo.lightning.megatron_parallel import MegatronParallel

    model.configure_model()  # <Arch>Config.configure_model → megatron GPTModel (local spec without TE)
    checkpoint_io = MegatronCheckpointIO(save_ckpt_format="torch_dist")
    metadata = checkpoint_io.load_content_metadata(weights)
    request = {"state_dict": MegatronParallel(model, cpu=True).sharded_state_dict(metadata=metadata)}
    requested = sorted(v.unique_key for v in request["state_dict"].values() if "_extra_state" in getattr(v, "key", ""))
    loaded = checkpoint_io.load_checkpoint(weights, sharded_state_dict=request)  # strict=None: NeMo's default
    state = {k.removeprefix("module."): v for k, v in loaded["state_dict"].items()}
    result = model.module.load_state_dict(state, strict=True)
    positions = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    with torch.no_grad():
        logits = model.module.eval()(ids, positions, attention_mask=None).float()
    return {"requested_extra_state": requested, "load_result": [list(result.missing_keys),
                                                                list(result.unexpected_keys)], "logits": logits}


def main(nemo2: Path, nemo_dir: Path, inputs_file: Path, out_file: Path) -> None:
    inputs = torch.load(inputs_file)
    out: dict = {}

    from nemo.lightning import io

    # 1. The context, as AutoResume(load_artifacts), nemo_load and the HF exporters read it.
    context = io.load_context(nemo2 / "context")  # the whole TrainerContext: model, trainer, extra
    out["context_types"] = [type(context).__name__, type(context.model).__name__,
                            type(context.model.config).__name__, type(context.trainer).__name__]
    # model.yaml as NeMo itself renders it from our io.json (IOMixin._io_dump_yaml, what nemo_save writes)
    import yaml
    from nemo.lightning.io.mixin import IOMixin

    unbuilt = io.load_context(nemo2 / "context", build=False)
    out["nemo_model_yaml"] = yaml.safe_load(IOMixin._io_dump_yaml(None, unbuilt, attrs=["model"])["model"])
    model = io.load_context(nemo2 / "context", subpath="model")
    config = io.load_context(nemo2 / "context", subpath="model.config")
    out["config"] = {k: getattr(config, k) for k in inputs["config_keys"]}
    out["config"]["activation_func"] = config.activation_func.__name__
    tokenizer = io.load_context(nemo2 / "context", subpath="model.tokenizer")  # NeMo's AutoTokenizer wrapper
    out["tokenizer_type"] = type(tokenizer).__name__
    out["nemo_ids"] = tokenizer.text_to_ids(inputs["text"])

    # NeMo's own NeMo → HF exporter reads the context for the HF config and the tokenizer.
    from nemo.collections.llm.gpt.model.llama import HFLlamaExporter

    exporter = HFLlamaExporter(str(nemo2))
    hf_config = exporter.config
    out["exporter_config"] = {k: getattr(hf_config, k) for k in (
        "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
        "head_dim", "rms_norm_eps", "rope_theta", "tie_word_embeddings", "vocab_size")}
    out["exporter_tokenizer_ids"] = exporter.tokenizer.text_to_ids(inputs["text"])

    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(nemo2 / "context" / "nemo_tokenizer")  # transformers 4.57 directly
    out["hf457_ids"] = hf(inputs["text"]).input_ids
    out["hf457_class"] = type(hf).__name__

    # 2. The weights into NeMo's model, at NeMo's default strictness, on CPU.
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import megatron_cpu_patch  # CUDA calls of megatron-core → CPU (RNG tracker, current_device, synchronize)

    megatron_cpu_patch.apply()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(inputs["port"]))
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(0)
    import nemo.lightning.io.pl as nemo_pl

    # The one NeMo patch: MegatronCheckpointIO.load_checkpoint ends with _fix_tensors_device, which asserts that CUDA
    # is initialised and moves CUDA tensors between CUDA devices; on CPU there is nothing to move, so it is identity.
    nemo_pl._fix_tensors_device = lambda checkpoint: checkpoint
    out.update(load_and_score(model, nemo2 / "weights", inputs["ids"]))
    if "qwen2" in inputs:  # a second architecture: untied, q/k/v biases
        qwen2 = inputs["qwen2"]
        qwen2["path"] = Path(qwen2["path"])
        context = io.load_context(qwen2["path"] / "context")
        out["qwen2"] = {"context_types": [type(context.model).__name__, type(context.model.config).__name__],
                        **load_and_score(io.load_context(qwen2["path"] / "context", subpath="model"),
                                         qwen2["path"] / "weights", qwen2["ids"])}
    torch.distributed.destroy_process_group()

    # 3. The .nemo (extracted: NeMo 2.7.3's TarPath fails under torch 2.13) through the TRT-LLM/vLLM export readers.
    from nemo.export.trt_llm.nemo_ckpt_loader import nemo_file

    out["model_type"] = nemo_file.get_model_type(nemo_dir)
    out["weights_dtype"] = nemo_file.get_weights_dtype(nemo_dir)
    with tempfile.TemporaryDirectory() as export_dir:
        weights_dict, nemo_config, returned_tokenizer = nemo_file.load_nemo_model(nemo_dir, Path(export_dir))
        out["nemo_weights"] = {k: v for k, v in weights_dict.items() if isinstance(v, torch.Tensor)}
        out["nemo_config"] = {k: nemo_config.get(k) for k in ("num_layers", "hidden_size", "num_attention_heads",
                                                               "num_query_groups", "activation", "mcore_gpt")}
        exported_tokenizer = nemo_file.get_tokenizer(export_dir)  # from the nemo_context load_nemo_model copied
        out["export_tokenizer_ids"] = list(exported_tokenizer.encode(inputs["text"]))
        out["returned_tokenizer"] = repr(returned_tokenizer)
    torch.save(out, out_file)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))

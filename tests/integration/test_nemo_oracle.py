"""Our NeMo exports, read by NVIDIA NeMo 2.7.3 itself (separate cached venv, tests/nemo_venv.py).

A real 1-step iGRPO run of the built-in tiny Llama is exported with ``--format nemo2`` and ``--format nemo``;
tests/nemo_oracle_check.py then makes these NeMo calls in the NeMo venv (CPU, one process):

1. ``nemo.lightning.io.load_context(EXPORT/context)`` (the whole TrainerContext), ``…, build=False`` rendered with
   ``IOMixin._io_dump_yaml`` (what NeMo writes as model.yaml), ``subpath="model"``, ``"model.config"`` and
   ``"model.tokenizer"`` (NeMo's AutoTokenizer; ``text_to_ids``); transformers 4.57's ``AutoTokenizer`` on
   ``context/nemo_tokenizer``; ``HFLlamaExporter(EXPORT).config`` and ``.tokenizer`` (NeMo's NeMo → HF exporter).
2. ``LlamaModel.configure_model()`` (megatron-core GPTModel, local spec; also for a Qwen2 export's ``Qwen2Model``),
   ``MegatronParallel(model).sharded_state_dict`` and ``MegatronCheckpointIO.load_checkpoint(EXPORT/weights, sharded_state_dict)`` at NeMo's default strictness
   (``StrictHandling.ASSUME_OK_UNEXPECTED``: a requested key missing from the checkpoint is fatal), then a strict
   ``load_state_dict`` and a forward pass. Patched: ``nemo.lightning.io.pl._fix_tensors_device`` (called at the end
   of ``load_checkpoint``; it asserts CUDA is initialised to move CUDA tensors between CUDA devices) is identity on
   CPU, and megatron-core's CUDA-only calls go through tests/megatron_cpu_patch.py, as in our Megatron tests. A full
   ``MegatronStrategy`` restore is not run: it needs CUDA streams and RNG.
3. On the ``.nemo`` extracted to a folder (NeMo 2.7.3's ``TarPath`` fails under torch 2.13 on any tar, NeMo's own
   included): ``nemo.export.trt_llm.nemo_ckpt_loader.nemo_file.get_model_type``, ``get_weights_dtype``,
   ``load_nemo_model`` and ``get_tokenizer`` on the folder load_nemo_model exported into.
"""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest
import torch
import yaml
from helpers import tiny_qwen2
from test_export import TINY_RUN
from transformers import AutoModelForCausalLM, AutoTokenizer

from nemo_igrpo.config import load_config
from nemo_igrpo.data.char_tokenizer import build_char_tokenizer
from nemo_igrpo.export import export
from nemo_igrpo.trainer import train

REPO = Path(__file__).resolve().parents[2]
TESTS = Path(__file__).resolve().parents[1]  # tests/: nemo_oracle_check.py and the shared helpers
CONFIG_KEYS = ["num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
               "kv_channels", "layernorm_epsilon", "rotary_base", "seq_length", "share_embeddings_and_output_weights",
               "params_dtype", "vocab_size", "make_vocab_size_divisible_by", "apply_rope_fusion"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dist_tensors(weights: Path) -> dict[str, torch.Tensor]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(weights))
    state = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in reader.read_metadata().state_dict_metadata
             .items() if isinstance(m, TensorStorageMetadata)}
    dcp.load(state, storage_reader=reader, no_dist=True)
    return state


@pytest.mark.slow
@pytest.mark.timeout(1800)  # a fresh machine builds the NeMo venv first (6–16 min); with it cached, ≈ 75 s
@pytest.mark.usefixtures("single_thread")
def test_nemo_2_7_3_loads_both_exports_of_a_trained_run(tmp_path):
    from nemo_venv import python

    nemo_python = python()
    run = tmp_path / "run"
    train(load_config(REPO / "conf" / "quickstart.yaml", [*TINY_RUN, f"trainer.output_dir={run}"]))
    export(run, "nemo2", tmp_path / "nemo2")
    export(run, "nemo", tmp_path / "policy.nemo")
    extracted = tmp_path / "extracted"
    with tarfile.open(tmp_path / "policy.nemo") as archive:
        archive.extractall(extracted, filter="data")

    text = "What is 3 + 4? <think>3 + 4 = 7</think> \\boxed{7}"
    ids = torch.randint(0, 101, (2, 24), generator=torch.Generator().manual_seed(0))
    qwen2 = tiny_qwen2().eval()  # a second architecture: untied output layer, q/k/v biases
    with torch.no_grad():
        for name, parameter in qwen2.named_parameters():
            if name.endswith(".bias"):
                parameter.normal_()  # zero-initialised biases would not show a mapping error
    qwen2.save_pretrained(tmp_path / "qwen2")
    build_char_tokenizer().save_pretrained(tmp_path / "qwen2")
    export(tmp_path / "qwen2", "nemo2", tmp_path / "qwen2_nemo2")
    qwen2_ids = torch.randint(0, qwen2.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    torch.save({"ids": ids, "text": text, "config_keys": CONFIG_KEYS, "port": _free_port(),
                "qwen2": {"path": str(tmp_path / "qwen2_nemo2"), "ids": qwen2_ids}}, tmp_path / "inputs.pt")
    done = subprocess.run([str(nemo_python), str(TESTS / "nemo_oracle_check.py"), str(tmp_path / "nemo2"),
                           str(extracted), str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")],
                          capture_output=True, text=True, timeout=900, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    out = torch.load(tmp_path / "out.pt", weights_only=False)

    # 1. The context: NeMo's own classes, our values, and the model.yaml NeMo would write for it.
    assert out["context_types"] == ["TrainerContext", "LlamaModel", "LlamaConfig", "Trainer"]
    hf = json.loads((run / "final" / "config.json").read_text())
    assert out["config"] == {
        "num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 128, "num_attention_heads": 2, "num_query_groups": 1,
        "kv_channels": 32, "layernorm_epsilon": hf["rms_norm_eps"], "rotary_base": hf["rope_parameters"]["rope_theta"],
        "seq_length": hf["max_position_embeddings"],
        "share_embeddings_and_output_weights": True, "params_dtype": torch.float32, "vocab_size": 101,
        "make_vocab_size_divisible_by": 1, "apply_rope_fusion": False, "activation_func": "silu"}
    rendered = out["nemo_model_yaml"]
    # load_context resolves the tokenizer artifact to an absolute path; NeMo writes it relative to context/.
    assert rendered["tokenizer"]["pretrained_model_name"] == str(tmp_path / "nemo2" / "context" / "nemo_tokenizer")
    rendered["tokenizer"]["pretrained_model_name"] = "nemo_tokenizer"
    assert yaml.safe_load((tmp_path / "nemo2" / "context" / "model.yaml").read_text()) == rendered
    ours = AutoTokenizer.from_pretrained(run / "final")(text).input_ids  # transformers 5.x, the run's tokenizer
    assert out["tokenizer_type"] == "AutoTokenizer" and out["hf457_class"] == "PreTrainedTokenizerFast"
    assert out["nemo_ids"] == ours and out["hf457_ids"] == ours and out["exporter_tokenizer_ids"] == ours
    assert out["exporter_config"] == {  # NeMo's HFLlamaExporter.config, built from our context
        "num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2,
        "num_key_value_heads": 1, "head_dim": 32, "rms_norm_eps": hf["rms_norm_eps"],
        "rope_theta": hf["rope_parameters"]["rope_theta"], "tie_word_embeddings": True, "vocab_size": 101}

    # 2. Weights at NeMo's default strictness: every requested key found (the layers' _extra_state included), all
    # parameters set, and NeMo's GPTModel scores like transformers.
    assert len(out["requested_extra_state"]) == 4 * 2  # 4 linears × 2 layers
    assert out["load_result"] == [[], []]
    final = AutoModelForCausalLM.from_pretrained(run / "final").eval()
    with torch.no_grad():
        reference = final(ids).logits
    difference = (out["logits"] - reference).abs().max().item()
    print(f"NeMo 2.7.3 GPTModel vs transformers logits (fp32): max |diff| = {difference:.2e}")
    # fp32 logits of size O(1) through 2 layers: only summation order differs (megatron's unfused attention vs SDPA),
    # ≈1e-7 relative per op; 1e-4 leaves two orders of margin on any x86-64 CPU and catches any mapping error (≥1e-2).
    assert difference < 1e-4

    with torch.no_grad():
        qwen2_reference = qwen2(qwen2_ids).logits
    qwen2_difference = (out["qwen2"]["logits"] - qwen2_reference).abs().max().item()
    print(f"NeMo 2.7.3 Qwen2 GPTModel vs transformers logits (fp32): max |diff| = {qwen2_difference:.2e}")
    assert out["qwen2"]["context_types"] == ["Qwen2Model", "Qwen2Config"]
    assert out["qwen2"]["load_result"] == [[], []] and len(out["qwen2"]["requested_extra_state"]) == 4 * 2
    assert qwen2_difference < 1e-4  # as above

    # 3. The .nemo through NeMo's TRT-LLM/vLLM export readers.
    assert out["model_type"] == "llama" and out["weights_dtype"] == "float32"
    assert out["nemo_config"] == {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 2, "num_query_groups": 1,
                                  "activation": "fast-swiglu", "mcore_gpt": True}
    exported = _dist_tensors(tmp_path / "nemo2" / "weights")
    assert set(out["nemo_weights"]) == set(exported)
    for name, tensor in exported.items():
        assert torch.equal(out["nemo_weights"][name], tensor), name
    assert out["export_tokenizer_ids"] == ours
    assert json.loads((extracted / "context" / "nemo_tokenizer" / "tokenizer_config.json").read_text())[
        "tokenizer_class"] == "PreTrainedTokenizerFast"

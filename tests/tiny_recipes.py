"""The one place that shrinks a recipe (``conf/recipes/*.yaml``) to the tiny CPU shape the launch tests run.

:func:`shrink` returns the overrides and the process count for one recipe. It keeps what makes the recipe that
recipe — the policy and generation backends, the algorithm (preset, N drafts, G refinements, losses, dynamic
sampling), the prompt layout (draft content), the micro-batch size and the Megatron layout (TP, PP, sequence
parallel, distributed optimizer, recompute) — and replaces what cannot run on 2 CPU cores:

* model: the built-in tiny Llama (character tokenizer, :data:`SHAPE`: 2 heads and 2 KV heads so that TP=2 divides
  them, 2 layers so that PP=2 does) in float32, trained in fp32: the checks compare the generator's log-probs with
  the trainer's to 1e-4, which bf16 cannot meet (ENVIRONMENT.md: vLLM bf16 differs by ≈0.03);
* data: the built-in arithmetic task (200 problems), no held-out evaluation, no paper system prompt (600+
  characters for a character model); lengths: 12 new tokens;
* reward: ``test_text_reward`` (registered by tests/integration/test_distributed.py's entry point), which varies
  with the sampled text: the tiny model never answers correctly, so math_verify would give every group zero
  variance (and DAPO's dynamic sampling would stop the run);
* batch: 2 prompts per data-parallel rank, one step;
* generation server: this machine's test server, ``weight_sync: shm`` (the recipes' ``nccl`` needs GPUs on both
  sides; it shares everything but the transport with shm, see nemo_igrpo/generation/server.py);
* layout: a recipe's TP × PP must fit in ``processes`` (2 here, 8 GPUs per node in the recipes): TP and PP are
  halved together, keeping their ratio, until TP × PP ≤ processes (TP 4 → 2); data parallelism takes the rest
  (DP = processes / (TP × PP)). Sequence parallelism is kept where TP stays > 1.

It lives in tests/, not in the package, because the shrunk Megatron layouts run on CPU only with the test-only
tests/megatron_cpu_patch.py, and the shape and reward exist for the checks, not for users; ``nemo-igrpo plan``
is the package's tool for a recipe's real shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from nemo_igrpo.config import load_config

# The shape the launch tests' server serves and every cell trains (head_dim 32: vLLM needs ≥ 32).
SHAPE = ["model.tiny.hidden_size=64", "model.tiny.intermediate_size=128", "model.tiny.num_layers=2",
         "model.tiny.num_heads=2", "model.tiny.num_kv_heads=2", "model.tiny.max_position_embeddings=512"]


@dataclass(frozen=True)
class Shrunk:
    overrides: list[str]
    nproc: int  # processes to launch (1: a plain process, else torchrun)
    tensor_parallel: int
    pipeline_parallel: int
    data_parallel: int


def scale_layout(tp: int, pp: int, processes: int) -> tuple[int, int]:
    """Halve TP and PP together (each stays ≥ 1) until TP × PP fits in ``processes``."""
    while tp * pp > processes:
        if tp > 1 and pp > 1:
            tp, pp = tp // 2, pp // 2
        elif tp > 1:
            tp //= 2
        else:
            pp //= 2
    return tp, pp


def shrink(recipe: Path, server_url: str, processes: int = 2) -> Shrunk:
    config = load_config(recipe)
    megatron = config.policy.megatron
    tp, pp = (scale_layout(megatron.tensor_model_parallel_size, megatron.pipeline_model_parallel_size, processes)
              if config.policy.backend == "megatron" else (1, 1))
    dp = processes // (tp * pp)
    overrides = [
        "model.path=builtin:tiny-llama", "model.tokenizer=null", "model.dtype=float32", *SHAPE,
        "policy.precision=fp32",
        "data.train=builtin:arithmetic", "data.eval=null", "data.arithmetic.num_train=200",
        "data.arithmetic.num_heldout=8", "data.max_prompt_tokens=256", "prompt.system_prompt=null",
        "generation.max_new_tokens=12",
        "reward.components={test_text_reward: 1.0}", "reward.num_workers=1",
        f"trainer.prompts_per_step={2 * dp}", "trainer.max_steps=1", "trainer.eval_every=0", "trainer.save_every=0",
        "trainer.loggers=[]", "trainer.progress=false", "trainer.resume=none", "warm_start.steps=0",
    ]
    if config.generation.backend == "server":
        overrides += [f"generation.server.url={server_url}", "generation.server.weight_sync=shm"]
    if config.policy.backend == "megatron":
        overrides += [f"policy.megatron.tensor_model_parallel_size={tp}",
                      f"policy.megatron.pipeline_model_parallel_size={pp}"]
        if tp == 1:
            overrides.append("policy.megatron.sequence_parallel=false")  # needs TP > 1
    return Shrunk(overrides, processes if processes > 1 else 1, tp, pp, dp)

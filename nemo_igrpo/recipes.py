"""Batch arithmetic of a config: what one training step generates, trains on and needs in GPUs and nodes.

Definitions (one *step* = one rollout batch; every count is per step):

* ``rollouts`` = prompts_per_step × (num_drafts + num_refinements): every sample the generator draws (Stage 1 and
  Stage 2 for iGRPO, the single group for GRPO). GRPO 8 and iGRPO 4 + 4 have the same rollout budget. With DAPO's
  dynamic sampling this is the first round; a step may draw up to ``max_sampling_rounds`` times as many.
* ``trained_sequences`` = prompts_per_step × num_refinements: only Stage-2 (or GRPO) samples get a loss, so
  iGRPO updates on half as many sequences as GRPO at a matched budget.
* ``data_parallel_size`` = training GPUs / (TP × PP × CP), where training GPUs = training nodes × GPUs per node.
  Prompts are sharded over data-parallel ranks, so prompts_per_step must divide by it.
* ``micro_batches_per_rank`` = ceil(trained_sequences / (data_parallel_size × micro_batch_size)): forward/backward
  passes whose gradients each data-parallel rank accumulates into one optimizer step (gradient accumulation).
* ``optimizer_steps_per_rollout_batch`` = ppo_epochs: the trainer takes one optimizer step per pass over the rollout
  batch (1 = on-policy, the paper's setting).
* Token counts are upper bounds (every completion runs to ``generation.max_new_tokens``; real ones stop earlier):
  ``generated_tokens`` = rollouts × max_new_tokens; the longest trained sequence is the prompt
  (``data.max_prompt_tokens``) plus, for iGRPO with ``prompt.draft_content: full``, the appended draft (up to
  max_new_tokens) plus the completion; ``trained_tokens`` = trained_sequences × that length and ``loss_tokens`` =
  trained_sequences × max_new_tokens. The chat template and draft header add a few tokens per prompt on top.
* Nodes: training nodes plus one node reserved for the generation server when ``generation.backend: server`` (the
  paper's layout: one vLLM node + K training nodes); a colocated engine (``vllm``/``hf``) shares the training GPUs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from nemo_igrpo.backends import GENERATION_BACKENDS, POLICY_BACKENDS
from nemo_igrpo.config import Config, ConfigError


@dataclass(frozen=True)
class BatchPlan:
    prompts_per_step: int
    rollouts_per_prompt: int
    rollouts: int
    max_rollouts: int  # with dynamic sampling: rollouts × max_sampling_rounds; else rollouts
    trained_sequences: int
    tensor_parallel: int
    pipeline_parallel: int
    context_parallel: int
    model_parallel_size: int  # TP × PP × CP: GPUs holding one copy of the model
    training_nodes: int
    gpus_per_node: int
    training_gpus: int
    data_parallel_size: int
    prompts_per_rank: int
    sequences_per_rank: int
    micro_batch_size: int
    micro_batches_per_rank: int
    optimizer_steps_per_rollout_batch: int
    max_sequence_tokens: int  # longest trained (Stage-2) sequence: prompt [+ draft] + completion
    generated_tokens: int
    trained_tokens: int
    loss_tokens: int
    generation_nodes: int
    nodes: int
    gpus: int
    total_steps: int
    total_prompts: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def lines(self) -> list[str]:
        """The plan as short human-readable lines (what ``nemo-igrpo plan`` prints)."""
        dyn = f" (up to {self.max_rollouts:,} with dynamic sampling)" if self.max_rollouts != self.rollouts else ""
        gen = (f" + {self.generation_nodes} generation-server node" if self.generation_nodes else
               " (generation colocated on the training GPUs)")
        return [
            (f"rollouts per step      {self.prompts_per_step} prompts × {self.rollouts_per_prompt} = "
            f"{self.rollouts:,}{dyn}"),
            f"trained sequences      {self.trained_sequences:,} per step (Stage-2 / GRPO samples)",
            (f"parallelism            TP {self.tensor_parallel} × PP {self.pipeline_parallel} × "
            f"CP {self.context_parallel} × DP {self.data_parallel_size} = {self.training_gpus} training GPUs"),
            (f"per data-parallel rank {self.prompts_per_rank} prompts, {self.sequences_per_rank} sequences = "
            f"{self.micro_batches_per_rank} micro-batches of {self.micro_batch_size}"),
            (f"optimizer steps        {self.optimizer_steps_per_rollout_batch} per rollout batch "
            f"(algorithm.ppo_epochs)"),
            (f"tokens per step (max)  generated {self.generated_tokens:,}; trained {self.trained_tokens:,} "
            f"(sequences ≤ {self.max_sequence_tokens:,}); with loss {self.loss_tokens:,}"),
            (f"nodes                  {self.training_nodes} training × {self.gpus_per_node} GPUs{gen} = "
            f"{self.nodes} nodes, {self.gpus} GPUs"),
            f"run                    {self.total_steps} steps, {self.total_prompts:,} prompts",
        ]


def batch_plan(config: Config, training_nodes: int | None = None, gpus_per_node: int = 8) -> BatchPlan:
    """The batch arithmetic of ``config`` on ``training_nodes`` nodes of ``gpus_per_node`` GPUs (default: the
    fewest nodes that hold one model-parallel group). Raises ConfigError naming the key when sizes do not divide."""
    if gpus_per_node < 1:
        raise ConfigError(f"gpus_per_node: must be >= 1, got {gpus_per_node}")
    algorithm, trainer = config.algorithm, config.trainer
    prompts = trainer.prompts_per_step
    per_prompt = algorithm.num_drafts + algorithm.num_refinements
    rollouts = prompts * per_prompt
    trained = prompts * algorithm.num_refinements

    megatron = config.policy.megatron
    if POLICY_BACKENDS[config.policy.backend].model_parallel:
        tp, pp, cp = (megatron.tensor_model_parallel_size, megatron.pipeline_model_parallel_size,
                      megatron.context_parallel_size)
    else:  # e.g. the HF backend keeps a whole model per GPU
        tp = pp = cp = 1
    model_parallel = tp * pp * cp
    if training_nodes is None:
        training_nodes = math.ceil(model_parallel / gpus_per_node)
    if training_nodes < 1:
        raise ConfigError(f"training_nodes: must be >= 1, got {training_nodes}")
    training_gpus = training_nodes * gpus_per_node
    if training_gpus % model_parallel:
        raise ConfigError(f"policy.megatron: TP × PP × CP = {tp} × {pp} × {cp} = {model_parallel} does not divide "
                          f"the {training_gpus} training GPUs ({training_nodes} nodes × {gpus_per_node})")
    dp = training_gpus // model_parallel
    if prompts % dp:
        raise ConfigError(f"trainer.prompts_per_step: {prompts} prompts do not shard evenly over "
                          f"{dp} data-parallel ranks")
    micro = config.policy.micro_batch_size
    per_rank = trained // dp

    max_new = config.generation.max_new_tokens
    draft = max_new if algorithm.num_drafts > 0 and config.prompt.draft_content == "full" else 0
    longest = config.data.max_prompt_tokens + draft + max_new
    generation_nodes = 1 if GENERATION_BACKENDS[config.generation.backend].own_nodes else 0
    rounds = algorithm.max_sampling_rounds if algorithm.dynamic_sampling else 1
    return BatchPlan(
        prompts_per_step=prompts,
        rollouts_per_prompt=per_prompt,
        rollouts=rollouts,
        max_rollouts=rollouts * rounds,
        trained_sequences=trained,
        tensor_parallel=tp,
        pipeline_parallel=pp,
        context_parallel=cp,
        model_parallel_size=model_parallel,
        training_nodes=training_nodes,
        gpus_per_node=gpus_per_node,
        training_gpus=training_gpus,
        data_parallel_size=dp,
        prompts_per_rank=prompts // dp,
        sequences_per_rank=per_rank,
        micro_batch_size=micro,
        micro_batches_per_rank=math.ceil(per_rank / micro),
        optimizer_steps_per_rollout_batch=algorithm.ppo_epochs,
        max_sequence_tokens=longest,
        generated_tokens=rollouts * max_new,
        trained_tokens=trained * longest,
        loss_tokens=trained * max_new,
        generation_nodes=generation_nodes,
        nodes=training_nodes + generation_nodes,
        gpus=(training_nodes + generation_nodes) * gpus_per_node,
        total_steps=trainer.max_steps,
        total_prompts=trainer.max_steps * prompts,
    )


def check_recipe(config: Config, plan: BatchPlan) -> list[str]:
    """Inconsistencies a launch would hit late or that waste work (empty list = none): a vLLM context shorter than
    the longest sequence, a micro-batch size that leaves a short last micro-batch."""
    problems = []
    limit = config.generation.vllm.max_model_len
    vllm_context = GENERATION_BACKENDS[config.generation.backend].vllm_context
    if vllm_context and limit is not None and limit < plan.max_sequence_tokens:
        problems.append(f"generation.vllm.max_model_len: {limit} is shorter than the longest sequence "
                        f"({plan.max_sequence_tokens} tokens)")
    if plan.micro_batches_per_rank * plan.micro_batch_size != plan.sequences_per_rank:
        problems.append(f"policy.micro_batch_size: {plan.micro_batch_size} does not divide the "
                        f"{plan.sequences_per_rank} sequences per data-parallel rank (the last micro-batch is short)")
    return problems

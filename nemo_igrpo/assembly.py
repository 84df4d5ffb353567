"""Config → every component of a run: the one place that reads a ``Config`` to build things.

Each builder hands its component explicit arguments (or one config section), never the whole ``Config``: the policy
and generation backends (registered by name, with their capabilities, in ``nemo_igrpo.backends``), the reward (a
judge's generator included), the prompt template, the rollout settings, the evaluation sampling, the loss and the
rollout producer. ``build_run`` puts them together for the training loop, once; evaluation, the warm start and the
scripts call the same builders.

This module imports the config schema for type checking only, and the schema never imports it (validation reads
the light ``nemo_igrpo.backends``). Heavy engines (vLLM, Megatron-Core) are imported inside their builders only.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from nemo_igrpo.algorithms.igrpo import BatchCollector, RolloutSettings
from nemo_igrpo.algorithms.loss import LossSpec
from nemo_igrpo.backends import GENERATION_BACKENDS, POLICY_BACKENDS, PolicyBackendEntry  # noqa: F401  (re-exported)
from nemo_igrpo.data.prompts import PAPER_SYSTEM_PROMPT, PromptBuilder
from nemo_igrpo.errors import ConfigError
from nemo_igrpo.generation.base import GenerationBackend, SamplingParams
from nemo_igrpo.policy.base import PolicyBackend, TrainingArguments
from nemo_igrpo.rewards import REWARDS, ChatModel, Reward, RewardContext, WeightedReward

if TYPE_CHECKING:
    from nemo_igrpo.config import Config, OptimConfig, PromptConfig
    from nemo_igrpo.data.dataset import Example
    from nemo_igrpo.rollout_producer import RolloutProducer
    from nemo_igrpo.sharding import ShardedSource


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------- algorithm


def build_loss(config: Config) -> LossSpec:
    """The loss of every RL step; ``LossSpec.needs_reference`` is the run's one KL decision."""
    a = config.algorithm
    return LossSpec(policy_loss=a.policy_loss, eps_low=a.eps_low, eps_high=a.eps_high, dual_clip=a.dual_clip,
                    loss_agg=a.loss_agg, kl_coef=a.kl_coef, kl_estimator=a.kl_estimator, kl_clamp=a.kl_clamp,
                    importance_correction=a.importance_correction, importance_cap=a.importance_cap,
                    max_tokens=config.generation.max_new_tokens)


def build_rollout_settings(config: Config, stop_token_ids: tuple[int, ...]) -> RolloutSettings:
    algorithm, generation = config.algorithm, config.generation
    return RolloutSettings(
        num_drafts=algorithm.num_drafts, num_refinements=algorithm.num_refinements, tie_break=algorithm.tie_break,
        advantage=algorithm.advantage, adv_eps=algorithm.adv_eps, dynamic_sampling=algorithm.dynamic_sampling,
        max_sampling_rounds=algorithm.max_sampling_rounds, overlong_buffer=config.reward.overlong_buffer,
        overlong_penalty=config.reward.overlong_penalty, overlong_filter=algorithm.overlong_filter,
        draft_selection=algorithm.draft_selection, draft_loss_weight=algorithm.draft_loss_weight,
        loss_agg=algorithm.loss_agg, skip_solved_by_drafts=algorithm.skip_solved_by_drafts,
        sampling=SamplingParams(temperature=generation.temperature, top_p=generation.top_p,
                                max_new_tokens=generation.max_new_tokens, stop_token_ids=stop_token_ids))


def build_eval_sampling(config: Config, stop_token_ids: tuple[int, ...]) -> SamplingParams:
    ev = config.eval
    return SamplingParams(n=ev.samples_per_problem, temperature=ev.temperature, top_p=ev.top_p,
                          max_new_tokens=ev.max_new_tokens or config.generation.max_new_tokens,
                          stop_token_ids=stop_token_ids)


def build_template(prompt: PromptConfig, tokenizer) -> PromptBuilder:
    """Both stages' prompts; ``prompt.system_prompt: paper`` means the paper's verbatim system text."""
    system = PAPER_SYSTEM_PROMPT if prompt.system_prompt == "paper" else prompt.system_prompt
    return PromptBuilder(tokenizer, system_prompt=system, draft_header=prompt.draft_header,
                         draft_content=prompt.draft_content)


def load_datasets(config: Config, template: PromptBuilder) -> tuple[list[Example], list[Example]]:
    """Training problems and the held-out problems evaluated during training, over-long prompts dropped."""
    from nemo_igrpo.data.sources import drop_long_prompts, load_examples

    def fitting(source: str, split: str) -> list[Example]:
        return drop_long_prompts(load_examples(source, config.data, split), lambda p: len(template.problem_ids(p)),
                                 config.data.max_prompt_tokens, f"data.{split}")

    heldout = fitting(config.data.eval, "eval") if config.data.eval else []
    return fitting(config.data.train, "train"), heldout[: config.eval.num_problems or None]


# ---------------------------------------------------------------------------------------------- reward


def build_training_reward(config: Config) -> Reward:
    """The reward of a run: one registered reward, or the weighted sum of ``reward.components`` (name → weight),
    e.g. the paper's ``{math_verify: 1.0, format: 1.0}``. Rewards get the ``reward`` section and a context that
    lends them a chat model on the run's generation backend (the judge's)."""
    context = RewardContext(chat_model=lambda path: build_chat_model(config, path))
    parts = {name: (REWARDS[name].from_config(config.reward, context), weight)
             for name, weight in config.reward.components.items()}
    if len(parts) == 1:
        ((reward, weight),) = parts.values()
        if weight == 1.0:
            return reward
    return WeightedReward(parts)


def build_chat_model(config: Config, path: str | None) -> ChatModel:
    """Model ``path`` (None: the policy's starting model) on ``generation.backend``, with its chat template."""
    from nemo_igrpo.models import load_model, load_tokenizer, stop_token_ids

    if GENERATION_BACKENDS[config.generation.backend].policy_only:  # validation refuses the judge; this guards others
        raise ConfigError(f"reward.components: a reward asked for a model of its own, but generation.backend="
                          f"{config.generation.backend} is the policy's engine; use generation.backend=hf or vllm")

    model_config = dataclasses.replace(config.model, path=path, tokenizer=None) if path else config.model
    tokenizer = load_tokenizer(model_config)
    model = load_model(model_config, tokenizer)
    render = PromptBuilder(tokenizer, system_prompt=None).problem_ids  # one user turn
    return ChatModel(build_generation(config, model, tokenizer.pad_token_id), render,
                     lambda ids: tokenizer.decode(ids, skip_special_tokens=True), stop_token_ids(tokenizer, model))


# ---------------------------------------------------------------------------------------------- policy backends
# The builders that ``nemo_igrpo.backends``' entries name (with each backend's capabilities).


def _hf_policy(config: Config, model: torch.nn.Module, training: TrainingArguments) -> PolicyBackend:
    from nemo_igrpo.models import resolve_device
    from nemo_igrpo.policy.hf import HFPolicy

    p = config.policy
    return HFPolicy(model, **training.as_kwargs(), logprob_chunk_size=p.logprob_chunk_size,
                    gradient_checkpointing=p.gradient_checkpointing,
                    autocast_dtype="bfloat16" if p.precision == "bf16" else None,
                    device=resolve_device(p.device), lora=p.lora, shared_prefix=p.shared_prefix)


def _megatron_policy(config: Config, model: torch.nn.Module, training: TrainingArguments) -> PolicyBackend:
    from nemo_igrpo.policy.megatron.policy import MegatronPolicy

    return MegatronPolicy(model, megatron=config.policy.megatron, **training.as_kwargs(),
                          bf16=config.policy.precision == "bf16", seed=config.trainer.seed)


def _megatron_check(config: Config, model: torch.nn.Module) -> None:
    from nemo_igrpo.policy.megatron.parallel import validate_sizes
    from nemo_igrpo.policy.megatron.spec import resolve_impl

    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    validate_sizes(config.policy.megatron, world, model.config, resolve_impl(config.policy.megatron.transformer_impl))


def check_policy(config: Config, model: torch.nn.Module) -> None:
    """Raise ConfigError (naming the key) when ``policy.*`` cannot work with this model and world size."""
    check = POLICY_BACKENDS[config.policy.backend].checker()
    if check is not None:
        check(config, model)


def build_policy(config: Config, model: torch.nn.Module, *, optim: OptimConfig | None = None,
                 total_steps: int | None = None, use_reference: bool | None = None,
                 temperature: float | None = None) -> PolicyBackend:
    """The policy backend named by ``policy.backend``. The keyword arguments default to the RL run's: its
    optimizer, ``max_steps × ppo_epochs`` optimizer steps (each of a step's ``algorithm.ppo_epochs`` updates steps
    the LR schedule, as in TRL and veRL, and warmup is a fraction of those), a reference policy when the loss needs
    one, and the sampling temperature (log-probs are scored at the temperature the generator samples at)."""
    optim = optim or config.optim
    if total_steps is None:
        total_steps = config.trainer.max_steps * config.algorithm.ppo_epochs
    training = TrainingArguments(
        lr=optim.lr, weight_decay=optim.weight_decay, betas=(optim.betas[0], optim.betas[1]),
        max_grad_norm=optim.max_grad_norm, warmup_steps=math.ceil(optim.warmup_ratio * total_steps),
        total_steps=total_steps, min_lr_ratio=optim.min_lr_ratio,
        micro_batch_size=config.policy.micro_batch_size,
        max_tokens_per_micro_batch=config.policy.max_tokens_per_micro_batch,
        sequence_packing=config.policy.sequence_packing,
        temperature=config.generation.temperature if temperature is None else temperature,
        use_reference=build_loss(config).needs_reference if use_reference is None else use_reference,
    )
    return POLICY_BACKENDS[config.policy.backend].builder()(config, model, training)


# ---------------------------------------------------------------------------------------------- generation backends
# (config, model, pad_token_id) -> GenerationBackend; the engine gets the model's weights once here, later ones
# only through update_weights. ``nemo_igrpo.backends``' entries name these builders.


def _hf_generation(config: Config, model: torch.nn.Module, pad_token_id: int) -> GenerationBackend:
    from nemo_igrpo.generation.hf import HFGeneration
    from nemo_igrpo.models import resolve_device

    # The generator keeps its own copy: weights reach it only through update_weights, as with any engine.
    return HFGeneration(copy.deepcopy(model).eval(), pad_token_id=pad_token_id,
                        batch_size=config.generation.batch_size, device=resolve_device(config.policy.device))


def _vllm_generation(config: Config, model: torch.nn.Module, pad_token_id: int) -> GenerationBackend:
    """An in-process engine loaded from ``model`` saved as an HF folder in a temporary directory (token ids in and
    out: no pad token needed)."""
    from nemo_igrpo.generation.vllm import VLLMGeneration, write_model_folder

    settings = config.generation.vllm
    directory = Path(tempfile.mkdtemp(prefix="nemo-igrpo-vllm-"))
    try:
        write_model_folder(model, directory)
    except Exception:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    dtype = settings.dtype if settings.dtype != "auto" else str(next(model.parameters()).dtype).removeprefix("torch.")
    return VLLMGeneration(
        directory, max_model_len=default_max_model_len(config, model), dtype=dtype,
        gpu_memory_utilization=settings.gpu_memory_utilization, tensor_parallel_size=settings.tensor_parallel_size,
        enforce_eager=settings.enforce_eager, enable_prefix_caching=settings.enable_prefix_caching,
        sleep_mode=settings.sleep_mode, stream_refinements=settings.stream_refinements,
        weight_bucket_mb=settings.weight_bucket_mb, seed=config.trainer.seed, owned_dir=True)


def default_max_model_len(config: Config, model: torch.nn.Module) -> int:
    """``generation.vllm.max_model_len``, or room for the longest Stage-2 sequence: prompt + draft + wrapper text +
    refinement (256 tokens of slack for the template), capped by the model's position limit."""
    if config.generation.vllm.max_model_len is not None:
        return config.generation.vllm.max_model_len
    longest = config.data.max_prompt_tokens + 2 * config.generation.max_new_tokens + 256
    limit = getattr(model.config, "max_position_embeddings", None)
    return min(longest, limit) if limit else longest


def _server_generation(config: Config, model: torch.nn.Module | None, pad_token_id: int = 0) -> GenerationBackend:
    """The client of ``nemo-igrpo serve``. When weights are synced, ``model``'s weights are sent once now, so step 0
    samples from the same model the trainer scores."""
    from nemo_igrpo.generation.server import ServerGeneration

    server = config.generation.server
    token = os.environ.get(server.token_env, "")
    if not token:
        raise ConfigError(f"generation.server.token_env: environment variable {server.token_env} is empty or unset; "
                          "set it to the token the server was started with")
    client = ServerGeneration(server.url, token, retry_budget_s=server.retry_budget_s,
                              request_timeout_s=server.request_timeout_s, weight_sync=server.weight_sync,
                              weight_bucket_mb=config.generation.vllm.weight_bucket_mb,
                              stream_refinements=config.generation.vllm.stream_refinements,
                              inflight_updates=config.rollout.inflight_updates)
    client.wait_until_ready()
    if model is not None and client.weight_sync != "none":
        client.update_weights(model.state_dict().items())
    return client


def build_generation(config: Config, model: torch.nn.Module | None, pad_token_id: int) -> GenerationBackend:
    """The generation backend named by ``generation.backend``, starting from ``model``'s weights."""
    return GENERATION_BACKENDS[config.generation.backend].builder()(config, model, pad_token_id)


# ---------------------------------------------------------------------------------------------- a whole run


def build_warm_start_policy(config: Config, model: torch.nn.Module) -> PolicyBackend:
    """The warm start's own policy over ``model``: its learning rate, a fresh optimizer for ``warm_start.steps``,
    no reference, and log-probs at temperature 1 (plain NLL of the reference solutions)."""
    ws = config.warm_start
    optim = dataclasses.replace(config.optim, lr=ws.lr, weight_decay=0.0, betas=[0.9, 0.99], max_grad_norm=1.0,
                                warmup_ratio=0.05, min_lr_ratio=0.1)
    return build_policy(config, model, optim=optim, total_steps=ws.steps, use_reference=False, temperature=1.0)


def warm_start_model(config: Config, model: torch.nn.Module, train_set: list[Example], template: PromptBuilder,
                     tokenizer, console) -> None:
    """``warm_start.steps`` supervised steps on ``model`` in place (``nemo_igrpo.warm_start``)."""
    from nemo_igrpo.models import stop_token_ids
    from nemo_igrpo.warm_start import ModelDrafts, warm_start

    ws, policy = config.warm_start, build_warm_start_policy(config, model)
    own = None
    if ws.refinement_fraction > 0 and ws.draft_mix.get("own", 0.0) > 0:  # drafts sampled from the warmed model
        sampling = dataclasses.replace(build_rollout_settings(config, stop_token_ids(tokenizer, model)).sampling, n=1)
        own = ModelDrafts(build_generation(config, model, tokenizer.pad_token_id), policy, template,
                          lambda ids: tokenizer.decode(ids, skip_special_tokens=True), sampling)
    try:
        warm_start(policy, model, train_set, template, tokenizer, ws, config.trainer.seed, console, own)
    finally:
        if own is not None:
            own.generator.close()


def build_producer(config: Config, collector: BatchCollector, source: ShardedSource) -> RolloutProducer:
    """The rollout producer the ``rollout`` section asks for (synchronous, draft-ahead or asynchronous), around the
    bound rollout ``collector`` and this rank's prompt ``source``; with a token budget per micro-batch it re-deals
    every batch over the data-parallel ranks by tokens. A resumed run then calls its ``resume_at``."""
    from nemo_igrpo.rollout_producer import make_producer

    return make_producer(collector, source, draft_ahead=config.rollout.draft_ahead,
                         max_off_policy_steps=config.rollout.max_off_policy_steps,
                         inflight_updates=config.rollout.inflight_updates,
                         balance_tokens=config.policy.max_tokens_per_micro_batch is not None,
                         max_steps=config.trainer.max_steps)


@dataclass
class Run:
    """Every component the training loop uses, built once from one config."""

    tokenizer: object
    template: PromptBuilder
    train_set: list[Example]
    heldout: list[Example]
    reward: Reward
    policy: PolicyBackend
    generator: GenerationBackend
    producer: RolloutProducer  # each step's batch, and the weight sync
    eval_sampling: SamplingParams
    loss: LossSpec

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def close(self) -> None:
        self.producer.close()  # a background rollout finishes before the generator goes
        self.generator.close()
        self.reward.close()  # e.g. a grading process pool


def build_run(config: Config, *, warm_start: bool, console) -> Run:
    """Tokenizer, data, reward, policy (after the warm start when ``warm_start.steps > 0``: run when ``warm_start``,
    else the stored warm-started weights of the run being resumed), generator and rollout producer, in the order
    that fails fastest: settings that cannot work are refused before any training."""
    from nemo_igrpo import distributed
    from nemo_igrpo.data.dataset import PromptSampler
    from nemo_igrpo.models import load_model, load_tokenizer, stop_token_ids
    from nemo_igrpo.sharding import ShardedSource
    from nemo_igrpo.validation import check_rollout_parallelism

    tokenizer = load_tokenizer(config.model)
    template = build_template(config.prompt, tokenizer)
    train_set, heldout = load_datasets(config, template)
    reward = build_training_reward(config)
    try:
        model = load_model(config.model, tokenizer)
        check_policy(config, model)  # e.g. parallel sizes that do not divide: fail before the warm start
        if config.warm_start.steps > 0:  # a resumed run (warm_start=False) loads the base its run stored
            from nemo_igrpo.warm_start import warm_started_base
            warm_started_base(config, model, fresh=warm_start, console=console,
                              train=lambda: warm_start_model(config, model, train_set, template, tokenizer, console))
        policy = build_policy(config, model)
        # this rank's prompts; refuses a prompts_per_step that does not split over the data-parallel ranks
        source = ShardedSource(PromptSampler(train_set, seed=config.trainer.seed), config.trainer.prompts_per_step,
                               policy.data_parallel_group)
        peers = policy.model_parallel_group
        check_rollout_parallelism(config, distributed.world_size(peers) if peers is not None else 1, source.world)
        generator = build_generation(config, model, tokenizer.pad_token_id)
    except BaseException:
        reward.close()
        raise
    generator.set_rollout_peers(policy.model_parallel_group)  # TP/PP peers must train on identical samples
    stops = stop_token_ids(tokenizer, model)
    collector = BatchCollector(generator, reward, template, lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
                               build_rollout_settings(config, stops), tokenizer.pad_token_id)
    return Run(tokenizer=tokenizer, template=template, train_set=train_set, heldout=heldout, reward=reward,
               policy=policy, generator=generator, producer=build_producer(config, collector, source),
               eval_sampling=build_eval_sampling(config, stops), loss=build_loss(config))

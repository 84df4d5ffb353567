"""Config → backend instances. The training loop calls these and never looks at which backend it got.

Each backend registers a builder here under the name used in ``policy.backend`` / ``generation.backend``.
Heavy engines (vLLM, Megatron-Core) are imported inside their builders only.
"""

from __future__ import annotations

import copy
import math
from typing import Callable

import torch

from nemo_igrpo.config import Config, OptimConfig
from nemo_igrpo.generation.base import GenerationBackend
from nemo_igrpo.models import resolve_device
from nemo_igrpo.policy.base import PolicyBackend


def _training_arguments(config: Config, optim: OptimConfig, total_steps: int) -> dict:
    """What every policy backend needs for its optimizer, schedule and loss (same math whichever backend)."""
    return dict(
        lr=optim.lr,
        weight_decay=optim.weight_decay,
        betas=(optim.betas[0], optim.betas[1]),
        max_grad_norm=optim.max_grad_norm,
        warmup_steps=math.ceil(optim.warmup_ratio * total_steps),
        total_steps=total_steps,
        min_lr_ratio=optim.min_lr_ratio,
        micro_batch_size=config.policy.micro_batch_size,
        max_tokens_per_micro_batch=config.policy.max_tokens_per_micro_batch,
        sequence_packing=config.policy.sequence_packing,
        temperature=config.generation.temperature,
        use_reference=config.algorithm.kl_coef > 0,
    )


def _hf_policy(config: Config, model: torch.nn.Module, optim: OptimConfig, total_steps: int) -> PolicyBackend:
    from nemo_igrpo.policy.hf import HFPolicy

    return HFPolicy(
        model,
        **_training_arguments(config, optim, total_steps),
        logprob_chunk_size=config.policy.logprob_chunk_size,
        gradient_checkpointing=config.policy.gradient_checkpointing,
        autocast_dtype="bfloat16" if config.policy.precision == "bf16" else None,
        device=resolve_device(config.policy.device),
        lora=config.policy.lora,
    )


def _megatron_policy(config: Config, model: torch.nn.Module, optim: OptimConfig, total_steps: int) -> PolicyBackend:
    from nemo_igrpo.policy.megatron.policy import MegatronPolicy

    return MegatronPolicy(
        model,
        megatron=config.policy.megatron,
        **_training_arguments(config, optim, total_steps),
        bf16=config.policy.precision == "bf16",
        seed=config.trainer.seed,
    )


def _hf_generation(config: Config, model: torch.nn.Module, pad_token_id: int) -> GenerationBackend:
    from nemo_igrpo.generation.hf import HFGeneration

    # The generator keeps its own copy: weights reach it only through update_weights, as with any engine.
    engine_model = copy.deepcopy(model).eval()
    return HFGeneration(engine_model, pad_token_id=pad_token_id, batch_size=config.generation.batch_size,
                        device=resolve_device(config.policy.device))


def _vllm_generation(config: Config, model: torch.nn.Module, pad_token_id: int) -> GenerationBackend:
    from nemo_igrpo.generation.vllm import build_vllm_generation

    return build_vllm_generation(config, model)  # token ids in/out: no pad token needed


def _server_generation(config: Config, model: torch.nn.Module, pad_token_id: int) -> GenerationBackend:
    from nemo_igrpo.generation.server import build_server_generation

    return build_server_generation(config, model)


POLICY_BUILDERS: dict[str, Callable[..., PolicyBackend]] = {"hf": _hf_policy, "megatron": _megatron_policy}
GENERATION_BUILDERS: dict[str, Callable[..., GenerationBackend]] = {
    "hf": _hf_generation, "vllm": _vllm_generation, "server": _server_generation}


def _megatron_check(config: Config, model: torch.nn.Module) -> None:
    from nemo_igrpo.policy.megatron.parallel import validate_sizes
    from nemo_igrpo.policy.megatron.spec import resolve_impl

    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    validate_sizes(config.policy.megatron, world, model.config, resolve_impl(config.policy.megatron.transformer_impl))


# Cheap checks of a backend's settings against the model and the world size, run before any training work.
POLICY_CHECKS: dict[str, Callable[[Config, torch.nn.Module], None]] = {"megatron": _megatron_check}


def check_policy(config: Config, model: torch.nn.Module) -> None:
    """Raise ConfigError (naming the key) when ``policy.*`` cannot work with this model and world size."""
    check = POLICY_CHECKS.get(config.policy.backend)
    if check is not None:
        check(config, model)


def build_policy(config: Config, model: torch.nn.Module, optim: OptimConfig | None = None,
                 total_steps: int | None = None) -> PolicyBackend:
    """The policy backend named by ``policy.backend``; ``optim``/``total_steps`` default to the RL settings.

    ``total_steps`` counts optimizer steps, as the LR schedule does: each of a training step's
    ``algorithm.ppo_epochs`` updates steps the schedule (as in TRL and veRL), so the RL run has
    ``max_steps × ppo_epochs`` of them and warmup is a fraction of those.
    """
    if total_steps is None:
        total_steps = config.trainer.max_steps * config.algorithm.ppo_epochs
    return POLICY_BUILDERS[config.policy.backend](config, model, optim or config.optim, total_steps)


def build_generation(config: Config, model: torch.nn.Module, pad_token_id: int) -> GenerationBackend:
    return GENERATION_BUILDERS[config.generation.backend](config, model, pad_token_id)

"""Value checks of a loaded ``Config`` that the type system cannot express; each error names its key.

Registry-backed keys (losses, advantages, rewards, backends, ...) are checked against the live registries
(``nemo_igrpo.registry``), so a choice a user registered before loading the config is accepted. What a backend can
do is read from its registry entry (``nemo_igrpo.backends``), never from its name; this module does not import the
assembly. Every check of ``rollout.*`` is here: ``_check_rollout`` at load time, ``check_rollout_parallelism`` once
the assembly knows the parallel sizes.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

# These modules hold the registries behind config keys (algorithm.*, reward.components, *.backend, eval.protocol,
# trainer.loggers); importing them registers the built-ins. None of them imports the config schema at run time.
from nemo_igrpo import algorithms, rewards, tracking  # noqa: F401
from nemo_igrpo.backends import GENERATION_BACKENDS, POLICY_BACKENDS
from nemo_igrpo.data import drafts  # noqa: F401  (warm_start.draft_mix's kinds)
from nemo_igrpo.errors import ConfigError
from nemo_igrpo.evaluation import protocols  # noqa: F401
from nemo_igrpo.registry import config_registries
from nemo_igrpo.rewards import REWARDS

if TYPE_CHECKING:
    from nemo_igrpo.config import Config, PolicyConfig

# String keys with a closed set of values fixed by the implementation. Pluggable choices (losses, advantages, KL
# estimators, aggregations, tie-breaks, importance corrections, presets, rewards, backends, eval protocols, loggers)
# are not listed here: validation reads their live registries (``nemo_igrpo.registry``), so a user's own
# ``@register_*`` is accepted once its module is imported.
CHOICES: dict[str, tuple[str, ...]] = {
    "prompt.draft_content": ("full", "answer_only"),
    "reward.extract": ("boxed", "answer_tag", "boxed_or_tag"),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "policy.precision": ("fp32", "bf16"),
    "generation.server.weight_sync": ("auto", "nccl", "shm", "none"),
    "rollout.inflight_updates": ("wait", "keep"),
    "policy.megatron.recompute": ("none", "selective", "full"),
    "policy.megatron.transformer_impl": ("auto", "transformer_engine", "local"),
    "policy.megatron.fp8": ("none", "hybrid", "e4m3"),
    "policy.megatron.fp8_recipe": ("delayed", "current"),
    "trainer.wandb.mode": ("online", "offline", "disabled"),
}


def validate(config: Config) -> None:
    """Value checks the type system cannot express; each error names its key. Numeric ranges are declared next to
    each field in ``config.py`` and checked first (``check_ranges``); what follows relates keys to each other."""
    check_ranges(config)
    for key, allowed in CHOICES.items():
        value = _get(config, key)
        if value not in allowed:
            hint = difflib.get_close_matches(str(value), allowed, n=1)
            suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(allowed)}{suggestion}")
    _check_registered(config)
    if not config.reward.components:
        raise ConfigError("reward.components: give at least one reward, e.g. {boxed_match: 1.0}")
    _check_chat_model_rewards(config)
    for name, weight in config.reward.components.items():
        if not math.isfinite(weight):
            raise ConfigError(f"reward.components.{name}: the weight must be finite, got {weight}")
    if config.reward.overlong_buffer >= config.generation.max_new_tokens:
        raise ConfigError(f"reward.overlong_buffer: must be below generation.max_new_tokens "
                          f"({config.generation.max_new_tokens}), got {config.reward.overlong_buffer}")
    _check_micro_batching(config.policy)
    _check_rollout(config)
    _check_draft_loss(config)
    if config.algorithm.skip_solved_by_drafts and config.algorithm.num_drafts == 0:
        raise ConfigError("algorithm.skip_solved_by_drafts: needs Stage-1 drafts, but algorithm.num_drafts is 0 "
                          "(GRPO); set algorithm.skip_solved_by_drafts=false")
    mix = config.warm_start.draft_mix
    if any(not math.isfinite(v) or v < 0 for v in mix.values()) or not sum(mix.values()) > 0:
        raise ConfigError(f"warm_start.draft_mix: shares must be finite and >= 0 with a positive sum, got {mix}")
    if len(config.optim.betas) != 2:
        raise ConfigError(f"optim.betas: needs two values, got {config.optim.betas}")
    if config.trainer.resume not in ("none", "auto") and not Path(config.trainer.resume).exists():
        raise ConfigError(f"trainer.resume: must be none, auto or an existing checkpoint path, "
                          f"got {config.trainer.resume!r}")


_LIMITS = {"ge": (">=", lambda v, b: v >= b), "gt": (">", lambda v, b: v > b),
           "le": ("<=", lambda v, b: v <= b), "lt": ("<", lambda v, b: v < b)}


def check_ranges(section: Any, prefix: str = "") -> None:
    """Every number in the config (each item of a list of numbers too) is finite and within the range its field
    declares in ``config.py`` (``ranged``: metadata ``ge``/``gt``/``le``/``lt``); null passes where the type allows it.
    NaN fails every comparison, so it is refused by name before the range is looked at."""
    for f in dataclasses.fields(section):
        value, key = getattr(section, f.name), prefix + f.name
        if dataclasses.is_dataclass(value):
            check_ranges(value, f"{key}.")
            continue
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, bool) or not isinstance(item, (int, float)):
                continue
            if not math.isfinite(item):
                raise ConfigError(f"{key}: must be a finite number, got {item}")
            limits = [(op, ok, f.metadata[name]) for name, (op, ok) in _LIMITS.items() if name in f.metadata]
            if not all(ok(item, bound) for _, ok, bound in limits):
                wanted = " and ".join(f"{op} {bound}" for op, _, bound in limits)
                raise ConfigError(f"{key}: must be {wanted}, got {item}")


def _check_chat_model_rewards(config: Config) -> None:
    backend = config.generation.backend
    for name in config.reward.components:
        if GENERATION_BACKENDS[backend].policy_only and getattr(REWARDS[name], "uses_chat_model", False):
            raise ConfigError(f"reward.components.{name}: needs a model of its own, but generation.backend={backend} "
                              "would lend it the policy's generation server (the judge's weights pushed into it, or "
                              "graded with the policy's weights); use generation.backend=hf or vllm with this reward, "
                              "or a rule reward such as math_verify")


def _check_registered(config: Config) -> None:
    """Every registry-backed key names something registered: a string value, each item of a list
    (``trainer.loggers``) or each key of a mapping (``reward.components``); null means "none" where allowed."""
    for key, registry in config_registries().items():
        value = _get(config, key)
        names = value if isinstance(value, (list, dict)) else [] if value is None else [value]
        for name in names:
            registry.check(name, key)


def _check_rollout(config: Config) -> None:
    rollout, k = config.rollout, config.rollout.max_off_policy_steps
    if k > 0 and rollout.draft_ahead:
        raise ConfigError("rollout.draft_ahead and rollout.max_off_policy_steps > 0 are alternatives (asynchronous "
                          "rollouts already generate both stages ahead); set one of them")
    if k > 0 and config.algorithm.importance_correction == "none":
        raise ConfigError(f"rollout.max_off_policy_steps={k} trains on samples up to {k} policy versions old, which "
                          "needs algorithm.importance_correction (token or sequence: truncated importance sampling "
                          "against the generator's log-probs); it is none")
    key = "rollout.max_off_policy_steps" if k > 0 else "rollout.draft_ahead" if rollout.draft_ahead else None
    if key is None:
        if rollout.inflight_updates == "keep":
            raise ConfigError("rollout.inflight_updates=keep: nothing is generating when the weights change unless "
                              "rollouts overlap the update (rollout.draft_ahead=true or rollout.max_off_policy_steps "
                              "> 0); set rollout.inflight_updates=wait")
        return
    off = "rollout.max_off_policy_steps=0" if k > 0 else "rollout.draft_ahead=false"
    if not GENERATION_BACKENDS[config.generation.backend].overlaps_training:
        raise ConfigError(f"{key}: generation.backend={config.generation.backend} generates in the trainer's process "
                          "on the trainer's device, so rollouts generated ahead would only queue behind the update "
                          "instead of overlapping it; use generation.backend=server (generation in its own process "
                          f"or device) or set {off}")
    if rollout.draft_ahead and config.algorithm.num_drafts == 0:
        raise ConfigError("rollout.draft_ahead: needs Stage-1 drafts, but algorithm.num_drafts is 0 (GRPO has no "
                          "drafts to generate ahead); set rollout.draft_ahead=false")


def check_rollout_parallelism(config: Config, model_parallel_size: int, data_parallel_size: int) -> None:
    """The ``rollout.*`` checks that need the launch's parallel sizes (the assembly calls this once the policy knows
    them): overlapping producers run jobs that no collective may join, and asynchronous rollouts cannot keep the
    samplers of several data-parallel ranks aligned under dynamic sampling."""
    k = config.rollout.max_off_policy_steps
    key = "rollout.max_off_policy_steps" if k > 0 else "rollout.draft_ahead" if config.rollout.draft_ahead else None
    if key is None:
        return
    if model_parallel_size > 1:
        raise ConfigError(f"{key}: not supported with tensor/pipeline-parallel peers "
                          "(policy.megatron.*_parallel_size > 1): peers share one generation request through "
                          f"collectives, which cannot run beside the update; turn {key} off")
    for refill in ("dynamic_sampling", "skip_solved_by_drafts"):
        if k > 0 and data_parallel_size > 1 and getattr(config.algorithm, refill):
            raise ConfigError(f"rollout.max_off_policy_steps > 0 with several data-parallel ranks: not supported with "
                              f"algorithm.{refill} (ranks would draw different numbers of prompts ahead of the steps "
                              f"that align them); set algorithm.{refill}=false or rollout.max_off_policy_steps=0")


def _check_draft_loss(config: Config) -> None:
    algorithm, weight = config.algorithm, config.algorithm.draft_loss_weight  # finite and >= 0: the schema's range
    if weight == 0:
        return
    if algorithm.num_drafts < 2:
        raise ConfigError(f"algorithm.draft_loss_weight={weight}: the drafts of a problem are its group, which needs "
                          f"algorithm.num_drafts >= 2 (got {algorithm.num_drafts})")
    for key, on in (("algorithm.dynamic_sampling", algorithm.dynamic_sampling),
                    ("rollout.draft_ahead", config.rollout.draft_ahead)):
        if on:  # dropped groups would leave their drafts behind; drafts made ahead are a policy version old
            raise ConfigError(f"algorithm.draft_loss_weight={weight} is not supported with {key}; set one of them off")


def _check_micro_batching(policy: PolicyConfig) -> None:
    if policy.sequence_packing and policy.max_tokens_per_micro_batch is None:
        raise ConfigError("policy.sequence_packing: needs policy.max_tokens_per_micro_batch (the packed row length)")
    if policy.shared_prefix and not POLICY_BACKENDS[policy.backend].shared_prefix:
        supported = ", ".join(name for name, entry in POLICY_BACKENDS.items() if entry.shared_prefix)
        raise ConfigError(f"policy.shared_prefix=true: only policy.backend={supported} computes a group's prefix once "
                          f"(Megatron needs an arbitrary attention mask path, see docs/megatron.md); set "
                          f"policy.shared_prefix=false for policy.backend={policy.backend}")
    lora = policy.lora
    if not lora.target_modules:
        raise ConfigError("policy.lora.target_modules: name at least one module (e.g. [q_proj, v_proj])")
    if lora.rank > 0 and not POLICY_BACKENDS[policy.backend].lora:
        supported = ", ".join(name for name, entry in POLICY_BACKENDS.items() if entry.lora)
        raise ConfigError(f"policy.lora.rank > 0: LoRA is only supported with policy.backend={supported}; set "
                          f"policy.lora.rank=0 for {policy.backend}")


def _get(config: Config, dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return value

"""The backend registries, and what each backend can do: a light module below the config schema.

``policy.backend`` and ``generation.backend`` name entries here. Each entry declares its capabilities, which config
validation and the recipe planner read instead of matching backend names, and where its builder is: a callable, or
``"module:function"``, imported only when a run builds the backend. Validating a config therefore never imports an
engine (vLLM, Megatron-Core) or the assembly, whose builders the built-in entries name.

A backend of your own: ``POLICY_BACKENDS.register("mine", PolicyBackendEntry(build=my_builder, lora=True))`` (or a
``GenerationBackendEntry``) in your module, imported before ``load_config``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

from nemo_igrpo.registry import Registry


def _resolve(target: Callable | str) -> Callable:
    """A callable, or the function a ``"module:function"`` string names (imported now)."""
    if callable(target):
        return target
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class PolicyBackendEntry:
    """A policy backend: its builder, an optional cheap check, and its capabilities."""

    build: Callable[..., Any] | str  # (config, model, TrainingArguments) -> PolicyBackend
    check: Callable[..., None] | str | None = None  # (config, model) -> None: raise ConfigError before training work
    lora: bool = False  # trains LoRA adapters (policy.lora.rank > 0)
    model_parallel: bool = False  # splits the model: policy.megatron.{tensor,pipeline,context}_parallel_size apply
    shared_prefix: bool = False  # computes a group's common prefix once (policy.shared_prefix)

    def builder(self) -> Callable[..., Any]:
        return _resolve(self.build)

    def checker(self) -> Callable[..., None] | None:
        return None if self.check is None else _resolve(self.check)


@dataclass(frozen=True)
class GenerationBackendEntry:
    """A generation backend: its builder and its capabilities."""

    build: Callable[..., Any] | str  # (config, model, pad_token_id) -> GenerationBackend
    # Generates outside the trainer's process and device, so work generated ahead (rollout.draft_ahead,
    # rollout.max_off_policy_steps) overlaps the update instead of queueing behind it.
    overlaps_training: bool = False
    own_nodes: bool = False  # runs on nodes of its own (a launch plans them beside the training nodes)
    vllm_context: bool = False  # a vLLM engine: generation.vllm.max_model_len bounds its sequences
    # Serves the policy's one model: a reward cannot get a second engine on it (a judge would push its weights into
    # the policy's server, or with weight_sync none grade with the policy's weights).
    policy_only: bool = False

    def builder(self) -> Callable[..., Any]:
        return _resolve(self.build)


POLICY_BACKENDS: Registry[PolicyBackendEntry] = Registry("policy backend", "policy.backend")
GENERATION_BACKENDS: Registry[GenerationBackendEntry] = Registry("generation backend", "generation.backend")

POLICY_BACKENDS.register("hf", PolicyBackendEntry("nemo_igrpo.assembly:_hf_policy", lora=True, shared_prefix=True))
POLICY_BACKENDS.register("megatron", PolicyBackendEntry("nemo_igrpo.assembly:_megatron_policy",
                                                        "nemo_igrpo.assembly:_megatron_check", model_parallel=True))
GENERATION_BACKENDS.register("hf", GenerationBackendEntry("nemo_igrpo.assembly:_hf_generation"))
GENERATION_BACKENDS.register("vllm", GenerationBackendEntry("nemo_igrpo.assembly:_vllm_generation", vllm_context=True))
GENERATION_BACKENDS.register("server", GenerationBackendEntry("nemo_igrpo.assembly:_server_generation",
                                                              overlaps_training=True, own_nodes=True,
                                                              vllm_context=True, policy_only=True))

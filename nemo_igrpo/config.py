"""One typed schema for every run, loaded from YAML with ``key=value`` overrides.

Precedence (lowest first): the defaults below → the YAML file → command-line overrides. An algorithm preset
(``algorithm.preset``) is applied just below the layer that names it, so ``algorithm.preset=grpo`` on the command
line turns a fully spelled-out iGRPO YAML into GRPO, while keys given next to it still win. Every default lives
here and nowhere else. Unknown keys and wrong types are rejected before any model is built, with the key's full
name and the closest valid key.

The defaults are the paper's hyperparameters (arXiv 2602.09000, Table S.2) wherever the paper states one, except
three that are chosen for a first run on a CPU, where bf16 is slow and memory is not the limit: ``model.dtype``
(float32), ``policy.precision`` (fp32) and ``policy.gradient_checkpointing`` (off). The paper trains in bf16 with
gradient checkpointing; the recipes in ``conf/recipes/`` set all three. The embedded CPU demo that
``nemo-igrpo train`` runs without ``--config`` is ``conf/quickstart.yaml``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from nemo_igrpo.algorithms.presets import PRESETS
from nemo_igrpo.errors import ConfigError  # noqa: F401  (re-exported: ``from nemo_igrpo.config import ConfigError``)


@dataclass
class TinyModelConfig:
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    max_position_embeddings: int = 512


@dataclass
class ModelConfig:
    path: str = "builtin:tiny-llama"
    tokenizer: str | None = None
    dtype: str = "float32"
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)


@dataclass
class ArithmeticConfig:
    seed: int = 1234
    num_train: int = 4000
    num_heldout: int = 200
    max_operand: int = 30
    unboxed_fraction: float = 0.0
    min_steps: int = 2  # builtin:chain only: operations per problem are drawn from min_steps..max_steps
    max_steps: int = 4


@dataclass
class DataConfig:
    train: str = "builtin:arithmetic"
    eval: str | None = "builtin:arithmetic"
    problem_key: str = "problem"
    answer_key: str = "answer"
    solution_key: str | None = None
    train_split: str = "train"
    eval_split: str = "test"
    max_prompt_tokens: int = 1024
    arithmetic: ArithmeticConfig = field(default_factory=ArithmeticConfig)


@dataclass
class PromptConfig:
    system_prompt: str | None = "paper"
    draft_header: str = "Previous draft (may contain mistakes):"
    draft_content: str = "full"


@dataclass
class JudgeConfig:
    model: str | None = None
    template: str = "judge/math_judge.txt"
    max_new_tokens: int = 8
    max_completion_chars: int = 4000


@dataclass
class RewardConfig:
    components: dict[str, float] = field(default_factory=lambda: {"math_verify": 1.0, "format": 1.0})
    extract: str = "boxed_or_tag"
    num_workers: int = 2
    timeout_s: float = 5.0
    overlong_buffer: int = 0
    overlong_penalty: float = 1.0
    judge: JudgeConfig = field(default_factory=JudgeConfig)


@dataclass
class AlgorithmConfig:
    preset: str = "igrpo"
    num_drafts: int = 4
    num_refinements: int = 4
    tie_break: str = "first"
    advantage: str = "grpo"
    adv_eps: float = 1e-6
    policy_loss: str = "ppo"
    eps_low: float = 0.2
    eps_high: float = 0.2
    dual_clip: float | None = None
    loss_agg: str = "seq-mean-token-mean"
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    kl_clamp: float | None = 10.0
    ppo_epochs: int = 1
    dynamic_sampling: bool = False
    max_sampling_rounds: int = 4
    overlong_filter: bool = False
    importance_correction: str = "none"
    importance_cap: float = 2.0


@dataclass
class VLLMConfig:
    gpu_memory_utilization: float = 0.5
    tensor_parallel_size: int = 1
    enforce_eager: bool = False
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    sleep_mode: bool = False
    dtype: str = "auto"
    stream_refinements: bool = True
    weight_bucket_mb: int = 512


@dataclass
class ServerConfig:
    url: str = "http://127.0.0.1:8000"
    token_env: str = "NEMO_IGRPO_SERVER_TOKEN"
    retry_budget_s: float = 300.0
    request_timeout_s: float = 3600.0
    weight_sync: str = "auto"


@dataclass
class GenerationConfig:
    backend: str = "hf"
    temperature: float = 0.7
    top_p: float = 1.0
    max_new_tokens: int = 4096
    batch_size: int = 64
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    server: ServerConfig = field(default_factory=ServerConfig)


@dataclass
class MegatronConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    context_parallel_size: int = 1
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = True
    recompute: str = "none"
    transformer_impl: str = "auto"
    fp8: str = "none"
    fp8_recipe: str = "delayed"
    async_save: bool = False
    make_vocab_size_divisible_by: int = 1


@dataclass
class LoraConfig:
    rank: int = 0  # 0: full fine-tuning
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])


@dataclass
class PolicyConfig:
    backend: str = "hf"
    micro_batch_size: int = 16
    max_tokens_per_micro_batch: int | None = None  # None: micro-batches of micro_batch_size rows
    sequence_packing: bool = False
    logprob_chunk_size: int = 2048
    gradient_checkpointing: bool = False
    precision: str = "fp32"
    device: str = "auto"
    megatron: MegatronConfig = field(default_factory=MegatronConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class OptimConfig:
    lr: float = 1e-6
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    max_grad_norm: float = 1.0
    warmup_ratio: float = 0.1
    min_lr_ratio: float = 0.1


@dataclass
class WarmStartConfig:
    steps: int = 0
    lr: float = 1e-4
    batch_size: int = 64
    refinement_fraction: float = 0.0


@dataclass
class EvalConfig:
    datasets: list[str] = field(default_factory=list)
    model: str | None = None
    num_problems: int | None = None
    samples_per_problem: int = 1
    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int | None = None
    output_dir: str | None = None
    protocol: str | None = None
    benchmarks_dir: str | None = None
    max_samples_per_problem: int | None = None


@dataclass
class WandbConfig:
    project: str = "nemo-igrpo"
    entity: str | None = None
    name: str | None = None
    mode: str = "online"


@dataclass
class MlflowConfig:
    tracking_uri: str | None = None
    experiment: str = "nemo-igrpo"
    run_name: str | None = None


@dataclass
class TrainerConfig:
    max_steps: int = 60
    prompts_per_step: int = 128
    seed: int = 0
    output_dir: str = "runs/igrpo"
    eval_every: int = 10
    save_every: int = 10
    keep_last: int = 2
    resume: str = "auto"
    max_consecutive_nan_steps: int = 3
    progress: bool = True
    loggers: list[str] = field(default_factory=lambda: ["tensorboard"])
    wandb: WandbConfig = field(default_factory=WandbConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    dist_timeout_s: float = 1800.0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    warm_start: WarmStartConfig = field(default_factory=WarmStartConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


# Mapping-valued keys that a layer replaces whole: `reward.components: {boxed_match: 1.0}` means only boxed_match.
REPLACED_MAPPINGS = ("reward.components",)

# String keys with a closed set of values (registries of later backends extend theirs at import time).
CHOICES: dict[str, tuple[str, ...]] = {
    "algorithm.preset": tuple(PRESETS),
    "algorithm.tie_break": ("first", "random"),
    "algorithm.advantage": ("grpo", "drgrpo", "rloo"),
    "algorithm.policy_loss": ("ppo", "gspo", "cispo"),
    "algorithm.loss_agg": ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"),
    "algorithm.kl_estimator": ("k1", "k2", "k3"),
    "prompt.draft_content": ("full", "answer_only"),
    "reward.extract": ("boxed", "answer_tag", "boxed_or_tag"),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "policy.precision": ("fp32", "bf16"),
    "algorithm.importance_correction": ("none", "token", "sequence"),
    "generation.backend": ("hf", "vllm", "server"),
    "generation.server.weight_sync": ("auto", "nccl", "shm", "none"),
    "policy.backend": ("hf", "megatron"),
    "policy.megatron.recompute": ("none", "selective", "full"),
    "policy.megatron.transformer_impl": ("auto", "transformer_engine", "local"),
    "policy.megatron.fp8": ("none", "hybrid", "e4m3"),
    "policy.megatron.fp8_recipe": ("delayed", "current"),
    "trainer.wandb.mode": ("online", "offline", "disabled"),
}
LOGGERS = ("tensorboard", "wandb", "mlflow")  # trainer.loggers: any subset


# ---------------------------------------------------------------------------------------------- loading


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults ← preset ← YAML file ``path`` ← ``overrides`` (``a.b=value`` dotlist), validated and typed."""
    layers: list[tuple[str, dict]] = []
    if path is not None:
        layers.append((str(path), _read_yaml(Path(path))))
    if overrides:
        layers.append(("command line", _parse_overrides(overrides)))
    for source, data in layers:
        _check_keys(data, Config, source, prefix="")

    merged = OmegaConf.structured(Config)
    for source, data in layers:
        preset = (data.get("algorithm") or {}).get("preset")
        if preset is not None:  # a preset sits just below the layer that names it: that layer and later ones win
            if preset not in PRESETS:
                raise ConfigError(f"{source}: algorithm.preset: unknown preset {preset!r}; "
                                  f"valid: {', '.join(PRESETS)}")
            merged = _merge(merged, {"algorithm": preset_values(preset)}, f"preset {preset}")
        for key in REPLACED_MAPPINGS:  # a layer that sets one of these gives all of it, not a key-wise update
            if OmegaConf.select(OmegaConf.create(data), key) is not None:
                OmegaConf.update(merged, key, {}, merge=False)
        merged = _merge(merged, data, source)
    config: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    validate(config)
    return config


def preset_values(name: str) -> dict[str, Any]:
    """Every key any preset sets, at this preset's value (schema default where it sets none), so that naming a
    preset fully replaces an earlier one: ``igrpo`` after a YAML with ``grpo`` restores N = 4, G = 4."""
    defaults = AlgorithmConfig()
    controlled = {key for diff in PRESETS.values() for key in diff}
    return {**{key: getattr(defaults, key) for key in controlled}, **PRESETS[name], "preset": name}


def _merge(base: DictConfig, data: dict, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, data)  # type: ignore[return-value]
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None) or "?"
        raise ConfigError(f"{source}: {key}: {_first_line(error)}") from None


def _check_micro_batching(policy: PolicyConfig) -> None:
    if policy.max_tokens_per_micro_batch is not None and policy.max_tokens_per_micro_batch < 1:
        raise ConfigError(f"policy.max_tokens_per_micro_batch: must be >= 1 (or null), "
                          f"got {policy.max_tokens_per_micro_batch}")
    if policy.sequence_packing and policy.max_tokens_per_micro_batch is None:
        raise ConfigError("policy.sequence_packing: needs policy.max_tokens_per_micro_batch (the packed row length)")
    lora = policy.lora
    if lora.rank < 0 or not 0 <= lora.dropout < 1 or not lora.target_modules:
        raise ConfigError(f"policy.lora: rank must be >= 0, dropout in [0, 1), target_modules non-empty; got {lora}")
    if lora.rank > 0 and policy.backend == "megatron":
        raise ConfigError("policy.lora.rank > 0: LoRA is only supported with policy.backend=hf; set policy.lora.rank=0 "
                          "for Megatron")


def validate(config: Config) -> None:
    """Value checks the type system cannot express; each error names its key."""
    from nemo_igrpo.rewards import REWARDS  # registered rewards, including any a user registered before loading

    for key, allowed in CHOICES.items():
        value = _get(config, key)
        if value not in allowed:
            hint = difflib.get_close_matches(str(value), allowed, n=1)
            suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(allowed)}{suggestion}")
    if not config.reward.components:
        raise ConfigError("reward.components: give at least one reward, e.g. {boxed_match: 1.0}")
    for name, weight in config.reward.components.items():
        if name not in REWARDS:
            hint = difflib.get_close_matches(name, list(REWARDS), n=1)
            suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ConfigError(f"reward.components: unknown reward {name!r}{suggestion}; "
                              f"registered: {', '.join(sorted(REWARDS))}")
        if not math.isfinite(weight):
            raise ConfigError(f"reward.components.{name}: the weight must be finite, got {weight}")
    if config.reward.overlong_buffer >= config.generation.max_new_tokens:
        raise ConfigError(f"reward.overlong_buffer: must be below generation.max_new_tokens "
                          f"({config.generation.max_new_tokens}), got {config.reward.overlong_buffer}")
    if config.eval.protocol is not None:
        from nemo_igrpo.evaluation.protocols import PROTOCOLS  # imports this module, so only here

        if config.eval.protocol not in PROTOCOLS:
            raise ConfigError(f"eval.protocol: {config.eval.protocol!r} is not one of "
                              f"{', '.join(PROTOCOLS)} (or null)")
    if config.reward.timeout_s <= 0:
        raise ConfigError(f"reward.timeout_s: must be > 0, got {config.reward.timeout_s}")
    positive = ["reward.num_workers", "reward.judge.max_new_tokens", "reward.judge.max_completion_chars",
                "algorithm.num_refinements", "generation.max_new_tokens", "generation.batch_size",
                "policy.micro_batch_size", "policy.logprob_chunk_size", "trainer.prompts_per_step",
                "trainer.keep_last", "algorithm.ppo_epochs", "algorithm.max_sampling_rounds",
                "eval.samples_per_problem", "data.max_prompt_tokens",
                "generation.vllm.tensor_parallel_size", "generation.vllm.weight_bucket_mb",
                "policy.megatron.make_vocab_size_divisible_by"]
    for key in positive:
        if _get(config, key) < 1:
            raise ConfigError(f"{key}: must be >= 1, got {_get(config, key)}")
    for key in ["reward.overlong_buffer", "reward.overlong_penalty", "algorithm.num_drafts", "trainer.max_steps",
                "trainer.eval_every", "trainer.save_every", "warm_start.steps", "algorithm.kl_coef"]:
        if _get(config, key) < 0:
            raise ConfigError(f"{key}: must be >= 0, got {_get(config, key)}")
    _check_micro_batching(config.policy)
    if config.algorithm.num_refinements < 2:
        raise ConfigError("algorithm.num_refinements: a group needs at least 2 samples for a relative advantage")
    if not 0 < config.generation.top_p <= 1 or not 0 < config.eval.top_p <= 1:
        raise ConfigError("generation.top_p / eval.top_p: must be in (0, 1]")
    if not config.algorithm.importance_cap > 0:
        raise ConfigError(f"algorithm.importance_cap: must be > 0, got {config.algorithm.importance_cap}")
    if not 0 < config.generation.vllm.gpu_memory_utilization <= 1:
        raise ConfigError(f"generation.vllm.gpu_memory_utilization: must be in (0, 1], "
                          f"got {config.generation.vllm.gpu_memory_utilization}")
    if config.generation.server.retry_budget_s < 0 or config.generation.server.request_timeout_s <= 0:
        raise ConfigError("generation.server.retry_budget_s / request_timeout_s: must be >= 0 / > 0")
    if config.generation.temperature <= 0:
        raise ConfigError("generation.temperature: RL needs sampling, must be > 0")
    if config.algorithm.dual_clip is not None and config.algorithm.dual_clip <= 1:
        raise ConfigError(f"algorithm.dual_clip: must be > 1 (or null), got {config.algorithm.dual_clip}")
    if not 0 <= config.warm_start.refinement_fraction <= 1:
        raise ConfigError(f"warm_start.refinement_fraction: must be in [0, 1], "
                          f"got {config.warm_start.refinement_fraction}")
    if len(config.optim.betas) != 2:
        raise ConfigError(f"optim.betas: needs two values, got {config.optim.betas}")
    for name in config.trainer.loggers:
        if name not in LOGGERS:
            hint = difflib.get_close_matches(name, LOGGERS, n=1)
            suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ConfigError(f"trainer.loggers: unknown logger {name!r}{suggestion}; valid: {', '.join(LOGGERS)}")
    if config.trainer.dist_timeout_s <= 0:
        raise ConfigError(f"trainer.dist_timeout_s: must be > 0, got {config.trainer.dist_timeout_s}")
    if config.trainer.resume not in ("none", "auto") and not Path(config.trainer.resume).exists():
        raise ConfigError(f"trainer.resume: must be none, auto or an existing checkpoint path, "
                          f"got {config.trainer.resume!r}")


def to_yaml(config: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def to_dict(config: Config) -> dict[str, Any]:
    return dataclasses.asdict(config)


# ---------------------------------------------------------------------------------------------- helpers


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError(f"{where}: malformed YAML: {error.problem}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: malformed YAML: {error}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def _parse_overrides(overrides: Sequence[str]) -> dict:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"command line: override {item!r} must look like section.key=value")
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides)))  # type: ignore[return-value]
    except OmegaConfBaseException as error:
        raise ConfigError(f"command line: {_first_line(error)}") from None


def _check_keys(data: Any, schema: type, source: str, prefix: str) -> None:
    """Reject keys the schema does not have, naming the full key and the closest valid one."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'top level'}: expected a mapping, got {data!r}")
    valid = {f.name: f for f in dataclasses.fields(schema)}
    for key, value in data.items():
        if key not in valid:
            hint = difflib.get_close_matches(str(key), list(valid), n=1)
            suggestion = f" (did you mean '{prefix}{hint[0]}'?)" if hint else ""
            raise ConfigError(f"{source}: unknown key '{prefix}{key}'{suggestion}")
        sub = _dataclass_type(valid[key])
        if sub is not None and value is not None:
            _check_keys(value, sub, source, prefix=f"{prefix}{key}.")


def _dataclass_type(f: dataclasses.Field) -> type | None:
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else None  # type: ignore[misc]
    return type(default) if dataclasses.is_dataclass(default) else None


def _get(config: Config, dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0]

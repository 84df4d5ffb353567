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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from nemo_igrpo.algorithms.presets import PRESETS
from nemo_igrpo.errors import ConfigError  # noqa: F401  (re-exported: ``from nemo_igrpo.config import ConfigError``)
from nemo_igrpo.rewards.defaults import DEFAULT_EXTRACT, DEFAULT_NUM_WORKERS, DEFAULT_TIMEOUT_S
from nemo_igrpo.validation import validate


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
    extract: str = DEFAULT_EXTRACT  # the reward constructors' defaults, so both read the same values
    num_workers: int = DEFAULT_NUM_WORKERS
    timeout_s: float = DEFAULT_TIMEOUT_S
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
class RolloutConfig:
    draft_ahead: bool = False  # step t+1's Stage-1 drafts generated during step t's update (rollout_producer)
    max_off_policy_steps: int = 0  # k > 0: asynchronous rollouts up to k policy versions old (rollout_producer)


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
    shared_prefix: bool = False  # hf: each group's common prefix (prompt + draft) computed once for its rows
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
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    warm_start: WarmStartConfig = field(default_factory=WarmStartConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


# Mapping-valued keys that a layer replaces whole: `reward.components: {boxed_match: 1.0}` means only boxed_match.
REPLACED_MAPPINGS = ("reward.components",)

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
                raise ConfigError(f"{source}: algorithm.preset: {PRESETS.unknown(preset)}")
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


def to_yaml(config: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))


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


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0]

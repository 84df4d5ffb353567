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

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from nemo_igrpo.algorithms.presets import PRESETS
from nemo_igrpo.config_sources import check_keys, first_line, parse_overrides, read_yaml
from nemo_igrpo.errors import ConfigError  # noqa: F401  (re-exported: ``from nemo_igrpo.config import ConfigError``)
from nemo_igrpo.rewards.defaults import DEFAULT_EXTRACT, DEFAULT_NUM_WORKERS, DEFAULT_TIMEOUT_S
from nemo_igrpo.validation import validate


# Numeric keys declare their valid range next to their default (``ranged``); ``validation.check_ranges`` refuses a
# value outside it, NaN and ±inf included, naming the key. Upper bounds sit far above any real run: they stop typos
# and hostile values (``rollout.max_off_policy_steps=10000000`` would log 10⁷ metrics a step).
SEED_MAX, TOKENS_MAX, STEPS_MAX, DAY_S, WEEK_S = 2**32 - 1, 2**20, 10**9, 86400.0, 604800.0  # TOKENS: one sequence


def ranged(default: Any, **limits: float) -> Any:
    """A numeric field: its default and its range (``ge``, ``gt``, ``le``, ``lt``; of each item, for a list)."""
    return field(default=default, metadata=limits)


@dataclass
class TinyModelConfig:
    hidden_size: int = ranged(128, ge=1, le=2**16)
    intermediate_size: int = ranged(384, ge=1, le=2**18)
    num_layers: int = ranged(4, ge=1, le=1024)
    num_heads: int = ranged(4, ge=1, le=1024)
    num_kv_heads: int = ranged(2, ge=1, le=1024)
    max_position_embeddings: int = ranged(512, ge=1, le=2**20)


@dataclass
class ModelConfig:
    path: str = "builtin:tiny-llama"
    tokenizer: str | None = None
    dtype: str = "float32"
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)


@dataclass
class ArithmeticConfig:
    seed: int = ranged(1234, ge=0, le=SEED_MAX)
    num_train: int = ranged(4000, ge=1, le=10**7)
    num_heldout: int = ranged(200, ge=0, le=10**6)
    max_operand: int = ranged(30, ge=1, le=10**9)
    unboxed_fraction: float = ranged(0.0, ge=0, le=1)
    min_steps: int = ranged(2, ge=1, le=64)  # builtin:chain only: operations per problem, min_steps..max_steps
    max_steps: int = ranged(4, ge=1, le=64)


@dataclass
class DataConfig:
    train: str = "builtin:arithmetic"
    eval: str | None = "builtin:arithmetic"
    problem_key: str = "problem"
    answer_key: str = "answer"
    solution_key: str | None = None
    train_split: str = "train"
    eval_split: str = "test"
    max_prompt_tokens: int = ranged(1024, ge=1, le=TOKENS_MAX)
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
    max_new_tokens: int = ranged(8, ge=1, le=TOKENS_MAX)
    max_completion_chars: int = ranged(4000, ge=1, le=10**8)


@dataclass
class RewardConfig:
    components: dict[str, float] = field(default_factory=lambda: {"math_verify": 1.0, "format": 1.0})
    extract: str = DEFAULT_EXTRACT  # the reward constructors' defaults, so both read the same values
    num_workers: int = ranged(DEFAULT_NUM_WORKERS, ge=1, le=1024)
    timeout_s: float = ranged(DEFAULT_TIMEOUT_S, gt=0, le=DAY_S)
    overlong_buffer: int = ranged(0, ge=0, le=TOKENS_MAX)
    overlong_penalty: float = ranged(1.0, ge=0, le=100)
    judge: JudgeConfig = field(default_factory=JudgeConfig)


@dataclass
class AlgorithmConfig:
    preset: str = "igrpo"
    num_drafts: int = ranged(4, ge=0, le=1024)
    num_refinements: int = ranged(4, ge=2, le=1024)  # a relative advantage needs 2
    tie_break: str = "first"
    draft_selection: str = "best"  # best (the paper) | random (ablation: a uniformly random draft)
    draft_loss_weight: float = ranged(0.0, ge=0, le=1000)  # > 0: + w · GRPO loss on the drafts (beyond the paper)
    skip_solved_by_drafts: bool = False  # all N drafts right: no Stage 2 for it, a new problem is drawn (beyond it)
    advantage: str = "grpo"
    adv_eps: float = ranged(1e-6, gt=0, le=1)
    policy_loss: str = "ppo"
    eps_low: float = ranged(0.2, ge=0, le=1)
    eps_high: float = ranged(0.2, ge=0, le=10)
    dual_clip: float | None = ranged(None, gt=1, le=1000)
    loss_agg: str = "seq-mean-token-mean"
    kl_coef: float = ranged(0.0, ge=0, le=1000)
    kl_estimator: str = "k3"
    kl_clamp: float | None = ranged(10.0, gt=0, le=10**4)
    ppo_epochs: int = ranged(1, ge=1, le=100)
    dynamic_sampling: bool = False
    max_sampling_rounds: int = ranged(4, ge=1, le=1000)
    overlong_filter: bool = False
    importance_correction: str = "none"
    importance_cap: float = ranged(2.0, gt=0, le=10**6)


@dataclass
class VLLMConfig:
    gpu_memory_utilization: float = ranged(0.5, gt=0, le=1)
    tensor_parallel_size: int = ranged(1, ge=1, le=1024)
    enforce_eager: bool = False
    max_model_len: int | None = ranged(None, ge=1, le=2**24)
    enable_prefix_caching: bool = True
    sleep_mode: bool = False
    dtype: str = "auto"
    stream_refinements: bool = True
    weight_bucket_mb: int = ranged(512, ge=1, le=2**20)


@dataclass
class ServerConfig:
    url: str = "http://127.0.0.1:8000"
    token_env: str = "NEMO_IGRPO_SERVER_TOKEN"
    retry_budget_s: float = ranged(300.0, ge=0, le=WEEK_S)
    request_timeout_s: float = ranged(3600.0, gt=0, le=WEEK_S)
    weight_sync: str = "auto"


@dataclass
class GenerationConfig:
    backend: str = "hf"
    temperature: float = ranged(0.7, gt=0, le=10)
    top_p: float = ranged(1.0, gt=0, le=1)
    max_new_tokens: int = ranged(4096, ge=1, le=TOKENS_MAX)
    batch_size: int = ranged(64, ge=1, le=2**20)
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    server: ServerConfig = field(default_factory=ServerConfig)


@dataclass
class RolloutConfig:
    draft_ahead: bool = False  # step t+1's Stage-1 drafts generated during step t's update (rollout_producer)
    max_off_policy_steps: int = ranged(0, ge=0, le=64)  # k > 0: async rollouts up to k versions old (rollout_producer)
    inflight_updates: str = "wait"  # a sync beside a running job: wait for it, or keep it going on the new weights


@dataclass
class MegatronConfig:
    tensor_model_parallel_size: int = ranged(1, ge=1, le=1024)
    pipeline_model_parallel_size: int = ranged(1, ge=1, le=1024)
    context_parallel_size: int = ranged(1, ge=1, le=1024)
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = True
    recompute: str = "none"
    transformer_impl: str = "auto"
    fp8: str = "none"
    fp8_recipe: str = "delayed"
    async_save: bool = False
    make_vocab_size_divisible_by: int = ranged(1, ge=1, le=2**16)


@dataclass
class LoraConfig:
    rank: int = ranged(0, ge=0, le=2**16)  # 0: full fine-tuning
    alpha: float = ranged(32.0, gt=0, le=10**4)
    dropout: float = ranged(0.0, ge=0, lt=1)
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])


@dataclass
class PolicyConfig:
    backend: str = "hf"
    micro_batch_size: int = ranged(16, ge=1, le=2**20)
    max_tokens_per_micro_batch: int | None = ranged(None, ge=1, le=2**30)  # None: micro_batch_size rows each
    sequence_packing: bool = False
    shared_prefix: bool = False  # hf: each group's common prefix (prompt + draft) computed once for its rows
    logprob_chunk_size: int = ranged(2048, ge=1, le=2**30)
    gradient_checkpointing: bool = False
    precision: str = "fp32"
    device: str = "auto"
    megatron: MegatronConfig = field(default_factory=MegatronConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class OptimConfig:
    lr: float = ranged(1e-6, gt=0, le=1)
    weight_decay: float = ranged(0.0, ge=0, le=10)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999], metadata=dict(ge=0, lt=1))
    max_grad_norm: float = ranged(1.0, ge=0, le=10**6)
    warmup_ratio: float = ranged(0.1, ge=0, le=1)
    min_lr_ratio: float = ranged(0.1, ge=0, le=1)


@dataclass
class WarmStartConfig:
    steps: int = ranged(0, ge=0, le=STEPS_MAX)
    lr: float = ranged(1e-4, gt=0, le=1)
    batch_size: int = ranged(64, ge=1, le=2**20)
    refinement_fraction: float = ranged(0.0, ge=0, le=1)
    # draft kind → share of the refinement rows (nemo_igrpo.data.drafts); the default is the mix before mixes existed
    draft_mix: dict[str, float] = field(default_factory=lambda: {"reference": 0.5, "foreign": 0.5})
    own_refresh_rows: int = ranged(256, ge=1, le=2**30)  # `own` drafts: the warmed weights reach the sampler this often


@dataclass
class EvalConfig:
    datasets: list[str] = field(default_factory=list)
    model: str | None = None
    num_problems: int | None = ranged(None, ge=0, le=10**9)
    samples_per_problem: int = ranged(1, ge=1, le=2**14)
    temperature: float = ranged(0.6, ge=0, le=10)
    top_p: float = ranged(0.95, gt=0, le=1)
    max_new_tokens: int | None = ranged(None, ge=1, le=TOKENS_MAX)
    output_dir: str | None = None
    protocol: str | None = None
    benchmarks_dir: str | None = None
    max_samples_per_problem: int | None = ranged(None, ge=1, le=2**14)


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
    max_steps: int = ranged(60, ge=0, le=STEPS_MAX)
    prompts_per_step: int = ranged(128, ge=1, le=2**20)
    seed: int = ranged(0, ge=0, le=SEED_MAX)
    output_dir: str = "runs/igrpo"
    eval_every: int = ranged(10, ge=0, le=STEPS_MAX)
    save_every: int = ranged(10, ge=0, le=STEPS_MAX)
    keep_last: int = ranged(2, ge=1, le=10**6)
    resume: str = "auto"
    max_consecutive_nan_steps: int = ranged(3, ge=1, le=10**6)
    progress: bool = True
    loggers: list[str] = field(default_factory=lambda: ["tensorboard"])
    wandb: WandbConfig = field(default_factory=WandbConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    dist_timeout_s: float = ranged(1800.0, gt=0, le=WEEK_S)


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
REPLACED_MAPPINGS = ("reward.components", "warm_start.draft_mix")

# ---------------------------------------------------------------------------------------------- loading


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults ← preset ← YAML file ``path`` ← ``overrides`` (``a.b=value`` dotlist), validated and typed."""
    layers: list[tuple[str, dict]] = []
    if path is not None:
        layers.append((str(path), read_yaml(Path(path))))
    if overrides:
        layers.append(("command line", parse_overrides(overrides)))
    for source, data in layers:
        check_keys(data, Config, source, prefix="")

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
        raise ConfigError(f"{source}: {key}: {first_line(error)}") from None


def to_yaml(config: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))

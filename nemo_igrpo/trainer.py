"""The training loop: rollout → advantages → loss → optimizer step → weight sync → log / evaluate / checkpoint.

It reads top to bottom as one iGRPO (or GRPO, N = 0) step; every backend hides behind the generation and policy
interfaces and the loop never asks which one it has.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import shutil
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from rich.console import Console

from nemo_igrpo.algorithms.aggregation import LossNormalizer
from nemo_igrpo.algorithms.igrpo import RolloutSettings, rollout
from nemo_igrpo.algorithms.loss import make_loss_fn
from nemo_igrpo.backends import build_generation, build_policy
from nemo_igrpo.checkpoint import find_latest, load_checkpoint, save_checkpoint
from nemo_igrpo.config import Config, to_yaml
from nemo_igrpo.data.dataset import Example, PromptSampler
from nemo_igrpo.data.prompts import PAPER_SYSTEM_PROMPT, PromptBuilder
from nemo_igrpo.data.sources import drop_long_prompts, load_examples
from nemo_igrpo.evaluation.run import EvalResult, evaluate
from nemo_igrpo.generation.base import GenerationBackend, SamplingParams
from nemo_igrpo.models import load_model, load_tokenizer, stop_token_ids
from nemo_igrpo.policy.base import PolicyBackend
from nemo_igrpo.progress import TrainingProgress
from nemo_igrpo.rewards import build_training_reward
from nemo_igrpo.tracking import MetricsLogger
from nemo_igrpo.warm_start import warm_start

log = logging.getLogger(__name__)


class TrainingStopped(RuntimeError):
    """The run stopped on purpose (e.g. too many non-finite steps); the last checkpoint is intact."""


@dataclass
class TrainState:
    step: int = 0
    nan_streak: int = 0  # consecutive skipped (non-finite) steps; the total is the sum of train/skipped


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    initial_accuracy: float | None
    final_accuracy: float | None


def train(config: Config, console: Console | None = None) -> TrainResult:
    console = console or Console()
    run_dir = Path(config.trainer.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(config))
    seed_everything(config.trainer.seed)

    tokenizer = load_tokenizer(config.model)
    template = prompt_builder(config, tokenizer)
    train_set, heldout = _datasets(config, template)
    reward = build_training_reward(config)
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731

    model = load_model(config.model, tokenizer)
    resume_from = _resume_path(config, run_dir)
    if resume_from is None and config.warm_start.steps > 0:
        console.print(f"[bold]Warm start[/]: {config.warm_start.steps} supervised steps on reference solutions")
        warm_start(config, model, train_set, template, tokenizer, console)
    policy = build_policy(config, model)
    generator = build_generation(config, model, tokenizer.pad_token_id)
    sampler = PromptSampler(train_set, seed=config.trainer.seed)
    state = TrainState()
    if resume_from is not None:
        state = _restore(resume_from, policy, sampler)
        console.print(f"Resumed from [bold]{resume_from}[/] at step {state.step}")
        generator.update_weights(policy.export_weights())
    if state.step >= config.trainer.max_steps:
        console.print(f"Run already finished at step {state.step} (trainer.max_steps={config.trainer.max_steps}); "
                      "raise trainer.max_steps to train further.")
        return TrainResult(run_dir, state.step, None, None)

    stops = stop_token_ids(tokenizer, model)
    settings = _rollout_settings(config, stops)
    eval_params = eval_sampling(config, stops)

    def run_eval(step: int) -> EvalResult | None:
        if not heldout:
            return None
        with torch.random.fork_rng():  # evaluation must not change the training trajectory
            torch.manual_seed(config.trainer.seed + 7919 * step)
            return evaluate(heldout, generator, template.problem_ids, reward, decode, eval_params)

    logger = MetricsLogger(run_dir, config.trainer.tensorboard, resume_step=state.step)
    initial = final = None
    if state.step == 0 and config.trainer.eval_every:
        result = run_eval(0)
        if result is not None:
            initial = result.accuracy
            logger.log(0, _eval_metrics(result))
            console.print(f"Held-out accuracy before RL: [bold]{100 * initial:.1f}%[/] ({len(heldout)} problems)")

    checkpoints = run_dir / "checkpoints"
    progress = TrainingProgress(console, enabled=config.trainer.progress, total=config.trainer.max_steps,
                                start=state.step)
    try:
        with progress, _stop_requests() as stop_requested:
            while state.step < config.trainer.max_steps:
                state.step += 1
                metrics = train_step(config, policy, generator, sampler, reward, template, decode, settings,
                                     tokenizer.pad_token_id)
                if config.trainer.eval_every and (state.step % config.trainer.eval_every == 0
                                                  or state.step == config.trainer.max_steps):
                    result = run_eval(state.step)
                    if result is not None:
                        final = result.accuracy
                        metrics.update(_eval_metrics(result))
                logger.log(state.step, metrics)
                progress.update(state.step, metrics)
                _count_non_finite(metrics["train/skipped"], state, config)
                last = state.step == config.trainer.max_steps or stop_requested()
                periodic = config.trainer.save_every and state.step % config.trainer.save_every == 0
                if (last or periodic) and state.nan_streak == 0:  # the newest checkpoint stays a good one
                    _save(checkpoints, state, policy, sampler, config.trainer.keep_last)
                if stop_requested():
                    saved = find_latest(checkpoints)
                    console.print(f"Stop requested after step {state.step}; newest checkpoint: {saved}. "
                                  "Run again with trainer.resume=auto to continue.")
                    break
    finally:
        logger.close()
        generator.close()
        reward.close()  # e.g. a grading process pool

    if state.step == config.trainer.max_steps:
        _export_final(run_dir / "final", policy, tokenizer)
    if initial is not None and final is not None:
        console.print(f"Held-out accuracy: [bold]{100 * initial:.1f}% → {100 * final:.1f}%[/] "
                      f"({100 * (final - initial):+.1f} points)")
    return TrainResult(run_dir, state.step, initial, final)


def train_step(config: Config, policy: PolicyBackend, generator: GenerationBackend, sampler: PromptSampler,
               reward, template: PromptBuilder, decode, settings: RolloutSettings,
               pad_token_id: int) -> dict[str, float]:
    """One optimizer step; returns its metrics (rewards, losses, seconds per phase, tokens/s)."""
    timer = PhaseTimer()
    algorithm = config.algorithm
    with timer("rollout"):
        batch, metrics = rollout(sampler.next_batch, config.trainer.prompts_per_step, generator, reward, template,
                                 decode, settings, pad_token_id, timings=timer.seconds)
    if algorithm.kl_coef > 0:
        with timer("reference_logprobs"):
            batch.ref_logprobs = policy.compute_logprobs(batch, reference=True).logprobs
    if algorithm.ppo_epochs > 1:  # with one pass, π_old = π_θ (detached) exactly, so no extra forward is needed
        with timer("old_logprobs"):
            batch.old_logprobs = policy.compute_logprobs(batch).logprobs
    loss_fn = make_loss_fn(
        policy_loss=algorithm.policy_loss, eps_low=algorithm.eps_low, eps_high=algorithm.eps_high,
        dual_clip=algorithm.dual_clip, loss_agg=algorithm.loss_agg, kl_coef=algorithm.kl_coef,
        kl_estimator=algorithm.kl_estimator, kl_clamp=algorithm.kl_clamp,
        normalizer=LossNormalizer.from_mask(batch.loss_mask, config.generation.max_new_tokens))
    with timer("update"):
        for _ in range(algorithm.ppo_epochs):
            update = policy.train_step(batch, loss_fn)
    with timer("weight_sync"):
        generator.update_weights(policy.export_weights())

    generated = metrics.pop("tokens/generated")
    trained = float(batch.loss_mask.sum())
    metrics.update({f"train/{k}": v for k, v in update.items()})
    metrics.update({f"time/{k}": v for k, v in timer.seconds.items()})
    metrics["time/step"] = sum(v for k, v in timer.seconds.items() if "/" not in k)
    metrics["throughput/generated_tokens_per_s"] = generated / max(timer.seconds.get("rollout/generation", 1e-9), 1e-9)
    metrics["throughput/trained_tokens_per_s"] = trained / max(timer.seconds["update"], 1e-9)
    metrics["throughput/tokens_per_s"] = (generated + trained) / max(metrics["time/step"], 1e-9)
    return metrics


class PhaseTimer:
    """``with timer("phase"):`` accumulates wall-clock seconds per phase name."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prompt_builder(config: Config, tokenizer) -> PromptBuilder:
    """Both stages' prompts; ``prompt.system_prompt: paper`` means the paper's verbatim system text."""
    system = PAPER_SYSTEM_PROMPT if config.prompt.system_prompt == "paper" else config.prompt.system_prompt
    return PromptBuilder(tokenizer, system_prompt=system, draft_header=config.prompt.draft_header,
                         draft_content=config.prompt.draft_content)


def eval_sampling(config: Config, stops: tuple[int, ...]) -> SamplingParams:
    ev = config.eval
    return SamplingParams(n=ev.samples_per_problem, temperature=ev.temperature, top_p=ev.top_p,
                          max_new_tokens=ev.max_new_tokens or config.generation.max_new_tokens,
                          stop_token_ids=stops)


def _datasets(config: Config, template: PromptBuilder) -> tuple[list[Example], list[Example]]:
    """Training problems and the held-out problems evaluated during training, over-long prompts dropped."""
    def fitting(source: str, split: str) -> list[Example]:
        return drop_long_prompts(load_examples(source, config.data, split), lambda p: len(template.problem_ids(p)),
                                 config.data.max_prompt_tokens, f"data.{split}")

    heldout = fitting(config.data.eval, "eval") if config.data.eval else []
    return fitting(config.data.train, "train"), heldout[: config.eval.num_problems or None]


def _rollout_settings(config: Config, stops: tuple[int, ...]) -> RolloutSettings:
    algorithm, generation = config.algorithm, config.generation
    return RolloutSettings(
        num_drafts=algorithm.num_drafts, num_refinements=algorithm.num_refinements, tie_break=algorithm.tie_break,
        advantage=algorithm.advantage, adv_eps=algorithm.adv_eps, dynamic_sampling=algorithm.dynamic_sampling,
        max_sampling_rounds=algorithm.max_sampling_rounds, overlong_buffer=config.reward.overlong_buffer,
        overlong_penalty=config.reward.overlong_penalty, overlong_filter=algorithm.overlong_filter,
        sampling=SamplingParams(temperature=generation.temperature, top_p=generation.top_p,
                                max_new_tokens=generation.max_new_tokens, stop_token_ids=stops))


def _count_non_finite(skipped: float, state: TrainState, config: Config) -> None:
    """Count skipped (non-finite) steps; too many in a row stop the run with the last checkpoint untouched."""
    if skipped > 0:
        state.nan_streak += 1
        log.warning("step %d: non-finite loss or gradient, update skipped (%d in a row)", state.step,
                    state.nan_streak)
        if state.nan_streak >= config.trainer.max_consecutive_nan_steps:
            raise TrainingStopped(
                f"stopping at step {state.step}: {state.nan_streak} consecutive steps had a non-finite loss or "
                f"gradient (trainer.max_consecutive_nan_steps={config.trainer.max_consecutive_nan_steps}); "
                "the last checkpoint is intact. Lower optim.lr or check the data.")
    else:
        state.nan_streak = 0


def _eval_metrics(result: EvalResult) -> dict[str, float]:
    return {"eval/accuracy": result.accuracy, **{f"eval/{k}": v for k, v in result.summary.items()}}


def _resume_path(config: Config, run_dir: Path) -> Path | None:
    if config.trainer.resume == "none":
        return None
    if config.trainer.resume == "auto":
        return find_latest(run_dir / "checkpoints")
    return Path(config.trainer.resume)


def _save(root: Path, state: TrainState, policy: PolicyBackend, sampler: PromptSampler, keep_last: int) -> None:
    save_checkpoint(root, state.step, policy.save, {**dataclasses.asdict(state), "sampler": sampler.state_dict()},
                    keep_last)


def _restore(path: Path, policy: PolicyBackend, sampler: PromptSampler) -> TrainState:
    saved = load_checkpoint(path, policy.load)
    sampler.load_state_dict(saved["sampler"])
    return TrainState(step=saved["step"], nan_streak=saved["nan_streak"])


def _export_final(directory: Path, policy: PolicyBackend, tokenizer) -> None:
    """The trained model in Hugging Face format (written beside, then renamed into place)."""
    tmp = directory.with_name(f".tmp-{directory.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    policy.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)


@contextmanager
def _stop_requests() -> Iterator:
    """SIGINT/SIGTERM ask the loop to checkpoint and stop after the current step; a second Ctrl-C aborts at once."""
    requested = {"flag": False}
    previous = {}

    def handler(signum, frame):
        requested["flag"] = True
        signal.signal(signum, previous[signum])  # the next signal acts immediately

    for signum in (signal.SIGINT, signal.SIGTERM):
        previous[signum] = signal.getsignal(signum)
        signal.signal(signum, handler)
    try:
        yield lambda: requested["flag"]
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)

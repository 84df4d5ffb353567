"""The training loop: rollout → advantages → loss → optimizer step → weight sync → log / evaluate / checkpoint.

It reads top to bottom as one iGRPO (or GRPO, N = 0) step; every backend hides behind the generation and policy
interfaces and the loop never asks which one it has.

SPMD: the same loop runs on every process of a torchrun / srun launch (``nemo_igrpo.distributed``). Each rank draws
the same global prompt batch and keeps its slice over the policy's data-parallel group; loss counts and metrics are
reduced over the group; only global rank 0 writes the config, metrics, loggers and checkpoint metadata.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import shutil
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from nemo_igrpo import distributed, faults
from nemo_igrpo.algorithms.aggregation import LossNormalizer
from nemo_igrpo.algorithms.igrpo import RolloutSettings, rollout
from nemo_igrpo.algorithms.loss import make_loss_fn
from nemo_igrpo.backends import build_generation, build_policy, check_policy
from nemo_igrpo.checkpoint import find_latest, load_checkpoint, save_checkpoint
from nemo_igrpo.config import Config, ConfigError, to_yaml
from nemo_igrpo.data.dataset import Example, PromptSampler
from nemo_igrpo.data.prompts import PAPER_SYSTEM_PROMPT, PromptBuilder
from nemo_igrpo.data.sources import drop_long_prompts, load_examples
from nemo_igrpo.evaluation.metrics import summarize
from nemo_igrpo.evaluation.run import EvalResult, evaluate
from nemo_igrpo.generation.base import GenerationBackend, SamplingParams
from nemo_igrpo.models import load_model, load_tokenizer, stop_token_ids
from nemo_igrpo.policy.base import PolicyBackend
from nemo_igrpo.policy.microbatch import balance_across_ranks
from nemo_igrpo.progress import TrainingProgress
from nemo_igrpo.rewards import build_training_reward
from nemo_igrpo.tracking import MetricsLogger, build_loggers
from nemo_igrpo.warm_start import warm_start

log = logging.getLogger(__name__)

STOP_FILE = "STOP"  # created in trainer.output_dir (e.g. by the sbatch script before its time limit): stop cleanly


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
    stop_signal: str | None = None  # "SIGTERM", "SIGINT" or "STOP file" when the run stopped before max_steps


def train(config: Config, console: Console | None = None) -> TrainResult:
    """Train on this process, or as one rank of a torchrun / srun launch (joins the process group itself)."""
    with distributed.distributed_session(config.trainer.dist_timeout_s):
        if not distributed.is_main():
            console = Console(quiet=True)  # one voice: rank 0 reports for all ranks
        return _train(config, console or Console())


def _train(config: Config, console: Console) -> TrainResult:
    run_dir = Path(config.trainer.output_dir)
    main = distributed.is_main()
    _check_writable(run_dir)
    if main:
        (run_dir / "config.yaml").write_text(to_yaml(config))
        (run_dir / STOP_FILE).unlink(missing_ok=True)  # a stop request was meant for the previous job
    seed_everything(config.trainer.seed)

    tokenizer = load_tokenizer(config.model)
    template = prompt_builder(config, tokenizer)
    train_set, heldout = _datasets(config, template)
    reward = build_training_reward(config)
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731

    model = load_model(config.model, tokenizer)
    check_policy(config, model)  # e.g. parallel sizes that do not divide: fail before the warm start
    resume_from = _resume_path(config, run_dir)
    if resume_from is None and config.warm_start.steps > 0:
        console.print(f"[bold]Warm start[/]: {config.warm_start.steps} supervised steps on reference solutions")
        warm_start(config, model, train_set, template, tokenizer, console)
    policy = build_policy(config, model)
    group = policy.data_parallel_group
    _check_divisible(config, distributed.world_size(group))
    generator = build_generation(config, model, tokenizer.pad_token_id)
    generator.set_rollout_peers(policy.model_parallel_group)  # TP/PP peers must train on identical samples
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
            return _sharded_eval(heldout, generator, template, reward, decode, eval_params, group)

    logger = MetricsLogger(run_dir, build_loggers(config, run_dir, state.step) if main else [],
                           resume_step=state.step if resume_from is not None else None, enabled=main)
    initial = final = None
    if state.step == 0 and config.trainer.eval_every:
        result = run_eval(0)
        if result is not None:
            initial = result.accuracy
            logger.log(0, _eval_metrics(result))
            console.print(f"Held-out accuracy before RL: [bold]{100 * initial:.1f}%[/] ({len(heldout)} problems)")

    checkpoints = run_dir / "checkpoints"
    progress = TrainingProgress(console, enabled=config.trainer.progress and main, total=config.trainer.max_steps,
                                start=state.step)
    stopped_by = None
    try:
        with progress, _stop_requests() as signal_received:
            def stop_requested() -> bool:
                # Every rank must stop after the same step, whichever rank received the signal first.
                return distributed.any_rank(bool(signal_received()) or (main and (run_dir / STOP_FILE).exists()))

            while state.step < config.trainer.max_steps:
                state.step += 1
                faults.point("train.step", step=state.step)
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
                stop = stop_requested()
                last = state.step == config.trainer.max_steps or stop
                periodic = config.trainer.save_every and state.step % config.trainer.save_every == 0
                if (last or periodic) and state.nan_streak == 0:  # the newest checkpoint stays a good one
                    _save(checkpoints, state, policy, sampler, config.trainer.keep_last)
                if stop and state.step < config.trainer.max_steps:
                    stopped_by = signal_received() or (
                        f"{STOP_FILE} file" if (run_dir / STOP_FILE).exists() else "another rank's signal")
                    saved = find_latest(checkpoints, verify=False)
                    console.print(f"Stop requested ({stopped_by}) after step {state.step}; newest checkpoint: "
                                  f"{saved}. Run again with trainer.resume=auto to continue.")
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
    return TrainResult(run_dir, state.step, initial, final, stopped_by)


def train_step(config: Config, policy: PolicyBackend, generator: GenerationBackend, sampler: PromptSampler,
               reward, template: PromptBuilder, decode, settings: RolloutSettings,
               pad_token_id: int) -> dict[str, float]:
    """One optimizer step; returns its metrics (rewards, losses, seconds per phase, tokens/s)."""
    timer = PhaseTimer()
    algorithm = config.algorithm
    group = policy.data_parallel_group
    source = _ShardedSource(sampler, config.trainer.prompts_per_step, group)
    with timer("rollout"):
        batch, metrics = rollout(source.draw, source.per_rank, generator, reward, template, decode, settings,
                                 pad_token_id, timings=timer.seconds)
    source.synchronize()
    if config.policy.max_tokens_per_micro_batch is not None:  # long-tailed lengths: equal tokens per DP rank
        batch = balance_across_ranks(batch, group)
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
        normalizer=_global_normalizer(batch.loss_mask, config.generation.max_new_tokens, group),
        importance_correction=algorithm.importance_correction, importance_cap=algorithm.importance_cap)
    with timer("update"):
        updates = [policy.train_step(batch, loss_fn) for _ in range(algorithm.ppo_epochs)]
    faults.point("train.updated")
    with timer("weight_sync"):
        generator.update_weights(policy.export_weights())

    generated = metrics.pop("tokens/generated")
    trained = float(batch.loss_mask.sum())
    metrics.update({f"time/{k}": v for k, v in timer.seconds.items()})
    metrics["time/step"] = sum(v for k, v in timer.seconds.items() if "/" not in k)
    metrics["throughput/generated_tokens_per_s"] = generated / max(timer.seconds.get("rollout/generation", 1e-9), 1e-9)
    metrics["throughput/trained_tokens_per_s"] = trained / max(timer.seconds["update"], 1e-9)
    metrics["throughput/tokens_per_s"] = (generated + trained) / max(metrics["time/step"], 1e-9)
    metrics = reduce_metrics(metrics, group)
    metrics.update(epoch_metrics(updates))  # the policy reports step-global values already
    return metrics


def epoch_metrics(updates: list[dict[str, float]]) -> dict[str, float]:
    """``train/*``: the mean over a step's PPO epochs (its optimizer steps); with several epochs, also the last
    epoch's values (``train/last_epoch/*``: how far the policy moved from π_old within the step)."""
    metrics = {f"train/{k}": sum(u[k] for u in updates) / len(updates) for k in updates[0]}
    if len(updates) > 1:
        metrics.update({f"train/last_epoch/{k}": v for k, v in updates[-1].items()})
        metrics["train/epochs"] = float(len(updates))
    return metrics


# Rollout and timing metrics are per rank; these say how ranks combine (anything else: mean over ranks, which is
# the global mean because every rank holds the same number of prompts and samples).
_SUMMED = ("batch/sequences", "reward/count/", "throughput/")
_MAXED = ("time/", "response_length/refinement_max", "sampling_rounds")


def reduce_metrics(metrics: dict[str, float], group) -> dict[str, float]:
    """Combine one step's per-rank metrics over the data-parallel group (identical on every rank afterwards)."""
    size = distributed.world_size(group)
    if group is None or size == 1:
        return metrics
    names = sorted(metrics)
    if distributed.all_gather_objects(names, group) != [names] * size:
        raise RuntimeError(f"ranks report different metric names; this rank: {names}")
    summed = distributed.all_reduce_values([float(metrics[n]) for n in names], "sum", group)
    maxed = distributed.all_reduce_values([float(metrics[n]) for n in names], "max", group)
    reduced = {}
    for name, total, largest in zip(names, summed, maxed):
        if name.startswith(_SUMMED):
            reduced[name] = total
        elif name.startswith(_MAXED):
            reduced[name] = largest
        else:
            reduced[name] = total / size
    return reduced


class _ShardedSource:
    """This rank's slice of each global prompt draw, with every rank's sampler kept in the same state.

    A draw of the global batch (``prompts_per_step``) is identical on all ranks (same seed, same state); rank r keeps
    prompts ``[r·p, r·p + n)`` with p = prompts per rank. Dynamic sampling may draw again a different number of
    times on different ranks; ``synchronize`` then moves every sampler to the furthest position reached, so the
    checkpointed sampler state is every rank's state.
    """

    def __init__(self, sampler: PromptSampler, prompts_per_step: int, group) -> None:
        self.sampler = sampler
        self.group = group
        self.world = distributed.world_size(group)
        self.rank = distributed.rank(group) if group is not None else 0
        self.per_rank = prompts_per_step // self.world

    def draw(self, n: int) -> list[Example]:
        if self.world == 1:
            return self.sampler.next_batch(n)  # single process: exactly the prompts asked for, as always
        start = self.rank * self.per_rank
        return self.sampler.next_batch(self.per_rank * self.world)[start : start + n]

    def synchronize(self) -> None:
        if self.world == 1:
            return
        states = distributed.all_gather_objects(self.sampler.state_dict(), self.group)
        furthest = max(states, key=lambda s: (s["epoch"], s["position"]))
        if furthest != self.sampler.state_dict():
            self.sampler.load_state_dict(furthest)


def _global_normalizer(loss_mask: torch.Tensor, max_tokens: int, group) -> LossNormalizer:
    """Loss denominators counted over the whole step's batch, i.e. summed over the data-parallel ranks."""
    local = LossNormalizer.from_mask(loss_mask, max_tokens)
    if group is None:
        return local
    tokens, sequences = distributed.all_reduce_values([local.num_tokens, local.num_sequences], "sum", group)
    return dataclasses.replace(local, num_tokens=tokens, num_sequences=sequences)


def _sharded_eval(examples: list[Example], generator: GenerationBackend, template: PromptBuilder, reward, decode,
                  params: SamplingParams, group) -> EvalResult:
    """Each rank evaluates every world-th problem; the summary is over all problems (records: this rank's only)."""
    world = distributed.world_size(group)
    if group is None or world == 1:
        return evaluate(examples, generator, template.problem_ids, reward, decode, params)
    mine = examples[distributed.rank(group)::world]
    result = evaluate(mine, generator, template.problem_ids, reward, decode, params) if mine else None
    correct = [r["correct"] for r in result.records] if result else []
    everyone = [c for part in distributed.all_gather_objects(correct, group) for c in part]
    return EvalResult(summary=summarize(everyone, None), records=result.records if result else [])


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
        # Rank 0 picks (verifying checksums once) and every rank resumes from that same checkpoint.
        return distributed.broadcast_object(find_latest(run_dir / "checkpoints") if distributed.is_main() else None)
    return Path(config.trainer.resume)


def _check_writable(run_dir: Path) -> None:
    """Fail before any model is built when trainer.output_dir (or its checkpoints/) cannot be written, on any rank."""
    error = None
    if distributed.is_main():
        probe = run_dir / "checkpoints" / f".write-test-{os.getpid()}"
        try:
            probe.parent.mkdir(parents=True, exist_ok=True)
            probe.write_text("ok")
            probe.unlink()
        except OSError as caught:
            error = f"trainer.output_dir: cannot write checkpoints under {run_dir} ({caught.strerror or caught}: " \
                    f"{caught.filename or probe}); choose a writable directory"
    error = distributed.broadcast_object(error)
    if error:
        raise ConfigError(error)


def _check_divisible(config: Config, world: int) -> None:
    if config.trainer.prompts_per_step % world:
        raise ConfigError(f"trainer.prompts_per_step: {config.trainer.prompts_per_step} prompts cannot be split evenly "
                          f"over {world} data-parallel ranks; use a multiple of {world}")


def _save(root: Path, state: TrainState, policy: PolicyBackend, sampler: PromptSampler, keep_last: int) -> None:
    save_checkpoint(root, state.step, policy.save, {**dataclasses.asdict(state), "sampler": sampler.state_dict()},
                    keep_last)


def _restore(path: Path, policy: PolicyBackend, sampler: PromptSampler) -> TrainState:
    saved = load_checkpoint(path, policy.load)
    sampler.load_state_dict(saved["sampler"])
    return TrainState(step=saved["step"], nan_streak=saved["nan_streak"])


def _export_final(directory: Path, policy: PolicyBackend, tokenizer) -> None:
    """The trained model in Hugging Face format (written beside, then renamed into place by rank 0; every rank
    calls ``save_pretrained``, which a sharded backend needs and a replicated one ignores off rank 0)."""
    tmp = directory.with_name(f".tmp-{directory.name}")
    main = distributed.is_main()
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    distributed.barrier()
    policy.save_pretrained(tmp)
    distributed.barrier()
    if main:
        tokenizer.save_pretrained(tmp)
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    distributed.barrier()


@contextmanager
def _stop_requests() -> Iterator:
    """SIGINT/SIGTERM ask the loop to checkpoint and stop after the current step; a second Ctrl-C aborts at once.

    Repeated SIGTERMs are not an abort: under Slurm a task gets one from slurmd and another forwarded by srun, and
    the scheduler's SIGKILL after its grace period is the hard stop. Yields a function returning the name of the
    signal received ("SIGTERM", "SIGINT") or None.
    """
    requested: dict[str, str | None] = {"flag": None}
    previous = {}

    def handler(signum, frame):
        requested["flag"] = requested["flag"] or signal.Signals(signum).name
        if signum == signal.SIGINT:
            signal.signal(signum, previous[signum])  # the next Ctrl-C acts immediately

    for signum in (signal.SIGINT, signal.SIGTERM):
        previous[signum] = signal.getsignal(signum)
        signal.signal(signum, handler)
    try:
        yield lambda: requested["flag"]
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)

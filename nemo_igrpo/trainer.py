"""The training loop: rollout → advantages → loss → optimizer step → weight sync → log / evaluate / checkpoint.

It reads top to bottom as one iGRPO (or GRPO, N = 0) step; every component, the rollout producer included, is built
once by ``nemo_igrpo.assembly``; every backend hides behind the generation and policy interfaces (of the policy
package the loop imports only ``policy/base.py``), and the loop never asks which one it has.

SPMD: the same loop runs on every process of a torchrun / srun launch (``nemo_igrpo.distributed``). Each rank draws
the same global prompt batch and keeps its slice over the policy's data-parallel group (``nemo_igrpo.sharding``);
loss counts and metrics are reduced over the group; only global rank 0 writes the config, metrics, loggers and
checkpoint metadata.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console

from nemo_igrpo import distributed, faults
from nemo_igrpo.algorithms.loss import LossSpec
from nemo_igrpo.assembly import build_run, seed_everything
from nemo_igrpo.checkpoint import find_latest
from nemo_igrpo.config import Config, to_yaml
from nemo_igrpo.evaluation.run import EvalResult, sharded_eval
from nemo_igrpo.lifecycle import (
    STOP_FILE,
    TrainState,
    check_writable,
    export_final,
    final_is_current,
    restore_state,
    resume_path,
    run_lock,
    save_state,
    stop_requests,
)
from nemo_igrpo.policy.base import PolicyBackend
from nemo_igrpo.progress import PhaseTimer, TrainingProgress
from nemo_igrpo.rollout_producer import RolloutProducer
from nemo_igrpo.sharding import global_normalizer, reduce_metrics
from nemo_igrpo.tracking import MetricsLogger, build_loggers

log = logging.getLogger(__name__)


class TrainingStopped(RuntimeError):
    """The run stopped on purpose (e.g. too many non-finite steps); the last checkpoint is intact."""


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    initial_accuracy: float | None
    final_accuracy: float | None
    stop_signal: str | None = None  # "SIGTERM", "SIGINT" or "STOP file" when the run stopped before max_steps


def train(config: Config, console: Console | None = None) -> TrainResult:
    """Train on this process, or as one rank of a torchrun / srun launch (joins the process group itself)."""
    with distributed.distributed_session(config.trainer.dist_timeout_s), run_lock(Path(config.trainer.output_dir)):
        if not distributed.is_main():
            console = Console(quiet=True)  # one voice: rank 0 reports for all ranks
        return _train(config, console or Console())


def _train(config: Config, console: Console) -> TrainResult:
    run_dir = Path(config.trainer.output_dir)
    main = distributed.is_main()
    check_writable(run_dir)
    seed_everything(config.trainer.seed)
    resume_from = resume_path(config.trainer.resume, run_dir)
    run = build_run(config, warm_start=resume_from is None, console=console)
    policy, generator, producer = run.policy, run.generator, run.producer
    state = TrainState()
    if resume_from is not None:
        try:
            state = restore_state(resume_from, policy, producer.sampler)
            producer.resume_at(state.step)
        except BaseException:  # e.g. a refused prompt stream: no grading workers or engines left behind
            run.close()
            raise
        console.print(f"Resumed from [bold]{resume_from}[/] at step {state.step}")
        generator.update_weights(policy.export_weights())
    if main:  # only now: a start refused above (another run's folder, another prompt stream) leaves the folder as is
        (run_dir / "config.yaml").write_text(to_yaml(config))
        (run_dir / STOP_FILE).unlink(missing_ok=True)  # a stop request was meant for the previous job
    if state.step >= config.trainer.max_steps:
        run.close()
        if not final_is_current(run_dir / "final", state.step):  # killed after its last checkpoint, before export
            export_final(run_dir / "final", policy, run.tokenizer, state.step)
        console.print(f"Run already finished at step {state.step} (trainer.max_steps={config.trainer.max_steps}); "
                      "raise trainer.max_steps to train further.")
        return TrainResult(run_dir, state.step, None, None)

    def run_eval(step: int) -> EvalResult | None:
        if not run.heldout:
            return None
        with torch.random.fork_rng():  # evaluation must not change the training trajectory
            torch.manual_seed(config.trainer.seed + 7919 * step)
            return sharded_eval(run.heldout, generator, run.template, run.reward, run.decode, run.eval_sampling,
                                policy.data_parallel_group)

    logger = MetricsLogger(run_dir, build_loggers(config, run_dir, state.step) if main else [],
                           resume_step=state.step if resume_from is not None else None, enabled=main)
    initial = final = None
    checkpoints = run_dir / "checkpoints"
    progress = TrainingProgress(console, enabled=config.trainer.progress and main, total=config.trainer.max_steps,
                                start=state.step)
    stopped_by = None
    try:
        if state.step == 0 and config.trainer.eval_every:
            result = run_eval(0)
            if result is not None:
                initial = result.accuracy
                logger.log(0, _eval_metrics(result))
                console.print(f"Held-out accuracy before RL: [bold]{100 * initial:.1f}%[/] ({len(run.heldout)} "
                              "problems)")
        with progress, stop_requests() as signal_received:
            def stop_requested() -> bool:
                # Every rank must stop after the same step, whichever rank received the signal first.
                return distributed.any_rank(bool(signal_received()) or (main and (run_dir / STOP_FILE).exists()))

            while state.step < config.trainer.max_steps:
                state.step += 1
                faults.point("train.step", step=state.step)
                metrics = train_step(policy, run.loss, producer, config.algorithm.ppo_epochs)
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
                    save_state(checkpoints, state, policy, producer, config.trainer.keep_last)  # its sampler state
                if stop and state.step < config.trainer.max_steps:
                    stopped_by = signal_received() or (
                        f"{STOP_FILE} file" if (run_dir / STOP_FILE).exists() else "another rank's signal")
                    saved = find_latest(checkpoints, verify=False)
                    console.print(f"Stop requested ({stopped_by}) after step {state.step}; newest checkpoint: "
                                  f"{saved}. Run again with trainer.resume=auto to continue.")
                    break
    finally:
        logger.close()
        run.close()  # the producer first, then the generator and the reward

    if state.step == config.trainer.max_steps:
        export_final(run_dir / "final", policy, run.tokenizer, state.step)
    if initial is not None and final is not None:
        console.print(f"Held-out accuracy: [bold]{100 * initial:.1f}% → {100 * final:.1f}%[/] "
                      f"({100 * (final - initial):+.1f} points)")
    return TrainResult(run_dir, state.step, initial, final, stopped_by)


def train_step(policy: PolicyBackend, loss: LossSpec, producer: RolloutProducer, epochs: int) -> dict[str, float]:
    """One RL step (Algorithm 1): Stage-1 drafts → best draft → Stage-2 refinements → advantages, then ``epochs``
    policy updates on the refinements (``algorithm.ppo_epochs``) and the weight sync. Returns its metrics (rewards,
    losses, seconds per phase, tokens/s)."""
    timer = PhaseTimer()
    group = policy.data_parallel_group
    batch, metrics = producer.next_batch(timer)  # timed as "rollout" ("rollout_wait" / "draft_wait" if it overlaps)
    if loss.needs_reference:
        with timer("reference_logprobs"):
            batch.ref_logprobs = policy.compute_logprobs(batch, reference=True).logprobs
    if epochs > 1:  # with one pass, π_old = π_θ (detached) exactly, so no extra forward is needed
        with timer("old_logprobs"):
            batch.old_logprobs = policy.compute_logprobs(batch).logprobs
    loss_fn = loss.build(global_normalizer(batch.loss_mask, loss.max_tokens, group))
    with timer("update"):
        updates = [policy.train_step(batch, loss_fn) for _ in range(epochs)]
    faults.point("train.updated")
    producer.sync_weights(policy.export_weights(), timer)  # timed as "weight_sync" (and "sync_wait")

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



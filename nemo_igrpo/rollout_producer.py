"""Where each step's rollout comes from, and the one place where generation may overlap training.

The loop asks ``next_batch`` for step t's batch and routes the weight sync after its update through
``sync_weights``; ``state_dict`` is what a checkpoint records of the prompt stream. The assembly builds the producer
once (``assembly.build_producer``), around a ``BatchCollector`` (the iGRPO batch bound to the run's generator, reward,
template and settings) and this rank's ``ShardedSource``; ``make_producer`` picks one of three producers from the
``rollout`` config section:

* :class:`RolloutProducer` (the default): today's synchronous rollout, a thin call of ``BatchCollector.collect``
  followed by ``generator.update_weights``; bit-identical to the loop before producers existed.
* :class:`DraftAheadProducer` (``rollout.draft_ahead``): step t+1's Stage-1 drafts during step t's update, the
  refinements (the trained tokens) exactly on-policy.
* :class:`AsyncRolloutProducer` (``rollout.max_off_policy_steps: k > 0``): whole rollouts up to k policy versions
  ahead of the trainer, corrected by truncated importance sampling against the generator's log-probs.

Shared rules of the overlapping producers:

* **Versions.** ``version`` counts the updates in the generator's weights (the step a run resumed at, plus the
  syncs since). A sample generated on version v and trained at step t (whose policy is version t − 1) is
  t − 1 − v versions stale.
* **In-flight requests at a sync** (``rollout.inflight_updates``). ``wait`` (the default): a sync never changes
  the weights under a running job. It waits until the job in flight has finished on the old weights (both of its
  stages: a group's drafts and refinements always come from one version); jobs not started yet run on the new
  weights, so no sequence mixes two policies. The wait is timed as ``time/sync_wait``. ``keep``: the sync does not
  wait; the server pauses the requests in flight, takes the new weights and lets them go on (partial rollouts:
  a sequence's first tokens come from one version, its last from a newer one). Every row records the first and
  the last version its tokens may have come from (``batch.policy_version`` / ``policy_version_last``: a job's
  version when it started, and when it ended, counting a sync still running then); staleness is measured from the
  first, and ``rollout/version_span`` is last − first.
* **Exact resume.** Prompts are drawn from the sampler by the jobs, ahead of the step that trains on them, so
  ``state_dict`` is the sampler state from before the oldest unconsumed job's first draw. A run resumed from it
  draws those prompts again, in the same order, and regenerates them on the checkpointed weights: no prompt is
  lost or repeated. ``rollout/sampler_start`` / ``rollout/sampler_end`` (every producer) log which stretch of the
  sampler's stream each step trained on, so a run's consumed prompts can be audited after the fact.
* **Threads, not processes.** A job runs in one background thread on the same generator, reward and torch global
  RNG as the loop. The loop meanwhile only computes log-probs and the update, which draw no random numbers unless
  the model has dropout; even so, which thread draws first is timing, so an overlapping run is not bitwise
  reproducible (the synchronous one is). Nothing in a job is collective across ranks (each data-parallel rank
  produces its own slice), which is why peers that share one request (Megatron tensor/pipeline peers) are refused.

Both overlapping producers are refused where they cannot overlap (generation backends that generate on the trainer's
own device), and with tensor/pipeline-parallel peers: every ``rollout.*`` check is in ``validation``.

With a token budget per micro-batch (``balance_tokens``), every batch is re-dealt over the data-parallel ranks by
tokens (``sharding.balance_across_ranks``) before the loop gets it.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass, field
from typing import Iterable

import torch

from nemo_igrpo.algorithms.batch import RolloutBatch
from nemo_igrpo.algorithms.igrpo import BatchCollector, Drafts
from nemo_igrpo.background import DaemonExecutor
from nemo_igrpo.progress import PhaseTimer
from nemo_igrpo.sharding import ShardedSource, balance_across_ranks


class RolloutProducer:
    """The synchronous producer: step t's rollout when the loop asks for it, on the weights of update t − 1."""

    def __init__(self, collector: BatchCollector, source: ShardedSource, *, balance_tokens: bool = False,
                 shared_prefix: bool = False, start_step: int = 0, max_steps: int | None = None,
                 inflight_updates: str = "wait") -> None:
        self.collector = collector
        self.keep_inflight = inflight_updates == "keep"  # a sync lets running jobs go on (overlapping producers)
        self.generator = collector.generator
        self.source = source
        self.sampler = source.sampler
        self.balance_tokens = balance_tokens  # re-deal each batch over the data-parallel ranks by tokens
        self.shared_prefix = shared_prefix  # ... in whole groups, weighed by the tokens the shared layout computes
        self.max_steps = max_steps
        self.resume_at(start_step)

    def resume_at(self, step: int) -> None:
        """Start at ``step`` (a resumed run, once the checkpoint's sampler state is loaded): ``step`` batches were
        handed out and the generator holds ``step`` updates."""
        self.step = step  # steps whose batch was handed out
        self.version = step  # updates in the generator's weights
        self._boundary = self.sampler.state_dict()  # the sampler at the last step boundary (nothing drawn ahead)

    # ------------------------------------------------------------------------------------------ the loop's calls

    def next_batch(self, timer: PhaseTimer) -> tuple[RolloutBatch, dict[str, float]]:
        """Step t's batch and rollout metrics; its phases are timed into ``timer``."""
        start = self._position()
        with timer("rollout"):
            batch, metrics = self._collect(timer.seconds)
        self.source.synchronize()
        self._handed_out(metrics, start)
        metrics["rollout/draft_version_lag"] = 0.0
        return self._balanced(batch), metrics

    def sync_weights(self, weights: Iterable, timer: PhaseTimer) -> None:
        """Push the updated weights to the generator."""
        with timer("weight_sync"):
            self.generator.update_weights(weights)
        self.version += 1

    def state_dict(self) -> dict[str, int]:
        """The sampler state a checkpoint written now must record: the one at the last step boundary, before any
        prompts drawn ahead (a resume draws them again)."""
        return dict(self._boundary)

    def close(self) -> None:
        """Nothing runs in the background here (see the overlapping producers)."""

    # ------------------------------------------------------------------------------------------ shared pieces

    def _collect(self, timings: dict[str, float], drafts: Drafts | None = None):
        batch, metrics = self.collector.collect(self.source.draw, self.source.per_rank, timings=timings, drafts=drafts)
        metrics.update(self.generator.rollout_metrics())
        return batch, metrics

    def _balanced(self, batch: RolloutBatch) -> RolloutBatch:
        """Long-tailed lengths under a token budget: equal tokens (not rows) per data-parallel rank."""
        if not self.balance_tokens:
            return batch
        return balance_across_ranks(batch, self.source.group, self.shared_prefix)

    def _position(self) -> int:
        """How many prompts the sampler has handed out since the start of its stream (epoch 0, position 0)."""
        return self.sampler.epoch * len(self.sampler) + self.sampler.position

    def _handed_out(self, metrics: dict[str, float], start: int, end: int | None = None) -> None:
        """Bookkeeping once a batch is handed to the loop: it drew the sampler's stream [start, end)."""
        self.step += 1
        self._boundary = self.sampler.state_dict()
        metrics["rollout/sampler_start"] = float(start)
        metrics["rollout/sampler_end"] = float(self._position() if end is None else end)


# ---------------------------------------------------------------------------------------------- draft-ahead


@dataclass
class _DraftJob:
    future: Future  # -> Drafts
    version: int  # the policy version the drafts were sampled with
    start: int  # the sampler's stream position before the job drew its prompts
    started: float  # perf_counter at submission
    finished: list  # [perf_counter at completion], set by the job itself
    overlap: float = 0.0  # seconds it ran beside the loop, set when the loop first waits for it


class DraftAheadProducer(RolloutProducer):
    """Draft-ahead iGRPO (``rollout.draft_ahead: true``): right after step t's Stage 2, a background thread runs
    step t+1's Stage 1 (draw the prompts, sample N drafts each, score, select the best: ``igrpo.draft_stage``) on
    the generator, while the loop computes step t's update. With W_t the weights after update t::

        main thread   | Stage 2 (t) on W_{t-1} | update t ............... | wait | sync W_t | Stage 2 (t+1) on W_t |
        draft thread  |                        | Stage 1 (t+1) on W_{t-1} |

    The refinements, the only tokens that carry loss, are exactly on-policy; only the drafts that condition them
    are one version old (``rollout/draft_version_lag`` = 1; 0 for a step drafted synchronously: the first step of a
    run or of a resume). ``time/rollout/draft_overlap`` is how long the draft job ran beside the update, and
    ``time/draft_wait`` how long the loop then waited for it. A resumed run redoes the drafts of the step after the
    checkpoint synchronously from the checkpointed weights (same prompts; not the same drafts).
    """

    def __init__(self, collector: BatchCollector, source: ShardedSource, **options) -> None:
        super().__init__(collector, source, **options)
        self._ahead: _DraftJob | None = None
        self._executor = DaemonExecutor("draft-ahead")

    def next_batch(self, timer: PhaseTimer) -> tuple[RolloutBatch, dict[str, float]]:
        job, self._ahead = self._ahead, None
        drafts, lag, overlap, start = None, 0, 0.0, self._position()
        if job is not None:
            with timer("draft_wait"):
                drafts = self._wait(job)
            lag, overlap, start = self.version - job.version, job.overlap, job.start
        with timer("rollout"):
            batch, metrics = self._collect(timer.seconds, drafts)
        self.source.synchronize()
        self._handed_out(metrics, start)
        metrics["rollout/draft_version_lag"] = float(lag)
        timer.seconds["rollout/draft_overlap"] = overlap
        if self.max_steps is None or self.step < self.max_steps:
            self._start_ahead()
        return self._balanced(batch), metrics

    def sync_weights(self, weights: Iterable, timer: PhaseTimer) -> None:
        """Push the updated weights once the draft job is done with the old ones (under ``keep``, at once: the
        drafts still being sampled go on under the new weights)."""
        if self._ahead is not None and not self.keep_inflight:
            with timer("draft_wait"):
                self._wait(self._ahead)
        super().sync_weights(weights, timer)

    def close(self) -> None:
        """Drop a pending draft job without waiting for it (its daemon thread cannot hold up the exit either)."""
        if self._ahead is not None:
            self._ahead.future.cancel()
            self._ahead = None
        self._executor.shutdown()

    def _start_ahead(self) -> None:
        finished, start = [], self._position()  # before the job can draw

        def job() -> Drafts:
            try:
                return self.collector.draft(self.source.draw, self.source.per_rank)
            finally:
                finished.append(time.perf_counter())

        self._ahead = _DraftJob(self._executor.submit(job), self.version, start, time.perf_counter(), finished)

    @staticmethod
    def _wait(job: _DraftJob) -> Drafts:
        if not job.overlap and not job.future.done():
            job.overlap = time.perf_counter() - job.started
        drafts = job.future.result()  # re-raises the job's error in the loop
        if not job.overlap:
            job.overlap = job.finished[0] - job.started
        return drafts


# ---------------------------------------------------------------------------------------------- asynchronous


@dataclass
class _RolloutJob:
    step: int  # the training step that will consume it
    future: Future | None = None  # -> (RolloutBatch, metrics)
    version: int | None = None  # the policy version it ran on, set when it starts
    last_version: int | None = None  # ... when it ended (newer if a sync ran meanwhile under inflight_updates=keep)
    sampler_before: dict | None = None  # the sampler state before its first draw, set when it starts
    start: int = 0  # the sampler's stream position then
    end: int = 0  # ... and after its last draw
    timings: dict[str, float] = field(default_factory=dict)  # its phases (rollout/*), and its whole duration


class AsyncRolloutProducer(RolloutProducer):
    """Bounded-staleness asynchronous rollouts (``rollout.max_off_policy_steps: k > 0``).

    One background thread runs whole rollouts (both stages, dynamic-sampling rounds included) back to back, in step
    order; the rollout of step s may start once the generator holds version s − 1 − k or newer, so the trainer at
    step s (version s − 1) trains on samples at most k versions old. At ``next_batch(t)`` the jobs of steps
    t … t + k are queued and step t's is waited for. With k = 1 and a rollout as long as an update::

        main thread  | wait | update t .............. | sync W_t | update t+1 ............ | sync W_{t+1} |
        rollouts     | rollout t on W_{t-2} ... | rollout t+1 on W_{t-1} | rollout t+2 on W_t |

    The behaviour policy is the generator: ``batch.gen_logprobs`` are the log-probs of the version that sampled
    each token, and ``algorithm.importance_correction`` (required, see ``validation``) weights every token's loss by
    min(π_θ / π_gen, cap). Every row records its version (``batch.policy_version``). Logged per step:
    ``rollout/policy_version``, ``rollout/staleness`` (versions behind the trainer), ``rollout/stale_token_fraction``
    (share of the step's trained tokens sampled by an older version), ``rollout/staleness_hist/j`` (share of rows
    j versions old, j = 0 … k; summed over steps it is the run's histogram), ``time/rollout_wait`` (the loop waiting
    for a batch), ``time/rollout/job`` (the job's own duration) and ``time/sync_wait``; the importance-weight
    statistics come from the loss (``train/mismatch/is_weight_mean``, ``is_capped_fraction``, ``token_prob_error``).

    With several data-parallel ranks every rank produces its own slice; dynamic sampling is then refused, because
    ranks would draw different numbers of prompts and their samplers could no longer be aligned between jobs.
    """

    def __init__(self, collector: BatchCollector, source: ShardedSource, *, max_off_policy_steps: int,
                 **options) -> None:
        super().__init__(collector, source, **options)
        if max_off_policy_steps < 1:
            raise ValueError(f"max_off_policy_steps must be >= 1, got {max_off_policy_steps}")
        self.k = max_off_policy_steps
        self._jobs: deque[_RolloutJob] = deque()  # queued or done, not consumed yet, in step order
        self._gate = threading.Condition()  # guards the three fields below and the sampler/version reads of a job
        self._generating = False  # a job is running on the generator
        self._sync_pending = False  # the loop waits to change the weights (or a sync failed): no job may start
        self._closed = False  # close() was called: a job waiting at the gate gives up
        self._executor = DaemonExecutor("rollouts")

    def resume_at(self, step: int) -> None:
        super().resume_at(step)
        self._queued_to = step  # the last step with a job

    def next_batch(self, timer: PhaseTimer) -> tuple[RolloutBatch, dict[str, float]]:
        step = self.step + 1
        last = step + self.k if self.max_steps is None else min(step + self.k, self.max_steps)
        while self._queued_to < last:  # version = step − 1 here, so these may all start (staleness ≤ k)
            self._queued_to += 1
            self._queue(_RolloutJob(self._queued_to))
        job = self._jobs.popleft()
        assert job.step == step, (job.step, step)
        with timer("rollout_wait"):
            batch, metrics = job.future.result()  # re-raises the job's error in the loop
        timer.seconds.update(job.timings)
        self._handed_out(metrics, job.start, job.end)
        staleness = self.version - job.version  # from the oldest tokens the job may hold
        rows = batch.size
        batch.policy_version = torch.full((rows,), job.version, dtype=torch.long)
        batch.policy_version_last = torch.full((rows,), job.last_version, dtype=torch.long)
        metrics["rollout/draft_version_lag"] = float(staleness)  # drafts are as old as their refinements here
        metrics["rollout/policy_version"] = float(job.version)
        metrics["rollout/version_span"] = float(job.last_version - job.version)
        metrics["rollout/staleness"] = float(staleness)
        metrics["rollout/stale_token_fraction"] = 1.0 if staleness > 0 and batch.loss_mask.sum() > 0 else 0.0
        for j in range(self.k + 1):
            metrics[f"rollout/staleness_hist/{j}"] = 1.0 if staleness == j else 0.0
        return self._balanced(batch), metrics

    def sync_weights(self, weights: Iterable, timer: PhaseTimer) -> None:
        """Change the weights between jobs: wait for the job in flight to finish on the old ones (under ``keep``, do
        not: it goes on under the new ones), keep the next from starting, push, release. A failed or interrupted
        sync keeps the gate shut: the generator's weights are then unknown and the run is ending (a job started on a
        dead server would wait out its whole retry budget first); ``close`` ends the jobs waiting at the gate."""
        with timer("sync_wait"):
            with self._gate:
                self._sync_pending = True
                if not self.keep_inflight:
                    self._gate.wait_for(lambda: not self._generating)
        super().sync_weights(weights, timer)
        with self._gate:
            self._sync_pending = False
            self._gate.notify_all()

    def state_dict(self) -> dict[str, int]:
        """The sampler state before the oldest unconsumed job's first draw (the current state if it has not started:
        then nothing was drawn beyond the consumed steps)."""
        with self._gate:
            oldest = self._jobs[0] if self._jobs else None
            if oldest is not None and oldest.sampler_before is not None:
                return dict(oldest.sampler_before)
            return self.sampler.state_dict()

    def close(self) -> None:
        """Drop every job without waiting for the running one (its results would be discarded; its daemon thread
        cannot hold up the exit either), and end a job waiting at the gate for a sync that will not come."""
        with self._gate:
            self._closed = True
            self._gate.notify_all()
        for job in self._jobs:
            job.future.cancel()
        self._jobs.clear()
        self._executor.shutdown()

    def _queue(self, job: _RolloutJob) -> None:
        def produce():
            with self._gate:
                self._gate.wait_for(lambda: not self._sync_pending or self._closed)
                if self._closed:
                    raise CancelledError("the rollout producer was closed")
                self._generating = True
                job.version = self.version
                job.sampler_before, job.start = self.sampler.state_dict(), self._position()
            began = time.perf_counter()
            try:
                return self._collect(job.timings)
            finally:
                with self._gate:
                    job.end = self._position()
                    # a sync under way (keep) may already have changed the weights under the job's last requests
                    job.last_version = self.version + (1 if self._sync_pending and self.keep_inflight else 0)
                    job.timings["rollout/job"] = time.perf_counter() - began
                    self._generating = False
                    self._gate.notify_all()

        job.future = self._executor.submit(produce)
        self._jobs.append(job)


def make_producer(collector: BatchCollector, source: ShardedSource, *, draft_ahead: bool = False,
                  max_off_policy_steps: int = 0, **options) -> RolloutProducer:
    """The producer the ``rollout`` config section asks for (``validation`` refuses the combinations that cannot
    overlap)."""
    if max_off_policy_steps > 0:
        return AsyncRolloutProducer(collector, source, max_off_policy_steps=max_off_policy_steps, **options)
    kind = DraftAheadProducer if draft_ahead else RolloutProducer
    return kind(collector, source, **options)  # RolloutProducer's keyword options

"""Where each step's rollout comes from, and the one place where generation may overlap training.

The loop asks ``next_batch`` for step t's batch and routes the weight sync through ``sync_weights``. Without
``rollout.draft_ahead`` that is exactly today's synchronous rollout (a thin call of ``algorithms.igrpo.rollout``)
followed by ``generator.update_weights``.

Draft-ahead iGRPO (``rollout.draft_ahead: true``): right after step t's Stage 2, a background thread runs step t+1's
Stage 1 (draw the prompts, sample N drafts each, score, select the best: ``igrpo.draft_stage``) on the generator,
while the loop computes step t's update on the trainer. Timeline of one step, with W_t the weights after update t::

    main thread   | Stage 2 (t) on W_{t-1} | update t ............... | wait | sync W_t | Stage 2 (t+1) on W_t |
    draft thread  |                        | Stage 1 (t+1) on W_{t-1} |

* ``sync_weights`` waits for the draft job before it pushes new weights: the generator never changes weights in
  the middle of a draft job, so every draft of a step comes from one policy version (W_{t-1}) and the server's
  in-flight requests are never mixed across a sync (in-flight weight updates, issue 13 item 3, are for later).
* Stage 2 of step t+1 runs after the sync, on W_t: the refinements, the only tokens that carry loss, are exactly
  on-policy. Only the drafts that condition them are one version old (``rollout/draft_version_lag`` = 1; 0 for a
  step whose drafts were made synchronously: the first step of a run or of a resume, and always without
  draft-ahead). ``time/rollout/draft_overlap`` is how long the draft job ran beside the update (seconds), and
  ``time/draft_wait`` how long the sync then waited for it.
* Exact resume: the prompts of step t+1 are drawn from the sampler ahead of time, so ``state_dict`` (what a
  checkpoint written after step t records) is the sampler's state from *before* that draw. A run resumed from it
  draws step t+1's prompts again, the same ones, and regenerates their drafts synchronously from the checkpointed
  weights W_t (lag 0 for that step): no prompt is lost or repeated, but those drafts are not the ones the
  interrupted run would have used.
* The draft job uses the same generator, reward and torch global RNG (sampling seeds, random tie-breaks) as the
  loop. While it runs, the loop only computes log-probs and the update, which draw no random numbers unless the
  model has dropout (e.g. ``policy.lora.dropout``); then the interleaving, and so the run, is not bitwise
  reproducible. Nothing in the job is collective across ranks (each rank drafts its own slice; ranks re-align
  their samplers in the main thread), which is why peers that share one request (Megatron tensor/pipeline peers)
  are refused.

It is refused where it cannot overlap (``generation.backend`` hf or vllm, which generate on the trainer's own
device) and for GRPO (``algorithm.num_drafts: 0``: there is no Stage 1): see ``config.validate``.

Extending to ``rollout.max_off_policy_steps: k > 0`` (bounded-staleness asynchronous rollouts): the job becomes a
whole rollout (both stages) tagged with the version it ran on, a queue of at most k of them replaces the single
``_ahead`` slot, ``sync_weights`` stops waiting (or defines the in-flight policy), and ``state_dict`` returns the
sampler state before the oldest unconsumed job's draw.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable

from nemo_igrpo import distributed
from nemo_igrpo.algorithms.batch import RolloutBatch
from nemo_igrpo.algorithms.igrpo import Drafts, draft_stage, rollout
from nemo_igrpo.data.dataset import PromptSampler
from nemo_igrpo.errors import ConfigError
from nemo_igrpo.progress import PhaseTimer
from nemo_igrpo.sharding import ShardedSource


@dataclass
class _AheadJob:
    future: Future  # -> Drafts
    version: int  # the policy version (number of weight syncs) the drafts were sampled with
    started: float  # perf_counter at submission
    finished: list  # [perf_counter at completion], set by the job itself
    overlap: float = 0.0  # seconds it ran beside the loop, set when the loop first waits for it


class RolloutProducer:
    """Step t's training batch on request (``next_batch``), and the weight sync after its update
    (``sync_weights``); with ``draft_ahead``, step t+1's Stage 1 in a background thread between the two."""

    def __init__(self, run, sampler: PromptSampler, prompts_per_step: int, *, draft_ahead: bool = False,
                 start_step: int = 0, max_steps: int | None = None) -> None:
        self.run = run
        self.sampler = sampler
        self.source = ShardedSource(sampler, prompts_per_step, run.policy.data_parallel_group)
        self.draft_ahead = draft_ahead
        self.step = start_step  # steps whose batch was handed out
        self.max_steps = max_steps
        self.version = 0  # weight syncs so far: the generator's policy version
        self._ahead: _AheadJob | None = None
        self._boundary = sampler.state_dict()  # the sampler at the last step boundary (nothing drawn ahead)
        self._executor = None
        if draft_ahead:
            peers = run.policy.model_parallel_group
            if peers is not None and distributed.world_size(peers) > 1:
                raise ConfigError("rollout.draft_ahead: not supported with tensor/pipeline-parallel peers "
                                  "(policy.megatron.*_parallel_size > 1): peers share one generation request "
                                  "through collectives, which cannot run beside the update; set "
                                  "rollout.draft_ahead=false")
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="draft-ahead")

    # ------------------------------------------------------------------------------------------ the loop's calls

    def next_batch(self, timer: PhaseTimer) -> tuple[RolloutBatch, dict[str, float]]:
        """Step t's batch and rollout metrics; its phases are timed into ``timer`` (``rollout``, ``draft_wait``)."""
        run = self.run
        drafts, lag, overlap = self._take_drafts(timer)
        with timer("rollout"):
            batch, metrics = rollout(self.source.draw, self.source.per_rank, run.generator, run.reward, run.template,
                                     run.decode, run.rollout, run.tokenizer.pad_token_id, timings=timer.seconds,
                                     drafts=drafts)
        self.source.synchronize()
        self.step += 1
        self._boundary = self.sampler.state_dict()
        metrics["rollout/draft_version_lag"] = float(lag)
        if self.draft_ahead:
            timer.seconds["rollout/draft_overlap"] = overlap
            if self.max_steps is None or self.step < self.max_steps:
                self._start_ahead()
        return batch, metrics

    def sync_weights(self, weights: Iterable, timer: PhaseTimer) -> None:
        """Push the updated weights to the generator, after the draft job (if any) is done with the old ones."""
        if self._ahead is not None:
            with timer("draft_wait"):
                self._wait(self._ahead)
        with timer("weight_sync"):
            self.run.generator.update_weights(weights)
        self.version += 1

    def state_dict(self) -> dict[str, int]:
        """The sampler state a checkpoint written now must record: the one at the last step boundary, before any
        prompts drawn ahead (a resume draws them again)."""
        return dict(self._boundary)

    def close(self) -> None:
        """Finish (and drop) a pending draft job before the generator is closed."""
        if self._ahead is not None:
            try:
                self._ahead.future.result()
            except Exception:  # noqa: BLE001  (the run is ending; the job's own error does not matter now)
                pass
            self._ahead = None
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    # ------------------------------------------------------------------------------------------ the draft job

    def _start_ahead(self) -> None:
        run, finished = self.run, []

        def job() -> Drafts:
            try:
                return draft_stage(self.source.draw, self.source.per_rank, run.generator, run.reward, run.template,
                                   run.decode, run.rollout)
            finally:
                finished.append(time.perf_counter())

        self._ahead = _AheadJob(self._executor.submit(job), self.version, time.perf_counter(), finished)

    def _wait(self, job: _AheadJob) -> Drafts:
        if not job.overlap and not job.future.done():
            job.overlap = time.perf_counter() - job.started
        drafts = job.future.result()  # re-raises the job's error in the loop
        if not job.overlap:
            job.overlap = job.finished[0] - job.started
        return drafts

    def _take_drafts(self, timer: PhaseTimer) -> tuple[Drafts | None, int, float]:
        job, self._ahead = self._ahead, None
        if job is None:
            return None, 0, 0.0
        with timer("draft_wait"):
            drafts = self._wait(job)
        return drafts, self.version - job.version, job.overlap


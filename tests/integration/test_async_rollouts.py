"""Bounded-staleness asynchronous rollouts (``rollout.max_off_policy_steps: k > 0``): the producer's schedule
(whole rollouts up to k versions ahead, one version per job, syncs only between jobs), its checkpointed sampler
state, exact prompts across a resume, the refusals, and, through a real ``nemo-igrpo serve``, a SIGKILL mid-step
followed by a resume that trains on exactly the prompts of the uninterrupted run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch
from test_draft_ahead import END, PROBLEMS, REPO, TOKENIZER, RandomAnswers, collector, decode, settings, shard

from nemo_igrpo.config import ConfigError, load_config
from nemo_igrpo.data.dataset import PromptSampler
from nemo_igrpo.generation.base import Completion
from nemo_igrpo.progress import PhaseTimer
from nemo_igrpo.rollout_producer import AsyncRolloutProducer, make_producer
from nemo_igrpo.validation import check_rollout_parallelism


def problems_of(batch) -> list[int]:
    """The problem numbers a batch trains on, one per group, read back from its token ids (``Q<i>?``)."""
    firsts = [int(torch.nonzero(batch.group_ids == g)[0]) for g in batch.group_ids.unique(sorted=True)]
    return [int(re.search(r"Q(\d+)\?", decode(batch.input_ids[row].tolist())).group(1)) for row in firsts]


def drive(producer, steps: int, update_s: float, sampler: PromptSampler | None = None) -> list[dict]:
    """What the trainer does with a producer: take a batch, "update" for ``update_s`` seconds, sync; per step the
    metrics, the problems trained on, the timings, and the sampler state a checkpoint would record (and, given the
    ``sampler``, its actual state then, drawn-ahead prompts included)."""
    out = []
    for _ in range(steps):
        timer = PhaseTimer()
        batch, metrics = producer.next_batch(timer)
        time.sleep(update_s)
        producer.sync_weights([], timer)
        versions = None if batch.policy_version is None else batch.policy_version.tolist()  # set by the async one
        out.append({"metrics": metrics, "versions": versions, "problems": problems_of(batch),
                    "seconds": timer.seconds, "checkpoint": producer.state_dict(),
                    "sampler": None if sampler is None else sampler.state_dict()})
    return out


def test_one_step_off_rollouts_run_during_the_update_on_the_previous_weights():
    """k = 1: step t+1's whole rollout (drafts and refinements) runs on version t−1 while update t runs; the sync
    waits for it; every row is tagged with its version; the checkpoint records the sampler from before the drawn-ahead
    prompts; nothing is queued past max_steps."""
    generator = RandomAnswers(delay=0.05)
    sampler = PromptSampler(PROBLEMS, seed=0)
    producer = AsyncRolloutProducer(collector(generator, settings()), shard(sampler), max_off_policy_steps=1,
                                    max_steps=4)
    steps = drive(producer, 4, update_s=0.3)
    producer.close()
    staleness = [s["metrics"]["rollout/staleness"] for s in steps]
    assert staleness == [0.0, 1.0, 1.0, 1.0]
    assert [s["metrics"]["rollout/policy_version"] for s in steps] == [0.0, 0.0, 1.0, 2.0]
    assert [s["versions"] for s in steps] == [[v] * 16 for v in (0, 0, 1, 2)]  # 4 groups × 4 refinements
    assert [s["metrics"]["rollout/stale_token_fraction"] for s in steps] == [0.0, 1.0, 1.0, 1.0]
    assert [(s["metrics"]["rollout/staleness_hist/0"], s["metrics"]["rollout/staleness_hist/1"]) for s in steps] == [
        (1.0, 0.0), (0.0, 1.0), (0.0, 1.0), (0.0, 1.0)]
    # both stages of every job on one version: (draft, v), (refine, v) pairs, versions 0, 0, 1, 2
    assert [c[:2] for c in generator.calls] == [(stage, v) for v in (0, 0, 1, 2) for stage in ("draft", "refine")]
    # the job ran beside the 0.3 s update: the loop never waited for steps 2-4's batches; the upper bound only
    # catches a unit error on a loaded machine
    assert all(s["seconds"]["rollout_wait"] < 0.25 for s in steps[1:])
    assert all(0.09 < s["seconds"]["rollout/job"] < 5.0 for s in steps)  # two 0.05 s requests each
    assert [(s["metrics"]["rollout/sampler_start"], s["metrics"]["rollout/sampler_end"]) for s in steps] == [
        (0, 4), (4, 8), (8, 12), (12, 16)]
    # after steps 1-3 the next step's prompts were already drawn: the checkpoint goes back to the step boundary
    assert [s["checkpoint"]["position"] for s in steps] == [4, 8, 12, 16] and sampler.state_dict()["position"] == 16


class KeptAnswers(RandomAnswers):
    """A server under ``rollout.inflight_updates=keep``: weights may change while a request is in flight, and each
    call records the versions it started and ended under."""

    def generate(self, prompts, params):
        started = self.version
        time.sleep(self.delay)
        stage = "refine" if "Draft:" in decode(prompts[0]) else "draft"
        self.calls.append((stage, started, self.version))
        ids = TOKENIZER.encode("\\boxed{1}", add_special_tokens=False) + [END]
        return [[Completion(ids, [-0.25] * len(ids), "stop") for _ in range(params.n)] for _ in prompts]

    def update_weights(self, weights):
        self.version += 1


def test_keep_syncs_beside_the_running_job_and_tags_each_row_with_its_first_and_last_version():
    """inflight_updates=keep, k = 1, rollouts (2 × 0.3 s) slower than updates (0.05 s): the sync does not wait for
    the job in flight (time/sync_wait ≈ 0, where wait mode waits ≈ the rest of the job), so a job's requests span
    two versions; every row carries the version its job started on and the one it ended on, and staleness counts
    from the first."""
    generator = KeptAnswers(delay=0.3)
    producer = AsyncRolloutProducer(collector(generator, settings()), shard(PromptSampler(PROBLEMS)),
                                    max_off_policy_steps=1, max_steps=4, inflight_updates="keep")
    steps = []
    for _ in range(4):
        timer = PhaseTimer()
        batch, metrics = producer.next_batch(timer)
        time.sleep(0.05)
        producer.sync_weights([], timer)
        steps.append((batch.policy_version.unique().tolist(), batch.policy_version_last.unique().tolist(), metrics,
                      timer.seconds["sync_wait"]))
    producer.close()
    assert all(wait < 0.1 for *_, wait in steps[:3])  # a 0.6 s job was running at each of the first three syncs
    # step 1's job is waited for before any sync; each later job starts as the previous one ends, at the step's
    # batch, and is running at the sync 0.05 s later
    spans = [(first[0], last[0]) for first, last, *_ in steps]
    assert spans == [(0, 0), (0, 1), (1, 2), (2, 3)]
    assert [metrics["rollout/staleness"] for _, _, metrics, _ in steps] == [0.0, 1.0, 1.0, 1.0]  # from the first
    for (first, last), (_, _, metrics, _) in zip(spans, steps):
        assert metrics["rollout/version_span"] == last - first and metrics["rollout/policy_version"] == first
    # the recorded span covers what the generator saw: each job's two requests ran within it
    for job, (first, last) in enumerate(spans):
        assert all(first <= v <= last for _, *versions in generator.calls[2 * job:2 * job + 2] for v in versions)


# A job is two requests of rollout_s. For staleness k from step k + 1 on, the jobs of steps 2 … k + 1 must all start
# before the first sync, i.e. k jobs (2k · rollout_s) within one job plus one update: (2, 0.01, 0.15) and
# (3, 0.005, 0.15) leave ≥ 0.12 s of slack for a loaded machine's scheduling (3, 0.02, 0.1 left 0.02 s and flaked).
# (2, 0.1, 0.05): a 0.2 s job outlasts the 0.05 s update by 0.15 s, and the next job starts as soon as the previous
# one is done (the same thread, microseconds), well before the loop's sync 0.05 s later.
@pytest.mark.parametrize("k, rollout_s, update_s", [(2, 0.01, 0.15), (2, 0.1, 0.05), (3, 0.005, 0.15)])
def test_staleness_never_exceeds_k(k, rollout_s, update_s):
    """Fast rollouts run as far ahead as allowed (staleness reaches k and stays there); slow ones are consumed as
    soon as they are done (staleness exactly 1: each job runs beside the update before it, on the weights before
    that update, and the sync waits for it). Never more than k."""
    producer = AsyncRolloutProducer(collector(RandomAnswers(delay=rollout_s), settings()),
                                    shard(PromptSampler(PROBLEMS)), max_off_policy_steps=k, max_steps=8)
    steps = drive(producer, 8, update_s)
    producer.close()
    staleness = [int(s["metrics"]["rollout/staleness"]) for s in steps]
    assert staleness[0] == 0 and max(staleness) <= k
    if update_s > rollout_s * 4:  # rollouts far faster than updates: the queue fills up to k
        assert staleness[k:] == [k] * (8 - k)
    else:  # rollouts slower than updates: one job ahead, never more (a producer that never runs ahead gives 0)
        assert staleness[1:] == [1] * 7
    assert all(sum(s["metrics"][f"rollout/staleness_hist/{j}"] for j in range(k + 1)) == 1.0 for s in steps)


def test_a_resume_from_the_checkpointed_state_trains_on_the_same_prompts():
    """Stop after step 2 of a 4-step run (step 3's prompts already drawn ahead), resume a new producer from the
    recorded sampler state: steps 3-4 train on exactly the prompts of the uninterrupted run: none lost, none
    repeated."""
    def run(steps: int, state=None, start: int = 0, max_steps: int | None = None):
        sampler = PromptSampler(PROBLEMS, seed=3)
        if state is not None:
            sampler.load_state_dict(state)
        producer = AsyncRolloutProducer(collector(RandomAnswers(delay=0.02), settings()), shard(sampler),
                                        max_off_policy_steps=2, start_step=start,
                                        max_steps=start + steps if max_steps is None else max_steps)
        # a 0.1 s update: step 3's job (two 0.02 s requests, queued at step 1) starts, and draws, during it
        out = drive(producer, steps, update_s=0.1, sampler=sampler)
        producer.close()
        return out

    reference = run(4)
    # max_steps=4 though it stops after 2 (a crash): steps 3 and 4 are queued, so prompts are drawn ahead of the
    # checkpoint (with max_steps=2 nothing is, and a state_dict of the current sampler state would pass)
    first = run(2, max_steps=4)
    assert first[-1]["checkpoint"] == {"epoch": 0, "position": 8}  # 2 steps × 4 prompts ...
    assert first[-1]["sampler"]["position"] >= 12  # ... though step 3's 4 were drawn by then
    resumed = run(2, first[-1]["checkpoint"], start=2)
    assert [s["problems"] for s in first + resumed] == [s["problems"] for s in reference]
    assert [s["metrics"]["rollout/staleness"] for s in resumed][0] == 0.0  # regenerated on the checkpointed weights
    assert sorted(p for s in reference for p in s["problems"]) == sorted(
        p for s in first + resumed for p in s["problems"])


@pytest.mark.parametrize("kind", [{}, {"draft_ahead": True}, {"max_off_policy_steps": 2}])
def test_a_saved_and_restored_checkpoint_resumes_the_prompt_stream(kind, tmp_path):
    """The trainer's resume path in the fast run, without a model: after step 2 of a 4-step run, ``save_state`` with
    the producer as the data cursor; then ``restore_state`` into a fresh sampler and a new producer from the restored
    step: steps 3-4 train on exactly the uninterrupted run's prompts, whichever producer drew ahead."""
    from nemo_igrpo.checkpoint import find_latest
    from nemo_igrpo.lifecycle import TrainState, restore_state, save_state

    loaded = []
    policy = SimpleNamespace(save=lambda d: (d / "weights.txt").write_text("after step 2"),
                             load=lambda d: loaded.append((d / "weights.txt").read_text()))

    def run(steps: int, sampler: PromptSampler, start: int = 0, root=None) -> list[dict]:
        producer = make_producer(collector(RandomAnswers(delay=0.01), settings()), shard(sampler), **kind,
                                 start_step=start, max_steps=4)
        out = drive(producer, steps, update_s=0.03)  # overlapping producers draw step 3's prompts during step 2
        if root is not None:
            save_state(root, TrainState(step=start + steps), policy, producer, keep_last=1)  # as the loop does
        producer.close()
        return out

    reference = run(4, PromptSampler(PROBLEMS, seed=3))
    first = run(2, PromptSampler(PROBLEMS, seed=3), root=tmp_path)
    sampler = PromptSampler(PROBLEMS, seed=3)  # a new process: the sampler starts at the beginning of the stream
    state = restore_state(find_latest(tmp_path), policy, sampler)
    assert (state.step, loaded) == (2, ["after step 2"])
    assert sampler.state_dict() == {"epoch": 0, "position": 8}  # 2 steps × 4 prompts, not what was drawn ahead
    resumed = run(2, sampler, start=state.step)
    assert [s["problems"] for s in first + resumed] == [s["problems"] for s in reference]
    assert [(s["metrics"]["rollout/sampler_start"], s["metrics"]["rollout/sampler_end"]) for s in resumed] == [
        (8, 12), (12, 16)]


def test_close_drops_queued_jobs_and_does_not_wait_for_the_running_one():
    """close() discards the job in flight, so it must not wait for it (a server rollout can take minutes), and the
    rollout thread is a daemon, so it cannot hold up the interpreter's exit either; queued jobs never start."""
    generator = RandomAnswers(delay=0.5)
    producer = AsyncRolloutProducer(collector(generator, settings()), shard(PromptSampler(PROBLEMS)),
                                    max_off_policy_steps=3)
    producer.next_batch(PhaseTimer())  # queues steps 1-4; step 2's job starts at once (two 0.5 s requests)
    start = time.perf_counter()
    producer.close()
    assert time.perf_counter() - start < 0.4  # the running job had about a second left
    assert all(t.daemon for t in threading.enumerate() if t.name.startswith("rollouts"))
    time.sleep(1.5)  # the discarded job ends on its own
    assert generator.busy == 0
    assert len(generator.calls) <= 4  # steps 1 and 2 at most (2 requests each): the queued jobs never started


class FailingSync(RandomAnswers):
    def update_weights(self, weights):
        raise RuntimeError("push failed")


def test_a_failed_weight_sync_keeps_the_next_job_from_starting():
    """A failed push leaves the generator's weights unknown and ends the run: the next job must not start on them
    (on a dead server it would wait out a whole retry budget before the loop could stop)."""
    generator = FailingSync(delay=0.05)
    producer = AsyncRolloutProducer(collector(generator, settings()), shard(PromptSampler(PROBLEMS)),
                                    max_off_policy_steps=2)
    producer.next_batch(PhaseTimer())  # queues steps 1-3; step 2's job starts at once
    with pytest.raises(RuntimeError, match="push failed"):
        producer.sync_weights([], PhaseTimer())  # waits for step 2's job, then fails
    calls = len(generator.calls)
    time.sleep(0.5)
    assert len(generator.calls) == calls == 4  # steps 1 and 2; step 3's job never started
    producer.close()


class InterruptedWait(PhaseTimer):
    """A Ctrl-C that lands while the loop waits to sync (KeyboardInterrupt out of the "sync_wait" phase)."""

    @contextmanager
    def __call__(self, name):
        with super().__call__(name):
            yield
        if name == "sync_wait":
            raise KeyboardInterrupt


@pytest.mark.parametrize("k", [2, 3])
def test_close_after_a_ctrl_c_during_the_sync_wait_does_not_hang(k):
    generator = RandomAnswers(delay=0.05)
    producer = AsyncRolloutProducer(collector(generator, settings()), shard(PromptSampler(PROBLEMS)),
                                    max_off_policy_steps=k)
    producer.next_batch(PhaseTimer())
    with pytest.raises(KeyboardInterrupt):
        producer.sync_weights([], InterruptedWait())
    closer = threading.Thread(target=producer.close, daemon=True)
    closer.start()
    closer.join(5.0)
    assert not closer.is_alive(), "close() hung on a job waiting for a sync that will never come"
    time.sleep(0.3)
    assert len(generator.calls) == 4  # no job started after the interrupted sync
    assert generator.version == 0  # and the weights were never pushed


def test_an_error_in_a_rollout_reaches_the_loop():
    class Failing(RandomAnswers):
        def generate(self, prompts, params):
            raise RuntimeError("server gone")

    producer = AsyncRolloutProducer(collector(Failing(), settings()), shard(PromptSampler(PROBLEMS)),
                                    max_off_policy_steps=1)
    with pytest.raises(RuntimeError, match="server gone"):
        producer.next_batch(PhaseTimer())
    producer.close()


def test_make_producer_picks_by_config():
    bound = collector(RandomAnswers(), settings())
    kinds = [type(make_producer(bound, shard(PromptSampler(PROBLEMS)), **kw)).__name__
             for kw in ({}, {"draft_ahead": True}, {"max_off_policy_steps": 2})]
    assert kinds == ["RolloutProducer", "DraftAheadProducer", "AsyncRolloutProducer"]


@pytest.mark.parametrize("overrides, message", [
    (["rollout.max_off_policy_steps=-1"], r"rollout\.max_off_policy_steps: must be >= 0"),
    (["rollout.max_off_policy_steps=1"],
     r"rollout\.max_off_policy_steps=1 trains on samples up to 1 policy versions old, which needs "
     r"algorithm\.importance_correction .* it is none"),
    (["rollout.max_off_policy_steps=1", "algorithm.importance_correction=token"],
     r"rollout\.max_off_policy_steps: generation\.backend=hf generates in the trainer's process"),
    (["rollout.max_off_policy_steps=1", "algorithm.importance_correction=token", "generation.backend=server",
      "rollout.draft_ahead=true"], r"rollout\.draft_ahead and rollout\.max_off_policy_steps > 0 are alternatives"),
])
def test_asynchronous_rollouts_are_refused_where_they_cannot_be_corrected_or_overlap(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(REPO / "conf" / "quickstart.yaml", overrides)
    ok = load_config(REPO / "conf" / "quickstart.yaml", ["rollout.max_off_policy_steps=2", "generation.backend=server",
                                                         "algorithm.importance_correction=sequence",
                                                         "algorithm.preset=grpo"])  # GRPO may run asynchronously
    assert ok.rollout.max_off_policy_steps == 2


def test_dynamic_sampling_with_several_data_parallel_ranks_is_refused():
    config = load_config(REPO / "conf" / "quickstart.yaml", [
        "rollout.max_off_policy_steps=1", "generation.backend=server", "algorithm.importance_correction=token",
        "algorithm.dynamic_sampling=true"])
    check_rollout_parallelism(config, model_parallel_size=1, data_parallel_size=1)
    with pytest.raises(ConfigError, match="several data-parallel ranks: not supported with algorithm.dynamic_sampl"):
        check_rollout_parallelism(config, model_parallel_size=1, data_parallel_size=2)


# ---------------------------------------------------------------------------------------------- through the server


def consumed_prompts(run_dir, config) -> tuple[list[tuple[int, int]], Counter]:
    """Per step, the stretch [start, end) of the prompt stream it trained on (metrics.jsonl), and the multiset of
    those prompts, replayed from a sampler with the run's seed (the stream is deterministic)."""
    from nemo_igrpo.assembly import build_template, load_datasets
    from nemo_igrpo.models import load_tokenizer
    from nemo_igrpo.tracking import read_metrics

    records = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["step"] > 0]
    ranges = [(int(r["rollout/sampler_start"]), int(r["rollout/sampler_end"])) for r in records]
    train_set, _ = load_datasets(config, build_template(config.prompt, load_tokenizer(config.model)))
    sampler, prompts = PromptSampler(train_set, seed=config.trainer.seed), Counter()
    for start, end in ranges:
        while sampler.epoch * len(sampler) + sampler.position < start:
            sampler.next_batch(1)
        prompts.update(e.problem for e in sampler.next_batch(end - start))
    return ranges, prompts


@pytest.mark.slow
def test_sigkill_mid_step_then_resume_trains_on_exactly_the_uninterrupted_runs_prompts(served, tmp_path,
                                                                                      monkeypatch):
    """k = 1 through the server. The uninterrupted run: stale steps, importance weights logged, step 1 on-policy.
    Then the same run SIGKILLed during step 3, after its update (step 4's rollout already drawn and running on the
    server), resumed with trainer.resume=auto: the steps' prompt stretches, and so the multiset of consumed prompts,
    equal the uninterrupted run's — nothing lost, nothing repeated (NeMo-RL's async GRPO lost ~30%, PR 3599)."""
    from test_server import TOKEN, TOLERANCE

    import nemo_igrpo.trainer as trainer_module
    from nemo_igrpo.tracking import read_metrics

    url, tiny = served
    monkeypatch.setenv("NEMO_IGRPO_SERVER_TOKEN", TOKEN)
    overrides = [*tiny, "generation.backend=server", f"generation.server.url={url}",
                 "rollout.max_off_policy_steps=1", "algorithm.importance_correction=token", "trainer.save_every=1",
                 "trainer.max_steps=4", "optim.lr=1e-3",
                 # the untrained tiny model never answers; a reward on length (DAPO's soft overlong penalty over
                 # 11 of the 12 tokens) gives groups variance, so the policy moves and old samples are off-policy
                 "reward.overlong_buffer=11"]

    reference_dir = tmp_path / "reference"
    config = load_config(REPO / "conf" / "quickstart.yaml", [*overrides, f"trainer.output_dir={reference_dir}"])
    trainer_module.train(config)
    records = [r for r in read_metrics(reference_dir / "metrics.jsonl") if r["step"] > 0]
    assert [r["rollout/staleness"] for r in records] == [0.0, 1.0, 1.0, 1.0]
    # Step 1 is on-policy (the server test's kernel tolerance); steps 2-4 trained on samples of the weights before
    # the previous update, which moved log-probs by 5-16% here (lr 1e-3): far above kernel noise (≥ 100× TOLERANCE)
    assert abs(records[0]["train/mismatch/token_prob_error"] - 1.0) < TOLERANCE
    assert all(r["train/mismatch/token_prob_error"] - 1.0 > 100 * TOLERANCE for r in records[1:])
    assert all(0 < r["train/mismatch/is_weight_mean"] <= 2.0 for r in records)  # min(π_θ/π_gen, cap 2)
    # ... and its value is tied to the same tokens' mismatch: per token |min(e^Δ, 2) − 1| ≤ e^|Δ| − 1, so the token
    # means obey |is_weight_mean − 1| ≤ token_prob_error − 1 (+ 1e-5: fp32 rounding of two token means of a few
    # hundred values near 1, which is tight when every Δ has one sign). On-policy (step 1) that makes the weights 1
    # within kernel noise, none capped.
    assert all(abs(r["train/mismatch/is_weight_mean"] - 1.0) <= r["train/mismatch/token_prob_error"] - 1.0 + 1e-5
               for r in records)
    assert abs(records[0]["train/mismatch/is_weight_mean"] - 1.0) < TOLERANCE
    assert records[0]["train/mismatch/is_capped_fraction"] == 0.0

    crashed = tmp_path / "crashed"
    command = [sys.executable, "-m", "nemo_igrpo.cli", "train", "--config", str(REPO / "conf" / "quickstart.yaml"),
               *overrides, f"trainer.output_dir={crashed}"]
    env = {**os.environ, "NEMO_IGRPO_FAULTS": "train.updated=kill,step=3"}
    killed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stdout[-2000:] + killed.stderr[-2000:]
    saved = json.loads((crashed / "checkpoints" / "step_000002" / "trainer_state.json").read_text())
    assert saved["sampler"] == {"epoch": 0, "position": 8}  # 2 steps × 4 prompts, not the 12 drawn by then
    env.pop("NEMO_IGRPO_FAULTS")
    resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert "Resumed from" in resumed.stdout

    reference_ranges, reference_prompts = consumed_prompts(reference_dir, config)
    ranges, prompts = consumed_prompts(crashed, config)
    assert reference_ranges == [(0, 4), (4, 8), (8, 12), (12, 16)]
    assert ranges == reference_ranges and prompts == reference_prompts and sum(prompts.values()) == 16
    after = [r for r in read_metrics(crashed / "metrics.jsonl") if r["step"] > 2]
    assert [r["rollout/staleness"] for r in after] == [0.0, 1.0]  # step 3 regenerated on the checkpointed weights

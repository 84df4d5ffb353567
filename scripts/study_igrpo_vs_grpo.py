#!/usr/bin/env python
"""Multi-seed study: GRPO (8 samples) vs iGRPO (4 drafts + 4 refinements) and its ablations, and DAPO vs
iGRPO-DAPO, at matched rollout budget.

Arms (--arms, ``ARMS``): grpo (GRPO, 8 samples per problem), igrpo (iGRPO, 4 drafts + 4 refinements, the paper's
method), igrpo_random (a uniformly random draft instead of the best), igrpo_draft_loss (+ 0.5 × a GRPO loss on the
drafts), igrpo_skip (no Stage 2 for problems every draft solved), dapo (DAPO, 8 samples, dynamic sampling) and
igrpo_dapo (the iGRPO wrapper around DAPO, 4 + 4); each is a set of overrides on top of --config (default
conf/quickstart.yaml; conf/study/refine.yaml is the refinement study, conf/study/chain.yaml the multi-step task).
Every arm consumes the same rollouts per problem (8) and per step (trainer.prompts_per_step × 8; the DAPO arms
more when dynamic sampling draws extra problems, igrpo_skip more drafts), and for a given seed starts from the same
warm-started model: the config's warm start (warm_start.steps supervised steps with trainer.seed = seed) runs once
per seed (or once for all, --warm-seed) and is saved to ROOT/warm-sSEED, and every arm loads it
(model.path=ROOT/warm-sSEED warm_start.steps=0), so each seed is a paired comparison with GRPO. Each run is a plain
``nemo-igrpo train`` in its own output directory under --root. The script is resumable: finished warm starts and
runs (a ``final/`` folder) are reused, an interrupted run resumes from its last checkpoint (trainer.resume=auto),
and --report-only rebuilds every table and plot from the runs' metrics.jsonl (and two_pass.json) without training.

Gates come first: the warm starts (with --two-pass, each one's two-pass evaluation) and the GRPO runs; GRPO must
gain ``GATE_GRPO_GAIN`` over the warm start, and at step 0 refining on the oracle-selected draft must beat single
pass by ``GATE_TWO_PASS_GAIN`` with ``GATE_RIGHT_AFTER_WRONG`` of the refinements after a wrong draft right (means
over seeds). A failed gate stops the study before its other arms (--ignore-gates runs them anyway); the report
opens with the gate table.

With --two-pass N, every finished run's final model is also evaluated draft → refine
(``nemo_igrpo.evaluation.two_pass``): N drafts per held-out problem at the evaluation sampling settings, the best
selected by the reward against the gold answer (oracle, an upper bound) or by majority vote over the drafts' answers
(no gold answer), then eval.samples_per_problem refinements of the Stage-2 prompt. Written to RUN/two_pass.json
(reused when present), so the report says whether iGRPO taught refinement, single-pass skill, or both.

The report has, per arm: held-out accuracy before / after RL per seed with mean ± 95% interval (t over seeds); the
paired difference per seed with its mean ± 95% interval and an exact sign-flip permutation test; accuracy at every
evaluation against rollouts consumed and training wall-clock; entropy and zero-variance-group fraction over training;
Proposition 3.1 on the accuracy reward; refinement-minus-best-draft over training; the refinement metrics (accuracy
after a right / wrong draft, copy rate, both stages' entropy, skips); the two-pass table.

    # the refinement study (docs/study_refine.md): gates, then 5 seeds × 4 arms, two parallel runs at 1 thread each
    python scripts/study_igrpo_vs_grpo.py --config conf/study/refine.yaml --seeds 0 1 2 3 4 \
        --arms grpo igrpo igrpo_random igrpo_draft_loss --root /tmp/refine_study --jobs 2 --two-pass 4 \
        --two-pass-problems 500 --markdown docs/study_refine.md --plots docs/study_refine
    # the multi-step study (5 seeds of GRPO vs iGRPO, 3 of DAPO vs iGRPO-DAPO), two parallel runs at 1 thread each
    python scripts/study_igrpo_vs_grpo.py --config conf/study/chain.yaml --seeds 0 1 2 3 4 --arms grpo igrpo \\
        --root /tmp/chain_study --jobs 2 --two-pass 4 --markdown docs/study_chain.md --plots docs/study_chain
    python scripts/study_igrpo_vs_grpo.py --config conf/study/chain.yaml --seeds 0 1 2 --arms dapo igrpo_dapo \\
        --root /tmp/chain_study --jobs 2 --two-pass 4 --markdown /tmp/chain_study/dapo.md --plots /tmp/chain_study/p
    # one report over everything that finished (re-run any time; add --partial for runs still going)
    python scripts/study_igrpo_vs_grpo.py --report-only --config conf/study/chain.yaml --seeds 0 1 2 3 4 \\
        --arms grpo igrpo dapo igrpo_dapo --root /tmp/chain_study --two-pass 4 \\
        --markdown docs/study_chain.md --plots docs/study_chain

Writes ``docs/study.md`` (--markdown), PNG plots under ``docs/study/`` (--plots) and the numbers as JSON (--json).
Text below ``<!-- discussion -->`` in the markdown file is written by hand and kept when it is regenerated.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nemo_igrpo.plotting import Run

# The study's settings on top of conf/quickstart.yaml (whose training settings are used unchanged): no TensorBoard,
# no progress bar (logs go to a file); add e.g. trainer.eval_every=5 for denser accuracy curves (costs more evals).
STUDY_OVERRIDES = ["trainer.loggers=[]", "trainer.progress=false", "trainer.resume=auto"]


@dataclass(frozen=True)
class Arm:
    label: str
    overrides: tuple[str, ...]  # on top of --config and the study's overrides


ARMS = {
    "grpo": Arm("GRPO 8", ("algorithm.preset=grpo",)),
    "igrpo": Arm("iGRPO 4+4", ("algorithm.preset=igrpo",)),  # the paper's method
    "igrpo_random": Arm("iGRPO 4+4, random draft", ("algorithm.preset=igrpo", "algorithm.draft_selection=random")),
    "igrpo_draft_loss": Arm("iGRPO 4+4 + draft loss 0.5",
                            ("algorithm.preset=igrpo", "algorithm.draft_loss_weight=0.5")),
    "igrpo_skip": Arm("iGRPO 4+4, skip solved", ("algorithm.preset=igrpo", "algorithm.skip_solved_by_drafts=true")),
    "dapo": Arm("DAPO 8", ("algorithm.preset=dapo",)),
    "igrpo_dapo": Arm("iGRPO-DAPO 4+4", ("algorithm.preset=igrpo_dapo",)),
}
# (baseline, the arm compared with it): same rollouts per problem, same warm start per seed
PAIRS = [("grpo", arm) for arm in ("igrpo", "igrpo_random", "igrpo_draft_loss", "igrpo_skip")] + [("dapo", "igrpo_dapo")]
TWO_PASS_FILE = "two_pass.json"
# Gates before any comparison: a study whose baseline does not learn, or whose warm-started model cannot use a
# draft at step 0, cannot show an iGRPO gain whatever iGRPO does (docs/study_chain.md was both).
GATE_GRPO_GAIN = 0.05  # GRPO's final held-out accuracy minus the warm start's, mean over seeds
GATE_TWO_PASS_GAIN = 0.05  # step 0: refined on the oracle-selected draft minus single pass, mean over seeds
GATE_RIGHT_AFTER_WRONG = 0.15  # step 0: share of refinements right after a wrong selected draft, mean over seeds
# Two-sided 95% quantiles of Student's t by degrees of freedom (intervals over 2-31 seeds); normal beyond.
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
         20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048,
         29: 2.045, 30: 2.042}


@dataclass
class RunSpec:
    arm: str  # a key of ARMS
    seed: int
    root: Path
    warm_seed: int | None = None  # whose warm start the run loads; None = its own seed's
    config: Path | None = None  # the study's YAML; None = conf/quickstart.yaml
    two_pass_problems: int = 0  # two-pass evaluations use the first this many held-out problems; 0 = all

    @property
    def directory(self) -> Path:
        return self.root / f"{self.arm}-s{self.seed}"

    @property
    def warm_seed_value(self) -> int:
        return self.seed if self.warm_seed is None else self.warm_seed

    @property
    def warm_directory(self) -> Path:
        return self.root / f"warm-s{self.warm_seed_value}"

    def command(self, extra: list[str]) -> list[str]:
        config = ["--config", str(self.config)] if self.config is not None else []
        return [sys.executable, "-m", "nemo_igrpo.cli", "train", *config, *ARMS[self.arm].overrides,
                f"trainer.seed={self.seed}", f"trainer.output_dir={self.directory}",
                f"model.path={self.warm_directory}", "warm_start.steps=0", *STUDY_OVERRIDES, *extra]

    def warm_command(self, extra: list[str]) -> list[str]:
        config = ["--config", str(self.config)] if self.config is not None else []
        # the overrides go before --seeds, which would take every word after it as a seed
        return [sys.executable, os.path.abspath(__file__), "--warm-start-to", str(self.warm_directory), *config,
                *extra, "--seeds", str(self.warm_seed_value)]

    def warm_two_pass_command(self, extra: list[str], num_drafts: int) -> list[str]:
        """Two-pass evaluation of the warm-started model (gate 2: does it refine before RL?)."""
        config = ["--config", str(self.config)] if self.config is not None else []
        return [sys.executable, os.path.abspath(__file__), "--two-pass-of-warm", str(self.warm_directory), *config,
                "--two-pass", str(num_drafts), "--two-pass-problems", str(self.two_pass_problems), *extra,
                "--seeds", str(self.warm_seed_value)]

    def two_pass_command(self, num_drafts: int) -> list[str]:
        return [sys.executable, os.path.abspath(__file__), "--two-pass-of", str(self.directory),
                "--two-pass", str(num_drafts), "--two-pass-problems", str(self.two_pass_problems)]


def _run_logged(command: list[str], log_path: Path, timeout_s: float, nice: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    started = time.perf_counter()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log:
        log.write("$ " + shlex.join(command) + "\n")
        log.flush()
        subprocess.run(["nice", "-n", str(nice), *command], stdout=log, stderr=subprocess.STDOUT, env=env,
                       timeout=timeout_s, check=True)
    return time.perf_counter() - started


def warm_one(spec: RunSpec, extra: list[str], timeout_s: float, nice: int,
             two_pass: int = 0) -> tuple[RunSpec, float | None]:
    """The seed's warm-started model, unless already saved, then (``two_pass`` > 0) its two-pass evaluation for
    gate 2 unless already written; returns the warm start's wall-clock seconds (None when reused)."""
    seconds = None
    if not (spec.warm_directory / "config.json").is_file():
        seconds = _run_logged(spec.warm_command(extra), spec.warm_directory.with_suffix(".log"), timeout_s, nice)
    if two_pass and not (spec.warm_directory / TWO_PASS_FILE).is_file():
        _run_logged(spec.warm_two_pass_command(extra, two_pass), spec.warm_directory.with_suffix(".two_pass.log"),
                    timeout_s, nice)
    return spec, seconds


def run_one(spec: RunSpec, extra: list[str], timeout_s: float, nice: int,
            two_pass: int = 0) -> tuple[RunSpec, float | None]:
    """Train one arm × seed unless it already finished, then (``two_pass`` > 0) its two-pass evaluation unless
    already written; returns the training wall-clock seconds (None when reused)."""
    seconds = None
    if not (spec.directory / "final").is_dir():
        seconds = _run_logged(spec.command(extra), spec.directory / "train.log", timeout_s, nice)
    if two_pass and not (spec.directory / TWO_PASS_FILE).is_file():
        _run_logged(spec.two_pass_command(two_pass), spec.directory / "two_pass.log", timeout_s, nice)
    return spec, seconds


def schedule(seeds: list[int], arms: list[str], jobs: int,
             warm_seed: int | None = None) -> list[tuple[str, int, str | None]]:
    """Task order that keeps ``jobs`` workers busy: warm starts of the first ``jobs`` seeds, then each seed's runs
    followed by the warm start of the seed ``jobs`` places later (ready by the time its runs come up). With a
    shared warm start (``warm_seed``), that one warm start comes first and every run waits for it."""
    if warm_seed is not None:
        return [("warm", warm_seed, None)] + [("run", seed, arm) for seed in seeds for arm in arms]
    order: list[tuple[str, int, str | None]] = [("warm", seed, None) for seed in seeds[:jobs]]
    for index, seed in enumerate(seeds):
        order += [("run", seed, arm) for arm in arms]
        if index + jobs < len(seeds):
            order.append(("warm", seeds[index + jobs], None))
    return order


def train_all(seeds: list[int], arms: list[str], root: Path, jobs: int, call,
              warm_seed: int | None = None, config: Path | None = None,
              two_pass_problems: int = 0) -> dict[str, float | None]:
    """Warm starts and runs on a pool of ``jobs`` workers; a run waits for its seed's warm start. ``call(task)``
    runs ``warm_one``/``run_one`` bound to a spec with the remaining arguments."""
    wall: dict[str, float | None] = {}
    warm_done = {}
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = []
        for kind, seed, arm in schedule(seeds, arms, jobs, warm_seed):
            spec = RunSpec(arm or arms[0], seed, root, warm_seed, config, two_pass_problems)
            if kind == "warm":
                warm_done[spec.warm_directory] = pool.submit(call, lambda *a, spec=spec: warm_one(spec, *a))
                futures.append((spec.warm_directory.name, warm_done[spec.warm_directory]))
            else:
                def after_warm(*a, spec=spec):
                    warm_done[spec.warm_directory].result()  # raises if the warm start failed
                    return run_one(spec, *a)
                futures.append((spec.directory.name, pool.submit(call, after_warm)))
        for name, future in futures:
            _, seconds = future.result()
            wall[name] = seconds
            print(f"{name}: " + ("reused" if seconds is None else f"{seconds:.0f} s"), flush=True)
    return wall


def save_warm_start(seed: int, directory: Path, overrides: list[str], config_path: Path | None = None) -> None:
    """The config's warm start (default: the quickstart's) from random init with trainer.seed = seed (as
    ``nemo-igrpo train`` runs it before RL), saved as an HF folder (written beside, then renamed, so a half-written
    folder is never reused)."""
    import shutil

    from rich.console import Console

    from nemo_igrpo.cli import default_config_path
    from nemo_igrpo.config import load_config
    from nemo_igrpo.data.sources import load_examples
    from nemo_igrpo.models import load_model, load_tokenizer
    from nemo_igrpo.assembly import build_template, seed_everything, warm_start_model

    config = load_config(config_path or default_config_path(), [f"trainer.seed={seed}", *overrides])
    seed_everything(seed)
    tokenizer = load_tokenizer(config.model)
    model = load_model(config.model, tokenizer)
    warm_start_model(config, model, load_examples(config.data.train, config.data, "train"),
                     build_template(config.prompt, tokenizer), tokenizer, Console())
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, directory)


def save_two_pass(run_dir: Path, num_drafts: int, max_problems: int = 0) -> None:
    """Two-pass evaluation of a finished run's final model on its own held-out problems (the first
    ``max_problems``; 0 = all) and evaluation sampling (run_dir/config.yaml, as the trainer wrote it), once per
    selection rule; written to run_dir/two_pass.json."""
    _two_pass(run_dir / "final", run_dir / "config.yaml", [], run_dir / TWO_PASS_FILE, num_drafts, max_problems)


def save_warm_two_pass(seed: int, warm_dir: Path, overrides: list[str], config_path: Path | None,
                       num_drafts: int, max_problems: int = 0) -> None:
    """The same for a warm-started model (gate 2, before any RL), with the study's config and that seed: written
    to warm_dir/two_pass.json."""
    from nemo_igrpo.cli import default_config_path

    _two_pass(warm_dir, config_path or default_config_path(), [f"trainer.seed={seed}", *overrides],
              warm_dir / TWO_PASS_FILE, num_drafts, max_problems)


def _two_pass(model_dir: Path, config_path: Path, overrides: list[str], out: Path, num_drafts: int,
              max_problems: int) -> None:
    import torch

    from nemo_igrpo.assembly import (
        build_eval_sampling,
        build_generation,
        build_template,
        build_training_reward,
        seed_everything,
    )
    from nemo_igrpo.config import load_config
    from nemo_igrpo.data.sources import load_examples
    from nemo_igrpo.evaluation.run import evaluate
    from nemo_igrpo.evaluation.two_pass import SELECTIONS, evaluate_two_pass
    from nemo_igrpo.models import load_model, load_tokenizer, stop_token_ids

    config = load_config(config_path, [*overrides, f"model.path={model_dir}", f"model.tokenizer={model_dir}",
                                       "warm_start.steps=0", "trainer.resume=none"])
    seed_everything(config.trainer.seed)
    tokenizer = load_tokenizer(config.model)
    model = load_model(config.model, tokenizer)
    generator = build_generation(config, model, tokenizer.pad_token_id)
    template = build_template(config.prompt, tokenizer)
    reward = build_training_reward(config)
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    params = build_eval_sampling(config, stop_token_ids(tokenizer, model))
    problems = load_examples(config.data.eval, config.data, "eval")[: config.eval.num_problems or None]
    problems = problems[: max_problems or None]
    result = {"num_drafts": num_drafts, "refinements": params.n, "temperature": params.temperature,
              "top_p": params.top_p, "problems": len(problems)}
    try:
        with torch.inference_mode():
            torch.manual_seed(config.trainer.seed + 104729)  # a stream apart from training's evaluations
            result["single_pass"] = evaluate(problems, generator, template.problem_ids, reward, decode, params).summary
            for selection in SELECTIONS:
                result[selection] = evaluate_two_pass(problems, generator, template, reward, decode, params,
                                                      num_drafts, selection=selection,
                                                      tie_break=config.algorithm.tie_break).summary
    finally:
        generator.close()
        reward.close()
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, out)


# --------------------------------------------------------------------------------------------------- analysis

def interval95(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% interval, mean ± t(0.975, n − 1) · s / √n over seeds (NaN for n < 2)."""
    if len(values) < 2:
        return (values[0] if values else math.nan), math.nan
    t = T_975.get(len(values) - 1, 1.96)
    return statistics.fmean(values), t * statistics.stdev(values) / math.sqrt(len(values))


def sign_flip_p_value(differences: list[float]) -> float:
    """Two-sided exact paired permutation test: under "no difference" each seed's sign is a coin flip; the p-value
    is the share of the 2^n sign patterns whose |mean| is at least the observed one. With n seeds the smallest
    possible p is 2 / 2^n (0.0625 for 5 seeds): fewer than 6 seeds can never reach p < 0.05."""
    if not differences:
        return math.nan
    observed = abs(sum(differences)) - 1e-12  # tolerance: equal means summed in another order
    n = len(differences)
    hits = 0
    for pattern in range(2 ** n):
        total = sum(d if pattern >> i & 1 else -d for i, d in enumerate(differences))
        hits += abs(total) >= observed
    return hits / 2 ** n


def cumulative_seconds(records: list[dict]) -> dict[int, float]:
    """Training wall-clock after each step (the sum of time/step, evaluation excluded); 0 at step 0."""
    total, seconds = 0.0, {0: 0.0}
    for record in sorted(records, key=lambda r: r["step"]):
        total += record.get("time/step", 0.0)
        seconds[record["step"]] = total
    return seconds


def accuracy_curve(records: list[dict], prompts_per_step: int | None) -> list[dict]:
    """Every held-out evaluation of a run: step, rollouts consumed (both stages; with dynamic sampling an upper
    bound, as in ``nemo_igrpo.plotting.rollouts_consumed``), training seconds so far, accuracy."""
    seconds = cumulative_seconds(records)
    rollouts, total = {0: 0.0}, 0.0
    for record in sorted(records, key=lambda r: r["step"]):
        if "rollouts_per_prompt/total" in record and prompts_per_step:
            total += prompts_per_step * record["rollouts_per_prompt/total"] * record.get("sampling_rounds", 1.0)
        rollouts[record["step"]] = total
    return [{"step": r["step"], "rollouts": rollouts.get(r["step"], math.nan), "seconds": seconds.get(r["step"]),
             "accuracy": r["eval/accuracy"]} for r in records if "eval/accuracy" in r]


def _read_two_pass(directory: Path) -> dict | None:
    path = directory / TWO_PASS_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def mean_of(records: list[dict], key: str) -> float | None:
    """Mean of ``key`` over the records that logged a finite value; None when none did."""
    values = [r[key] for r in records if key in r and math.isfinite(r[key])]
    return statistics.fmean(values) if values else None

def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def final_accuracy(records: list[dict]) -> tuple[float | None, float | None]:
    """Held-out accuracy at the first and the last evaluation of a run."""
    evals = [r["eval/accuracy"] for r in records if "eval/accuracy" in r]
    return (evals[0], evals[-1]) if evals else (None, None)


def best_draft_vs_prediction(records: list[dict]) -> dict[str, float]:
    """Proposition 3.1 over a run, on the binary accuracy reward: observed best-of-N success vs 1 − (1 − p)^N,
    averaged over the steps.

    The trainer logs per step ``reward/accuracy/any_draft_correct`` (fraction of problems with a right draft),
    ``reward/accuracy/best_draft_predicted`` (mean over problems of 1 − (1 − p_q)^N with p_q the fraction of that
    problem's own N drafts that are right) and ``reward/accuracy/draft_mean`` (p averaged over problems). Also
    returned: the prediction from the step-level p alone, 1 − (1 − p̄)^N, which over-estimates when p varies
    between problems (Jensen). Runs logged before these keys existed fall back to the total-reward keys.
    """
    steps = [r for r in records if "reward/best_draft_mean" in r]
    if not steps:
        return {}
    prefix = "reward/accuracy/" if "reward/accuracy/draft_mean" in steps[0] else "reward/"
    observed_key = "reward/accuracy/any_draft_correct" if prefix != "reward/" else "reward/best_draft_mean"
    n = steps[0]["rollouts_per_prompt/drafts"]
    observed = statistics.fmean(r[observed_key] for r in steps)
    per_problem = statistics.fmean(r[f"{prefix}best_draft_predicted"] for r in steps)
    pooled = statistics.fmean(1 - (1 - min(max(r[f"{prefix}draft_mean"], 0.0), 1.0)) ** n for r in steps)
    return {"num_drafts": n, "draft_mean": statistics.fmean(r[f"{prefix}draft_mean"] for r in steps),
            "observed_best_draft": observed, "predicted_per_problem_p": per_problem, "predicted_pooled_p": pooled,
            "refinement_mean": statistics.fmean(r["reward/refinement_mean"] for r in steps)}


def summarize(runs: dict[str, dict[int, list[dict]]]) -> dict:
    """Per arm: accuracy before/after per seed, mean ± std, entropy and Proposition 3.1 numbers."""
    summary = {}
    for arm, by_seed in runs.items():
        before, after, entropy_first, entropy_last, prop, zero_variance, refine_gap = {}, {}, {}, {}, {}, {}, {}
        no_answer = {}
        for seed, records in sorted(by_seed.items()):
            before[seed], after[seed] = final_accuracy(records)
            entropies = [r["train/entropy"] for r in records if "train/entropy" in r]
            if entropies:
                entropy_first[seed], entropy_last[seed] = entropies[0], entropies[-1]
            prop[seed] = best_draft_vs_prediction(records)
            zero_variance[seed] = mean_of(records, "zero_variance_fraction")
            refine_gap[seed] = mean_of(records, "reward/refinement_minus_best_draft")
            no_answer_seen = [r["eval/no_answer"] for r in records if "eval/no_answer" in r]
            if no_answer_seen:
                no_answer[seed] = (no_answer_seen[0], no_answer_seen[-1])
        finals = [v for v in after.values() if v is not None]
        starts = [v for v in before.values() if v is not None]
        summary[arm] = {
            "label": ARMS[arm].label, "seeds": sorted(by_seed), "accuracy_before": before,
            "accuracy_final": after, "final_mean_std": mean_std(finals), "before_mean_std": mean_std(starts),
            "entropy_first": entropy_first, "entropy_last": entropy_last,
            "entropy_last_mean_std": mean_std(list(entropy_last.values())), "proposition_3_1": prop,
            "last_step": {seed: max(r["step"] for r in records) for seed, records in sorted(by_seed.items())},
            "final_interval95": interval95(finals), "zero_variance_mean": zero_variance,
            "refinement_minus_best_draft_mean": refine_gap, "no_answer_first_last": no_answer,
        }
    return summary


def gates(summary: dict, warm_two_pass: dict[int, dict | None]) -> list[dict]:
    """The three gates, each with its value per seed, the mean over seeds, its threshold and whether it passed:
    GRPO's gain over the warm start (from the grpo runs), and at step 0 (the warm starts' two-pass files) the
    two-pass gain over single pass and the accuracy of refinements after a wrong draft. A gate without data fails."""
    grpo = summary.get("grpo", {})
    gains = {seed: grpo["accuracy_final"][seed] - grpo["accuracy_before"][seed] for seed in grpo.get("seeds", [])
             if grpo["accuracy_final"][seed] is not None and grpo["accuracy_before"][seed] is not None}
    results = {seed: r for seed, r in sorted(warm_two_pass.items()) if r}
    return [
        _gate("GRPO: final held-out accuracy − the warm start's (points)", gains, GATE_GRPO_GAIN),
        _gate("step 0: refined on the oracle-selected draft − single pass (points)",
              {seed: r["oracle"]["refined_accuracy"] - _avg_at_k(r["single_pass"]) for seed, r in results.items()},
              GATE_TWO_PASS_GAIN),
        _gate("step 0: refinements right after a wrong draft (%)",
              {seed: r["oracle"]["refined_given_wrong_draft"] for seed, r in results.items()},
              GATE_RIGHT_AFTER_WRONG),
    ]


def _avg_at_k(metrics: dict[str, float]) -> float:
    return next(v for k, v in metrics.items() if k.startswith("avg@"))


def _gate(name: str, per_seed: dict[int, float], threshold: float) -> dict:
    values = [v for v in per_seed.values() if v is not None and math.isfinite(v)]
    mean = statistics.fmean(values) if values else math.nan
    return {"gate": name, "per_seed": per_seed, "mean": mean, "threshold": threshold,
            "passed": bool(values) and mean >= threshold}


def gate_table(rows: list[dict], summary: dict) -> str:
    """The gates as a table, and the share of GRPO's evaluation answers with no extractable answer before and after
    (a gain that is only this share falling is the format being learnt, not solving)."""
    lines = ["| gate | per seed | mean | needed | passed |", "|---|---|---|---|---|"]
    for row in rows:
        per_seed = ", ".join(f"s{seed}: {_pct(v)}" for seed, v in row["per_seed"].items()) or "no data"
        lines.append(f"| {row['gate']} | {per_seed} | {_pct(row['mean'])} | ≥ {_pct(row['threshold'])} | "
                     f"{'yes' if row['passed'] else '**no**'} |")
    no_answer = summary.get("grpo", {}).get("no_answer_first_last", {})
    if no_answer:
        shares = ", ".join(f"s{seed}: {_pct(first)} → {_pct(last)}" for seed, (first, last) in no_answer.items())
        lines.append(f"\nGRPO's held-out answers with no extractable answer, before → after RL (%): {shares}.")
    return "\n".join(lines)


def paired_differences(summary: dict, arm_a: str, arm_b: str) -> list[float]:
    """Final accuracy of arm_b minus arm_a, per seed both have."""
    a, b = summary[arm_a]["accuracy_final"], summary[arm_b]["accuracy_final"]
    return [b[s] - a[s] for s in sorted(set(a) & set(b)) if a[s] is not None and b[s] is not None]


def _pct(value: float) -> str:
    return "–" if value is None or math.isnan(value) else f"{100 * value:.1f}"


def markdown_table(summary: dict) -> str:
    lines = [("| arm | seeds | accuracy before RL (%) | final accuracy (%) per seed | final mean ± std (%) | "
              "final entropy (mean ± std) |"), "|---|---|---|---|---|---|"]
    # a run that stopped before the longest one (unfinished, reported with --partial) shows its last step
    longest = max(step for s in summary.values() for step in s["last_step"].values())
    for s in summary.values():
        per_seed = ", ".join(f"s{k}: {_pct(v)}" + (f" (step {s['last_step'][k]})" if s["last_step"][k] < longest
                                                     else "") for k, v in s["accuracy_final"].items())
        bm, bs = s["before_mean_std"]
        fm, fs = s["final_mean_std"]
        em, es = s["entropy_last_mean_std"]
        lines.append(f"| {s['label']} | {len(s['seeds'])} | {_pct(bm)} ± {_pct(bs)} | {per_seed} | "
                     f"**{_pct(fm)} ± {_pct(fs)}** | {em:.3f} ± {es:.3f} |")
    return "\n".join(lines)


def proposition_table(summary: dict) -> str:
    lines = [("| arm | seed | mean draft reward p̄ | observed best-of-N | 1 − (1 − p_q)^N (per problem) | "
              "1 − (1 − p̄)^N (pooled) | refinement reward |"), "|---|---|---|---|---|---|---|"]
    for s in summary.values():
        for seed, p in s["proposition_3_1"].items():
            if p:
                lines.append(f"| {s['label']} | {seed} | {p['draft_mean']:.3f} | {p['observed_best_draft']:.3f} | "
                             f"{p['predicted_per_problem_p']:.3f} | {p['predicted_pooled_p']:.3f} | "
                             f"{p['refinement_mean']:.3f} |")
    return "\n".join(lines)


def interval_text(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    """"mean ± 95% half-width" of values (× scale); "–" when empty."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "–"
    mean, half = interval95(values)
    return f"{scale * mean:.{digits}f}" + ("" if math.isnan(half) else f" ± {scale * half:.{digits}f}")


def pair_table(summary: dict) -> str:
    """Paired differences (iGRPO wrapper − its baseline) in final accuracy, per seed, with a 95% interval and the
    exact sign-flip p-value."""
    lines = ["| comparison | seeds | difference per seed (points) | mean ± 95% interval (points) | sign-flip p |",
             "|---|---|---|---|---|"]
    for base, wrapped in PAIRS:
        if {base, wrapped} <= summary.keys():
            diffs = paired_differences(summary, base, wrapped)
            if diffs:
                lines.append(f"| {summary[wrapped]['label']} − {summary[base]['label']} | {len(diffs)} | "
                             f"{', '.join(f'{100 * d:+.1f}' for d in diffs)} | {interval_text(diffs)} | "
                             f"{sign_flip_p_value(diffs):.3f} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def curve_table(summary: dict) -> str:
    """Held-out accuracy at every evaluation: rollouts consumed, training minutes, mean ± 95% interval over seeds."""
    lines = ["| arm | step | rollouts consumed | training minutes (mean) | accuracy (%), mean ± 95% interval |",
             "|---|---|---|---|---|"]
    for s in summary.values():
        by_step: dict[int, list[dict]] = {}
        for curve in s.get("curves", {}).values():
            for point in curve:
                by_step.setdefault(point["step"], []).append(point)
        for step, points in sorted(by_step.items()):
            rollouts = statistics.fmean(p["rollouts"] for p in points)
            minutes = statistics.fmean(p["seconds"] or 0.0 for p in points) / 60
            lines.append(f"| {s['label']} | {step} | {rollouts:,.0f} | {minutes:.1f} | "
                         f"{interval_text([p['accuracy'] for p in points])} (n={len(points)}) |")
    return "\n".join(lines)


def dynamics_table(summary: dict) -> str:
    """Means over training, then over seeds (± 95% interval): zero-variance groups, entropy, refinement − best
    draft."""
    lines = ["| arm | zero-variance group fraction | entropy first → last (nats/token) | "
             "refinement − best-draft reward |", "|---|---|---|---|"]
    for s in summary.values():
        gap = interval_text(list(s["refinement_minus_best_draft_mean"].values()), scale=1.0, digits=3)
        zero = interval_text(list(s["zero_variance_mean"].values()), scale=1.0, digits=3)
        first, last = (interval_text(list(s[key].values()), scale=1.0, digits=3)
                       for key in ("entropy_first", "entropy_last"))
        lines.append(f"| {s['label']} | {zero} | {first} → {last} | {gap if gap != '–' else '– (no drafts)'} |")
    return "\n".join(lines)


# Per-step metrics of issue 27, averaged over a run's steps (then over seeds, ± 95% interval): how the refinements
# relate to their draft, both stages' sampling entropy and the skips.
REFINEMENT_METRICS = [
    ("reward/accuracy/refined_after_right_draft", "refined right after a right draft (%)", 100.0, 1),
    ("reward/accuracy/refined_after_wrong_draft", "… after a wrong draft (%)", 100.0, 1),
    ("rollout/copy_rate", "copies of the draft (%)", 100.0, 1),
    ("rollout/edit_distance_to_draft", "edit distance to the draft", 1.0, 3),
    ("rollout/entropy/draft", "draft entropy (nats/token)", 1.0, 3),
    ("rollout/entropy/refinement", "refinement / GRPO sample entropy (nats/token)", 1.0, 3),
    ("rollout/skipped_solved", "problems skipped per step", 1.0, 1),
]


def refinement_table(runs: dict[str, dict[int, list[dict]]]) -> str:
    """``REFINEMENT_METRICS`` per arm: each run's mean over its steps, then mean ± 95% interval over seeds ("–"
    where an arm does not log a metric, e.g. GRPO has no draft)."""
    lines = ["| arm | " + " | ".join(title for _, title, _, _ in REFINEMENT_METRICS) + " |",
             "|---|" + "---|" * len(REFINEMENT_METRICS)]
    for arm, by_seed in runs.items():
        cells = []
        for key, _, scale, digits in REFINEMENT_METRICS:
            cells.append(interval_text([mean_of(records, key) for records in by_seed.values()], scale, digits))
        lines.append(f"| {ARMS[arm].label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def two_pass_table(summary: dict) -> str:
    """Final models evaluated single-pass and draft → refine (RUN/two_pass.json), mean ± 95% interval over seeds."""
    rows = []
    for s in summary.values():
        results = [r for r in s.get("two_pass", {}).values() if r]
        if not results:
            continue
        single = [next(v for k, v in r["single_pass"].items() if k.startswith("avg@")) for r in results]
        rows.append(f"| {s['label']} | {len(results)} | {interval_text(single)} | "
                    f"{interval_text([r['oracle']['any_draft_correct'] for r in results])} | "
                    f"{interval_text([r['oracle']['refined_accuracy'] for r in results])} | "
                    f"{interval_text([r['oracle']['refined_given_wrong_draft'] for r in results])} | "
                    f"{interval_text([r['majority']['selected_draft_accuracy'] for r in results])} | "
                    f"{interval_text([r['majority']['refined_accuracy'] for r in results])} |")
    if not rows:
        return ""
    n = next(r for s in summary.values() for r in s.get("two_pass", {}).values() if r)["num_drafts"]
    return "\n".join([
        f"| arm | seeds | single pass avg@k (%) | best of {n} drafts, oracle (%) | refined on the oracle draft (%) | "
        f"… when that draft is wrong (%) | majority-vote draft (%) | refined on the majority draft (%) |",
        "|---|---|---|---|---|---|---|---|", *rows])


def load_runs(root: Path, arms: list[str], seeds: list[int], partial: bool = False) -> dict[str, dict[int, Run]]:
    """Finished runs (a final/ folder); with ``partial``, unfinished ones too (labelled, reported up to their last
    logged step)."""
    from nemo_igrpo.plotting import load_run

    runs: dict[str, dict[int, Run]] = {}
    for arm in arms:
        for seed in seeds:
            directory = RunSpec(arm, seed, root).directory
            finished = (directory / "final").is_dir()
            if finished or (partial and (directory / "metrics.jsonl").is_file()):
                label = f"{ARMS[arm].label} s{seed}" + ("" if finished else " (unfinished)")
                runs.setdefault(arm, {})[seed] = load_run(directory, label)
            else:
                print(f"skipping {directory}: not a finished run", file=sys.stderr)
    return runs


def write_plots(runs: dict[str, dict[int, Run]], directory: Path) -> list[Path]:
    """Per-run overlays of every curve, plus mean ± std over seeds of accuracy, entropy and best-draft reward."""
    from nemo_igrpo.plotting import plot_mean_std, plot_runs

    everything = [run for by_seed in runs.values() for run in by_seed.values()]
    written = [f.path for f in plot_runs(everything, directory, prefix="runs_")]
    groups = {ARMS[arm].label: list(by_seed.values()) for arm, by_seed in runs.items()}
    for key, name, title, ylabel in [
            ("eval/accuracy", "accuracy_vs_rollouts", "Held-out accuracy", "avg@4"),
            ("train/entropy", "entropy_vs_rollouts", "Policy entropy", "nats / token"),
            ("reward/refinement_mean", "reward_vs_rollouts", "Training reward (refinements / GRPO samples)",
             "mean reward"),
            ("zero_variance_fraction", "zero_variance_vs_rollouts", "Zero-variance groups", "fraction of groups"),
            ("reward/refinement_minus_best_draft", "refinement_minus_best_draft_vs_rollouts",
             "Refinement − best-draft reward (iGRPO arms)", "reward difference"),
            ("reward/accuracy/refined_after_right_draft", "refined_after_right_draft_vs_rollouts",
             "Refinements right after a right draft", "accuracy"),
            ("reward/accuracy/refined_after_wrong_draft", "refined_after_wrong_draft_vs_rollouts",
             "Refinements right after a wrong draft", "accuracy"),
            ("rollout/copy_rate", "copy_rate_vs_rollouts", "Refinements that copy their draft", "share"),
            ("rollout/entropy/draft", "draft_entropy_vs_rollouts", "Draft (Stage-1) sampling entropy",
             "nats / token")]:
        written.append(plot_mean_std(groups, key, directory / f"{name}.png", title, ylabel).path)
    written.append(plot_accuracy_vs_wall_clock(runs, directory / "accuracy_vs_wall_clock.png"))
    return written


def plot_accuracy_vs_wall_clock(runs: dict[str, dict[int, Run]], path: Path) -> Path:
    """Mean held-out accuracy over seeds against mean training minutes (time/step summed; evaluations excluded)."""
    from nemo_igrpo.plotting import _pyplot

    plt = _pyplot()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for arm, by_seed in runs.items():
        by_step: dict[int, list[dict]] = {}
        for run in by_seed.values():
            for point in accuracy_curve(run.records, run.prompts_per_step):
                by_step.setdefault(point["step"], []).append(point)
        steps = [step for step, points in sorted(by_step.items()) if len(points) == len(by_seed)]
        if steps:
            xs = [statistics.fmean((p["seconds"] or 0.0) / 60 for p in by_step[st]) for st in steps]
            ys = [statistics.fmean(p["accuracy"] for p in by_step[st]) for st in steps]
            ax.plot(xs, ys, marker="o", markersize=3, label=f"{ARMS[arm].label} (n={len(by_seed)})")
    ax.set_xlabel("training minutes (mean over seeds; CPU shared, not a benchmark)")
    ax.set_ylabel("avg@4")
    ax.set_title("Held-out accuracy vs training wall-clock (mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="trainer.seed of the runs (and of their warm starts unless --warm-seed)")
    parser.add_argument("--arms", nargs="+", default=["grpo", "igrpo"], choices=sorted(ARMS),
                        help="arms to run (ARMS): grpo and igrpo, its ablations igrpo_random igrpo_draft_loss "
                             "igrpo_skip, and the DAPO pair dapo igrpo_dapo")
    parser.add_argument("--root", type=Path, default=Path("/tmp/igrpo_study"), help="one output dir per run here")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel (each gets OMP_NUM_THREADS=1)")
    parser.add_argument("--nice", type=int, default=5, help="niceness of the training processes")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds before one run is killed")
    parser.add_argument("--report-only", action="store_true", help="do not train; report the finished runs")
    parser.add_argument("--markdown", type=Path, default=Path("docs/study.md"),
                        help="report to write (its text below <!-- discussion --> is kept)")
    parser.add_argument("--plots", type=Path, default=Path("docs/study"), help="folder for the PNG plots")
    parser.add_argument("--json", type=Path, default=None, help="numbers as JSON (default: ROOT/study.json)")
    parser.add_argument("--partial", action="store_true",
                        help="also report unfinished runs (up to their last logged step), marked as such")
    parser.add_argument("--warm-seed", type=int, default=None,
                        help="one warm start (with this seed) shared by every run; default: one per seed")
    parser.add_argument("--config", type=Path, default=None,
                        help="the study's YAML (default conf/quickstart.yaml); e.g. conf/study/chain.yaml")
    parser.add_argument("--ignore-gates", action="store_true",
                        help="run the comparison even when a gate fails (the report still shows the gates)")
    parser.add_argument("--two-pass", type=int, default=0, metavar="N",
                        help="also evaluate each final model draft → refine with N drafts (0 = off)")
    parser.add_argument("--warm-start-to", type=Path, default=None, help=argparse.SUPPRESS)  # internal: one seed
    parser.add_argument("--two-pass-problems", type=int, default=0, metavar="P",
                        help="two-pass evaluations use the first P held-out problems (0 = all of them)")
    parser.add_argument("--two-pass-of", type=Path, default=None, help=argparse.SUPPRESS)  # internal: one run
    parser.add_argument("--two-pass-of-warm", type=Path, default=None, help=argparse.SUPPRESS)  # internal: one seed
    parser.add_argument("overrides", nargs="*", help="extra config overrides for every run")
    args = parser.parse_args()
    if args.warm_start_to is not None:
        save_warm_start(args.seeds[0], args.warm_start_to, args.overrides, args.config)
        return
    if args.two_pass_of is not None:
        save_two_pass(args.two_pass_of, args.two_pass, args.two_pass_problems)
        return
    if args.two_pass_of_warm is not None:
        save_warm_two_pass(args.seeds[0], args.two_pass_of_warm, args.overrides, args.config, args.two_pass,
                           args.two_pass_problems)
        return

    wall, compared = {}, list(args.arms)
    if not args.report_only:
        call = lambda task: task(args.overrides, args.timeout, args.nice, args.two_pass)  # noqa: E731
        # the gates first (the warm starts, their two-pass files and the GRPO runs), then the other arms
        wall = train_all(args.seeds, ["grpo"], args.root, args.jobs, call, args.warm_seed, args.config,
                         args.two_pass_problems)
        rows = gates(_grpo_summary(args), _warm_two_pass(args))
        print(gate_table(rows, {}))
        if not all(row["passed"] for row in rows) and not args.ignore_gates:
            print("a gate failed: the comparison is not run (--ignore-gates runs it anyway)", flush=True)
            compared = ["grpo"]
        elif [arm for arm in args.arms if arm != "grpo"]:
            wall.update(train_all(args.seeds, [arm for arm in args.arms if arm != "grpo"], args.root, args.jobs, call,
                                  args.warm_seed, args.config, args.two_pass_problems))

    runs = load_runs(args.root, sorted(set(compared) | {"grpo"}, key=list(ARMS).index), args.seeds, args.partial)
    if not runs:
        sys.exit(f"no finished runs under {args.root}")
    summary = summarize({arm: {seed: run.records for seed, run in by_seed.items()} for arm, by_seed in runs.items()})
    for arm, by_seed in runs.items():
        summary[arm]["curves"] = {seed: accuracy_curve(run.records, run.prompts_per_step)
                                  for seed, run in by_seed.items()}
        summary[arm]["two_pass"] = {seed: _read_two_pass(RunSpec(arm, seed, args.root).directory)
                                    for seed in by_seed}
    gate_rows = gates(summary, _warm_two_pass(args))
    print(gate_table(gate_rows, summary))
    print(markdown_table(summary))
    print(pair_table(summary))
    print(proposition_table(summary))
    print(two_pass_table(summary))

    written = write_plots(runs, args.plots)
    refinement = refinement_table({arm: {seed: run.records for seed, run in by_seed.items()}
                                   for arm, by_seed in runs.items()})
    print(refinement)
    result = {"machine": machine_info(), "command": shlex.join(sys.argv), "overrides": STUDY_OVERRIDES + args.overrides,
              "root": str(args.root), "wall_seconds": wall, "summary": summary, "gates": gate_rows,
              "refinement_table": refinement, "plots": [str(p) for p in written]}
    json_path = args.json or args.root / "study.json"
    json_path.write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {json_path} and {len(written)} plots under {args.plots}")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(render_markdown(result, summary, args))
        print(f"wrote {args.markdown}")


def _warm_two_pass(args) -> dict[int, dict | None]:
    """Each seed's warm start's two-pass file (gate 2), None where missing."""
    warm_seeds = [args.warm_seed] if args.warm_seed is not None else args.seeds
    return {seed: _read_two_pass(RunSpec("grpo", seed, args.root).warm_directory) for seed in warm_seeds}


def _grpo_summary(args) -> dict:
    runs = load_runs(args.root, ["grpo"], args.seeds)
    return summarize({arm: {seed: run.records for seed, run in by_seed.items()} for arm, by_seed in runs.items()})


def machine_info() -> dict:
    import torch
    import transformers

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "torch_threads_per_run": os.environ.get("OMP_NUM_THREADS", "1")}


def render_markdown(result: dict, summary: dict, args) -> str:
    """The generated part of docs/study.md: tables and plot links (the discussion is appended by hand below the
    marker, and kept when the file is regenerated)."""
    marker = "<!-- discussion -->"
    discussion = ""
    if args.markdown.is_file() and marker in args.markdown.read_text():
        discussion = args.markdown.read_text().split(marker, 1)[1]
    m = result["machine"]
    diffs = paired_differences(summary, "grpo", "igrpo") if {"grpo", "igrpo"} <= summary.keys() else []
    diff_line = ""
    if diffs:
        dm, ds = mean_std(diffs)
        diff_line = (f"\nPaired difference iGRPO − GRPO in final accuracy (same seed = same warm-started model): "
                     f"{', '.join(f'{100 * d:+.1f}' for d in diffs)} points; mean {100 * dm:+.1f} ± {100 * ds:.1f}.\n")
    config = str(args.config) if args.config is not None else "conf/quickstart.yaml"
    task = "the embedded default task" if args.config is None else f"`{config}`"
    warm_text = (f"one shared warm start (trainer.seed={args.warm_seed}, warm_start.steps of the config) loaded by "
                 "every run; seeds differ in RL sampling, prompt order and evaluation samples"
                 if args.warm_seed is not None else
                 "one per seed (the config's, with trainer.seed = seed), shared by every arm of that seed")
    rel = os.path.relpath(args.plots, args.markdown.parent)
    plots = "\n\n".join(f"![{Path(p).stem}]({rel}/{Path(p).name})" for p in result["plots"])
    pairs, curves, two_pass = pair_table(summary), curve_table(summary), two_pass_table(summary)
    sections = [
        ("Paired differences in final accuracy (95% interval: t over seeds; p: exact sign-flip test)", pairs),
        ("Held-out accuracy at every evaluation (against rollouts consumed and training wall-clock)", curves),
        ("Training dynamics (means over the steps of each run, then mean ± 95% interval over seeds)",
         dynamics_table(summary)),
        ("Refinement metrics (each run's mean over its steps, then mean ± 95% interval over seeds)",
         result.get("refinement_table", "")),
        ("Proposition 3.1: best-draft success vs 1 − (1 − p)^N (averaged over the training steps)",
         proposition_table(summary)),
        ("Two-pass inference: single pass vs draft → refine with the model's own drafts (final models; oracle "
         "selection uses the gold answer and is an upper bound, majority vote does not)", two_pass),
    ]
    body = "\n".join(f"## {title}\n\n{table}\n" for title, table in sections if table)
    return f"""# iGRPO vs GRPO on {task} (multi-seed study)

Generated by `scripts/study_igrpo_vs_grpo.py`; numbers are re-derived from the runs' `metrics.jsonl` each time.

- Command: `{result['command']}`
- Settings: `{config}` + `{' '.join(result['overrides'])}`; arms differ only in their overrides
  ({', '.join(f"{ARMS[a].label}: `{' '.join(ARMS[a].overrides)}`" for a in summary)}).
  Warm start: {warm_text}.
  Paired arms use 8 rollouts per problem (GRPO/DAPO: 8 samples; iGRPO: 4 drafts + 4 refinements) and the same
  problems per step, so rollouts consumed = step × prompts_per_step × 8 (DAPO's dynamic sampling: an upper bound).
- Machine: {m['platform']}, {m['cpus']} CPUs ({m['processor']}), Python {m['python']}, torch {m['torch']},
  transformers {m['transformers']}, OMP_NUM_THREADS={m['torch_threads_per_run']} per run, `--jobs {args.jobs}`,
  CPU shared with other work (wall times are not benchmarks).

## Gates (computed before any comparison; a failed gate stops the study before its other arms)

{gate_table(result["gates"], summary)}

## Final held-out accuracy (held-out problems × eval.samples_per_problem samples, evaluation sampling)

{markdown_table(summary)}
{diff_line}
{body}
## Plots

{plots}

{marker}{discussion}"""


if __name__ == "__main__":
    main()

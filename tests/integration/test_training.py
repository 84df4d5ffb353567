"""The training loop end to end on a tiny model: resume equality, NaN handling, Ctrl-C, eval, Nemotron-H."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nemo_igrpo import faults
from nemo_igrpo.checkpoint import find_latest
from nemo_igrpo.cli import main as cli_main
from nemo_igrpo.config import load_config
from nemo_igrpo.rewards import Reward, RewardOutput, register_reward
from nemo_igrpo.evaluation.protocols import packaged_benchmarks
from nemo_igrpo.tracking import read_metrics
from nemo_igrpo.trainer import TrainingStopped, train

REPO = Path(__file__).resolve().parents[2]
BENCHMARKS = packaged_benchmarks()
pytestmark = pytest.mark.slow  # every test trains (train() or the CLI)

TINY = [
    "model.tiny.hidden_size=64", "model.tiny.intermediate_size=128", "model.tiny.num_layers=2",
    "model.tiny.num_heads=2", "model.tiny.num_kv_heads=1",
    "data.arithmetic.num_train=200", "data.arithmetic.num_heldout=16", "data.arithmetic.max_operand=9",
    "warm_start.steps=10", "warm_start.batch_size=16", "trainer.prompts_per_step=4", "generation.max_new_tokens=12",
    "eval.samples_per_problem=1", "trainer.progress=false", "trainer.loggers=[]", "policy.micro_batch_size=8",
]


def tiny_config(run_dir: Path, *overrides: str):
    return load_config(REPO / "conf" / "quickstart.yaml", [*TINY, f"trainer.output_dir={run_dir}", *overrides])


def comparable(records):
    """Metrics that must be reproducible (wall-clock timings are not)."""
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "throughput/"))} for r in records]


def test_resume_after_a_crash_reproduces_the_uninterrupted_run(tmp_path):
    steps = ["trainer.max_steps=4", "trainer.save_every=2", "trainer.eval_every=2"]
    reference = tmp_path / "reference"
    train(tiny_config(reference, *steps))

    crashed = tmp_path / "crashed"
    with faults.armed("train.step", "raise", when={"step": 3}), pytest.raises(faults.FaultInjected):
        train(tiny_config(crashed, *steps))  # crashes as step 3 begins
    assert find_latest(crashed / "checkpoints").name == "step_000002"
    result = train(tiny_config(crashed, *steps))  # trainer.resume=auto
    assert result.step == 4

    expected = comparable(read_metrics(reference / "metrics.jsonl"))
    got = comparable(read_metrics(crashed / "metrics.jsonl"))
    assert [r["step"] for r in got] == [0, 1, 2, 3, 4]
    assert got == expected  # every reward, loss, entropy and held-out accuracy, steps 0..4
    for name in ("model.safetensors",):
        a = (reference / "final" / name).read_bytes()
        assert a == (crashed / "final" / name).read_bytes()  # bitwise-identical final weights


def test_finished_run_is_not_retrained(tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny_config(run, "trainer.max_steps=1"))
    lines = len(read_metrics(run / "metrics.jsonl"))
    result = train(tiny_config(run, "trainer.max_steps=1"))
    assert result.step == 1 and len(read_metrics(run / "metrics.jsonl")) == lines


def test_non_finite_steps_are_skipped_then_the_run_stops_with_the_checkpoint_intact(tmp_path):
    run = tmp_path / "run"
    train(tiny_config(run, "trainer.max_steps=1", "trainer.eval_every=0"))
    weights = (run / "checkpoints" / "step_000001" / "policy").iterdir()
    before = {p.name: p.read_bytes() for p in weights}

    # A NaN loss (a NaN reward no longer makes one: such samples are unscorable and get advantage 0)
    with faults.armed("loss.computed", "nan", times=None), \
            pytest.raises(TrainingStopped, match="2 consecutive steps had a non-finite loss"):
        train(tiny_config(run, "trainer.max_steps=5", "trainer.max_consecutive_nan_steps=2", "trainer.eval_every=0",
                          "trainer.save_every=1"))
    records = read_metrics(run / "metrics.jsonl")
    assert [r["train/skipped"] for r in records if r["step"] > 1] == [1.0, 1.0]
    assert find_latest(run / "checkpoints").name == "step_000001"
    after = {p.name: p.read_bytes() for p in (run / "checkpoints" / "step_000001" / "policy").iterdir()}
    assert after == before


def test_sigint_stops_after_the_step_with_a_checkpoint(tmp_path):
    run = tmp_path / "run"
    command = [sys.executable, "-m", "nemo_igrpo.cli", "train", *TINY, f"trainer.output_dir={run}",
               "trainer.max_steps=500", "trainer.save_every=0", "trainer.eval_every=0"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 600  # generous: a loaded machine runs these steps far slower
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output
    assert "Stop requested" in output
    last_logged = read_metrics(metrics)[-1]["step"]
    assert 2 <= last_logged < 500
    assert find_latest(run / "checkpoints").name == f"step_{last_logged:06d}"


def test_eval_command_writes_reports(tmp_path):
    run = tmp_path / "run"
    train(tiny_config(run, "trainer.max_steps=1", "trainer.eval_every=0"))
    out = tmp_path / "eval"
    datasets = f"eval.datasets=[{BENCHMARKS / 'math500.jsonl'},{BENCHMARKS / 'aime24.jsonl'},builtin:arithmetic]"
    code = cli_main(["eval", *TINY, f"eval.model={run / 'final'}", datasets, "eval.num_problems=3",
                     "eval.samples_per_problem=2", f"eval.output_dir={out}"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())["results"]
    assert set(results) == {"math500", "aime24", "arithmetic"}
    assert set(results["aime24"]) == {"avg@2", "pass@1", "pass@2", "problems", "no_answer"}
    assert results["aime24"]["problems"] == 3 and 0.0 <= results["aime24"]["no_answer"] <= 1.0
    samples = [json.loads(line) for line in (out / "math500.samples.jsonl").read_text().splitlines()]
    assert len(samples) == 3 and all(len(s["completions"]) == 2 and len(s["correct"]) == 2 for s in samples)
    assert "| math500 |" in (out / "results.md").read_text()


@register_reward("test_alternating")
class AlternatingReward(Reward):
    """1, 0, 1, 0, ... whatever the text: every group has variance, so every step moves the policy."""

    def __init__(self, extract: str = "boxed"):
        pass

    def __call__(self, completions, answers):
        return RewardOutput(scores=[float(i % 2 == 0) for i in range(len(completions))], components={})


def test_grpo_preset_and_kl_run(tmp_path):
    run = tmp_path / "run"
    result = train(tiny_config(run, "algorithm.preset=grpo", "algorithm.num_refinements=4", "algorithm.kl_coef=0.1",
                               "reward.components={test_alternating: 1.0}", "trainer.max_steps=2",
                               "trainer.eval_every=0"))
    records = read_metrics(run / "metrics.jsonl")
    assert result.step == 2 and "reward/draft_mean" not in records[-1]
    assert records[-1]["rollouts_per_prompt/total"] == 4.0
    assert records[0]["train/kl"] == pytest.approx(0.0, abs=1e-6)  # first step: policy == reference
    assert records[-1]["train/kl"] > 0.0


def test_nemotron_h_hybrid_runs_igrpo_steps(tmp_path):
    from transformers import NemotronHConfig, NemotronHForCausalLM

    from nemo_igrpo.data.char_tokenizer import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    torch.manual_seed(0)
    config = NemotronHConfig(
        vocab_size=len(tokenizer), hidden_size=64, hybrid_override_pattern="M*M-", num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, intermediate_size=128, mamba_num_heads=4, mamba_head_dim=16,
        ssm_state_size=16, n_groups=1, chunk_size=16, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=None, tie_word_embeddings=True)
    model_dir = tmp_path / "nemotron_h"
    NemotronHForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)

    run = tmp_path / "run"
    train(tiny_config(run, f"model.path={model_dir}", "trainer.max_steps=2", "trainer.eval_every=0",
                      "warm_start.steps=2"))
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    assert all(math.isfinite(r["train/loss"]) and r["train/skipped"] == 0.0 for r in records)
    assert records[-1]["rollouts_per_prompt/drafts"] == 4.0
    trained = NemotronHForCausalLM.from_pretrained(run / "final")
    initial = NemotronHForCausalLM.from_pretrained(model_dir)
    changed = [n for n, p in trained.state_dict().items() if not torch.equal(p, initial.state_dict()[n])]
    assert changed  # the warm start and RL updated the hybrid model


def test_math_verify_reward_in_the_loop_leaves_no_workers(tmp_path):
    import multiprocessing

    run = tmp_path / "run"
    # A warm start long enough that the model writes \boxed{} answers, so the grading pool really runs.
    train(tiny_config(run, "reward.components={math_verify: 1.0}", "trainer.max_steps=1", "trainer.eval_every=1",
                      "warm_start.steps=60", "data.arithmetic.unboxed_fraction=0.0", "generation.max_new_tokens=24"))
    record = read_metrics(run / "metrics.jsonl")[-1]
    samples = 4 * 8  # prompts_per_step × (drafts + refinements)
    assert record["reward/count/no_answer"] < samples  # some answers reached the grader
    assert record["reward/count/timeouts"] == 0 and record["reward/count/crashes"] == 0
    assert 0.0 <= record["reward/accuracy"] <= 1.0 and 0.0 <= record["eval/accuracy"] <= 1.0
    assert multiprocessing.active_children() == []  # the grading pool was closed with the run


@register_reward("test_alternating_problems")
class AlternatingProblemsReward(Reward):
    """A call that scores one problem's N drafts (``num_drafts`` texts) marks all of them right or all wrong, on
    alternate calls, so that whatever draft is selected both right and wrong selected drafts occur every step;
    any other call (the refinements) alternates 1, 0, 1, 0 so every group has variance."""

    num_drafts = 4

    def __init__(self, extract: str = "boxed"):
        self.calls = 0

    def __call__(self, completions, answers):
        self.calls += 1
        if len(completions) == self.num_drafts:
            return RewardOutput(scores=[float(self.calls % 2)] * len(completions), components={})
        return RewardOutput(scores=[float(i % 2 == 0) for i in range(len(completions))], components={})


def test_refinement_metrics_logged_with_a_draft_mix_and_random_selection(tmp_path, monkeypatch):
    """Issue 27's "done when": a 2-step run with warm_start.draft_mix (every kind, own drafts sampled from the
    warmed model), algorithm.draft_selection=random and algorithm.draft_loss_weight=0.5 logs the refinement
    metrics, each in [0, 1] (the draft rows themselves: tests/unit/test_draft_loss.py)."""
    from nemo_igrpo import warm_start

    counts = {"refresh": 0, "own": 0}
    refresh, sample = warm_start.ModelDrafts.refresh, warm_start.ModelDrafts.__call__

    def counted_refresh(self):
        counts["refresh"] += 1
        return refresh(self)

    def counted_sample(self, problems):
        counts["own"] += len(problems)
        drafts = sample(self, problems)
        assert len(drafts) == len(problems) and all(isinstance(d, str) for d in drafts)
        return drafts

    monkeypatch.setattr(warm_start.ModelDrafts, "refresh", counted_refresh)
    monkeypatch.setattr(warm_start.ModelDrafts, "__call__", counted_sample)
    run = tmp_path / "run"
    train(tiny_config(run, "data.train=builtin:chain", "data.eval=builtin:chain", "warm_start.steps=4",
                      "warm_start.batch_size=16", "warm_start.refinement_fraction=1.0",
                      "warm_start.own_refresh_rows=32",
                      "warm_start.draft_mix={reference: 0.25, near_miss: 0.25, foreign: 0.25, own: 0.25}",
                      "algorithm.draft_selection=random", "algorithm.draft_loss_weight=0.5",
                      "reward.components={test_alternating_problems: 1.0}",
                      "trainer.max_steps=2", "trainer.eval_every=0", "trainer.save_every=0"))
    # 64 warm-start rows, a quarter of them own drafts; the sampler got the weights after rows 32 (step 3)
    assert counts["refresh"] == 1 and 0 < counts["own"] < 64
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    keys = ["reward/accuracy/refined_after_right_draft", "reward/accuracy/refined_after_wrong_draft",
            "rollout/copy_rate", "rollout/edit_distance_to_draft", "rollout/entropy/draft",
            "rollout/entropy/refinement"]
    for record in records:
        for key in keys[:4]:
            assert 0.0 <= record[key] <= 1.0, (key, record[key])
        # refinements alternate right, wrong within each group of 4, after right and after wrong drafts alike
        assert record["reward/accuracy/refined_after_right_draft"] == 0.5
        assert record["reward/accuracy/refined_after_wrong_draft"] == 0.5
        assert record["rollout/entropy/draft"] > 0 and record["rollout/entropy/refinement"] > 0
        assert math.isfinite(record["train/loss"]) and record["train/skipped"] == 0.0


def test_skip_solved_by_drafts_draws_replacements_from_the_prompt_stream(tmp_path):
    """algorithm.skip_solved_by_drafts in the trainer: the problems every draft solved (test_alternating_problems
    marks every other problem's drafts all right) skip Stage 2, replacements come from the same prompt stream, and
    each step still trains prompts_per_step groups."""
    run = tmp_path / "run"
    train(tiny_config(run, "algorithm.skip_solved_by_drafts=true", "reward.components={test_alternating_problems: 1.0}",
                      "trainer.max_steps=2", "trainer.eval_every=0", "trainer.save_every=0"))
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    for record in records:
        skipped = record["rollout/skipped_solved"]
        assert skipped >= 1  # about half of each round's problems have all-right drafts
        # the stream advanced by the trained problems plus the skipped ones, no more
        assert record["rollout/sampler_end"] - record["rollout/sampler_start"] == 4 + skipped
        assert record["batch/sequences"] == 4 * 4  # prompts_per_step groups of G refinements
        assert 1 < record["sampling_rounds"] <= 4

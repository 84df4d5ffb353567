"""The benchmark and study scripts' pure parts: statistics, tables, JSON, Proposition 3.1, memory tracking."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


bench_vs_trl = load_script("bench_vs_trl")
overhead = load_script("bench_igrpo_overhead")
memory = load_script("bench_memory")
study = load_script("study_igrpo_vs_grpo")
bench_async = load_script("bench_async")
parity = load_script("study_async_parity")


# ------------------------------------------------------------------------------------------ bench_vs_trl

def test_vs_trl_summary_ratio_table_and_json(tmp_path):
    ours = bench_vs_trl.summarize([{"seconds": 2.0, "tokens": 100}, {"seconds": 1.0, "tokens": 100},
                                   {"seconds": 4.0, "tokens": 100}])
    assert ours == {"steps": 3, "median_s_per_step": 2.0, "min_s_per_step": 1.0, "max_s_per_step": 4.0,
                    "median_tokens_per_s": 50.0, "median_tokens_per_step": 100}
    theirs = bench_vs_trl.summarize([{"seconds": 4.0, "tokens": 100}, {"seconds": 4.0, "tokens": 120}])
    assert theirs["median_tokens_per_s"] == pytest.approx(27.5)
    results = {"nemo-igrpo": ours, "trl": theirs}
    assert bench_vs_trl.ratios(results) == {"s_per_step": 0.5, "tokens_per_s": pytest.approx(50 / 27.5)}
    table = bench_vs_trl.render_table(results, "t")
    assert "| nemo-igrpo | 3 | 2.000 (1.000–4.000) | 50 | 100 |" in table
    assert "**0.50** (time)" in table and "**1.82** (throughput)" in table
    paired = bench_vs_trl.paired_ratios({"nemo-igrpo": [ours, theirs, ours], "trl": [theirs, theirs, ours]})
    assert paired == [0.5, 1.0, 1.0]
    assert "1.00**." in bench_vs_trl.render_table(results, "t", paired)  # median of the paired ratios
    bench_vs_trl.write_json(tmp_path / "a" / "out.json", {"results": results})
    assert json.loads((tmp_path / "a" / "out.json").read_text())["results"]["trl"]["steps"] == 2
    with pytest.raises(ValueError, match="no measured steps"):
        bench_vs_trl.summarize([])


# ------------------------------------------------------------------------------------------ iGRPO overhead

def test_overhead_phases_ratio_and_tokens():
    grpo = [{"time/rollout/refinements": 2.0, "time/rollout/reward": 0.1, "time/update": 1.0,
             "time/weight_sync": 0.01, "time/step": 3.11}] * 3
    igrpo = [{"time/rollout/drafts": 1.0, "time/rollout/refinements": 1.2, "time/rollout/reward": 0.2,
              "time/old_logprobs": 0.3, "time/reference_logprobs": 0.2, "time/update": 1.0,
              "time/weight_sync": 0.01, "time/step": 3.91}]
    g, i = overhead.median_phases(grpo), overhead.median_phases(igrpo)
    assert g["drafts"] == 0.0 and g["log-probs"] == 0.0
    assert i["log-probs"] == pytest.approx(0.5)  # old + reference passes
    o = overhead.overhead(g, i)
    assert o["step_ratio"] == pytest.approx(3.91 / 3.11)
    assert o["step_overhead_pct"] == pytest.approx(100 * (3.91 / 3.11 - 1))
    assert o["extra_s/drafts"] == 1.0 and o["extra_s/refinements"] == pytest.approx(-0.8)
    table = overhead.render_table({"hf": {"grpo": g, "igrpo": i}}, "t")
    assert "**1.26× (+26%)**" in table and "| hf | igrpo | 1.000 | 0.200 | 1.200 | 0.500 |" in table
    # 2 problems: 8 refinements of 10 tokens + 8 drafts of 5 tokens
    record = {"batch/sequences": 8.0, "rollouts_per_prompt/refinements": 4.0, "rollouts_per_prompt/drafts": 4.0,
              "response_length/refinement_mean": 10.0, "response_length/draft_mean": 5.0}
    assert overhead.generated_tokens(record) == 120.0
    assert overhead.generated_tokens({**record, "rollouts_per_prompt/drafts": 0.0,
                                      "response_length/draft_mean": 0.0}) == 80.0


# ------------------------------------------------------------------------------------------ memory

def test_peak_tensor_memory_tracks_allocation_and_release():
    with memory.PeakTensorMemory() as tracker:
        a = torch.ones(1000, 250)  # 1,000,000 bytes
        b = a * 2  # another 1 MB
        del a, b
        c = torch.ones(1000, 250)
        c.view(-1).add_(1)  # a view of c: no new storage
    assert tracker.peak == 2_000_000
    assert tracker.current == 1_000_000  # c is still alive
    del c
    assert tracker.current == 0
    assert memory.full_logits_bytes(2, 1024, 32768) == 2 * 1024 * 32768 * 4
    assert memory.chunk_logits_bytes(1024, 32768) == 1024 * 32768 * 4


def test_chunked_logprob_path_stays_below_full_logits():
    """Many chunks: the chunked path's peak is bounded by the chunk, the naive one grows with B·L·V."""
    class Args:
        hidden, layers, batch, chunk, device = 32, 1, 4, 64, "cpu"

    torch.manual_seed(0)
    chunked = memory.measure("chunked", 4096, 256, Args)["peak_bytes"]
    naive = memory.measure("naive", 4096, 256, Args)["peak_bytes"]
    full = memory.full_logits_bytes(4, 256, 4096)
    assert chunked < full < naive
    table = memory.render_table([{"length": 256, "vocab": 4096, "full_logits_bytes": full,
                                  "chunked_peak_bytes": chunked, "naive_peak_bytes": naive}], "t")
    assert f"| 256 | 4096 | {full / 2**20:.1f} | {chunked / 2**20:.1f} | {naive / 2**20:.1f} |" in table


# ------------------------------------------------------------------------------------------ study

def _records(draft_rewards_per_step: list[list[list[float]]], accuracies: list[float], entropy: list[float]):
    """metrics.jsonl records as the trainer logs them, from per-step [problem][draft] binary rewards."""
    records = [{"step": 0, "eval/accuracy": accuracies[0]}]
    for step, drafts in enumerate(draft_rewards_per_step, start=1):
        n = len(drafts[0])
        p = [sum(d) / n for d in drafts]
        records.append({
            "step": step, "rollouts_per_prompt/drafts": float(n), "reward/draft_mean": sum(p) / len(p),
            "reward/best_draft_mean": sum(max(d) for d in drafts) / len(drafts),
            "reward/accuracy/draft_mean": sum(p) / len(p),
            "reward/accuracy/any_draft_correct": sum(max(d) for d in drafts) / len(drafts),
            "reward/accuracy/best_draft_predicted": sum(1 - (1 - q) ** n for q in p) / len(p),
            "reward/refinement_mean": 0.5, "train/entropy": entropy[step - 1]})
    records[-1]["eval/accuracy"] = accuracies[1]
    return records


def test_proposition_3_1_from_logged_draft_rewards():
    # two problems, N = 4: p = 0.25 and 0.75; both have a success, so observed best-of-N = 1
    records = _records([[[1, 0, 0, 0], [1, 1, 1, 0]]], [0.1, 0.2], [1.0])
    got = study.best_draft_vs_prediction(records)
    assert got["num_drafts"] == 4
    assert got["observed_best_draft"] == 1.0
    assert got["draft_mean"] == 0.5
    assert got["predicted_per_problem_p"] == pytest.approx(((1 - 0.75 ** 4) + (1 - 0.25 ** 4)) / 2)
    assert got["predicted_pooled_p"] == pytest.approx(1 - 0.5 ** 4)
    assert study.best_draft_vs_prediction([{"step": 0, "eval/accuracy": 0.1}]) == {}  # a GRPO run: no drafts
    # runs logged before the accuracy keys existed: the total-reward keys (binary rewards here, so the same numbers)
    old = [{k.replace("accuracy/", "").replace("any_draft_correct", "best_draft_mean"): v for k, v in r.items()}
           for r in records]
    assert study.best_draft_vs_prediction(old) == pytest.approx(got)


def test_study_summary_tables_and_report(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    root = tmp_path / "runs"
    finals = {("grpo", 0): 0.30, ("grpo", 1): 0.40, ("igrpo", 0): 0.35, ("igrpo", 1): 0.50}
    for (arm, seed), final in finals.items():
        directory = root / f"{arm}-s{seed}"
        (directory / "final").mkdir(parents=True)
        (directory / "config.yaml").write_text("trainer:\n  prompts_per_step: 2\n")
        drafts = [[[1, 0, 0, 0], [0, 0, 0, 0]]] * 2 if arm == "igrpo" else []
        records = _records(drafts, [0.2, final], [0.9, 0.8]) if drafts else [
            {"step": 0, "eval/accuracy": 0.2},
            {"step": 1, "train/entropy": 0.9, "reward/refinement_mean": 0.4},
            {"step": 2, "train/entropy": 0.7, "reward/refinement_mean": 0.5, "eval/accuracy": final}]
        for r in records[1:]:
            r.update({"rollouts_per_prompt/total": 8.0, "sampling_rounds": 1.0})
        (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (root / "igrpo-s2").mkdir()  # unfinished: skipped

    runs = study.load_runs(root, ["grpo", "igrpo"], [0, 1, 2])
    summary = study.summarize({a: {s: r.records for s, r in by.items()} for a, by in runs.items()})
    assert summary["grpo"]["final_mean_std"] == pytest.approx((0.35, math.sqrt(0.005)))
    assert summary["igrpo"]["accuracy_final"] == {0: 0.35, 1: 0.50}
    assert summary["grpo"]["entropy_last_mean_std"] == pytest.approx((0.7, 0.0))
    assert study.paired_differences(summary, "grpo", "igrpo") == pytest.approx([0.05, 0.10])
    assert "| GRPO 8 | 2 | 20.0 ± 0.0 | s0: 30.0, s1: 40.0 | **35.0 ± 7.1** | 0.700 ± 0.000 |" in \
        study.markdown_table(summary)
    # N = 4, p = 0.25 and 0: observed 0.5, per-problem 1 − 0.75⁴ / 2, pooled 1 − 0.875⁴
    assert "| iGRPO 4+4 | 0 | 0.125 | 0.500 | 0.342 | 0.414 | 0.500 |" in study.proposition_table(summary)

    markdown, plots = tmp_path / "docs" / "study.md", tmp_path / "docs" / "study"
    markdown.parent.mkdir()
    markdown.write_text("old\n<!-- discussion -->\nkept by hand\n")
    monkeypatch.setattr(sys, "argv", ["study", "--report-only", "--root", str(root), "--seeds", "0", "1", "2",
                                      "--markdown", str(markdown), "--plots", str(plots)])
    study.main()
    text = markdown.read_text()
    assert "mean +7.5 ± 3.5" in text  # paired differences +5 and +10 points
    assert text.endswith("<!-- discussion -->\nkept by hand\n")
    assert "![accuracy_vs_rollouts](study/accuracy_vs_rollouts.png)" in text
    assert "![accuracy_vs_wall_clock](study/accuracy_vs_wall_clock.png)" in text
    assert "| iGRPO 4+4 − GRPO 8 | 2 | +5.0, +10.0 | 7.5 ± 31.8 | 0.500 |" in text  # the paired-test section
    # accuracy per evaluation: step 2 = 2 steps × 2 problems × 8 rollouts; 30 and 40% → 35 ± 12.706 · 7.07 / √2
    assert "| GRPO 8 | 2 | 32 | 0.0 | 35.0 ± 63.5 (n=2) |" in text
    assert (plots / "accuracy_vs_rollouts.png").read_bytes().startswith(b"\x89PNG")
    saved = json.loads((root / "study.json").read_text())
    assert saved["summary"]["igrpo"]["final_mean_std"] == pytest.approx([0.425, math.sqrt(0.01125)])


def test_study_schedule_runs_each_seed_after_its_warm_start():
    assert study.schedule([0, 1, 2], ["grpo", "igrpo"], jobs=2) == [
        ("warm", 0, None), ("warm", 1, None), ("run", 0, "grpo"), ("run", 0, "igrpo"), ("warm", 2, None),
        ("run", 1, "grpo"), ("run", 1, "igrpo"), ("run", 2, "grpo"), ("run", 2, "igrpo")]
    assert study.schedule([3, 4], ["grpo"], jobs=2, warm_seed=3) == [("warm", 3, None), ("run", 3, "grpo"),
                                                                     ("run", 4, "grpo")]
    spec = study.RunSpec("igrpo", 4, Path("/r"), warm_seed=3)
    command = spec.command(["x=1"])
    assert "model.path=/r/warm-s3" in command and "trainer.seed=4" in command and "warm_start.steps=0" in command
    assert command[-1] == "x=1"


def test_study_intervals_and_paired_test():
    mean, half = study.interval95([0.30, 0.40])
    # s = 0.0707, n = 2: t(0.975, 1) = 12.706, so 12.706 · 0.0707 / √2 = 0.635
    assert (mean, half) == pytest.approx((0.35, 0.6353), abs=1e-4)
    assert math.isnan(study.interval95([0.3])[1])
    assert study.sign_flip_p_value([0.05, 0.10]) == 0.5  # sums ±0.15 reach 0.15: 2 of 4 sign patterns
    assert study.sign_flip_p_value([1, 2, 3, 4, 5]) == 2 / 32  # all one sign: the smallest p 5 seeds can give
    assert study.sign_flip_p_value([3, -1, 2]) == 4 / 8  # |sum| >= 4: 4, 6, -6, -4 of the 8 patterns


def test_study_accuracy_curve_has_rollouts_and_wall_clock():
    records = [{"step": 0, "eval/accuracy": 0.2},
               {"step": 1, "time/step": 10.0, "rollouts_per_prompt/total": 8.0},
               {"step": 2, "time/step": 20.0, "rollouts_per_prompt/total": 8.0, "sampling_rounds": 2.0,
                "eval/accuracy": 0.5}]
    # 4 problems × 8 rollouts at step 1, then two sampling rounds at step 2: 32 + 64; seconds 10 + 20
    assert study.accuracy_curve(records, prompts_per_step=4) == [
        {"step": 0, "rollouts": 0.0, "seconds": 0.0, "accuracy": 0.2},
        {"step": 2, "rollouts": 96.0, "seconds": 30.0, "accuracy": 0.5}]


def test_study_pair_and_two_pass_tables():
    def two_pass(single, best, refined):
        return {"num_drafts": 4, "single_pass": {"avg@4": single, "pass@1": single},
                "oracle": {"any_draft_correct": best, "refined_accuracy": refined, "refined_given_wrong_draft": 0.1},
                "majority": {"selected_draft_accuracy": 0.4, "refined_accuracy": 0.45}}

    summary = {"grpo": {"label": "GRPO 8", "accuracy_final": {0: 0.30, 1: 0.40}, "two_pass": {0: None, 1: None}},
               "igrpo": {"label": "iGRPO 4+4", "accuracy_final": {0: 0.35, 1: 0.50},
                         "two_pass": {0: two_pass(0.3, 0.6, 0.5), 1: two_pass(0.5, 0.8, 0.7)}}}
    # +5 and +10 points: mean 7.5, s = 3.54, t(1) = 12.706 → ± 31.8; sign-flip p = 0.5
    assert "| iGRPO 4+4 − GRPO 8 | 2 | +5.0, +10.0 | 7.5 ± 31.8 | 0.500 |" in study.pair_table(summary)
    table = study.two_pass_table(summary)
    assert "best of 4 drafts" in table and "GRPO 8 |" not in table  # no two-pass results for GRPO
    # single 40 ± 12.706·14.14/√2 = 127.1; best 70 ± 127.1; refined 60 ± 127.1; wrong-draft 10; majority 40, 45
    row = "| iGRPO 4+4 | 2 | 40.0 ± 127.1 | 70.0 ± 127.1 | 60.0 ± 127.1 | 10.0 ± 0.0 | 40.0 ± 0.0 | 45.0 ± 0.0 |"
    assert row in table
    spec = study.RunSpec("igrpo", 1, Path("/r"), config=Path("conf/study/chain.yaml"))
    assert spec.command([])[3:6] == ["train", "--config", "conf/study/chain.yaml"]
    assert spec.command([])[6] == "algorithm.preset=igrpo"
    ablation = study.RunSpec("igrpo_random", 1, Path("/r")).command([])
    assert "algorithm.draft_selection=random" in ablation and "algorithm.preset=igrpo" in ablation
    assert "--config" in spec.warm_command([]) and spec.two_pass_command(4)[2:] == [
        "--two-pass-of", "/r/igrpo-s1", "--two-pass", "4", "--two-pass-problems", "0"]
    warm = spec.warm_two_pass_command(["x=1"], 4)
    assert warm[2:4] == ["--two-pass-of-warm", "/r/warm-s1"] and warm[-3:] == ["x=1", "--seeds", "1"]
    # overrides before --seeds (nargs="+"), which would otherwise read them as seeds
    assert spec.warm_command(["trainer.eval_every=15"])[-3:] == ["trainer.eval_every=15", "--seeds", "1"]


def test_study_refinement_table_means_over_steps_then_seeds():
    runs = {"grpo": {0: [{"step": 1, "rollout/entropy/refinement": 0.2}]},
            "igrpo": {0: [{"step": 1, "rollout/copy_rate": 0.5, "reward/accuracy/refined_after_wrong_draft": 0.1},
                          {"step": 2, "rollout/copy_rate": 0.25}],  # a step with no wrong draft logs no such key
                      1: [{"step": 1, "rollout/copy_rate": 0.125, "reward/accuracy/refined_after_wrong_draft": 0.3}]}}
    table = study.refinement_table(runs).splitlines()
    assert table[2].startswith("| GRPO 8 | – | – | – | – | – | 0.200 | – |")
    # copy rate: seed 0 (0.5 + 0.25) / 2 = 0.375, seed 1 0.125: mean 25 ± 12.706 · 17.68 / √2 = 158.8
    assert table[3] == "| iGRPO 4+4 | – | 20.0 ± 127.1 | 25.0 ± 158.8 | – | – | – | – |"


def test_study_gates_from_grpo_runs_and_warm_start_two_pass():
    summary = {"grpo": {"seeds": [0, 1], "accuracy_before": {0: 0.40, 1: 0.50}, "accuracy_final": {0: 0.47, 1: 0.54},
                        "no_answer_first_last": {0: (0.2, 0.0), 1: (0.1, 0.0)}}}

    def warm(single, refined, after_wrong):
        return {"single_pass": {"avg@4": single}, "oracle": {"refined_accuracy": refined,
                                                             "refined_given_wrong_draft": after_wrong}}

    rows = study.gates(summary, {0: warm(0.40, 0.50, 0.20), 1: warm(0.50, 0.52, 0.12)})
    # GRPO: +7 and +4 points, mean 5.5 ≥ 5; two-pass: +10 and +2, mean 6 ≥ 5; after a wrong draft: 16% ≥ 15%
    assert [round(r["mean"], 6) for r in rows] == [0.055, 0.06, 0.16]
    assert [r["passed"] for r in rows] == [True, True, True]
    rows = study.gates(summary, {0: warm(0.40, 0.50, 0.10), 1: None})  # one warm start without its file
    assert [r["passed"] for r in rows] == [True, True, False] and rows[2]["per_seed"] == {0: 0.10}
    assert [r["passed"] for r in study.gates({}, {})] == [False, False, False]  # no data: every gate fails
    table = study.gate_table(rows, summary)
    assert "| s0: 10.0 | 10.0 | ≥ 15.0 | **no** |" in table
    assert "before → after RL (%): s0: 20.0 → 0.0, s1: 10.0 → 0.0" in table


# ------------------------------------------------------------------------------------------ bench_async


def test_bench_async_summary_and_table():
    sync = [{"time/step": 10.0, "time/rollout/generation": 6.0, "time/update": 3.0, "time/weight_sync": 1.0},
            {"time/step": 12.0, "time/rollout/generation": 8.0, "time/update": 3.0, "time/weight_sync": 1.0}]
    k1 = [{"time/step": 6.0, "time/rollout/generation": 6.0, "time/update": 4.0, "time/weight_sync": 1.0,
           "rollout/staleness": 1.0, "time/rollout/job": 7.0, "time/sync_wait": 0.5, "rollout/version_span": 1.0}]
    # sync: 11 s/step → 327 steps/h; generating 7 of 11 s → 36% idle; computing 4 of 11 → 64% idle
    got = bench_async.summarize(sync)
    assert got["s_per_step"] == 11.0 and got["steps_per_hour"] == pytest.approx(3600 / 11)
    assert got["generator_idle"] == pytest.approx(4 / 11) and got["trainer_idle"] == pytest.approx(7 / 11)
    assert got["staleness_mean"] == 0.0 and got["steps"] == 2
    fast = bench_async.summarize(k1)  # generation as long as the step: never idle; trainer works 5 of 6 s
    assert fast["generator_idle"] == 0.0 and fast["trainer_idle"] == pytest.approx(1 / 6)
    table = bench_async.render_table({"sync": got, "k=1": fast}, "t")
    assert "| sync | 11.00 | 327 | 1.00× | 36% | 64% | 0.00 | 0.00 | 0.00 |" in table
    assert "| k=1 | 6.00 | 600 | 1.83× | 0% | 17% | 1.00 | 0.50 | 1.00 |" in table
    assert bench_async.pinned(1, ["x"]) == ["taskset", "-c", "1", "x"] and bench_async.pinned(None, ["x"]) == ["x"]
    with pytest.raises(ValueError, match="no measured steps"):
        bench_async.summarize([])


# ------------------------------------------------------------------------------------------ study_async_parity


def test_parity_run_summary_means_skip_steps_without_the_key():
    records = [{"step": 0, "eval/accuracy": 0.5},
               {"step": 1, "time/step": 2.0, "rollout/staleness": 1.0},
               {"step": 2, "time/step": 4.0, "rollout/staleness": 0.0, "train/mismatch/is_weight_mean": 1.01,
                "eval/accuracy": 0.9}]
    got = parity.run_summary(records)
    assert (got["before"], got["final"], got["curve"]) == (0.5, 0.9, {0: 0.5, 2: 0.9})
    assert got["means"] == {"s/step": 3.0, "staleness": 0.5, "stale tokens": None, "IS weight": 1.01,
                            "IS capped": None, "sampler–trainer KL": None}
    assert (got["steps"], got["training_seconds"]) == (2, 6.0)


def test_parity_range_paired_differences_and_intervals():
    def runs(finals, seconds_per_step=1.0):
        return {seed: {"final": acc, "curve": {0: 0.5, 30: acc}, "steps": 30, "training_seconds": 30 * seconds_per_step,
                       "means": {**dict.fromkeys(parity.RUN_MEANS, 1.0), "s/step": seconds_per_step}}
                for seed, acc in enumerate(finals)}

    summaries = {"sync": runs([0.90, 0.80, 0.85], 3.5), "k=1": runs([0.88, 0.95, 0.82], 2.0)}
    got = parity.parity(summaries)
    # sync: mean 0.85, s = 0.05 → 95% half-width t(0.975, 2) · s / √3 = 4.303 · 0.05 / 1.732 = 0.1242
    assert got["sync"]["mean"] == pytest.approx(0.85) and got["sync"]["half_width"] == pytest.approx(0.12422, abs=1e-5)
    assert got["k=1"]["baseline_range"] == [0.80, 0.90]
    assert got["k=1"]["inside_range"] == {0: True, 1: False, 2: True}
    # paired differences −0.02, +0.15, −0.03: mean 0.0333, s = 0.1012 → half-width 4.303 · 0.1012 / √3 = 0.2513
    assert list(got["k=1"]["differences"].values()) == pytest.approx([-0.02, 0.15, -0.03])
    assert got["k=1"]["difference_mean"] == pytest.approx(0.03333, abs=1e-5)
    assert got["k=1"]["difference_half_width"] == pytest.approx(0.25132, abs=1e-5)
    table = parity.parity_table(got)
    assert "| sync | s0: 90.0, s1: 80.0, s2: 85.0 | 85.0 ± 12.4 | 3/3 | — | — | — |" in table
    # sign flips of (−2, +15, −3): ±15 dominates, so all 8 patterns have |sum| ≥ 10 (10, 14, 16, 20, mirrored):
    # p = 1
    assert "| k=1 | s0: 88.0, s1: 95.0, s2: 82.0 | 88.3 ± 16.2 | 2/3 | -2.0, +15.0, -3.0 | 3.3 ± 25.1 | 1.000 |" \
        in table
    curves = parity.curve_table(summaries)
    assert "| 0 | 50.0 ± 0.0 | 50.0 ± 0.0 |" in curves and "| 30 | 85.0 ± 12.4 | 88.3 ± 16.2 |" in curves
    assert "| k=1 | 30 ± 0 | 60 ± 0 | 2.000 ± 0.000 | 1.000 ± 0.000 |" in parity.dynamics_table(summaries)
    # sync trains 30 × 3.5 = 105 s; k=1 fits 105 / 2.0 = 52.5 → 52 steps (round half to even) in that time
    assert parity.equal_time_steps(summaries) == 52
    with pytest.raises(ValueError, match="needs finished sync and k=1 runs"):
        parity.equal_time_steps({"sync": summaries["sync"]})
    assert parity.run_directory(Path("r"), "k=1", 2) == Path("r/k1-s2")


def test_bench_shared_prefix_token_counts_table_and_json(tmp_path, monkeypatch):
    bench = load_script("bench_shared_prefix")
    assert bench.parse_prefix("64:448") == (64, 448)
    # the default shape: 4 × (512 + 512) unshared against 512 + 4 × 512 shared, the 1.6× bound of the issue
    assert bench.computed_tokens(512, 512, 4, 1, shared=False) == 4096
    assert bench.computed_tokens(512, 512, 4, 1, shared=True) == 2560
    output = tmp_path / "bench.json"
    monkeypatch.setattr(sys, "argv", ["bench_shared_prefix.py", "--model", "tiny", "--prefixes", "8:8", "16:16",
                                      "--refinement", "8", "--repeats", "1", "--threads", "1",
                                      "--output", str(output)])
    bench.main()
    report = json.loads(output.read_text())
    rows = report["rows"]
    assert [(r["mode"], r["computed_tokens"]) for r in rows] == [("unshared", 96), ("shared", 48),
                                                                ("unshared", 160), ("shared", 64)]
    assert report["ratio"] == pytest.approx(rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"])
    assert report["peak_bytes"] == {"unshared": rows[0]["peak_bytes"], "shared": rows[1]["peak_bytes"]}
    assert report["peak_bytes"]["shared"] < report["peak_bytes"]["unshared"]  # fewer activations kept
    assert "| prefix 16 (8+8) | shared | 48 |" in report["table"]

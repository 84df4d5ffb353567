"""A CI-sized subset of scripts/fault_drills.py: each drill really kills, corrupts or starves a training run."""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def drills():
    spec = importlib.util.spec_from_file_location("fault_drills", REPO / "scripts" / "fault_drills.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["fault_drills"] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def harness(drills, tmp_path_factory):
    return drills.Harness(tmp_path_factory.mktemp("drills"), drills.BASE + drills.QUICK, timeout_s=600)


def assert_survived(trials, count):
    assert len(trials) == count
    for trial in trials:
        assert trial.survived, (trial.detail, trial.notes)
        assert trial.data_lost == 0, (trial.detail, trial.notes)


@pytest.mark.slow
def test_sigkill_inside_a_checkpoint_write_and_inside_backward_then_resume_equals_the_reference(
        drills, harness, monkeypatch):
    monkeypatch.setattr(drills, "PHASES", ("checkpoint", "backward"))
    trials = drills.drill_kill(harness, random.Random(1), repeats=1)
    assert_survived(trials, 2)
    assert all("killed:" in t.detail for t in trials)  # the kill landed inside the named phase


@pytest.mark.slow
def test_damaged_newest_checkpoint_is_skipped_and_the_run_ends_where_the_undamaged_one_did(
        drills, harness, monkeypatch):
    monkeypatch.setattr(drills, "CORRUPTIONS", ("truncate", "garbage"))
    assert_survived(drills.drill_corrupt(harness, random.Random(2), repeats=1), 2)


@pytest.mark.slow
def test_a_damaged_rng_file_or_a_manifest_of_the_wrong_shape_is_skipped_too(drills, harness, monkeypatch):
    monkeypatch.setattr(drills, "CORRUPTIONS", ("rng", "manifest"))
    assert_survived(drills.drill_corrupt(harness, random.Random(2), repeats=1), 2)


@pytest.mark.slow
def test_disk_full_during_a_checkpoint_keeps_the_previous_one_and_resumes(drills, harness):
    assert_survived(drills.drill_disk_full(harness, random.Random(3), repeats=1), 1)


@pytest.mark.slow
def test_non_finite_loss_is_skipped_once_and_stops_the_run_when_repeated(drills, harness):
    trials = drills.drill_nan(harness, random.Random(4), repeats=1)
    assert_survived(trials, 4)
    assert sum("once" in t.detail for t in trials) == 2


@pytest.mark.slow
def test_malformed_inputs_fail_before_any_work_naming_file_line_or_key(drills, harness):
    trials = drills.drill_inputs(harness, random.Random(5), repeats=1)
    assert_survived(trials, 4)


def test_drills_arm_the_packages_environment_variable(drills):
    from nemo_igrpo import faults

    assert drills.FAULTS_ENV == faults.ENV  # the script spells it out so that its parent process imports nothing
    assert {point for options in drills.KILL_POINTS.values() for _, point, _ in options} <= set(faults.POINTS)
    assert set(drills.KILL_POINTS) == set(drills.PHASES) | set(drills.END_PHASES)


def test_summary_counts_repetitions_survivors_and_lost_steps(drills, tmp_path):
    trials = [drills.Trial("kill", "a", True, 0, 2.0), drills.Trial("kill", "b", False, 3, 4.0),
              drills.Trial("kill", "c", True, 0, 1.0), drills.Trial("nan", "d", True, 0, 0.5)]
    rows = drills.summarize(trials)
    assert rows == [
        {"drill": "kill", "repetitions": 3, "survived": 2, "data_lost": 3, "recover_s_median": 2.0,
         "recover_s_max": 4.0},
        {"drill": "nan", "repetitions": 1, "survived": 1, "data_lost": 0, "recover_s_median": 0.5,
         "recover_s_max": 0.5},
    ]
    json.dumps(rows)  # the script writes these rows as JSON


def test_compare_runs_counts_each_differing_or_duplicated_step(drills, tmp_path):
    def run(name, records, weights=b"w"):
        directory = tmp_path / name
        (directory / "final").mkdir(parents=True)
        (directory / "final" / "model.safetensors").write_bytes(weights)
        (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        return directory

    reference = run("reference", [{"step": 0, "a": 1}, {"step": 1, "a": 2, "time/step": 1.0}, {"step": 2, "a": 3}])
    same = run("same", [{"step": 0, "a": 1}, {"step": 1, "a": 2, "time/step": 9.0}, {"step": 2, "a": 3}])
    assert drills.compare_runs(reference, same, []) == 0  # timings may differ
    notes = []
    twice = run("twice", [{"step": 0, "a": 1}, {"step": 0, "a": 1}, {"step": 1, "a": 2}, {"step": 2, "a": 3}])
    assert drills.compare_runs(reference, twice, notes) == 1 and "logged twice" in notes[0]
    other = run("other", [{"step": 0, "a": 1}, {"step": 1, "a": 5}, {"step": 2, "a": 3}], weights=b"x")
    assert drills.compare_runs(reference, other, []) == 2  # step 1's metrics, and the final weights (step 2)


@pytest.mark.slow
def test_a_hung_and_a_crashed_grading_worker_score_zero_are_counted_and_the_run_finishes(drills, harness):
    assert_survived(drills.drill_reward(harness, random.Random(6), repeats=1), 2)


@pytest.mark.slow
def test_sigterm_checkpoints_the_step_exits_cleanly_and_resumes_to_the_reference(drills, harness):
    trials = drills.drill_term(harness, random.Random(7), repeats=1)
    assert_survived(trials, 1)
    from nemo_igrpo.cli import EXIT_STOPPED

    assert f"exit status {EXIT_STOPPED}" in trials[0].notes


@pytest.mark.slow
def test_grading_pool_under_concurrency_warm_up_death_and_orphaning_and_the_config_fuzz(drills, harness):
    # issue 26: two threads mapping at once, a replacement dying in its warm-up, workers outliving a SIGKILLed
    # trainer; every numeric key × NaN, ±inf, negative and huge values refused by name
    assert_survived(drills.drill_pool(harness, random.Random(7), repeats=1), 3)
    assert_survived(drills.drill_fuzz(harness, random.Random(8), repeats=1), 1)

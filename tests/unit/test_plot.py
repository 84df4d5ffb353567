"""`nemo-igrpo plot`: PNGs of several runs overlaid, against step and against rollouts consumed."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("matplotlib")

from nemo_igrpo.cli import main
from nemo_igrpo.plotting import FIGURES, PlotError, load_run, plot_directories, rollouts_consumed

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_run(directory, *, drafts: int, refinements: int, prompts: int, steps: int = 4, offset: float = 0.0):
    """A run directory as `nemo-igrpo train` writes it: config.yaml and metrics.jsonl (eval at 0, 2 and 4)."""
    directory.mkdir(parents=True)
    (directory / "config.yaml").write_text(f"trainer:\n  prompts_per_step: {prompts}\n  max_steps: {steps}\n")
    records = [{"step": 0, "eval/accuracy": 0.1 + offset}]
    for step in range(1, steps + 1):
        record = {"step": step, "reward/refinement_mean": 0.1 * step + offset, "train/entropy": 1.0 - 0.1 * step,
                  "train/kl": 0.0, "zero_variance_fraction": 0.5, "response_length/refinement_mean": 20.0 + step,
                  "rollouts_per_prompt/drafts": float(drafts), "rollouts_per_prompt/refinements": float(refinements),
                  "rollouts_per_prompt/total": float(drafts + refinements), "sampling_rounds": 1.0}
        if drafts:
            record.update({"reward/draft_mean": 0.05 * step, "reward/best_draft_mean": 0.08 * step,
                           "reward/accuracy/any_draft_correct": 0.09 * step,
                           "reward/accuracy/best_draft_mean": 0.08 * step,
                           "reward/accuracy/best_draft_predicted": 0.07 * step, "response_length/draft_mean": 15.0,
                           "reward/accuracy/refined_after_right_draft": 0.9, "rollout/copy_rate": 0.3 + 0.1 * step,
                           "reward/accuracy/refined_after_wrong_draft": 0.1 * step, "rollout/entropy/draft": 1.2,
                           "rollout/edit_distance_to_draft": 0.5})
        if step % 2 == 0:
            record["eval/accuracy"] = 0.1 + 0.1 * step + offset
        records.append(record)
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture
def two_runs(tmp_path):
    grpo, igrpo = tmp_path / "grpo", tmp_path / "igrpo"
    write_run(grpo, drafts=0, refinements=8, prompts=4)
    write_run(igrpo, drafts=4, refinements=4, prompts=4, offset=0.05)
    return grpo, igrpo


def test_rollouts_consumed_counts_both_stages(two_runs):
    _, igrpo = two_runs
    # 4 problems × (4 drafts + 4 refinements) per step
    assert rollouts_consumed(load_run(igrpo)) == {0: 0.0, 1: 32.0, 2: 64.0, 3: 96.0, 4: 128.0}


def test_plot_command_writes_pngs_with_the_logged_curves(two_runs, tmp_path):
    grpo, igrpo = two_runs
    out = tmp_path / "plots"
    assert main(["plot", str(grpo), str(igrpo), "--output", str(out)]) == 0
    for name in FIGURES:
        data = (out / f"{name}.png").read_bytes()
        assert data.startswith(PNG_SIGNATURE), name

    import matplotlib.image

    image = matplotlib.image.imread(out / "accuracy.png")
    assert image.shape[:2] == (336, 960)  # 12 × 4.2 inches at 80 dpi: two panels side by side

    figures = {f.path.stem: f for f in plot_directories([grpo, igrpo], tmp_path / "again")}
    accuracy = figures["accuracy"].lines
    assert accuracy["step"]["grpo"] == ([0.0, 2.0, 4.0], [0.1, pytest.approx(0.3), pytest.approx(0.5)])
    assert accuracy["rollouts"]["igrpo"][0] == [0.0, 64.0, 128.0]
    assert accuracy["rollouts"]["igrpo"][1] == pytest.approx([0.15, 0.35, 0.55])
    # Draft curves exist for the iGRPO run only; refinement reward for both.
    reward = figures["reward"].lines["step"]
    assert set(reward) == {"grpo · refinements", "igrpo · drafts", "igrpo · best draft", "igrpo · refinements"}
    assert reward["igrpo · best draft"][1] == pytest.approx([0.08, 0.16, 0.24, 0.32])
    assert figures["entropy"].lines["rollouts"]["grpo · trained tokens"][0] == [32.0, 64.0, 96.0, 128.0]
    assert figures["entropy"].lines["step"]["igrpo · drafts (sampled)"][1] == [1.2] * 4  # Stage 1's entropy too
    refinement = figures["refinement"].lines["step"]  # iGRPO only: GRPO has no draft
    assert set(refinement) == {"igrpo · after a right draft", "igrpo · after a wrong draft"}
    assert refinement["igrpo · after a wrong draft"][1] == pytest.approx([0.1, 0.2, 0.3, 0.4])
    copying = figures["copying"].lines["step"]
    assert copying["igrpo · copy rate"][1] == pytest.approx([0.4, 0.5, 0.6, 0.7])
    assert copying["igrpo · normalised edit distance"][1] == [0.5] * 4
    assert set(figures["best_draft"].lines["step"]) == {
        "igrpo · observed best of N", "igrpo · selected draft right", "igrpo · 1-(1-p)^N, p per problem"}


def test_labels_and_errors(two_runs, tmp_path, capsys):
    grpo, igrpo = two_runs
    figures = plot_directories([grpo, igrpo], tmp_path / "out", labels=["GRPO 8", "iGRPO 4+4"])
    assert set(next(f for f in figures if f.path.stem == "kl").lines["step"]) == {"GRPO 8", "iGRPO 4+4"}
    with pytest.raises(PlotError, match="2 run directories"):
        plot_directories([grpo, igrpo], tmp_path / "out", labels=["one"])

    assert main(["plot", str(tmp_path / "missing"), "--output", str(tmp_path / "x")]) == 2
    assert "missing: no metrics.jsonl" in capsys.readouterr().out

    with open(grpo / "metrics.jsonl", "a") as handle:
        handle.write("{not json\n")
    with pytest.raises(PlotError, match=r"grpo/metrics.jsonl:6: not valid JSON"):
        load_run(grpo)

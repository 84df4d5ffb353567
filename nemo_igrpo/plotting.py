"""``nemo-igrpo plot``: training curves from runs' ``metrics.jsonl``, several runs overlaid, as PNG files.

Each figure has two panels with the same curves: against the optimizer step, and against rollouts consumed (drafts +
refinements sampled so far), the budget on which GRPO 8 and iGRPO 4+4 are compared. matplotlib is imported lazily
(it is the ``plot`` extra) with the non-interactive Agg backend, so this works on headless machines.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# figure name → (title, y label, [(metric key, series label)]). A series absent from every run is not drawn; a
# figure with no series at all is not written.
FIGURES: dict[str, tuple[str, str, list[tuple[str, str]]]] = {
    "reward": ("Training reward", "mean reward", [
        ("reward/draft_mean", "drafts"), ("reward/best_draft_mean", "best draft"),
        ("reward/refinement_mean", "refinements")]),
    "best_draft": ("Best-draft success vs Proposition 3.1 (accuracy reward)", "fraction of problems", [
        ("reward/accuracy/any_draft_correct", "observed best of N"),
        ("reward/accuracy/best_draft_mean", "selected draft right"),
        ("reward/accuracy/best_draft_predicted", "1-(1-p)^N, p per problem")]),
    "accuracy": ("Held-out accuracy", "avg@k", [("eval/accuracy", "held-out")]),
    "entropy": ("Policy entropy", "nats / token", [
        ("train/entropy", "trained tokens"), ("rollout/entropy/draft", "drafts (sampled)"),
        ("rollout/entropy/refinement", "refinements (sampled)")]),
    "refinement": ("Refinement accuracy by the selected draft's verdict", "accuracy", [
        ("reward/accuracy/refined_after_right_draft", "after a right draft"),
        ("reward/accuracy/refined_after_wrong_draft", "after a wrong draft"),
        ("reward/accuracy/refinement_mean", "all refinements")]),
    "copying": ("Refinements against their draft", "fraction", [
        ("rollout/copy_rate", "copy rate"), ("rollout/edit_distance_to_draft", "normalised edit distance")]),
    "response_length": ("Response length", "tokens", [
        ("response_length/refinement_mean", "refinements"), ("response_length/draft_mean", "drafts")]),
    "kl": ("KL to the reference policy", "token-mean KL", [("train/kl", "KL")]),
    "zero_variance": ("Groups with zero reward variance", "fraction of groups", [
        ("zero_variance_fraction", "zero-variance")]),
}
LINESTYLES = ["-", "--", ":", "-."]


class PlotError(ValueError):
    """A run directory that cannot be plotted (no metrics.jsonl, bad JSON line); the message names the file."""


@dataclass
class Run:
    label: str
    records: list[dict[str, Any]]
    prompts_per_step: int | None = None  # trainer.prompts_per_step from the run's config.yaml


@dataclass
class Figure:
    """What one written PNG shows: per panel ("step" | "rollouts"), line label → (x, y) exactly as drawn."""

    path: Path
    lines: dict[str, dict[str, tuple[list[float], list[float]]]] = field(default_factory=dict)


def load_run(run_dir: Path, label: str | None = None) -> Run:
    """A run directory written by ``nemo-igrpo train`` (metrics.jsonl, config.yaml)."""
    import json

    import yaml

    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise PlotError(f"{run_dir}: no metrics.jsonl (is it a `nemo-igrpo train` output directory?)")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise PlotError(f"{path}:{number}: not valid JSON ({error.msg})") from None
        if "step" not in records[-1]:
            raise PlotError(f"{path}:{number}: record has no 'step'")
    prompts = None
    config = run_dir / "config.yaml"
    if config.is_file():
        prompts = (yaml.safe_load(config.read_text()) or {}).get("trainer", {}).get("prompts_per_step")
    return Run(label or run_dir.name, records, prompts)


def rollouts_consumed(run: Run) -> dict[int, float]:
    """Cumulative rollouts (sampled completions, both stages) after each step; 0 at step 0.

    prompts_per_step × rollouts_per_prompt/total per step, times sampling_rounds: exact without dynamic sampling,
    an upper bound with it (later rounds only draw the problems still missing).
    """
    total, cumulative = 0.0, {0: 0.0}
    for record in sorted(run.records, key=lambda r: r["step"]):
        if record["step"] == 0:
            continue
        if "rollouts_per_prompt/total" in record and run.prompts_per_step:
            total += run.prompts_per_step * record["rollouts_per_prompt/total"] * record.get("sampling_rounds", 1.0)
        else:
            total = math.nan  # unknown from here on: the rollouts panel shows nothing rather than a wrong axis
        cumulative[record["step"]] = total
    return cumulative


def series(run: Run, key: str) -> tuple[list[float], list[float], list[float]]:
    """(steps, rollouts consumed, values) of one metric, finite values only, in step order."""
    consumed = rollouts_consumed(run)
    steps, rollouts, values = [], [], []
    for record in sorted(run.records, key=lambda r: r["step"]):
        value = record.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            steps.append(float(record["step"]))
            rollouts.append(consumed.get(record["step"], math.nan))
            values.append(float(value))
    return steps, rollouts, values


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless: no display needed, and never opens windows
    import matplotlib.pyplot as plt

    return plt


def plot_runs(runs: list[Run] | dict[str, list[dict]], output_dir: Path, prefix: str = "",
              figures: list[str] | None = None) -> list[Figure]:
    """One PNG per figure in FIGURES (or ``figures``) with every run overlaid: colour = run, line style = series."""
    if isinstance(runs, dict):
        runs = [Run(label, records) for label, records in runs.items()]
    if not runs:
        raise PlotError("no runs to plot")
    plt = _pyplot()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    written = []
    for name in figures or list(FIGURES):
        title, ylabel, keys = FIGURES[name]
        present = [(key, label) for key, label in keys if any(series(run, key)[2] for run in runs)]
        if not present:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
        result = Figure(output_dir / f"{prefix}{name}.png", {"step": {}, "rollouts": {}})
        for r, run in enumerate(runs):
            for s, (key, series_label) in enumerate(present):
                steps, rollouts, values = series(run, key)
                if not values:
                    continue
                line_label = run.label if len(present) == 1 else f"{run.label} · {series_label}"
                style = {"color": colors[r % len(colors)], "linestyle": LINESTYLES[s % len(LINESTYLES)],
                         "marker": "o" if len(values) <= 12 else None, "markersize": 3, "label": line_label}
                axes[0].plot(steps, values, **style)
                result.lines["step"][line_label] = (steps, values)
                known = [(x, v) for x, v in zip(rollouts, values) if math.isfinite(x)]
                if known:
                    axes[1].plot([x for x, _ in known], [v for _, v in known], **style)
                    result.lines["rollouts"][line_label] = ([x for x, _ in known], [v for _, v in known])
        axes[0].set_xlabel("optimizer step")
        axes[1].set_xlabel("rollouts consumed (drafts + refinements)")
        axes[0].set_ylabel(ylabel)
        for ax in axes:
            ax.grid(alpha=0.3)
        axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
        fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(result.path, dpi=80)
        plt.close(fig)
        written.append(result)
    return written


def plot_mean_std(groups: dict[str, list[Run]], key: str, path: Path, title: str, ylabel: str) -> Figure:
    """Mean ± std over the runs of each group (e.g. seeds of one algorithm) against rollouts consumed.

    Runs of a group are aligned on the rollout counts where every run of the group has a value.
    """
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    result = Figure(path, {"rollouts": {}})
    for label, runs in groups.items():
        by_x: dict[float, list[float]] = {}
        for run in runs:
            _, rollouts, values = series(run, key)
            for x, v in zip(rollouts, values):
                if math.isfinite(x):
                    by_x.setdefault(x, []).append(v)
        xs = sorted(x for x, vs in by_x.items() if len(vs) == len(runs))
        if not xs:
            continue
        means = [statistics.fmean(by_x[x]) for x in xs]
        stds = [statistics.stdev(by_x[x]) if len(by_x[x]) > 1 else 0.0 for x in xs]
        (line,) = ax.plot(xs, means, marker="o" if len(xs) <= 12 else None, markersize=3,
                          label=f"{label} (n={len(runs)})")
        ax.fill_between(xs, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                        color=line.get_color(), alpha=0.2)
        result.lines["rollouts"][label] = (xs, means)
    ax.set_xlabel("rollouts consumed (drafts + refinements)")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{title} (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return result


def plot_directories(run_dirs: list[Path], output_dir: Path, labels: list[str] | None = None) -> list[Figure]:
    """``nemo-igrpo plot``: load each run directory (label = its folder name unless given) and plot them."""
    if labels is not None and len(labels) != len(run_dirs):
        raise PlotError(f"--labels has {len(labels)} names for {len(run_dirs)} run directories")
    runs = [load_run(d, labels[i] if labels else None) for i, d in enumerate(run_dirs)]
    names = [run.label for run in runs]
    if len(set(names)) != len(names):  # e.g. a/run and b/run: keep the legend unambiguous
        runs = [Run(str(d), run.records, run.prompts_per_step) for d, run in zip(run_dirs, runs)]
    return plot_runs(runs, output_dir)

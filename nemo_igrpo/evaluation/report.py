"""``nemo-igrpo eval``: single-pass sampling over datasets or an evaluation protocol's benchmarks; avg@k and pass@k
(under a protocol also a 95% interval for avg@k); results.json, results.md and per-sample records."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from nemo_igrpo.assembly import (
    build_eval_sampling,
    build_generation,
    build_template,
    build_training_reward,
    seed_everything,
)
from nemo_igrpo.config import Config, EvalConfig
from nemo_igrpo.data.sources import load_examples
from nemo_igrpo.evaluation.metrics import avg_at_k_ci95, markdown_table
from nemo_igrpo.evaluation.protocols import EvalRun, plan_runs
from nemo_igrpo.evaluation.run import EvalResult, evaluate
from nemo_igrpo.models import load_model, load_tokenizer, stop_token_ids

INTERVAL_METHOD = ("avg@k_ci95 is the half-width of a 95% interval for avg@k: normal approximation over problems, "
                   "1.96 * s / sqrt(P), s = sample std (ddof 1) of the per-problem accuracies")


def run_eval(config: Config, console: Console | None = None) -> dict[str, dict[str, float]]:
    """Evaluate ``eval.model`` (default: ``model.path``) on ``eval.datasets`` (default: ``data.eval``), or on the
    benchmarks of ``eval.protocol`` (``nemo_igrpo.evaluation.protocols`` says how the eval keys combine)."""
    console = console or Console()
    ev = config.eval
    runs = plan_runs(ev, config.data.eval)  # configuration mistakes surface before a model is loaded
    model_config = dataclasses.replace(config.model, path=ev.model, tokenizer=ev.model) if ev.model else config.model
    output_dir = Path(ev.output_dir or Path(config.trainer.output_dir) / "eval")
    seed_everything(config.trainer.seed)

    tokenizer = load_tokenizer(model_config)
    model = load_model(model_config, tokenizer)
    generator = build_generation(config, model, tokenizer.pad_token_id)
    template = build_template(config.prompt, tokenizer)
    reward = build_training_reward(config)
    base_params = build_eval_sampling(config, stop_token_ids(tokenizer, model))
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731

    output_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, float]] = {}
    try:
        for run in runs:
            examples = load_examples(run.source, config.data, "eval")[: ev.num_problems or None]
            params = dataclasses.replace(base_params, n=run.samples, temperature=run.temperature, top_p=run.top_p)
            with torch.inference_mode():
                result = evaluate(examples, generator, template.problem_ids, reward, decode, params)
            results[run.name] = _scores(result, with_interval=ev.protocol is not None)
            _write_records(output_dir / f"{run.name}.samples.jsonl", result.records)
            console.print(f"{run.name}: {', '.join(f'{k} {100 * v:.2f}%' for k, v in result.summary.items())}")
    finally:
        generator.close()
        reward.close()

    if ev.protocol is None:
        header: dict[str, Any] = {"model": model_config.path, "samples_per_problem": runs[0].samples,
                                  "temperature": ev.temperature, "top_p": ev.top_p}
        table = markdown_table({name: {k: v for k, v in r.items() if k != "problems"} for name, r in results.items()})
    else:
        header = _protocol_header(model_config.path, ev, runs, base_params.max_new_tokens)
        table = _protocol_markdown(results, runs, ev, base_params.max_new_tokens)
    (output_dir / "results.json").write_text(json.dumps({**header, "results": results}, indent=2))
    (output_dir / "results.md").write_text(table + "\n")
    console.print(table)
    return results


def _scores(result: EvalResult, with_interval: bool) -> dict[str, float]:
    """avg@k and pass@k, the problem count and, when asked and defined (two or more problems), avg@k's 95%
    half-width under the key ``avg@k_ci95``."""
    correct = [record["correct"] for record in result.records]
    scores = {**result.summary, "problems": float(len(correct))}
    if with_interval and len(correct) >= 2:
        avg_key = next(key for key in result.summary if key.startswith("avg@"))
        scores[f"{avg_key}_ci95"] = avg_at_k_ci95(correct)
    return scores


def _write_records(path: Path, records: list[dict]) -> None:
    """One JSON line per problem: its completions, extracted answers and verdicts."""
    with open(path, "w") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")


def _protocol_header(model: str, ev: EvalConfig, runs: list[EvalRun], max_new_tokens: int) -> dict[str, Any]:
    """Everything needed to tell a protocol run from another: sampling, budget, truncation, k and file per
    benchmark, and how the interval was computed."""
    return {
        "model": model, "protocol": ev.protocol, "temperature": runs[0].temperature, "top_p": runs[0].top_p,
        "max_new_tokens": max_new_tokens, "num_problems": ev.num_problems,
        "max_samples_per_problem": ev.max_samples_per_problem, "interval": INTERVAL_METHOD,
        "benchmarks": {run.name: {"source": run.source, "samples_per_problem": run.samples} for run in runs},
    }


def _protocol_markdown(results: dict[str, dict[str, float]], runs: list[EvalRun], ev: EvalConfig,
                       max_new_tokens: int) -> str:
    """A caption with the settings, then one row per benchmark, labelled with its k: avg@k ± 95% interval, pass@k.

    k differs between benchmarks (64 for AIME, 8 elsewhere), so avg@64 and avg@8 share one "avg@k" column.
    """
    rows, intervals = {}, {}
    for run in runs:
        scores, label = results[run.name], f"{run.name} (k={run.samples})"
        rows[label] = {"avg@k": scores[f"avg@{run.samples}"],
                       **{key: value for key, value in scores.items() if key.startswith("pass@")}}
        if f"avg@{run.samples}_ci95" in scores:
            intervals[label] = {"avg@k": scores[f"avg@{run.samples}_ci95"]}
    caption = (f"Protocol `{ev.protocol}`: temperature {runs[0].temperature}, top-p {runs[0].top_p}, at most "
               f"{max_new_tokens} new tokens. avg@k ± half-width of a 95% interval (normal approximation over "
               f"problems); pass@k unbiased (Chen et al., 2021).")
    if ev.num_problems or ev.max_samples_per_problem:
        caption += (f" Reduced run (first {ev.num_problems or 'all'} problems per benchmark, k capped at "
                    f"{ev.max_samples_per_problem or 'the protocol value'}): "
                    f"not comparable with full-protocol numbers.")
    return caption + "\n\n" + markdown_table(rows, intervals)

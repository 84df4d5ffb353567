"""``nemo-igrpo eval``: single-pass sampling over one or more datasets, avg@k and pass@k, JSON + Markdown report."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from rich.console import Console

from nemo_igrpo.backends import build_generation
from nemo_igrpo.config import Config, ModelConfig
from nemo_igrpo.data.sources import load_examples
from nemo_igrpo.evaluation.metrics import markdown_table
from nemo_igrpo.evaluation.run import evaluate
from nemo_igrpo.models import load_model, load_tokenizer, stop_token_ids
from nemo_igrpo.rewards import build_reward
from nemo_igrpo.trainer import eval_sampling, prompt_builder, seed_everything


def run_eval(config: Config, console: Console | None = None) -> dict[str, dict[str, float]]:
    """Evaluate ``eval.model`` (default: ``model.path``) on ``eval.datasets`` (default: ``data.eval``)."""
    console = console or Console()
    ev = config.eval
    model_config = ModelConfig(path=ev.model, tokenizer=ev.model, dtype=config.model.dtype) if ev.model \
        else config.model
    datasets = ev.datasets or ([config.data.eval] if config.data.eval else [])
    if not datasets:
        raise ValueError("eval.datasets: nothing to evaluate (give eval.datasets=[path.jsonl,...])")
    output_dir = Path(ev.output_dir or Path(config.trainer.output_dir) / "eval")
    seed_everything(config.trainer.seed)

    tokenizer = load_tokenizer(model_config)
    model = load_model(model_config, tokenizer)
    generator = build_generation(config, model, tokenizer.pad_token_id)
    template = prompt_builder(config, tokenizer)
    reward = build_reward(config.reward.name, extract=config.reward.extract)
    params = eval_sampling(config, stop_token_ids(tokenizer, model))
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731

    output_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, float]] = {}
    for source in datasets:
        name = Path(source).stem if source.endswith(".jsonl") else source.split(":")[-1]
        examples = load_examples(source, config.data, "eval")[: ev.num_problems or None]
        with torch.inference_mode():
            result = evaluate(examples, generator, template.problem_ids, reward, decode, params)
        results[name] = {**result.summary, "problems": float(len(examples))}
        with open(output_dir / f"{name}.samples.jsonl", "w") as handle:
            for record in result.records:
                handle.write(json.dumps(record) + "\n")
        console.print(f"{name}: {', '.join(f'{k} {100 * v:.2f}%' for k, v in result.summary.items())}")
    generator.close()
    reward.close()

    (output_dir / "results.json").write_text(json.dumps(
        {"model": model_config.path, "samples_per_problem": ev.samples_per_problem, "temperature": ev.temperature,
         "top_p": ev.top_p, "results": results}, indent=2))
    table = markdown_table({name: {k: v for k, v in r.items() if k != "problems"} for name, r in results.items()})
    (output_dir / "results.md").write_text(table + "\n")
    console.print(table)
    return results

"""``nemo-igrpo train | eval``: a YAML config plus ``section.key=value`` overrides."""

from __future__ import annotations

import argparse
import logging
import sys
from importlib import resources
from pathlib import Path

from rich.console import Console

from nemo_igrpo.config import ConfigError, load_config

OVERRIDES_HELP = ("overrides in OmegaConf dotlist form, e.g. trainer.max_steps=20 algorithm.preset=grpo "
                  "'eval.datasets=[a.jsonl,b.jsonl]'")


def default_config_path() -> Path:
    """The embedded demo, ``conf/quickstart.yaml`` (shipped in the wheel as ``nemo_igrpo.conf``)."""
    repo_copy = Path(__file__).resolve().parent.parent / "conf" / "quickstart.yaml"
    if repo_copy.is_file():  # a source checkout or editable install
        return repo_copy
    return Path(str(resources.files("nemo_igrpo.conf").joinpath("quickstart.yaml")))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nemo-igrpo", description="iGRPO / GRPO reinforcement learning for verifiable math reasoning.")
    commands = parser.add_subparsers(dest="command", required=True)

    subcommands = {
        "train": ("train a policy (without --config: the embedded CPU demo, conf/quickstart.yaml)",
                  "Run RL training. Without --config this runs the self-contained demo (tiny model, generated "
                  "arithmetic, no downloads) and reports held-out accuracy before and after RL."),
        "eval": ("single-pass evaluation: avg@k and pass@k over datasets",
                 "Sample eval.samples_per_problem answers per problem from eval.model (default model.path), grade "
                 "them, and write results.json, results.md and per-sample records to eval.output_dir."),
    }
    for name, (summary, description) in subcommands.items():
        command = commands.add_parser(name, help=summary, description=description)
        command.add_argument("--config", type=Path, help="YAML config (default: conf/quickstart.yaml)")
        command.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    console = Console()
    try:
        config = load_config(args.config or default_config_path(), args.overrides)
    except ConfigError as error:
        console.print(f"[red]config error[/]: {error}", highlight=False, soft_wrap=True)
        return 2
    from transformers.utils import logging as hf_logging

    from nemo_igrpo.data.dataset import DatasetError

    hf_logging.disable_progress_bar()  # per-shard bars would interleave with ours
    try:
        if args.command == "train":
            from nemo_igrpo.trainer import TrainingStopped, train

            try:
                train(config, console)
            except TrainingStopped as stopped:
                console.print(f"[red]training stopped[/]: {stopped}", highlight=False, soft_wrap=True)
                return 1
        else:
            from nemo_igrpo.evaluation.report import run_eval

            run_eval(config, console)
    except (DatasetError, FileNotFoundError) as error:
        console.print(f"[red]error[/]: {error}", highlight=False, soft_wrap=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

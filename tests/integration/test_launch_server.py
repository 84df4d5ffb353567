"""The generation-server column of the launch matrix, and every recipe's one-step smoke run, against ONE server.

One ``nemo-igrpo serve`` starts for the module (the tiny shape of tests/tiny_recipes.py: 2 heads, 2 KV heads,
2 layers, so that TP=2 and PP=2 divide it). Cells run one after another (each pushes its own weights at start-up):

* matrix cells (tests/launch_harness.py): 2 steps, resumed with ``trainer.resume=auto`` to a third, ``final/``
  equal to the trainer to 1e-5, ``train/mismatch/*`` ≈ 0 after every sync; plus, read from the server's access
  log, one weight push per sync whatever the number of ranks, and one request per prompt and stage whatever the
  layout (data-parallel ranks send their own shards; tensor/pipeline peers do not repeat their leader's requests);
  and for hf DP=2, a 1-process run of 3 straight steps samples exactly what the 2 ranks (resumed) sampled;
* recipes (conf/recipes/*.yaml shrunk by tests/tiny_recipes.py): one step with the recipe's backends, algorithm and
  (scaled) layout; Nemotron-H on Megatron is refused with its message.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("vllm")
pytest.importorskip("megatron.core")

from launch_harness import BASE, MISMATCH_TOLERANCE, SEQ_KL_TOLERANCE, _WRAPPER, check_cell, report, run_cell
from test_distributed import _run
from test_server import TOKEN, start_server
from tiny_recipes import SHAPE, shrink

from nemo_igrpo.config import load_config
from nemo_igrpo.models import load_model, load_tokenizer
from nemo_igrpo.tracking import read_metrics

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted((REPO / "conf" / "recipes").glob("*.yaml"))
ENV = {"NEMO_IGRPO_SERVER_TOKEN": TOKEN}
PROMPTS_PER_STEP = 4  # launch_harness.BASE

MEGATRON = "policy.backend=megatron"
CELLS = {  # id → (matrix row, overrides, processes)
    "hf-dp2": ("hf DP=2", ["policy.backend=hf"], 2),
    "megatron-tp1": ("megatron TP=1, 1 process", [MEGATRON], 1),
    "megatron-dp2": ("megatron DP=2 + distributed optimizer",
                     [MEGATRON, "policy.megatron.use_distributed_optimizer=true"], 2),
    "megatron-tp2-sp": ("megatron TP=2 + SP", [MEGATRON, "policy.megatron.tensor_model_parallel_size=2",
                                               "policy.megatron.sequence_parallel=true"], 2),
    "megatron-pp2": ("megatron PP=2", [MEGATRON, "policy.megatron.pipeline_model_parallel_size=2"], 2),
}


class Server:
    def __init__(self, url: str, log: Path):
        self.url, self.log = url, log

    def count(self, method: str, path: str) -> int:
        """Requests answered so far (uvicorn's access log: ``"POST /v1/completions HTTP/1.1" 200``)."""
        return len(re.findall(rf'"{method} {re.escape(path)} HTTP/1.1" 200', self.log.read_text(errors="replace")))

    def counts(self) -> tuple[int, int]:
        # One POST /finish_weight_update per weight push (after its buckets); one /v1/completions per request.
        return self.count("POST", "/finish_weight_update"), self.count("POST", "/v1/completions")


@pytest.fixture(scope="module")
def server(tmp_path_factory, request) -> Server:
    config = load_config(REPO / "conf" / "quickstart.yaml", SHAPE)
    torch.manual_seed(321)  # weights no cell trains: each cell's start-up push replaces them
    folder = tmp_path_factory.mktemp("served")
    url, _ = start_server(load_model(config.model, load_tokenizer(config.model)), folder, request)
    return Server(url, folder / "server.log")


@pytest.mark.slow
@pytest.mark.parametrize("name", CELLS)
def test_server_cell(name, server, tmp_path):
    row, overrides, nproc = CELLS[name]
    pushes, requests = server.counts()
    result = run_cell(tmp_path, [*SHAPE, *overrides, "generation.backend=server", f"generation.server.url={server.url}"],
                      nproc=nproc, env=ENV)
    check_cell(result)
    report(f"{row} + server", result)
    pushes, requests = (after - before for after, before in zip(server.counts(), (pushes, requests)))
    # Launch 1: start-up push + 2 steps; launch 2: start-up push + the checkpoint's weights on resume + 1 step.
    assert pushes == 6
    # Streamed stages: one drafts and one refinements request per prompt, each prompt sent by one rank only.
    assert requests == 3 * PROMPTS_PER_STEP * 2
    if name == "hf-dp2":
        _one_rank_reproduces(result, [*SHAPE, *overrides, "generation.backend=server",
                                      f"generation.server.url={server.url}"], tmp_path / "one")


def _one_rank_reproduces(two, overrides: list[str], tmp_path: Path) -> None:
    """Seeded requests (per-prompt keys from the trainer's RNG): one process, 3 steps straight, samples what the
    2-rank run (2 steps, then resumed) sampled — same rewards and lengths, losses up to float summation order."""
    tmp_path.mkdir()
    run_dir = tmp_path / "run"
    result = _run_once(tmp_path, [*BASE, *overrides, "trainer.max_steps=3", "trainer.resume=none",
                                  f"trainer.output_dir={run_dir}"], 1, megatron=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    one = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in one] == [1, 2, 3]
    assert len({r["reward/refinement_mean"] for r in one}) > 1  # the reward varies: equal rewards mean something
    for a, b in zip(one, two.records):
        # Sampled text: identical, so rewards, lengths and counts agree up to the mean-of-rank-means rounding.
        exact = [k for k in a if k.startswith(("reward/", "batch/", "response_length/"))]
        assert {k: b[k] for k in exact} == pytest.approx({k: a[k] for k in exact}, rel=1e-6, abs=1e-9), a["step"]
        # Losses: the same samples, summed in another order over 2 ranks (float32 rounding only).
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-4, abs=1e-5), a["step"]


def _run_once(tmp_path: Path, overrides: list[str], nproc: int, megatron: bool):
    """One launch of the CLI (torchrun when nproc > 1) through the harness's entry (reward; the Megatron CPU patch
    when ``megatron``)."""
    from test_distributed import _free_port

    wrapper = tmp_path / "harness_entry.py"
    wrapper.write_text(_WRAPPER.format(tests=str(Path(__file__).resolve().parents[1]), megatron=megatron,
                                       fixed=[[1, 2, 3, 4, 5, 6]], prompt=3, entry=str(tmp_path / "entry.py")))
    launch = [] if nproc == 1 else ["-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
                                    f"--master-port={_free_port()}"]
    return _run([*launch, str(wrapper), "train", *overrides], tmp_path, 600, {"PYTHONWARNINGS": "ignore", **ENV})


def _supported(path: Path) -> bool:
    return "nemotron_h" not in path.stem


def _shrunk_groups() -> list[list[Path]]:
    """Recipes grouped by their shrunk config (everything but the output folder): recipes that differ only in what
    the shrink replaces (model, data) would run the very same thing, so each group runs once."""
    from nemo_igrpo.config import to_yaml

    groups: dict[str, list[Path]] = {}
    for path in filter(_supported, RECIPES):
        # the test reward is registered in the launched processes only; every recipe gets the same one
        kept = [o for o in shrink(path, "URL").overrides if not o.startswith("reward.components=")]
        groups.setdefault(to_yaml(load_config(path, [*kept, "trainer.output_dir=run"])), []).append(path)
    return list(groups.values())


@pytest.mark.slow
@pytest.mark.parametrize("paths", _shrunk_groups(), ids=lambda paths: "+".join(p.stem for p in paths))
def test_recipe_runs_one_step(paths, server, tmp_path):
    shrunk = shrink(paths[0], server.url)
    run_dir = tmp_path / "run"
    result = _run_once(tmp_path, [f"--config={paths[0]}", *shrunk.overrides, f"trainer.output_dir={run_dir}"],
                       shrunk.nproc, megatron=load_config(paths[0]).policy.backend == "megatron")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    ran = yaml.safe_load((run_dir / "config.yaml").read_text())
    (record,) = read_metrics(run_dir / "metrics.jsonl")
    assert record["step"] == 1 and record["train/skipped"] == 0.0
    assert abs(record["train/mismatch/token_prob_error"] - 1.0) <= MISMATCH_TOLERANCE
    assert abs(record["train/mismatch/seq_kl"]) <= SEQ_KL_TOLERANCE
    assert (run_dir / "final" / "config.json").is_file()

    for path in paths:  # what ran is each member's recipe: algorithm and backends as written, layout scaled
        recipe = load_config(path)
        assert ran["algorithm"] == yaml.safe_load(_section(recipe, "algorithm")), path.stem
        assert (ran["policy"]["backend"], ran["generation"]["backend"]) == (recipe.policy.backend,
                                                                            recipe.generation.backend)
        megatron = ran["policy"]["megatron"]
        assert (megatron["tensor_model_parallel_size"], megatron["pipeline_model_parallel_size"]) == (
            shrunk.tensor_parallel, shrunk.pipeline_parallel)
        assert megatron["sequence_parallel"] == (recipe.policy.megatron.sequence_parallel
                                                 and shrunk.tensor_parallel > 1)
        assert megatron["use_distributed_optimizer"] == recipe.policy.megatron.use_distributed_optimizer
        assert ran["policy"]["micro_batch_size"] == recipe.policy.micro_batch_size
        refinements = recipe.algorithm.num_refinements
        assert record["batch/sequences"] == 2 * shrunk.data_parallel * refinements  # 2 prompts per DP rank × G
        assert record["rollouts_per_prompt/drafts"] == recipe.algorithm.num_drafts


def _section(config, name: str) -> str:
    from nemo_igrpo.config import to_yaml

    return yaml.safe_dump(yaml.safe_load(to_yaml(config))[name])


@pytest.mark.slow
@pytest.mark.parametrize("path", [p for p in RECIPES if not _supported(p)], ids=lambda p: p.stem)
def test_nemotron_h_on_megatron_is_refused_with_its_message(path, tmp_path):
    """The tiny shape, but a Nemotron-H (hybrid Mamba2) model: the built-in HF↔Megatron mapping refuses it."""
    from transformers import NemotronHConfig, NemotronHForCausalLM

    from nemo_igrpo.data.char_tokenizer import build_char_tokenizer

    folder = tmp_path / "nemotron_h"
    torch.manual_seed(0)
    NemotronHForCausalLM(NemotronHConfig(
        vocab_size=len(build_char_tokenizer()), hidden_size=64, hybrid_override_pattern="M*M-",
        num_attention_heads=2, num_key_value_heads=2, head_dim=32, intermediate_size=128, mamba_num_heads=4,
        mamba_head_dim=16, ssm_state_size=16, n_groups=1, chunk_size=8, max_position_embeddings=512,
    )).save_pretrained(folder)
    shrunk = shrink(path, "http://127.0.0.1:9")  # refused before any server is contacted
    overrides = [o for o in shrunk.overrides if not o.startswith(("model.path=", "model.tokenizer="))]
    result = _run_once(tmp_path, [f"--config={path}", *overrides, f"model.path={folder}",
                                  "model.tokenizer=builtin:tiny-llama", f"trainer.output_dir={tmp_path / 'run'}"],
                       shrunk.nproc, megatron=True)
    assert result.returncode != 0
    output = " ".join((result.stdout + result.stderr).split())  # however the console wrapped it
    assert "policy.backend=megatron: model_type 'nemotron_h' has no built-in HF↔Megatron mapping" in output, \
        output[-3000:]
    assert "Other architectures (e.g. Nemotron-H hybrids) need Megatron-Bridge" in output

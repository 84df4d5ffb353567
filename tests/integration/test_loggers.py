"""Loggers: TensorBoard, W&B (offline) and MLflow (file store) receive the same numbers as metrics.jsonl, continue
the same run on resume, and are imported only when configured."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from nemo_igrpo.config import ConfigError, load_config
from nemo_igrpo.tracking import MLFLOW_ID_FILE, WANDB_ID_FILE, MetricsLogger, mlflow_key, read_metrics
from nemo_igrpo.trainer import train

REPO = Path(__file__).resolve().parents[2]

TINY = [
    "model.tiny.hidden_size=64", "model.tiny.intermediate_size=128", "model.tiny.num_layers=2",
    "model.tiny.num_heads=2", "model.tiny.num_kv_heads=1", "data.arithmetic.num_train=100",
    "data.arithmetic.num_heldout=8", "warm_start.steps=2", "warm_start.batch_size=8", "trainer.prompts_per_step=2",
    "generation.max_new_tokens=8", "eval.samples_per_problem=1", "trainer.progress=false", "trainer.eval_every=0",
    "policy.micro_batch_size=8", "trainer.save_every=1",
]


def wandb_records(path: Path):
    """The protobuf records of a W&B run file (LevelDB log format: 32 KiB blocks of checksummed chunks)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    position, block, pending = 7, 32768, b""
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a chunk header is padding
            position += block - position % block
            continue
        length, kind = int.from_bytes(data[position + 4 : position + 6], "little"), data[position + 6]
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 2):  # FULL, FIRST
            pending = chunk
        elif kind in (3, 4):  # MIDDLE, LAST
            pending += chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def wandb_history(run_dir: Path) -> dict[int, dict[str, float]]:
    history = {}
    for run_file in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        for record in wandb_records(run_file):
            if record.WhichOneof("record_type") == "history":
                row = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                       for item in record.history.item}
                history[row["_step"]] = row
    return history


@pytest.mark.slow
def test_tensorboard_wandb_offline_and_mlflow_file_store_get_the_metrics(tmp_path, monkeypatch):
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    loggers = ["trainer.loggers=[tensorboard,wandb,mlflow]", "trainer.wandb.mode=offline",
               "trainer.mlflow.experiment=igrpo-test", f"trainer.output_dir={run}"]
    train(load_config(REPO / "conf" / "quickstart.yaml", [*TINY, *loggers, "trainer.max_steps=2"]))
    wandb_id, mlflow_id = (run / WANDB_ID_FILE).read_text(), (run / MLFLOW_ID_FILE).read_text()
    train(load_config(REPO / "conf" / "quickstart.yaml", [*TINY, *loggers, "trainer.max_steps=3"]))  # resumes
    assert (run / WANDB_ID_FILE).read_text() == wandb_id and (run / MLFLOW_ID_FILE).read_text() == mlflow_id

    records = {r["step"]: r for r in read_metrics(run / "metrics.jsonl")}
    assert sorted(records) == [1, 2, 3]
    keys = ["train/loss", "train/grad_norm", "train/lr", "reward/refinement_mean", "response_length/refinement_mean",
            "time/rollout", "time/rollout/generation"]

    # W&B: both processes wrote into the same run id, whose history rows carry our numbers.
    history = wandb_history(run)
    assert sorted(history) == [1, 2, 3]
    assert {p.name.rsplit("-", 1)[-1] for p in (run / "wandb").glob("offline-run-*")} == {wandb_id}
    for step, record in records.items():
        for key in keys:
            assert history[step][key] == pytest.approx(record[key], rel=1e-6), (step, key)

    # MLflow: one run in the file store, read back through the client.
    client = MlflowClient(tracking_uri=(run / "mlruns").resolve().as_uri())
    mlflow_run = client.get_run(mlflow_id)
    assert mlflow_run.info.status == "FINISHED" and mlflow_run.data.params["algorithm.preset"] == "igrpo"
    assert client.get_experiment(mlflow_run.info.experiment_id).name == "igrpo-test"
    for key in keys:
        logged = {m.step: m.value for m in client.get_metric_history(mlflow_id, mlflow_key(key))}
        assert logged == pytest.approx({step: r[key] for step, r in records.items()}, rel=1e-6), key

    # TensorBoard: scalars per step, the resumed run continuing the same log.
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    for key in keys:
        logged = {e.step: e.value for e in events.Scalars(key)}
        assert logged == pytest.approx({step: r[key] for step, r in records.items()}, rel=1e-6), key


@pytest.mark.slow  # a fresh interpreter imports the package (18 s on loaded cores)
def test_logger_packages_are_imported_only_when_configured():
    code = ("import sys, nemo_igrpo.trainer, nemo_igrpo.tracking, nemo_igrpo.cli; "
            "print([m for m in ('wandb', 'mlflow', 'tensorboard') if m in sys.modules])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "[]"


def test_a_missing_logger_package_says_how_to_install_it(tmp_path, monkeypatch):
    from nemo_igrpo.tracking import build_loggers

    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed
    config = load_config(REPO / "conf" / "quickstart.yaml", ["trainer.loggers=[mlflow]"])
    with pytest.raises(ImportError, match=r"pip install 'nemo-igrpo\[mlflow\]' or remove it from trainer.loggers"):
        build_loggers(config, tmp_path, 0)


def test_unknown_logger_names_are_rejected():
    with pytest.raises(ConfigError, match="trainer.loggers: unknown logger 'wandbb' \\(did you mean 'wandb'\\?\\)"):
        load_config(REPO / "conf" / "quickstart.yaml", ["trainer.loggers=[tensorboard,wandbb]"])
    with pytest.raises(ConfigError, match="trainer.wandb.mode: 'cloud' is not one of online, offline, disabled"):
        load_config(REPO / "conf" / "quickstart.yaml", ["trainer.wandb.mode=cloud"])


def test_metrics_of_a_lost_run_are_dropped_on_resume_and_all_of_them_on_a_fresh_start(tmp_path):
    logger = MetricsLogger(tmp_path, [])
    for step in (0, 1, 2, 3):
        logger.log(step, {"loss": float(step)})
    MetricsLogger(tmp_path, [], resume_step=2)  # resumed from the step-2 checkpoint: step 3 is redone
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [0, 1, 2]
    MetricsLogger(tmp_path, [])  # no checkpoint survived: the run starts over, its step 0 included
    assert read_metrics(tmp_path / "metrics.jsonl") == []

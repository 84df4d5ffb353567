"""Per-step metrics: ``metrics.jsonl`` (always, one JSON object per step) plus the loggers in ``trainer.loggers``:
TensorBoard (default), Weights & Biases and MLflow. Each logger library is imported only when it is configured.

Resumed runs continue where they stopped: JSON records after the resumed step are dropped, TensorBoard purges the
later events, and the W&B / MLflow run ids are kept in the run directory so a resumed (or requeued) job appends to
the same run instead of starting a new one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from nemo_igrpo.checkpoint import fsync_dir
from nemo_igrpo.registry import Registry

if TYPE_CHECKING:
    from nemo_igrpo.config import Config

log = logging.getLogger(__name__)

WANDB_ID_FILE = "wandb_run_id"
MLFLOW_ID_FILE = "mlflow_run_id"


class Logger(Protocol):
    def log(self, step: int, scalars: dict[str, float]) -> None: ...
    def close(self) -> None: ...


class MetricsLogger:
    """Appends one record per step to ``metrics.jsonl`` and forwards finite scalars to ``loggers``.

    On resume, records after the resumed step (written by the run that died before its next checkpoint) are
    dropped, so the file reads as one uninterrupted run; a run that starts from scratch (``resume_step=None``)
    drops them all, step 0 included. ``enabled=False`` (ranks other than 0) writes nothing.
    """

    def __init__(self, run_dir: Path, loggers: list[Logger], resume_step: int | None = None, enabled: bool = True):
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self.loggers = loggers
        if enabled:
            _truncate_after(self.path, -1 if resume_step is None else resume_step)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        scalars = {k: float(v) for k, v in record.items()
                   if k != "step" and isinstance(v, (int, float)) and math.isfinite(v)}
        for logger in self.loggers:
            logger.log(step, scalars)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()


# (config, run_dir, resume_step) -> Logger; each records the whole config of the run, so it gets all of it
LOGGERS: Registry = Registry("logger", "trainer.loggers")


def build_loggers(config: Config, run_dir: Path, resume_step: int) -> list[Logger]:
    """The loggers named in ``trainer.loggers``, in that order."""
    return [LOGGERS[name](config, run_dir, resume_step) for name in config.trainer.loggers]


@LOGGERS.register("tensorboard")
class TensorBoardLogger:
    def __init__(self, config: Config, run_dir: Path, resume_step: int):
        from torch.utils.tensorboard import SummaryWriter  # lazily: tensorboard is heavy to import

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=resume_step + 1)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


@LOGGERS.register("wandb")
class WandbLogger:
    """One W&B run per training run; offline mode writes it under ``<output_dir>/wandb`` for ``wandb sync``."""

    def __init__(self, config: Config, run_dir: Path, resume_step: int):
        wandb = _import("wandb", "wandb")
        settings = config.trainer.wandb
        id_file = run_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(6)  # W&B ids: [a-z0-9]
        id_file.write_text(run_id)
        self.run = wandb.init(project=settings.project, entity=settings.entity,
                              name=settings.name or run_dir.resolve().name, mode=settings.mode, id=run_id,
                              resume="allow", dir=str(run_dir), config=dataclasses.asdict(config))

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


@LOGGERS.register("mlflow")
class MlflowLogger:
    """One MLflow run per training run, in ``trainer.mlflow.tracking_uri`` (default: a file store in the run)."""

    def __init__(self, config: Config, run_dir: Path, resume_step: int):
        mlflow = _import("mlflow", "mlflow")
        settings = config.trainer.mlflow
        uri = settings.tracking_uri or (run_dir / "mlruns").resolve().as_uri()
        if uri.startswith("file:") or "://" not in uri:
            # MLflow 3 refuses its file store unless opted in; a plain folder is what needs no server or database.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = mlflow.MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name(settings.experiment)
        experiment_id = (experiment.experiment_id if experiment is not None
                         else self.client.create_experiment(settings.experiment))
        id_file = run_dir / MLFLOW_ID_FILE
        if id_file.exists():
            self.run_id = id_file.read_text().strip()
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            run = self.client.create_run(experiment_id, run_name=settings.run_name or run_dir.resolve().name)
            self.run_id = run.info.run_id
            id_file.write_text(self.run_id)
            params = _flatten(dataclasses.asdict(config))
            for start in range(0, len(params), 100):  # log_batch takes at most 100 params at a time
                chunk = params[start : start + 100]
                self.client.log_batch(self.run_id, params=[mlflow.entities.Param(k, v) for k, v in chunk])

    def log(self, step: int, scalars: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = _now_ms()
        metrics = [Metric(mlflow_key(key), value, now, step) for key, value in scalars.items()]
        for start in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[start : start + 1000])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def mlflow_key(key: str) -> str:
    """Our metric name as MLflow stores it: ``eval/pass@4`` → ``eval.pass_at_4``. MLflow allows no ``@``, and its
    file store keeps ``a/b`` as a file inside folder ``a``, which clashes with a metric named ``a`` (``time/rollout``
    and ``time/rollout/generation``); dots are flat names in every store."""
    return key.replace("@", "_at_").replace("/", ".")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl``; a torn last line (a live or killed run mid-write) is left out."""
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines[:-1]]
    try:
        records.extend(json.loads(line) for line in lines[-1:])
    except ValueError:
        pass
    return records


def _import(module: str, extra: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(f"trainer.loggers has {module!r} but it is not installed ({error}); "
                          f"pip install 'nemo-igrpo[{extra}]' or remove it from trainer.loggers") from error


def _flatten(tree: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    items = []
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            items.extend(_flatten(value, f"{prefix}{key}."))
        else:
            items.append((f"{prefix}{key}", str(value)[:6000]))  # MLflow's parameter value limit
    return items


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)


def _truncate_after(path: Path, step: int) -> None:
    """Keep the records up to ``step``; a line that is not a whole record (a process killed mid-write leaves half
    a line) is dropped with a warning. The file is replaced atomically: a kill here leaves the old one."""
    if not path.exists():
        return
    kept = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            record = json.loads(line) if line.strip() else None
            keep = record is not None and record["step"] <= step
        except (ValueError, TypeError, KeyError):
            log.warning("%s:%d: dropping a torn or malformed record: %.80s", path, number, line)
            continue
        if keep:
            kept.append(line)
    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "w") as handle:
        handle.write("".join(line + "\n" for line in kept))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/Inf; keep the information readable
    return value

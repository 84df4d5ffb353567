"""Our weight-transfer engines, registered in vLLM (``WeightTransferEngineFactory``): ``nemo_igrpo_shm`` (same host,
safetensors buckets under /dev/shm; the CPU path CI runs, worker and trainer side) and ``nemo_igrpo_local``
(colocated, tensors by reference), plus vLLM's ``nccl`` trainer engine fed bucket by bucket. Both of ours receive
through vLLM's layerwise reload, which re-runs the weight processing (fused q/k/v, CPU repacking).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable, Iterator
from types import SimpleNamespace

import torch

from nemo_igrpo import faults
from nemo_igrpo.generation.vllm.version import UnsupportedVLLMError, check_vllm_version
from nemo_igrpo.generation.weight_buckets import bucket_path, weight_buckets, write_bucket

log = logging.getLogger(__name__)

SHM_BACKEND = "nemo_igrpo_shm"  # same host: safetensors buckets under /dev/shm (the CPU path CI runs)
LOCAL_BACKEND = "nemo_igrpo_local"  # colocated: tensors handed over by reference, in this process


def register_weight_transfer() -> None:
    """Register our two engines with vLLM's ``WeightTransferEngineFactory`` (worker side) and the shm engine with
    ``WeightTransferTrainerFactory`` (trainer side). The ``vllm.general_plugins`` entry point of the package, so every
    vLLM process (the server's workers included) has them; called again by the colocated engine before it needs
    them, which is harmless (an engine registered already is left as it is)."""
    try:
        check_vllm_version()
    except UnsupportedVLLMError as error:  # this hook runs in every vLLM process of the environment: never break one
        log.warning("nemo-igrpo's weight-transfer engines are not registered: %s", error)
        return
    from vllm.distributed.weight_transfer import WeightTransferEngineFactory, WeightTransferTrainerFactory

    engines = _engines()
    for factory, name, engine in ((WeightTransferEngineFactory, SHM_BACKEND, engines.ShmEngine),
                                  (WeightTransferEngineFactory, LOCAL_BACKEND, engines.LocalEngine),
                                  (WeightTransferTrainerFactory, SHM_BACKEND, engines.ShmTrainerEngine)):
        try:
            factory.register_engine(name, engine)
        except ValueError:  # "already registered": the plugin loads once per vLLM process, we may call it again
            pass


@functools.cache
def _engines() -> SimpleNamespace:
    """Our weight-transfer engines. They subclass vLLM's classes, which exist only once vLLM is imported (and after
    the version check), so they are built at first use, once."""
    from dataclasses import dataclass
    from typing import ClassVar

    check_vllm_version()
    from vllm.distributed.weight_transfer.base import (
        TrainerInitInfo,
        TrainerWeightTransferEngine,
        WeightSource,
        WeightTransferEngine,
        WeightTransferInitInfo,
        WeightTransferUpdateInfo,
    )

    class StreamSource(WeightSource):
        """One sync's weights as the policy exports them: a one-pass stream (a Megatron export gathers as it goes),
        so its metadata is known only bucket by bucket, which is how our trainer-side engines send it."""

        def __init__(self, weights: Iterable[tuple[str, torch.Tensor]]):
            self._weights = weights

        def metadata(self):
            raise NotImplementedError("a streamed export has no metadata ahead; send it bucket by bucket")

        def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
            return iter(self._weights)

    @dataclass
    class NoInitInfo(WeightTransferInitInfo):
        """Nothing to set up: neither engine opens a connection."""

    @dataclass
    class ShmUpdateInfo(WeightTransferUpdateInfo):
        path: str  # a bucket file written by :func:`write_bucket`
        names: list[str]  # the tensors it must hold

    @dataclass
    class LocalUpdateInfo(WeightTransferUpdateInfo):
        weights: list  # (HF name, tensor) pairs, by reference

    class CheckpointFormatEngine(WeightTransferEngine):
        """Receives HF-named tensors through vLLM's layerwise reload (start: keep each layer's loaders; finish:
        re-run its weight processing), as vLLM's own nccl engine does."""

        init_info_cls = NoInitInfo
        supports_draft_weight_update = False

        def init_transfer_engine(self, init_info) -> None:
            pass

        def start_weight_update(self) -> None:
            from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

            initialize_layerwise_reload(self.model)

        def finish_weight_update(self) -> None:
            from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

            finalize_layerwise_reload(self.model, self.model_config)

        def update_weights(self, update_info: dict) -> None:
            # the base class would also synchronise an accelerator; a load here is synchronous already
            self.receive_weights(self.parse_update_info(update_info))

        def shutdown(self) -> None:
            pass

    class ShmEngine(CheckpointFormatEngine):
        update_info_cls = ShmUpdateInfo

        def receive_weights(self, update_info: ShmUpdateInfo) -> None:
            from safetensors.torch import load_file

            tensors = load_file(str(bucket_path(update_info.path)), device="cpu")
            if sorted(tensors) != sorted(update_info.names):
                raise ValueError(f"{SHM_BACKEND}: {update_info.path} holds {len(tensors)} tensors, not the "
                                 f"{len(update_info.names)} announced")
            self.model.load_weights(list(tensors.items()))

    class LocalEngine(CheckpointFormatEngine):
        update_info_cls = LocalUpdateInfo

        def receive_weights(self, update_info: LocalUpdateInfo) -> None:
            self.model.load_weights(update_info.weights)

    @dataclass
    class ShmTrainerInitInfo(TrainerInitInfo):
        backend: ClassVar[str] = SHM_BACKEND
        bucket_bytes: int = 512 << 20

    class ShmTrainerEngine(TrainerWeightTransferEngine):
        """Trainer side of ``nemo_igrpo_shm``: start, one bucket file per update, finish."""

        init_info_cls = ShmTrainerInitInfo

        @classmethod
        def trainer_init(cls, init_info: ShmTrainerInitInfo, *, client, source=None):
            engine = cls(client=client, source=source, is_sender=init_info.is_sender)
            engine.bucket_bytes = init_info.bucket_bytes
            if engine.is_sender:
                client.init_weight_transfer_engine({})
            return engine

        def send_weights(self) -> None:
            if not self.is_sender:
                for _ in self.source:
                    pass
                return
            self.client.start_weight_update()
            for index, bucket in enumerate(weight_buckets(self.source, self.bucket_bytes)):
                faults.point("weights.bucket", bucket=index)
                path = write_bucket(bucket)
                try:
                    self.client.update_weights({"path": str(path), "names": [name for name, _ in bucket]})
                finally:
                    path.unlink(missing_ok=True)
            self.client.finish_weight_update()

    return SimpleNamespace(ShmEngine=ShmEngine, LocalEngine=LocalEngine, ShmTrainerEngine=ShmTrainerEngine,
                           ShmTrainerInitInfo=ShmTrainerInitInfo, StreamSource=StreamSource)


@functools.cache
def _bucketed_nccl_trainer():
    """vLLM's NCCL trainer engine, fed one bucket at a time (GPUs; not run here: the development machines have none).
    Its own ``send_weights`` needs the whole model's metadata first, which a streamed export does not have; per
    bucket, the workers' ``update_weights`` (announcing the bucket) runs beside the broadcast, as vLLM's does."""
    from concurrent.futures import ThreadPoolExecutor

    from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource
    from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerWeightTransferEngine

    class BucketSource(WeightSource):
        def __init__(self, bucket, meta):
            self.bucket, self.meta = bucket, meta

        def metadata(self):
            return self.meta

        def __iter__(self):
            return iter(self.bucket)

    class BucketedNCCLTrainerEngine(NCCLTrainerWeightTransferEngine):
        bucket_bytes = 512 << 20

        def send_weights(self) -> None:
            self.client.start_weight_update()
            for bucket in weight_buckets(self.source, self.bucket_bytes):
                meta = [ParamMeta(name, t.dtype, tuple(t.shape)) for name, t in bucket]
                info = {"names": [m.name for m in meta], "dtype_names": [str(m.dtype).split(".")[-1] for m in meta],
                        "shapes": [list(m.shape) for m in meta]}
                pool = ThreadPoolExecutor(max_workers=1)
                try:
                    receiving = pool.submit(self.client.update_weights, info)
                    self._broadcast(BucketSource(bucket, meta), meta)
                    receiving.result()
                finally:
                    pool.shutdown(wait=False)  # after a failed broadcast the workers never answer: do not join
            self.client.finish_weight_update()
            self._post_send_sync()

    return BucketedNCCLTrainerEngine

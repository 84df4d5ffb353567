"""Weight sync from the trainer to the generation server, after each optimizer step
(``generation.server.weight_sync``):

* ``shm``: the weights go, in buckets, into safetensors files under /dev/shm and the server's workers reload them
  (``POST /collective_rpc`` → :class:`~nemo_igrpo.generation.vllm_worker.WeightSyncExtension`); same host only.
* ``nccl``: a NCCL group between this process and the server's workers (GPUs; written, untested here).
* ``none``: the server's weights never change (evaluation, or a server such as TRT-LLM's that cannot update them).
* ``auto``: ``shm`` for a server on this host (127.0.0.1 / localhost), else ``nccl``.

Several trainer ranks, one server: weights are pushed once per sync, by global rank 0 only. Every rank calls
:meth:`~ServerWeightSync.update_weights` with the same export (replicas agree after the all-reduced step;
Megatron's export gathers TP/PP shards into full HF tensors on every rank, with collectives inside the iterator, so
every rank drains it). A barrier first (no rank still samples from the old weights), then rank 0 sends; its outcome
— the new weights label, or the error — is broadcast, so every rank checks the same label afterwards and a failed
push fails every rank with the same error. A server that restarted since the last sync no longer holds that label:
its samples are refused (:class:`~nemo_igrpo.generation.server_http.ServerRestartedError`).
"""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import torch

from nemo_igrpo import distributed, faults
from nemo_igrpo.generation.rank_outcome import failure, unpack
from nemo_igrpo.generation.server_http import ServerHTTPClient, ServerRestartedError
from nemo_igrpo.generation.weight_buckets import weight_buckets

_LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
SHM_DIR = "/dev/shm"
BUCKET_PREFIX = "nemo-igrpo-weights-"  # then the writer's pid: a SIGKILLed writer's files are found by the next one


def remove_stale_buckets() -> None:
    """Delete bucket files whose writing process is gone (killed mid-push, they would hold RAM until reboot)."""
    root = Path(SHM_DIR)
    if not root.is_dir():
        return
    for path in root.glob(f"{BUCKET_PREFIX}*"):
        pid = path.name[len(BUCKET_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not distributed.process_alive(int(pid)):
            path.unlink(missing_ok=True)


class ServerWeightSync(ServerHTTPClient):
    """Pushes the trainer's weights to the server and checks that it still holds them; the base of the client."""

    def __init__(self, url: str, token: str, *, retry_budget_s: float = 300.0, request_timeout_s: float = 3600.0,
                 weight_sync: str = "auto", weight_bucket_mb: int = 512):
        super().__init__(url, token, retry_budget_s=retry_budget_s, request_timeout_s=request_timeout_s)
        host = urlparse(self.url).hostname or ""
        self.weight_sync = ("shm" if host in _LOCAL_HOSTS else "nccl") if weight_sync == "auto" else weight_sync
        self.bucket_bytes = weight_bucket_mb << 20
        self._nccl = None
        self._weights_version: str | None = None  # set after each sync; a restarted server has lost it
        if self.weight_sync == "shm":
            remove_stale_buckets()

    @torch.no_grad()
    def update_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Called on every rank with the same weights; global rank 0 alone sends them (see the module docstring)."""
        weights = iter(weights)
        if self.weight_sync == "none":
            for _ in weights:  # the iterator may be a generator holding resources: drain it
                pass
            return
        distributed.barrier()  # every rank is done sampling from the old weights
        outcome = caught = None
        if distributed.is_main():
            try:
                outcome = ("ok", self._push(weights))
            except Exception as error:  # noqa: BLE001  (re-raised below, on every rank)
                outcome, caught = failure(error), error
        for _ in weights:  # the rest (everything, off rank 0): a Megatron export's collectives need every rank
            pass
        outcome = distributed.broadcast_object(outcome)
        if caught is not None:
            raise caught
        self._weights_version = unpack(outcome)

    def _push(self, weights: Iterator[tuple[str, torch.Tensor]]) -> str:
        """Send the weights to the server; returns the label its workers now hold."""
        if self.weight_sync == "shm":
            for index, bucket in enumerate(weight_buckets(weights, self.bucket_bytes)):
                faults.point("weights.bucket", bucket=index)
                self._send_shm(bucket)
        elif self.weight_sync == "nccl":
            self._send_nccl(weights)
        else:
            raise ValueError(f"generation.server.weight_sync: unknown transport {self.weight_sync!r}")
        self._request("POST", "/reset_prefix_cache")  # cached KV blocks were computed with the old weights
        version = uuid.uuid4().hex
        self._rpc("nemo_igrpo_set_weights_version", version)
        return version

    def _check_weights(self) -> None:
        """Refuse samples from a server that restarted since the last sync (checked after generating, so a restart
        during a request that the retries then rode over is caught too)."""
        if self._weights_version is None:
            return
        held = self._rpc("nemo_igrpo_weights_version")
        if any(version != self._weights_version for version in held):
            raise ServerRestartedError(
                f"generation server {self.url} restarted and lost the trained weights (it holds weights version "
                f"{held}, the trainer sent {self._weights_version!r}); samples from it would come from the model "
                "folder's weights. Run again with trainer.resume=auto: resuming sends the checkpoint's weights.")


    def _send_shm(self, bucket: list[tuple[str, torch.Tensor]]) -> None:
        from safetensors.torch import save_file

        root = SHM_DIR if os.path.isdir(SHM_DIR) else None
        handle, path = tempfile.mkstemp(prefix=f"{BUCKET_PREFIX}{os.getpid()}-", suffix=".safetensors", dir=root)
        os.close(handle)
        try:
            # contiguous CPU copies; tied tensors (embed_tokens / lm_head) must not share storage in one file
            save_file({name: t.detach().to("cpu").contiguous().clone() for name, t in bucket}, path)
            os.chmod(path, 0o600)
            answer = self._request("POST", "/collective_rpc", {
                "method": "nemo_igrpo_load_weights_file", "args": [path, self.token]})
            loaded = [int(r) for r in answer["results"]]
            if any(n != len(bucket) for n in loaded):
                raise RuntimeError(f"weight sync: the server's workers loaded {loaded} of {len(bucket)} tensors")
        finally:
            Path(path).unlink(missing_ok=True)

    def _send_nccl(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Broadcast from this process (rank 0) to the server's workers (ranks 1..W). Needs CUDA; untested here."""
        if self._nccl is None:
            self._nccl = self._init_nccl()
        for bucket in weight_buckets(weights, self.bucket_bytes):
            metadata = json.dumps([[name, str(t.dtype).removeprefix("torch."), list(t.shape)] for name, t in bucket])
            with ThreadPoolExecutor(max_workers=1) as pool:  # the RPC returns only once the workers received
                reply = pool.submit(self._request, "POST", "/collective_rpc",
                                    {"method": "nemo_igrpo_receive_nccl", "args": [metadata, self.token]})
                for _, tensor in bucket:
                    self._nccl.broadcast(tensor.detach().to("cuda").contiguous(), src=0,
                                         stream=torch.cuda.current_stream())
                reply.result()

    def _init_nccl(self):
        import socket

        from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
        from vllm.distributed.utils import StatelessProcessGroup

        if not torch.cuda.is_available():
            raise RuntimeError("generation.server.weight_sync=nccl needs a GPU on the trainer side; use shm for a "
                               "server on this host")
        workers = int(os.environ.get("NEMO_IGRPO_SERVER_WORKERS", "1"))  # the server's TP × PP world size
        address = os.environ.get("NEMO_IGRPO_NCCL_ADDRESS") or socket.gethostbyname(socket.gethostname())
        with socket.socket() as probe:
            probe.bind(("", 0))
            port = probe.getsockname()[1]
        with ThreadPoolExecutor(max_workers=1) as pool:
            joined = pool.submit(self._request, "POST", "/collective_rpc", {
                "method": "nemo_igrpo_init_nccl", "args": [address, str(port), "1", str(workers + 1), self.token]})
            group = StatelessProcessGroup.create(host=address, port=port, rank=0, world_size=workers + 1)
            communicator = PyNcclCommunicator(group, device=torch.cuda.current_device())
            joined.result()
        return communicator

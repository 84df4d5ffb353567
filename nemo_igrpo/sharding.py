"""What each data-parallel rank holds, and how the ranks' numbers combine.

Every rank draws the same global prompt batch and keeps its slice; loss denominators, metrics and evaluation
results are reduced over the policy's data-parallel group so that every rank ends a step with the same numbers.
"""

from __future__ import annotations

import dataclasses

import torch

from nemo_igrpo import distributed
from nemo_igrpo.algorithms.aggregation import LossNormalizer
from nemo_igrpo.data.dataset import Example, PromptSampler
from nemo_igrpo.data.prompts import PromptBuilder
from nemo_igrpo.errors import ConfigError
from nemo_igrpo.evaluation.metrics import summarize
from nemo_igrpo.evaluation.run import EvalResult, evaluate
from nemo_igrpo.generation.base import GenerationBackend, SamplingParams


# Rollout and timing metrics are per rank; these say how ranks combine (anything else: mean over ranks, which is
# the global mean because every rank holds the same number of prompts and samples).
_SUMMED = ("batch/sequences", "reward/count/", "throughput/")
_MAXED = ("time/", "response_length/refinement_max", "sampling_rounds")


def reduce_metrics(metrics: dict[str, float], group) -> dict[str, float]:
    """Combine one step's per-rank metrics over the data-parallel group (identical on every rank afterwards)."""
    size = distributed.world_size(group)
    if group is None or size == 1:
        return metrics
    names = sorted(metrics)
    if distributed.all_gather_objects(names, group) != [names] * size:
        raise RuntimeError(f"ranks report different metric names; this rank: {names}")
    summed = distributed.all_reduce_values([float(metrics[n]) for n in names], "sum", group)
    maxed = distributed.all_reduce_values([float(metrics[n]) for n in names], "max", group)
    reduced = {}
    for name, total, largest in zip(names, summed, maxed):
        if name.startswith(_SUMMED):
            reduced[name] = total
        elif name.startswith(_MAXED):
            reduced[name] = largest
        else:
            reduced[name] = total / size
    return reduced


class ShardedSource:
    """This rank's slice of each global prompt draw, with every rank's sampler kept in the same state.

    A draw of the global batch (``prompts_per_step``) is identical on all ranks (same seed, same state); rank r keeps
    prompts ``[r·p, r·p + n)`` with p = prompts per rank. Dynamic sampling may draw again a different number of
    times on different ranks; ``synchronize`` then moves every sampler to the furthest position reached, so the
    checkpointed sampler state is every rank's state.
    """

    def __init__(self, sampler: PromptSampler, prompts_per_step: int, group) -> None:
        self.sampler = sampler
        self.group = group
        self.world = distributed.world_size(group)
        self.rank = distributed.rank(group) if group is not None else 0
        self.per_rank = prompts_per_step // self.world

    def draw(self, n: int) -> list[Example]:
        if self.world == 1:
            return self.sampler.next_batch(n)  # single process: exactly the prompts asked for, as always
        start = self.rank * self.per_rank
        return self.sampler.next_batch(self.per_rank * self.world)[start : start + n]

    def synchronize(self) -> None:
        if self.world == 1:
            return
        states = distributed.all_gather_objects(self.sampler.state_dict(), self.group)
        furthest = max(states, key=lambda s: (s["epoch"], s["position"]))
        if furthest != self.sampler.state_dict():
            self.sampler.load_state_dict(furthest)


def global_normalizer(loss_mask: torch.Tensor, max_tokens: int, group) -> LossNormalizer:
    """Loss denominators counted over the whole step's batch, i.e. summed over the data-parallel ranks."""
    local = LossNormalizer.from_mask(loss_mask, max_tokens)
    if group is None:
        return local
    tokens, sequences = distributed.all_reduce_values([local.num_tokens, local.num_sequences], "sum", group)
    return dataclasses.replace(local, num_tokens=tokens, num_sequences=sequences)


def sharded_eval(examples: list[Example], generator: GenerationBackend, template: PromptBuilder, reward, decode,
                 params: SamplingParams, group) -> EvalResult:
    """Each rank evaluates every world-th problem; the summary is over all problems (records: this rank's only)."""
    world = distributed.world_size(group)
    if group is None or world == 1:
        return evaluate(examples, generator, template.problem_ids, reward, decode, params)
    mine = examples[distributed.rank(group)::world]
    result = evaluate(mine, generator, template.problem_ids, reward, decode, params) if mine else None
    correct = [r["correct"] for r in result.records] if result else []
    everyone = [c for part in distributed.all_gather_objects(correct, group) for c in part]
    return EvalResult(summary=summarize(everyone, None), records=result.records if result else [])


def check_divisible(prompts_per_step: int, world: int) -> None:
    if prompts_per_step % world:
        raise ConfigError(f"trainer.prompts_per_step: {prompts_per_step} prompts cannot be split evenly "
                          f"over {world} data-parallel ranks; use a multiple of {world}")

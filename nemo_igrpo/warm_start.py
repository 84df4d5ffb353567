"""A short supervised warm start on reference solutions, so a randomly initialised model learns the answer format.

It goes through the policy interface (``train_step`` with a negative log-likelihood loss), so it runs on whichever
policy backend is configured, with its own learning rate and a fresh optimizer that is discarded afterwards
(``nemo_igrpo.assembly.build_warm_start_policy``).
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

import torch
from rich.console import Console

from nemo_igrpo import distributed
from nemo_igrpo.algorithms.batch import RolloutBatch, TokenStats, pad_sequences
from nemo_igrpo.data.dataset import Example
from nemo_igrpo.data.prompts import PromptBuilder
from nemo_igrpo.policy.base import PolicyBackend

if TYPE_CHECKING:
    from nemo_igrpo.config import WarmStartConfig


def warm_start(policy: PolicyBackend, model: torch.nn.Module, examples: list[Example], template: PromptBuilder,
               tokenizer, ws: WarmStartConfig, seed: int, console: Console) -> None:
    """``warm_start.steps`` steps of token-mean NLL on (prompt, solution) pairs, on ``policy`` (built over ``model``
at temperature 1, without a reference).

    A ``warm_start.refinement_fraction`` of the examples is shown as a Stage-2 prompt, with a draft that is the
    problem's own reference solution or, half of the time, another problem's (a wrong draft), so the model has
    seen the refinement format before RL conditions on its own drafts. The target is always the reference.
    """
    with_solution = [e for e in examples if e.solution]
    if not with_solution:
        raise ValueError("warm_start.steps > 0 needs examples with a solution (set data.solution_key)")
    end = tokenizer.eos_token_id
    rng = random.Random(seed)
    for step in range(1, ws.steps + 1):
        rows = rng.sample(with_solution, min(ws.batch_size, len(with_solution)))
        prompts = [_prompt(e, with_solution, template, ws.refinement_fraction, rng) for e in rows]
        targets = [tokenizer.encode(e.solution, add_special_tokens=False) + [end] for e in rows]
        input_ids, attention_mask, loss_mask, _ = pad_sequences(prompts, targets, tokenizer.pad_token_id)
        batch = RolloutBatch(input_ids=input_ids, attention_mask=attention_mask, loss_mask=loss_mask,
                             advantages=torch.zeros(len(rows)), group_ids=torch.arange(len(rows)),
                             gen_logprobs=torch.zeros_like(loss_mask))
        # Every data-parallel rank built the same batch: each trains on its share of the rows, normalised by the
        # whole batch's tokens, so the summed gradient is the full batch's.
        ranks = distributed.world_size(policy.data_parallel_group) if policy.data_parallel_group else 1
        if ranks > 1:
            batch = batch.select(torch.arange(distributed.rank(policy.data_parallel_group), len(rows), ranks))
        metrics = policy.train_step(batch, _nll(float(loss_mask.sum())))
        if step % max(ws.steps // 5, 1) == 0 or step == ws.steps:
            console.print(f"  warm start {step}/{ws.steps}: nll {metrics['loss']:.3f}")
    if getattr(policy, "peft_model", None) is not None:
        # policy.lora trained adapters on the policy's copy: fold them into ``model``, which RL then adapts afresh
        with torch.no_grad():
            model.load_state_dict(dict(policy.export_weights()))


def _prompt(example: Example, pool: list[Example], template: PromptBuilder, refinement_fraction: float,
            rng: random.Random) -> list[int]:
    if rng.random() >= refinement_fraction:
        return template.problem_ids(example.problem)
    draft = example if rng.random() < 0.5 else rng.choice(pool)
    return template.refinement_ids(example.problem, draft.solution)


def _nll(num_tokens: float):
    def loss_fn(stats: TokenStats, micro_batch: RolloutBatch):
        loss = -(stats.logprobs * micro_batch.loss_mask).sum() / num_tokens
        return loss, {}
    return loss_fn

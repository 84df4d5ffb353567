"""A short supervised warm start on reference solutions, so a randomly initialised model learns the answer format.

It goes through the policy interface (``train_step`` with a negative log-likelihood loss), so it runs on whichever
policy backend is configured, with its own learning rate and a fresh optimizer that is discarded afterwards
(``nemo_igrpo.assembly.build_warm_start_policy``).

The warm-started weights are the base of the whole run: a LoRA checkpoint holds only the adapters on top of them,
and with ``algorithm.kl_coef > 0`` they are the KL reference. ``warm_started_base`` therefore stores them once in the
run folder (``<trainer.output_dir>/warm_start/``), and a resumed run loads that copy bit for bit instead of training
again (which on a GPU need not reproduce the same bits) or starting from the untrained model.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import safetensors.torch

import torch
from rich.console import Console

from nemo_igrpo import distributed
from nemo_igrpo.algorithms.batch import RolloutBatch, TokenStats, pad_sequences
from nemo_igrpo.data.dataset import Example
from nemo_igrpo.data.prompts import PromptBuilder
from nemo_igrpo.policy.base import PolicyBackend

if TYPE_CHECKING:
    from nemo_igrpo.config import Config, WarmStartConfig

log = logging.getLogger(__name__)

BASE_DIR = "warm_start"
BASE_FILE = "model.safetensors"
BASE_INFO = "warm_start.json"  # the file's SHA-256 and the warm_start settings that produced it


def warm_started_base(config: Config, model: torch.nn.Module, *, fresh: bool, train: Callable[[], None],
                      console: Console) -> None:
    """Make ``model`` this run's warm-started base: a fresh run trains it (``train()``) and stores it, a resumed
    one loads the stored copy. A resumed run from an older version (nothing stored) trains again, with a warning."""
    from nemo_igrpo.checkpoint import fsync_dir, fsync_tree, sha256

    store = Path(config.trainer.output_dir) / BASE_DIR
    if not fresh:
        if (store / BASE_INFO).is_file():
            info = json.loads((store / BASE_INFO).read_text())
            if sha256(store / BASE_FILE) != info.get("sha256"):
                raise RuntimeError(f"{store / BASE_FILE}: the stored warm-started weights do not match their "
                                   f"checksum in {BASE_INFO}; the run cannot resume onto the base it trained on")
            safetensors.torch.load_model(model, str(store / BASE_FILE))
            console.print(f"[bold]Warm start[/]: the run's warm-started weights from {store}")
            return
        log.warning("%s: no stored warm-started weights (a run of an older version); training the warm start "
                    "again, which matches the original only where the warm start is bitwise reproducible", store)
    console.print(f"[bold]Warm start[/]: {config.warm_start.steps} supervised steps on reference solutions")
    train()
    if distributed.is_main():
        tmp = store.with_name(f".tmp-{BASE_DIR}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        safetensors.torch.save_model(model, str(tmp / BASE_FILE))  # de-duplicates tied tensors
        (tmp / BASE_INFO).write_text(json.dumps({"sha256": sha256(tmp / BASE_FILE),
                                                 "warm_start": vars(config.warm_start)}, indent=1))
        fsync_tree(tmp)
        shutil.rmtree(store, ignore_errors=True)  # a fresh start: resume_path refused one over an older run
        os.replace(tmp, store)
        fsync_dir(store.parent)
    distributed.barrier()  # every rank resumes from the stored copy only once it is complete


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

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
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import safetensors.torch

import torch
from rich.console import Console

from nemo_igrpo import distributed
from nemo_igrpo.algorithms.batch import RolloutBatch, TokenStats, pad_sequences
from nemo_igrpo.data.dataset import Example
from nemo_igrpo.data.drafts import DRAFT_KINDS
from nemo_igrpo.data.prompts import PromptBuilder
from nemo_igrpo.generation.base import GenerationBackend, SamplingParams
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


class OwnDrafts(Protocol):
    """The ``own`` draft kind: drafts sampled from the model being warmed (``nemo_igrpo.assembly`` builds one)."""

    def refresh(self) -> None:
        """Load the warmed model's current weights into the sampler."""

    def __call__(self, problems: list[str]) -> list[str]:
        """One sampled draft (decoded text) per problem."""


def warm_start(policy: PolicyBackend, model: torch.nn.Module, examples: list[Example], template: PromptBuilder,
               tokenizer, ws: WarmStartConfig, seed: int, console: Console,
               own_drafts: OwnDrafts | None = None) -> None:
    """``warm_start.steps`` steps of token-mean NLL on (prompt, solution) pairs, on ``policy`` (built over ``model``
at temperature 1, without a reference).

    A ``warm_start.refinement_fraction`` of the rows is shown as a Stage-2 prompt whose draft is drawn from
    ``warm_start.draft_mix`` (``nemo_igrpo.data.drafts``: the problem's own reference, a near miss, another
    problem's solution, or the model's own draft from ``own_drafts``, whose weights are refreshed every
    ``warm_start.own_refresh_rows`` rows), so the model has seen the refinement format, and what to do with right
    and wrong drafts, before RL conditions on its own. The target is always the reference.
    """
    with_solution = [e for e in examples if e.solution]
    if not with_solution:
        raise ValueError("warm_start.steps > 0 needs examples with a solution (set data.solution_key)")
    end = tokenizer.eos_token_id
    rng = random.Random(seed)
    thresholds = draft_thresholds(ws.draft_mix)
    if ws.refinement_fraction > 0 and "own" in thresholds and own_drafts is None:
        raise ValueError("warm_start.draft_mix has own drafts but no sampler was given (own_drafts)")
    rows_since_refresh = 0
    for step in range(1, ws.steps + 1):
        rows = rng.sample(with_solution, min(ws.batch_size, len(with_solution)))
        drafts = [_draft(e, with_solution, ws.refinement_fraction, thresholds, rng) for e in rows]
        own = [i for i, draft in enumerate(drafts) if draft is _OWN]
        if own:
            if rows_since_refresh >= ws.own_refresh_rows:
                own_drafts.refresh()  # type: ignore[union-attr]
                rows_since_refresh = 0
            for i, text in zip(own, own_drafts([rows[i].problem for i in own])):  # type: ignore[misc]
                drafts[i] = text
        rows_since_refresh += len(rows)
        prompts = [template.problem_ids(e.problem) if d is None else template.refinement_ids(e.problem, d)
                   for e, d in zip(rows, drafts)]
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


class ModelDrafts:
    """``OwnDrafts`` over a generation backend that started from the warmed model's weights: ``refresh`` syncs the
    policy's current weights into it, as the RL loop does after an update."""

    def __init__(self, generator: GenerationBackend, policy: PolicyBackend, template: PromptBuilder,
                 decode: Callable[[list[int]], str], sampling: SamplingParams) -> None:
        self.generator, self.policy, self.template, self.decode = generator, policy, template, decode
        self.sampling = replace(sampling, n=1)

    def refresh(self) -> None:
        self.generator.update_weights(self.policy.export_weights())

    def __call__(self, problems: list[str]) -> list[str]:
        groups = self.generator.generate([self.template.problem_ids(p) for p in problems], self.sampling)
        return [self.decode(group[0].token_ids) for group in groups]


_OWN = object()  # a row whose draft the model will sample


def draft_thresholds(mix: dict[str, float]) -> dict[str, float]:
    """Cumulative shares of the kinds with a positive share, in ``DRAFT_KINDS`` order (so the draw does not
    depend on the order a YAML lists them), normalised to end at 1: kind k is drawn when u < its threshold."""
    total = sum(mix.values())
    thresholds, running = {}, 0.0
    for kind in DRAFT_KINDS:
        if mix.get(kind, 0.0) > 0:
            running += mix[kind] / total
            thresholds[kind] = running
    return thresholds


def _draft(example: Example, pool: list[Example], refinement_fraction: float, thresholds: dict[str, float],
           rng: random.Random):
    """None for a plain-prompt row, else the draft text (``_OWN``: to be sampled). One uniform draw picks the
    kind: with the default mix {reference: 0.5, foreign: 0.5} the random stream is the one before mixes existed."""
    if rng.random() >= refinement_fraction:
        return None
    u = rng.random()
    kind = next((k for k, threshold in thresholds.items() if u < threshold), list(thresholds)[-1])
    make = DRAFT_KINDS[kind]
    return _OWN if make is None else make(example, pool, rng)


def _nll(num_tokens: float):
    def loss_fn(stats: TokenStats, micro_batch: RolloutBatch):
        loss = -(stats.logprobs * micro_batch.loss_mask).sum() / num_tokens
        return loss, {}
    return loss_fn

"""The Megatron-Core policy backend: TP/PP/SP/DP GPTModel, Megatron DDP + distributed optimizer, vocab-parallel
log-probs, HF-named weight export, dist_checkpointing state.

One instance per process; every rank of the job calls every method (collectives inside). Rollouts are sharded over
:attr:`data_parallel_group`; the tensor/pipeline peers of a rank receive the same rows. The work is done by one
module per job: ``build`` (model and optimizer), ``step`` (micro-batched forward/backward and the optimizer hooks
of ``policy.optimizer_step``), ``export`` (TP/PP gathering to HF tensors), ``checkpoint`` (save/load).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from nemo_igrpo.algorithms.batch import RolloutBatch
from nemo_igrpo.policy.base import LossFn, PolicyBackend, TokenStats
from nemo_igrpo.policy.megatron import checkpoint
from nemo_igrpo.policy.megatron import step as step_lib
from nemo_igrpo.policy.megatron.build import build
from nemo_igrpo.policy.megatron.export import HFExporter
from nemo_igrpo.policy.optimizer_step import optimizer_step, warmup_cosine


class MegatronPolicy(PolicyBackend):
    def __init__(
        self,
        hf_model: torch.nn.Module,
        *,
        megatron: Any,
        lr: float,
        weight_decay: float,
        betas: tuple[float, float],
        max_grad_norm: float | None,
        warmup_steps: int,
        total_steps: int,
        min_lr_ratio: float,
        micro_batch_size: int,
        temperature: float,
        use_reference: bool,
        bf16: bool,
        seed: int = 0,
        max_tokens_per_micro_batch: int | None = None,
        sequence_packing: bool = False,
    ) -> None:
        from megatron.core import parallel_state

        built = build(hf_model, megatron, lr=lr, weight_decay=weight_decay, betas=betas, bf16=bf16, seed=seed,
                      variable_seq_lengths=max_tokens_per_micro_batch is not None, sequence_packing=sequence_packing)
        self.hf_config, self.impl, self.sizes, self.config = built.hf_config, built.impl, built.sizes, built.config
        self.device, self.hf_dtype, self.vocab_size = built.device, built.hf_dtype, built.vocab_size
        self.model, self.optimizer = built.model, built.optimizer
        self.temperature = temperature if temperature > 0 else 1.0  # greedy rollouts are scored untempered
        self.max_grad_norm = math.inf if max_grad_norm is None else float(max_grad_norm)
        self.lr_schedule = step_lib.StepLR(self.optimizer, lr, warmup_cosine(warmup_steps, total_steps, min_lr_ratio))

        # The reference policy lives on the CPU as this rank's shard and is swapped in only while it scores.
        self.reference = ({n: p.detach().to("cpu", copy=True) for n, p in self._named_params()}
                          if use_reference else None)
        pp_group = parallel_state.get_pipeline_model_parallel_group()
        self.runner = step_lib.MicroBatchRunner(self.model, self.sizes, self.device, temperature=self.temperature,
                                            vocab_size=self.vocab_size, micro_batch_size=micro_batch_size,
                                            max_tokens=max_tokens_per_micro_batch, pp_group=pp_group)
        self.exporter = HFExporter(self._named_params, config=self.config, hf_config=self.hf_config,
                                   hf_dtype=self.hf_dtype, sizes=self.sizes, device=self.device, pp_group=pp_group)

    # ------------------------------------------------------------------ helpers

    @property
    def step(self) -> int:
        """Training steps taken (the LR schedule's clock; saved in checkpoints)."""
        return self.lr_schedule.step

    @property
    def data_parallel_group(self):
        from megatron.core import parallel_state

        return parallel_state.get_data_parallel_group()

    @property
    def model_parallel_group(self):
        from megatron.core import parallel_state

        # megatron-core 0.16.1: the 'tp-pp' ranks (context-parallel peers are not in it; CP needs Transformer Engine)
        return parallel_state.get_model_parallel_group() if self.sizes.tp * self.sizes.pp > 1 else None

    @property
    def unwrapped(self) -> torch.nn.Module:
        module = self.model.module
        return getattr(module, "module", module)  # Float16Module → GPTModel

    def _named_params(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        return iter(self.unwrapped.named_parameters())

    def _micro_batches(self, batch: RolloutBatch) -> tuple[list[torch.Tensor], list[RolloutBatch]]:
        return self.runner.micro_batches(batch)

    # ------------------------------------------------------------------ scoring

    @torch.no_grad()
    def compute_logprobs(self, batch: RolloutBatch, reference: bool = False) -> TokenStats:
        if reference and self.reference is None:
            raise RuntimeError("no reference policy: MegatronPolicy was built with use_reference=False")
        groups, parts = self.runner.micro_batches(batch)
        results: list[TokenStats] = []

        def keep(stats: TokenStats, part: RolloutBatch) -> None:
            results.append(TokenStats(stats.logprobs.cpu(), stats.entropy.cpu()))

        if reference:
            with self._reference_weights():
                self.runner.run(parts, keep, forward_only=True)
        else:
            self.runner.run(parts, keep, forward_only=True)
        results = self.runner.broadcast_from_last_stage(results)
        logprobs = torch.zeros(batch.input_ids.shape, dtype=torch.float32)
        entropy = torch.zeros_like(logprobs)
        for index, stats in zip(groups, results):
            rows = len(index)  # the rest are padding rows
            width = min(stats.logprobs.shape[1], logprobs.shape[1])
            logprobs[index, :width] = stats.logprobs[:rows, :width]
            entropy[index, :width] = stats.entropy[:rows, :width]
        device = batch.input_ids.device
        return TokenStats(logprobs.to(device), entropy.to(device))

    class _Swap:
        def __init__(self, policy: MegatronPolicy) -> None:
            self.policy = policy
            self.saved: dict[str, torch.Tensor] = {}

        def __enter__(self):
            for name, param in self.policy._named_params():
                self.saved[name] = param.detach().to("cpu", copy=True)
                param.data.copy_(self.policy.reference[name])

        def __exit__(self, *exc):
            for name, param in self.policy._named_params():
                param.data.copy_(self.saved[name])

    def _reference_weights(self) -> _Swap:
        return MegatronPolicy._Swap(self)

    # ------------------------------------------------------------------ training

    def accumulate_gradients(self, batch: RolloutBatch, loss_fn: LossFn) -> tuple[float, dict[str, float]]:
        """Zero, then forward/backward all micro-batches (see ``megatron.step.accumulate_gradients``)."""
        return step_lib.accumulate_gradients(self.runner, self.optimizer, batch, loss_fn)

    def train_step(self, batch: RolloutBatch, loss_fn: LossFn) -> dict[str, float]:
        loss, metrics = self.accumulate_gradients(batch, loss_fn)
        # A skipped step leaves weights and Adam moments untouched; the schedule still advances, as in the HF backend.
        return optimizer_step(loss, metrics, step_lib.MegatronOptimizerHooks(self.optimizer, self.lr_schedule),
                              self.max_grad_norm)

    # ------------------------------------------------------------------ weights out

    def export_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        with torch.no_grad():
            yield from self.exporter.hf_tensors()

    def gradients_as_hf(self) -> dict[str, torch.Tensor]:
        """The accumulated gradients under HF names; exact only without DP sharding of the gradient buffer (DP=1 or
        no distributed optimizer). For tests and debugging."""
        return self.exporter.gradients()

    def save_pretrained(self, directory: Path) -> None:
        self.exporter.save_pretrained(directory)

    # ------------------------------------------------------------------ checkpoints

    def save(self, directory: Path) -> None:
        checkpoint.save_policy(directory, self.model, self.optimizer, self.step, self.hf_config, self.sizes)

    def load(self, directory: Path) -> None:
        self.lr_schedule.step = checkpoint.load_policy(directory, self.model, self.optimizer, self.hf_config)
        self.lr_schedule.apply()

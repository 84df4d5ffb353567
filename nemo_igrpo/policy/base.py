"""The policy interface: log-probs of given sequences, one optimizer step, weights out, state in and out.

Backends (Hugging Face ``hf``, Megatron-Core ``megatron``) are registered in ``nemo_igrpo.backends``'
``POLICY_BACKENDS`` and built by ``nemo_igrpo.assembly`` with a ``TrainingArguments``. The loss is computed by the
algorithm core and handed in as a function, so every backend trains with the same math.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Iterator

import torch

# TokenStats and LossFn belong to the algorithm core (the loss is written against them); re-exported here because
# every backend implements against them.
from nemo_igrpo.algorithms.batch import LossFn, RolloutBatch, TokenStats  # noqa: F401


@dataclass(frozen=True)
class TrainingArguments:
    """What every policy backend is built with (the assembly fills it from ``optim``, ``policy``, ``generation`` and
    the loss; the warm start passes its own optimizer settings). No defaults: the config schema holds them."""

    lr: float
    weight_decay: float
    betas: tuple[float, float]
    max_grad_norm: float | None
    warmup_steps: int
    total_steps: int  # optimizer steps of the LR schedule
    min_lr_ratio: float
    micro_batch_size: int
    max_tokens_per_micro_batch: int | None
    sequence_packing: bool
    temperature: float  # log-probs are scored at the temperature the generator samples at
    use_reference: bool  # keep a frozen reference policy (the loss has a KL term)

    def as_kwargs(self) -> dict:
        """The fields as keyword arguments of a backend's constructor."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


class PolicyBackend(ABC):
    @property
    def data_parallel_group(self):
        """The torch.distributed group whose ranks hold different data (None: not distributed).

        The trainer shards prompts over it and sums loss counts and metrics across it; tensor/pipeline peers of a
        rank (Megatron) share its data-parallel rank and therefore its rollouts.
        """
        return None

    @property
    def model_parallel_group(self):
        """The ranks holding other shards of this rank's model copy (same data-parallel rank, hence the same
        rollouts), or None when this rank holds the whole model."""
        return None

    @abstractmethod
    def compute_logprobs(self, batch: RolloutBatch, reference: bool = False) -> TokenStats:
        """Log-probs and entropy without gradient; ``reference=True`` scores under the frozen reference policy."""

    @abstractmethod
    def train_step(self, batch: RolloutBatch, loss_fn: LossFn) -> dict[str, float]:
        """Micro-batched forward/backward over ``batch``, gradient clipping, one optimizer + scheduler step.

        Returns summed metrics plus ``loss``, ``grad_norm``, ``lr`` and ``skipped`` (1.0 when the loss or the
        gradient was not finite: the update is dropped and the weights are unchanged).
        """

    @abstractmethod
    def export_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """HF-named full tensors, for the generation backend's weight sync."""

    @abstractmethod
    def save(self, directory: Path) -> None:
        """Model, optimizer and scheduler state into ``directory`` (which exists and is empty)."""

    @abstractmethod
    def load(self, directory: Path) -> None:
        """Restore what :meth:`save` wrote."""

    @abstractmethod
    def save_pretrained(self, directory: Path) -> None:
        """The model alone, in Hugging Face format (for eval and export)."""

"""The policy interface: log-probs of given sequences, one optimizer step, weights out, state in and out.

Backends (Hugging Face ``hf``, Megatron-Core ``megatron``) are registered in ``nemo_igrpo.assembly``'s
``POLICY_BACKENDS``. The loss is computed by the algorithm core and handed in as a function, so every backend trains
with the same math.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Iterator

import torch

# TokenStats and LossFn belong to the algorithm core (the loss is written against them); re-exported here because
# every backend implements against them.
from nemo_igrpo.algorithms.batch import LossFn, RolloutBatch, TokenStats  # noqa: F401


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

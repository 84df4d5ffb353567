"""The Hugging Face policy backend: any ``transformers`` causal LM, trained with AdamW on CPU or one GPU."""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from pathlib import Path
from typing import Callable, Iterator

import safetensors.torch
import torch
from torch import nn

from nemo_igrpo.algorithms.batch import RolloutBatch
from nemo_igrpo.policy.base import LossFn, PolicyBackend, TokenStats
from nemo_igrpo.policy.logprobs import check_head_matches_forward, token_logprobs_and_entropy

WEIGHTS_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"


def warmup_cosine(warmup_steps: int, total_steps: int, min_lr_ratio: float) -> Callable[[int], float]:
    """LR multiplier for optimizer step ``step`` (0-based): linear warmup, then cosine decay to ``min_lr_ratio``.

    Warmup rises as (step + 1) / warmup_steps, so the first step already moves the weights (the common
    step / warmup_steps form wastes it on lr = 0) and the last warmup step runs at the peak. The cosine then falls
    from 1 at ``warmup_steps`` to ``min_lr_ratio`` at ``total_steps`` and stays there.
    """

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return multiplier


def disable_dropout(model: nn.Module) -> None:
    """Zero every dropout probability: a sequence must score the same in rollout, π_old and the training forward.

    Besides ``nn.Dropout`` modules, attention layers keep their rate as a float attribute that they pass to the
    attention kernel in training mode.
    """
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for name in ("attention_dropout", "dropout"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)


class HFPolicy(PolicyBackend):
    """Owns the trained model, its optimizer and LR schedule, and (optionally) a frozen reference copy."""

    def __init__(
        self,
        model: nn.Module,
        *,
        lr: float,
        weight_decay: float,
        betas: tuple[float, float],
        max_grad_norm: float | None,
        warmup_steps: int,
        total_steps: int,
        min_lr_ratio: float,
        micro_batch_size: int,
        logprob_chunk_size: int,
        temperature: float,
        use_reference: bool,
        gradient_checkpointing: bool,
        autocast_dtype: str | None,
        device: torch.device | str = "cpu",
    ) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.micro_batch_size = micro_batch_size
        self.logprob_chunk_size = logprob_chunk_size
        # Greedy rollouts (temperature 0) are scored as HFGeneration reports them: untempered.
        self.temperature = temperature if temperature > 0 else 1.0
        self.max_grad_norm = math.inf if max_grad_norm is None else max_grad_norm
        self.autocast_dtype = None if autocast_dtype is None else getattr(torch, autocast_dtype)

        check_head_matches_forward(self.model)
        disable_dropout(self.model)
        # The reference is the policy *as constructed* (the initial checkpoint), so `load` never touches it.
        self.reference = copy.deepcopy(self.model).eval().requires_grad_(False) if use_reference else None

        # Training mode always (also when only scoring): HF gradient checkpointing and fused training kernels
        # (e.g. Mamba2's) switch on `module.training`, and π_old must be computed by the same code path as π.
        self.model.train()
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

        self.optimizer = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad], lr=lr, betas=betas, weight_decay=weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(warmup_steps, total_steps, min_lr_ratio)
        )

    # ------------------------------------------------------------------ scoring

    @torch.no_grad()
    def compute_logprobs(self, batch: RolloutBatch, reference: bool = False) -> TokenStats:
        model = self._scoring_model(reference)
        logprobs = torch.zeros(batch.input_ids.shape, dtype=torch.float32, device=batch.input_ids.device)
        entropy = torch.zeros_like(logprobs)
        start = 0
        for micro_batch in batch.split(self.micro_batch_size):
            stats = self._stats(model, micro_batch.to(self.device))
            rows, width = stats.logprobs.shape
            logprobs[start : start + rows, :width] = stats.logprobs
            entropy[start : start + rows, :width] = stats.entropy
            start += rows
        return TokenStats(logprobs, entropy)

    def _scoring_model(self, reference: bool) -> nn.Module:
        if not reference:
            return self.model
        if self.reference is None:
            raise RuntimeError("no reference policy: HFPolicy was built with use_reference=False")
        return self.reference

    def _stats(self, model: nn.Module, batch: RolloutBatch) -> TokenStats:
        """Token stats of the completion tokens of a batch already on the device."""
        with self._autocast():
            return token_logprobs_and_entropy(
                model,
                batch.input_ids,
                batch.attention_mask,
                batch.loss_mask,
                temperature=self.temperature,
                chunk_size=self.logprob_chunk_size,
            )

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    # ------------------------------------------------------------------ training

    def train_step(self, batch: RolloutBatch, loss_fn: LossFn) -> dict[str, float]:
        self.optimizer.zero_grad(set_to_none=True)
        loss, metrics = self._accumulate_gradients(batch, loss_fn)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm).item()
        lr = self.optimizer.param_groups[0]["lr"]

        skipped = not (math.isfinite(loss) and math.isfinite(grad_norm))
        if skipped:
            # A non-finite loss or gradient would poison Adam's moments for good: drop this update entirely.
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.optimizer.step()
        # The schedule is a function of the training step, whether or not this step's update was applied.
        with warnings.catch_warnings():
            # torch warns when the scheduler steps before any optimizer.step(), as it does after a skipped first step.
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
            self.scheduler.step()
        return {**metrics, "loss": loss, "grad_norm": grad_norm, "lr": lr, "skipped": float(skipped)}

    def _accumulate_gradients(self, batch: RolloutBatch, loss_fn: LossFn) -> tuple[float, dict[str, float]]:
        """Forward/backward per micro-batch; losses and metrics are step-normalised already, so they just sum."""
        total_loss = 0.0
        totals: dict[str, float] = {}
        for micro_batch in batch.split(self.micro_batch_size):
            micro_batch = micro_batch.to(self.device)
            loss, metrics = loss_fn(self._stats(self.model, micro_batch), micro_batch)
            if loss.requires_grad:  # a micro-batch without completion tokens has nothing to differentiate
                loss.backward()
            total_loss += loss.item()
            for name, value in metrics.items():
                totals[name] = totals.get(name, 0.0) + float(value)
        return total_loss, totals

    # ------------------------------------------------------------------ weights and state

    def export_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in self.model.state_dict().items():
            yield name, tensor.detach()

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        # save_model (unlike save_file) de-duplicates tied tensors such as embed_tokens / lm_head.
        safetensors.torch.save_model(self.model, str(directory / WEIGHTS_FILE))
        torch.save(
            {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
            directory / OPTIMIZER_FILE,
        )

    def load(self, directory: Path) -> None:
        directory = Path(directory)
        safetensors.torch.load_model(self.model, str(directory / WEIGHTS_FILE), device=str(self.device))
        state = torch.load(directory / OPTIMIZER_FILE, map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def save_pretrained(self, directory: Path) -> None:
        self.model.save_pretrained(directory)

"""The Hugging Face policy backend: any ``transformers`` causal LM, trained with AdamW on CPU or GPUs.

Under data parallelism (several processes, see ``nemo_igrpo.distributed``) every rank holds a full replica: the
replicas start from rank 0's weights, gradients are summed over the group before clipping (the loss is already
normalised by step-global counts, so the sum is the full-batch gradient), and only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import torch.distributed as dist
from torch import nn

from nemo_igrpo.algorithms.batch import RolloutBatch
from nemo_igrpo.policy import lora as lora_lib
from nemo_igrpo.policy import packing
from nemo_igrpo.policy import shared_prefix as _shared
from nemo_igrpo.policy.base import LossFn, PolicyBackend, TokenStats
from nemo_igrpo.policy.logprobs import check_head_matches_forward, token_logprobs_and_entropy
from nemo_igrpo.policy.microbatch import micro_batches, row_lengths, token_budget_groups
from nemo_igrpo.policy.optimizer_step import TorchOptimizerHooks, optimizer_step, warmup_cosine

WEIGHTS_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
ADAPTER_FILE = "adapter.safetensors"  # with LoRA: the checkpoint holds the adapters, not the frozen base
_BUCKET_BYTES = 64 * 2**20


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
        data_parallel_group: Any = "auto",
        max_tokens_per_micro_batch: int | None = None,
        sequence_packing: bool = False,
        lora: Any = None,
        shared_prefix: bool = False,
    ) -> None:
        self.device = torch.device(device)
        # "auto": the whole world when this process is one of several (HF replicas are pure data parallelism).
        if data_parallel_group == "auto":
            data_parallel_group = dist.group.WORLD if dist.is_initialized() and dist.get_world_size() > 1 else None
        self._group = data_parallel_group
        self.model = model.to(self.device)
        self.micro_batch_size = micro_batch_size
        self.max_tokens = max_tokens_per_micro_batch  # None: row micro-batches (see policy.microbatch)
        if sequence_packing and max_tokens_per_micro_batch is None:
            raise ValueError(f"{packing.KEY}=true needs policy.max_tokens_per_micro_batch (the packed row length)")
        self.sequence_packing = sequence_packing
        self.logprob_chunk_size = logprob_chunk_size
        # Greedy rollouts (temperature 0) are scored as HFGeneration reports them: untempered.
        self.temperature = temperature if temperature > 0 else 1.0
        self.max_grad_norm = math.inf if max_grad_norm is None else max_grad_norm
        self.autocast_dtype = None if autocast_dtype is None else getattr(torch, autocast_dtype)

        if shared_prefix:
            _shared.check_implementation(self.model)
            _shared.use_span_attention(self.model)
        check_head_matches_forward(self.model)
        disable_dropout(self.model)
        self.shared_prefix = shared_prefix  # one row per group: its common prefix once (policy.shared_prefix)
        if shared_prefix:
            _shared.check_supported(self.model)
        elif sequence_packing:
            packing.check_packing_supported(self.model)
        # LoRA (``policy.lora``, rank > 0): adapters injected in place after dropout is zeroed, so lora.dropout stays.
        self.peft_model = None
        if lora is not None and lora.rank > 0:
            # On a copy: PEFT rewrites modules in place, and the caller's model must stay a plain HF model (the
            # trainer builds the generator from it after the policy).
            self.peft_model = lora_lib.apply_lora(copy.deepcopy(self.model), lora.rank, lora.alpha, lora.dropout,
                                                  lora.target_modules)
            self.model = self.peft_model.get_base_model()
        self._broadcast_from_first_rank()
        # The reference is the policy *as constructed* (the initial checkpoint), so `load` never touches it. With
        # LoRA it is the same model with the adapters disabled.
        self.use_reference = use_reference
        self.reference = (copy.deepcopy(self.model).eval().requires_grad_(False)
                          if use_reference and self.peft_model is None else None)

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

    @property
    def data_parallel_group(self):
        return self._group

    def _is_writer(self) -> bool:
        return not dist.is_initialized() or dist.get_rank() == 0

    @torch.no_grad()
    def _broadcast_from_first_rank(self) -> None:
        """Replicas start identical whatever each rank's initialisation did (random init, load order)."""
        if self._group is None:
            return
        source = dist.get_global_rank(self._group, 0)
        for tensor in [*self.model.parameters(), *self.model.buffers()]:
            dist.broadcast(tensor.data, src=source, group=self._group)

    @torch.no_grad()
    def _all_reduce_gradients(self) -> None:
        """Sum gradients over the group in flat buckets (one collective per ~64 MB, not one per tensor)."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        for p in params:
            if p.grad is None:  # this rank had no tokens to learn from; its peers did
                p.grad = torch.zeros_like(p)
        bucket: list[torch.Tensor] = []
        size = 0
        for p in params:
            bucket.append(p.grad)
            size += p.grad.numel() * p.grad.element_size()
            if size >= _BUCKET_BYTES:
                self._reduce_bucket(bucket)
                bucket, size = [], 0
        if bucket:
            self._reduce_bucket(bucket)

    def _reduce_bucket(self, grads: list[torch.Tensor]) -> None:
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=self._group)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    # ------------------------------------------------------------------ scoring

    @torch.no_grad()
    def compute_logprobs(self, batch: RolloutBatch, reference: bool = False) -> TokenStats:
        model = self._scoring_model(reference)
        adapters_off = reference and self.peft_model is not None
        with self.peft_model.disable_adapter() if adapters_off else contextlib.nullcontext():
            return self._score(model, batch)

    def _score(self, model: nn.Module, batch: RolloutBatch) -> TokenStats:
        logprobs = torch.zeros(batch.input_ids.shape, dtype=torch.float32, device=batch.input_ids.device)
        entropy = torch.zeros_like(logprobs)
        for index, micro_batch in self._micro_batches(batch):
            stats = self._stats(model, micro_batch.to(self.device))
            width = stats.logprobs.shape[1]
            index = index.to(logprobs.device)
            logprobs[index, :width] = stats.logprobs.to(logprobs.device)
            entropy[index, :width] = stats.entropy.to(logprobs.device)
        return TokenStats(logprobs, entropy)

    def _micro_batches(self, batch: RolloutBatch) -> list[tuple[torch.Tensor, RolloutBatch]]:
        """(rows of ``batch``, micro-batch): by rows, by a token budget, or packed bins of the budget."""
        if self.shared_prefix:  # whole groups, sized by the tokens the shared layout computes
            groups = _shared.micro_batch_rows(batch, self.micro_batch_size, self.max_tokens, self.sequence_packing)
            return [(index, batch.select(index).trim()) for index in map(torch.tensor, groups)]
        if not self.sequence_packing:
            return micro_batches(batch, self.micro_batch_size, self.max_tokens)
        groups = token_budget_groups(row_lengths(batch), self.max_tokens, packed=True)
        return [(index, batch.select(index).trim()) for index in map(torch.tensor, groups)]

    def _scoring_model(self, reference: bool) -> nn.Module:
        if not reference:
            return self.model
        if self.use_reference and self.peft_model is not None:
            return self.model  # scored with the adapters disabled
        if self.reference is None:
            raise RuntimeError("no reference policy: HFPolicy was built with use_reference=False")
        return self.reference

    def _stats(self, model: nn.Module, batch: RolloutBatch) -> TokenStats:
        """Token stats of the completion tokens of a batch already on the device."""
        if self.shared_prefix:
            with self._autocast():
                return _shared.token_stats(model, batch, self.sequence_packing, self.temperature,
                                           self.logprob_chunk_size)
        if self.sequence_packing:
            return self._packed_stats(model, batch)
        with self._autocast():
            return token_logprobs_and_entropy(
                model,
                batch.input_ids,
                batch.attention_mask,
                batch.loss_mask,
                temperature=self.temperature,
                chunk_size=self.logprob_chunk_size,
            )

    def _packed_stats(self, model: nn.Module, batch: RolloutBatch) -> TokenStats:
        """The micro-batch as one packed row, scored, then laid back out as [B, L] for the loss."""
        packed = packing.pack(batch.input_ids, batch.attention_mask, batch.loss_mask)
        with self._autocast():
            stats = token_logprobs_and_entropy(model, packed.input_ids, None, packed.loss_mask,
                                               temperature=self.temperature, chunk_size=self.logprob_chunk_size,
                                               position_ids=packed.position_ids)
        shape = batch.input_ids.shape
        return TokenStats(packing.unpack(stats.logprobs, packed, shape), packing.unpack(stats.entropy, packed, shape))

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    # ------------------------------------------------------------------ training

    def train_step(self, batch: RolloutBatch, loss_fn: LossFn) -> dict[str, float]:
        self.optimizer.zero_grad(set_to_none=True)
        loss, metrics = self._accumulate_gradients(batch, loss_fn)
        if self._group is not None:
            self._all_reduce_gradients()
            # Step-normalised values sum to the global ones; every rank then takes the same skip decision.
            names = sorted(metrics)
            device = "cuda" if dist.get_backend(self._group) == "nccl" else "cpu"
            totals = torch.tensor([loss, *(metrics[n] for n in names)], dtype=torch.float64, device=device)
            dist.all_reduce(totals, group=self._group)
            loss, *values = totals.tolist()
            metrics = dict(zip(names, values))
        return optimizer_step(loss, metrics, TorchOptimizerHooks(self.model, self.optimizer, self.scheduler),
                              self.max_grad_norm)

    def _accumulate_gradients(self, batch: RolloutBatch, loss_fn: LossFn) -> tuple[float, dict[str, float]]:
        """Forward/backward per micro-batch; losses and metrics are step-normalised already, so they just sum."""
        total_loss = 0.0
        totals: dict[str, float] = {}
        for _, micro_batch in self._micro_batches(batch):
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
        if self.peft_model is not None:  # the generator gets merged weights under the base model's names
            yield from lora_lib.merged_weights(self.peft_model)
            return
        for name, tensor in self.model.state_dict().items():
            yield name, tensor.detach()

    def save(self, directory: Path) -> None:
        if not self._is_writer():  # replicas are identical: rank 0's copy is the checkpoint
            return
        directory = Path(directory)
        if self.peft_model is not None:
            adapters = {n: t.contiguous() for n, t in lora_lib.adapter_state(self.peft_model).items()}
            safetensors.torch.save_file(adapters, str(directory / ADAPTER_FILE))
        else:
            # save_model (unlike save_file) de-duplicates tied tensors such as embed_tokens / lm_head.
            safetensors.torch.save_model(self.model, str(directory / WEIGHTS_FILE))
        torch.save(
            {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
            directory / OPTIMIZER_FILE,
        )

    def load(self, directory: Path) -> None:
        directory = Path(directory)
        if self.peft_model is not None:
            adapters = safetensors.torch.load_file(str(directory / ADAPTER_FILE), device=str(self.device))
            expected = set(lora_lib.adapter_state(self.peft_model))
            if set(adapters) != expected:
                missing, unexpected = sorted(expected - set(adapters))[:3], sorted(set(adapters) - expected)[:3]
                raise ValueError(f"{directory / ADAPTER_FILE}: adapters do not match {lora_lib.KEY} (missing "
                                 f"{missing}, unexpected {unexpected})")
            self.model.load_state_dict(adapters, strict=False)
        else:
            safetensors.torch.load_model(self.model, str(directory / WEIGHTS_FILE), device=str(self.device))
        state = torch.load(directory / OPTIMIZER_FILE, map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def save_pretrained(self, directory: Path) -> None:
        if self._is_writer():
            model = self.model if self.peft_model is None else lora_lib.merged_model(self.peft_model)
            model.save_pretrained(directory)  # with LoRA: a plain, merged model

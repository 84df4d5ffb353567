"""Construction of the Megatron policy: process groups, this rank's GPTModel stage loaded with HF weights, Megatron
DDP and the Megatron optimizer. Everything here runs once, in ``MegatronPolicy.__init__``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from nemo_igrpo.errors import ConfigError
from nemo_igrpo.policy.megatron import convert
from nemo_igrpo.policy.megatron.parallel import ParallelSizes


@dataclass
class Built:
    """What :func:`build` made for this rank."""

    hf_config: Any
    impl: str  # "local" or "transformer_engine" (``spec.resolve_impl``)
    sizes: ParallelSizes
    device: torch.device
    hf_dtype: torch.dtype  # exported weights are cast back to the HF model's dtype
    config: Any  # megatron TransformerConfig
    vocab_size: int  # real vocabulary rows; the rest of the embedding is Megatron's padding
    model: Any  # megatron DistributedDataParallel around (Float16Module around) the GPTModel stage
    optimizer: Any  # megatron-core optimizer (possibly chained / distributed)


def build(hf_model: torch.nn.Module, megatron: Any, *, lr: float, weight_decay: float, betas: tuple[float, float],
          bf16: bool, seed: int, variable_seq_lengths: bool, sequence_packing: bool) -> Built:
    """``variable_seq_lengths``: micro-batches differ in shape (token-budget micro-batches); only matters with PP."""
    import torch.distributed as dist
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from nemo_igrpo.policy.megatron import model as model_lib
    from nemo_igrpo.policy.megatron import parallel
    from nemo_igrpo.policy.megatron.spec import resolve_impl

    if megatron.async_save:
        # The trainer renames a finished checkpoint directory into place; a background writer would race it.
        raise ValueError("policy.megatron.async_save=true is not supported with the trainer's atomic "
                         "checkpoints yet; set it to false")
    hf_config = hf_model.config
    convert.check_supported(hf_config)  # before any process group or memory
    _check_packing(sequence_packing, megatron.transformer_impl)
    impl = resolve_impl(megatron.transformer_impl)
    parallel.ensure_process_group()
    sizes = parallel.validate_sizes(megatron, dist.get_world_size(), hf_config, impl)
    # Seeding megatron's RNG tracker and the random init must not move the trainer's CPU RNG (rollouts).
    with torch.random.fork_rng(devices=[]):
        parallel.initialize(sizes, seed)

    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    config = model_lib.transformer_config(hf_config, sizes, megatron, bf16, on_gpu)
    if variable_seq_lengths and sizes.pp > 1:
        # Token-budget micro-batches differ in rows and length: pipeline stages exchange each one's shape first.
        # Set after construction: __post_init__ would demand the MoE all-to-all dispatcher, unused by dense models.
        config.variable_seq_lengths = True
    with torch.random.fork_rng(devices=[]):
        module = model_lib.build_model(hf_config, config, impl,
                                       int(getattr(megatron, "make_vocab_size_divisible_by", 1)))
    hf_state = {k: v.detach().cpu() for k, v in hf_model.state_dict().items()}
    model_lib.load_hf_weights(module, hf_state, hf_config, impl)
    del hf_state
    module.to(device)
    padding_idx = getattr(hf_model.get_input_embeddings(), "padding_idx", None)
    if padding_idx is not None and module.pre_process:
        module.embedding.register_forward_hook(_padding_row_hook(padding_idx), with_kwargs=True)
    if bf16:
        from megatron.core.transformer.module import Float16Module

        module = Float16Module(config, module)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False,
        use_distributed_optimizer=bool(megatron.use_distributed_optimizer))
    with torch.enable_grad():  # DDP finds each parameter's grad accumulator through a differentiable view
        model = DistributedDataParallel(config, ddp_config, module)
    model.train()  # dropout is 0; training mode keeps scoring and training on one code path
    config.finalize_model_grads_func = finalize_model_grads

    optim_config = OptimizerConfig(
        optimizer="adam", lr=lr, weight_decay=weight_decay, adam_beta1=betas[0], adam_beta2=betas[1],
        adam_eps=1e-8, clip_grad=0.0,  # clipping is done by policy.optimizer_step, after the non-finite check
        bf16=bf16, params_dtype=config.params_dtype,
        use_distributed_optimizer=bool(megatron.use_distributed_optimizer))
    # {} = no parameter-group overrides: weight decay on every parameter, as the HF backend's AdamW does.
    optimizer = get_megatron_optimizer(optim_config, [model], config_overrides={})
    return Built(hf_config=hf_config, impl=impl, sizes=sizes, device=device,
                 hf_dtype=next(hf_model.parameters()).dtype, config=config,
                 vocab_size=convert.gpt_model_kwargs(hf_config)["vocab_size"], model=model, optimizer=optimizer)


def _check_packing(sequence_packing: bool, transformer_impl: str) -> None:
    """Packed (THD) sequences need Transformer Engine's varlen attention; not wired up in this backend yet."""
    from nemo_igrpo.policy.megatron.spec import resolve_impl

    if not sequence_packing:
        return
    if resolve_impl(transformer_impl) != "transformer_engine":
        raise ConfigError("policy.sequence_packing=true with policy.backend=megatron needs Transformer Engine (packed "
                          "THD sequences), which is not importable here; set policy.sequence_packing=false "
                          "(policy.max_tokens_per_micro_batch still batches by tokens)")
    raise ConfigError("policy.sequence_packing=true with policy.backend=megatron: packed THD sequences are not "
                      "implemented yet; set policy.sequence_packing=false (policy.max_tokens_per_micro_batch still "
                      "batches by tokens)")


def _padding_row_hook(padding_idx: int):
    """Match ``nn.Embedding(padding_idx=…)`` of the HF model: the padding row gets no gradient from the input side.

    The embedding output is detached wherever the input token is the padding id; under sequence parallelism the
    output holds only this TP rank's slice of the sequence.
    """

    def hook(module, args, kwargs, output):
        from megatron.core import parallel_state

        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = (ids == padding_idx).transpose(0, 1).contiguous()  # [s, b], the layout of the embedding output
        if output.shape[0] != mask.shape[0]:
            rows = output.shape[0]
            start = parallel_state.get_tensor_model_parallel_rank() * rows
            mask = mask[start:start + rows]
        # contiguous: pipeline P2P sends need it, and where() may take the mask's strides
        return torch.where(mask.unsqueeze(-1), output.detach(), output).contiguous()

    return hook

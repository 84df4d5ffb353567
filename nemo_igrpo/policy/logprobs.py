"""Per-token log-probs and entropy of a causal LM without ever materialising [all tokens × vocab] logits.

A full forward of a causal LM returns logits for every position, [B, L, V] (for a 150k vocab and a few thousand
tokens that is gigabytes, and its float32 softmax and gradient are as large again). RL only needs the log-prob of
the *sampled* token at the completion positions, so here:

1. the base model (the causal LM minus its output head) produces the final hidden states [B, L, H];
2. only the hidden states that predict a selected token are gathered (hidden at t−1 predicts token t): [N, H];
3. the output head runs over those rows ``chunk_size`` at a time; each chunk is wrapped in activation
   checkpointing, so autograd keeps just the [chunk, H] input and recomputes the [chunk, V] logits in backward;
4. the per-token results are scattered back into zero [B, L] tensors (the layout of ``algorithms.batch``).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from nemo_igrpo.policy.base import TokenStats

# Config fields of models whose forward rescales the head's logits, in directions that differ between model
# families (Granite divides by ``logits_scaling``, HyperCLOVA X multiplies by it), so we refuse rather than guess.
_UNSUPPORTED_LOGIT_SCALES = ("logit_scale", "logits_scaling", "lm_head_multiplier", "output_multiplier")


def token_logprobs_and_entropy(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    positions_mask: torch.Tensor,
    temperature: float,
    chunk_size: int,
    position_ids: torch.Tensor | None = None,
) -> TokenStats:
    """Log p(token t | tokens < t) and the predictive entropy at every position t where ``positions_mask`` is 1.

    ``model`` is a Hugging Face causal LM; ``input_ids``/``attention_mask``/``positions_mask`` are [B, L] and
    right-padded. The distribution is softmax(logits / ``temperature``). Returns float32 [B, L] tensors that are 0
    where ``positions_mask`` is 0 (and at position 0, which nothing predicts). Differentiable when grad is enabled.
    Packed rows (see ``policy.packing``) pass ``attention_mask=None`` and ``position_ids`` restarting per sequence.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 to score tokens, got {temperature}")
    softcap = final_logit_softcap(model)
    hidden = final_hidden_states(model, input_ids, attention_mask, position_ids)

    # Position 0 has no predecessor, so only columns 1.. can be scored.
    rows, cols = positions_mask[:, 1:].nonzero(as_tuple=True)
    cols = cols + 1
    return head_stats(model, hidden[rows, cols - 1], input_ids[rows, cols], rows, cols, input_ids.shape,
                      temperature, chunk_size, softcap)


def head_stats(model: nn.Module, predictors: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor,
               cols: torch.Tensor, shape: torch.Size, temperature: float, chunk_size: int,
               softcap: float | None) -> TokenStats:
    """Steps 3-4: the head over the hidden states ``predictors`` [N, H] that predict ``targets`` [N], chunked,
    scattered to (``rows``, ``cols``) of zero [B, L] = ``shape`` tensors (also used by ``policy.shared_prefix``,
    whose predictors are not simply the previous column)."""
    head = model.get_output_embeddings()
    logprob_chunks, entropy_chunks = [], []
    for start in range(0, targets.numel(), chunk_size):
        stop = start + chunk_size
        logprobs, entropy = _score_chunk(head, predictors[start:stop], targets[start:stop], temperature, softcap)
        logprob_chunks.append(logprobs)
        entropy_chunks.append(entropy)

    return TokenStats(
        logprobs=_scatter(logprob_chunks, rows, cols, shape, predictors.device),
        entropy=_scatter(entropy_chunks, rows, cols, shape, predictors.device),
    )


def final_hidden_states(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                        position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The last hidden states [B, L, H] that the causal LM would feed to its output head.

    ``model.base_model`` (``getattr(model, model.base_model_prefix)``) is the body that ``*ForCausalLM.forward``
    itself calls (``LlamaModel``, ``NemotronHModel``, ...). ``get_decoder()`` would work for these too, but for
    multimodal wrappers it returns just the language model, skipping parts of the body the forward uses.
    """
    body = model.base_model
    if body is model:
        raise TypeError(f"{type(model).__name__} has no separate base model; expected a *ForCausalLM with a head")
    extra = {} if position_ids is None else {"position_ids": position_ids}
    outputs = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **extra)
    return outputs[0]


def final_logit_softcap(model: nn.Module) -> float | None:
    """The model's final-logit soft-capping value (Gemma 2/3 style), or None.

    Raises for models whose head output is rescaled in ways this module does not reproduce, so that they fail
    loudly instead of training on wrong log-probs.
    """
    config = model.config.get_text_config()
    for field in _UNSUPPORTED_LOGIT_SCALES:
        value = getattr(config, field, None)
        if value is not None and value != 1:
            raise NotImplementedError(
                f"{type(model).__name__} rescales its logits ({field}={value!r}); "
                "token_logprobs_and_entropy does not apply that transform"
            )
    return getattr(config, "final_logit_softcapping", None)


@torch.no_grad()
def check_head_matches_forward(model: nn.Module, length: int = 8, tolerance: float = 1e-2) -> None:
    """Fail if ``output head(base model(x))`` is not what ``model(x).logits`` returns on a short dummy sequence.

    A cheap guard for heads with extra processing that :func:`final_logit_softcap` does not know about.
    """
    device = model.get_output_embeddings().weight.device
    vocab = model.get_output_embeddings().weight.shape[0]
    input_ids = (torch.arange(length, device=device) * 7919 % vocab).unsqueeze(0)
    attention_mask = torch.ones_like(input_ids)
    expected = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits.float()
    actual = _head_logits(model.get_output_embeddings(), final_hidden_states(model, input_ids, attention_mask))
    softcap = final_logit_softcap(model)
    actual = _soft_cap(actual, softcap)
    scale = expected.abs().max().clamp_min(1e-6)
    error = (actual - expected).abs().max()
    if error > tolerance * scale:
        raise NotImplementedError(
            f"{type(model).__name__}: output head applied to the base model's hidden states differs from the "
            f"model's logits (max abs error {error.item():.3g}, logit scale {scale.item():.3g}); its forward "
            "post-processes logits in a way token_logprobs_and_entropy does not reproduce"
        )


def _score_chunk(
    head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, temperature: float, softcap: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row log-prob and entropy for one chunk; checkpointed under grad so backward recomputes its logits."""
    if torch.is_grad_enabled():
        # The chunk is deterministic, so there is no RNG state to stash and replay in the recomputation.
        return checkpoint(
            _chunk_stats, head, hidden, targets, temperature, softcap, use_reentrant=False, preserve_rng_state=False
        )
    return _chunk_stats(head, hidden, targets, temperature, softcap)


def _chunk_stats(
    head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, temperature: float, softcap: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    scaled = _soft_cap(_head_logits(head, hidden), softcap) / temperature  # [chunk, V] float32
    log_normaliser = torch.logsumexp(scaled, dim=-1)
    logprobs = scaled.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - log_normaliser
    # H = logsumexp(z) − Σ softmax(z)·z, which avoids forming log_softmax(z) as a second [chunk, V] tensor.
    entropy = log_normaliser - (torch.softmax(scaled, dim=-1) * scaled).sum(dim=-1)
    return logprobs, entropy


def _head_logits(head: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    # The head runs in the model's (or autocast's) dtype, as in generation; the softmax math is done in float32.
    return head(hidden).float()


def _soft_cap(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    return logits if softcap is None else torch.tanh(logits / softcap) * softcap


def _scatter(
    chunks: list[torch.Tensor], rows: torch.Tensor, cols: torch.Tensor, shape: torch.Size, device: torch.device
) -> torch.Tensor:
    """Place per-token values at (rows, cols) of a zero [B, L] float32 tensor (differentiably)."""
    out = torch.zeros(shape, dtype=torch.float32, device=device)
    if not chunks:
        return out
    return out.index_put((rows, cols), torch.cat(chunks))

"""Chunked log-prob/entropy path: equals the naive full-logits computation and never builds [tokens × vocab]."""

from __future__ import annotations

import pytest
import torch
from helpers import TINY, tiny_llama
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from nemo_igrpo.policy.logprobs import check_head_matches_forward, token_logprobs_and_entropy

pytestmark = pytest.mark.usefixtures("single_thread")


def ragged_batch(vocab: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded rows of different lengths; the mask covers each row's completion (prompt lengths differ)."""
    generator = torch.Generator().manual_seed(1)
    lengths, prompt_lengths = [12, 7, 10, 3], [4, 3, 5, 1]
    input_ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    positions_mask = torch.zeros(input_ids.shape)
    for row, (length, prompt) in enumerate(zip(lengths, prompt_lengths)):
        input_ids[row, :length] = torch.randint(1, vocab, (length,), generator=generator)
        attention_mask[row, :length] = 1
        positions_mask[row, prompt:length] = 1
    return input_ids, attention_mask, positions_mask


def naive_stats(model, input_ids, attention_mask, positions_mask, temperature):
    """Reference: full logits → log_softmax → gather; entropy from the full distribution."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()[:, :-1] / temperature
    log_probs = torch.log_softmax(logits, dim=-1)
    token_logprobs = log_probs.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    mask = positions_mask[:, 1:]
    pad = torch.zeros(input_ids.shape[0], 1)
    return torch.cat([pad, token_logprobs * mask], 1), torch.cat([pad, entropy * mask], 1)


def weighted_sum(logprobs: torch.Tensor, entropy: torch.Tensor) -> torch.Tensor:
    generator = torch.Generator().manual_seed(2)
    return (torch.randn(logprobs.shape, generator=generator) * logprobs).sum() + 0.3 * entropy.sum()


def grads(model) -> dict[str, torch.Tensor]:
    out = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


MODELS = {
    "llama": tiny_llama,
    "qwen2": lambda: (torch.manual_seed(0), Qwen2ForCausalLM(Qwen2Config(**TINY)))[1],
    "llama-tied": lambda: tiny_llama(tie_word_embeddings=True),
    # Gemma 2 soft-caps its final logits; the chunked path must apply the same cap.
    "gemma2-softcap": lambda: (
        torch.manual_seed(0),
        Gemma2ForCausalLM(Gemma2Config(**TINY, head_dim=32, final_logit_softcapping=0.5)),
    )[1],
}


@pytest.mark.parametrize("family", MODELS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_matches_naive_values_and_gradients(family: str, temperature: float) -> None:
    model = MODELS[family]()
    input_ids, attention_mask, positions_mask = ragged_batch()

    stats = token_logprobs_and_entropy(model, input_ids, attention_mask, positions_mask, temperature, chunk_size=5)
    weighted_sum(stats.logprobs, stats.entropy).backward()
    chunked_grads = grads(model)

    logprobs, entropy = naive_stats(model, input_ids, attention_mask, positions_mask, temperature)
    weighted_sum(logprobs, entropy).backward()
    naive_grads = grads(model)

    assert stats.logprobs.dtype == torch.float32 and stats.logprobs.shape == input_ids.shape
    torch.testing.assert_close(stats.logprobs, logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(stats.entropy, entropy, atol=1e-5, rtol=0)
    assert (stats.logprobs[positions_mask == 0] == 0).all() and (stats.entropy[positions_mask == 0] == 0).all()
    assert chunked_grads.keys() == naive_grads.keys()
    for name, grad in naive_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_no_grad_path_and_empty_mask() -> None:
    model = tiny_llama()
    input_ids, attention_mask, positions_mask = ragged_batch()
    with torch.no_grad():
        stats = token_logprobs_and_entropy(model, input_ids, attention_mask, positions_mask, 1.0, chunk_size=4)
        empty = token_logprobs_and_entropy(model, input_ids, attention_mask, positions_mask * 0, 1.0, chunk_size=4)
    logprobs, _ = naive_stats(model, input_ids, attention_mask, positions_mask, 1.0)
    torch.testing.assert_close(stats.logprobs, logprobs.detach(), atol=1e-5, rtol=0)
    assert not stats.logprobs.requires_grad
    assert (empty.logprobs == 0).all() and empty.logprobs.shape == input_ids.shape


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor (by element count) any op produces while active, forward and backward."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0
        self.op = ""
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.calls += 1
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor) and value.numel() > self.largest:
                self.largest, self.op = value.numel(), str(func)
        return out


def test_full_logits_are_never_materialised() -> None:
    vocab = 50_000
    model = tiny_llama(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    torch.manual_seed(3)
    input_ids = torch.randint(0, vocab, (4, 64))
    attention_mask = torch.ones_like(input_ids)
    positions_mask = torch.zeros(input_ids.shape)
    positions_mask[:, 16:] = 1  # 3/4 of the tokens scored
    all_logits = input_ids.numel() * vocab

    with LargestTensor() as forward:
        stats = token_logprobs_and_entropy(model, input_ids, attention_mask, positions_mask, 0.7, chunk_size=32)
    with LargestTensor() as backward:
        weighted_sum(stats.logprobs, stats.entropy).backward()
    largest = max(forward.largest, backward.largest)
    print(f"largest tensor: {largest:,} elements ({forward.op} / {backward.op}); all logits: {all_logits:,}")
    assert backward.calls > 0, "the dispatch mode did not see the backward pass"
    assert largest < all_logits / 4

    # The probe itself works: the naive path does produce a tensor of every logit.
    model.zero_grad(set_to_none=True)
    with LargestTensor() as naive, torch.no_grad():
        naive_stats(model, input_ids, attention_mask, positions_mask, 0.7)
    assert naive.largest >= all_logits


def test_unreproduced_logit_processing_is_refused() -> None:
    input_ids, attention_mask, positions_mask = ragged_batch()
    model = tiny_llama()
    model.config.logits_scaling = 4.0  # a Granite-style rescale we do not apply
    with pytest.raises(NotImplementedError, match="logits_scaling"):
        token_logprobs_and_entropy(model, input_ids, attention_mask, positions_mask, 1.0, chunk_size=4)

    class ScaledLlama(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            output = super().forward(*args, **kwargs)
            output.logits = output.logits * 3
            return output

    torch.manual_seed(0)
    check_head_matches_forward(tiny_llama())
    with pytest.raises(NotImplementedError, match="differs"):
        check_head_matches_forward(ScaledLlama(LlamaConfig(**TINY)))

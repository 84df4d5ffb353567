"""HFGeneration: n samples per prompt, stop/length handling, greedy, sampling log-probs, weight sync."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import tiny_llama, tiny_qwen2

from nemo_igrpo.algorithms.batch import pad_sequences
from nemo_igrpo.generation import Completion, SamplingParams
from nemo_igrpo.generation.hf import HFGeneration
from nemo_igrpo.policy.logprobs import token_logprobs_and_entropy

PROMPTS = [[1, 5, 7], [2, 9, 4, 4, 11, 30, 8], [6]]  # different lengths, so left padding is exercised


pytestmark = pytest.mark.usefixtures("single_thread")


def generator_for(model, batch_size: int = 2) -> HFGeneration:
    return HFGeneration(copy.deepcopy(model), pad_token_id=0, batch_size=batch_size, device="cpu")


def policy_logprobs(model, prompts, completions: list[list[Completion]], temperature: float) -> list[torch.Tensor]:
    """Log-probs the trainer computes for exactly the generated tokens (right-padded prompt + completion rows)."""
    rows = [(prompt, c) for prompt, group in zip(prompts, completions) for c in group]
    input_ids, attention_mask, loss_mask, _ = pad_sequences([p for p, _ in rows], [c.token_ids for _, c in rows], 0)
    with torch.no_grad():
        stats = token_logprobs_and_entropy(model, input_ids, attention_mask, loss_mask, temperature, chunk_size=16)
    return [stats.logprobs[i][loss_mask[i] == 1] for i in range(len(rows))]


def token_ids(completions: list[list[Completion]]) -> list[list[list[int]]]:
    return [[c.token_ids for c in group] for group in completions]


def test_n_completions_per_prompt_with_stop_and_length() -> None:
    stops = tuple(range(40, 56))  # a quarter of the vocabulary: many rows stop early, some run to the limit
    params = SamplingParams(n=4, temperature=1.0, max_new_tokens=6, stop_token_ids=stops)
    torch.manual_seed(0)
    completions = generator_for(tiny_llama()).generate(PROMPTS * 3, params)

    assert len(completions) == 9 and all(len(group) == 4 for group in completions)
    reasons = set()
    for completion in (c for group in completions for c in group):
        reasons.add(completion.finish_reason)
        assert len(completion.logprobs) == len(completion.token_ids)
        assert not any(t in stops for t in completion.token_ids[:-1])  # cut at the *first* stop token
        if completion.finish_reason == "stop":
            assert completion.token_ids[-1] in stops  # the stop token is kept
        else:
            assert len(completion.token_ids) == params.max_new_tokens
    assert reasons == {"stop", "length"}


def test_model_eos_does_not_stop_generation_without_stop_tokens() -> None:
    model = tiny_llama()
    model.generation_config.eos_token_id = list(range(64))  # every token is an "eos" in the model's own config
    completions = generator_for(model).generate(PROMPTS, SamplingParams(n=2, max_new_tokens=5))
    assert all(len(c.token_ids) == 5 and c.finish_reason == "length" for group in completions for c in group)


def test_greedy_is_deterministic() -> None:
    generation = generator_for(tiny_llama(), batch_size=8)
    params = SamplingParams(n=3, temperature=0.0, max_new_tokens=8)
    first = generation.generate(PROMPTS, params)
    second = generation.generate(PROMPTS, params)
    assert first == second
    assert all(c == group[0] and c is not group[0] for group in first for c in group[1:])


@pytest.mark.parametrize("make_model", [tiny_llama, tiny_qwen2], ids=["llama", "qwen2"])
@pytest.mark.parametrize("temperature", [0.0, 1.0, 0.7])
def test_logprobs_match_the_policy(make_model, temperature: float) -> None:
    model = make_model()
    torch.manual_seed(1)
    params = SamplingParams(n=3, temperature=temperature, max_new_tokens=10, stop_token_ids=(3, 17))
    completions = generator_for(model).generate(PROMPTS, params)

    # Greedy decoding reports log-probs of the untempered (temperature 1) distribution.
    expected = policy_logprobs(model, PROMPTS, completions, temperature or 1.0)
    reported = [torch.tensor(c.logprobs) for group in completions for c in group]
    for got, want in zip(reported, expected):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_top_p_renormalises_the_sampling_distribution() -> None:
    model = tiny_llama()
    torch.manual_seed(2)
    completions = generator_for(model).generate(PROMPTS, SamplingParams(n=4, top_p=0.5, max_new_tokens=8))
    full = policy_logprobs(model, PROMPTS, completions, 1.0)
    reported = [torch.tensor(c.logprobs) for group in completions for c in group]
    # Mass outside the nucleus is removed, so each kept token is at least as likely as under the full softmax.
    assert all((got >= want - 1e-5).all() for got, want in zip(reported, full))
    assert any((got > want + 1e-3).any() for got, want in zip(reported, full))


def test_update_weights_makes_generation_follow_the_new_model() -> None:
    target = tiny_llama(seed=1)
    generation = generator_for(tiny_llama(seed=0), batch_size=8)
    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=12)
    expected = token_ids(generator_for(target).generate(PROMPTS, params))
    assert token_ids(generation.generate(PROMPTS, params)) != expected

    generation.update_weights(target.state_dict().items())
    assert token_ids(generation.generate(PROMPTS, params)) == expected


def test_update_weights_casts_into_a_lower_precision_copy() -> None:
    source = tiny_llama(seed=1)
    generation = HFGeneration(tiny_llama(seed=0).to(torch.bfloat16), pad_token_id=0, batch_size=4, device="cpu")
    generation.update_weights((name, t) for name, t in source.state_dict().items())
    for name, tensor in generation.model.state_dict().items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, source.state_dict()[name].to(torch.bfloat16)), name


def test_update_weights_rejects_unknown_names_and_wrong_shapes() -> None:
    generation = generator_for(tiny_llama())
    with pytest.raises(KeyError, match="model.not_a_weight"):
        generation.update_weights([("model.not_a_weight", torch.zeros(1))])
    with pytest.raises(ValueError, match="lm_head.weight"):
        generation.update_weights([("lm_head.weight", torch.zeros(3, 64))])

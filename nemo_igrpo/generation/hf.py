"""The Hugging Face generation backend: ``model.generate`` on a private copy of the policy, CPU or one GPU.

Sampling is keyed per completion, not drawn from one stream for the whole batch: completion j of a prompt uses
Gumbel-max noise from a counter-based hash of (a per-call seed from torch's global RNG, the prompt's tokens, its
repeat index within the call, j, the position, the vocabulary index). So what a prompt samples does not depend on
which other prompts share its batch, its rank or its chunk: a 2-rank data-parallel run samples exactly what a
1-rank run samples from the same global batch, and checkpoints (which restore the global RNG) resume it exactly.
"""

from __future__ import annotations

import copy
from typing import Iterable, Sequence

import torch
from torch import nn
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from nemo_igrpo.generation.base import Completion, GenerationBackend, SamplingParams
from nemo_igrpo.generation.keys import call_seed, prompt_keys


class HFGeneration(GenerationBackend):
    """Plain ancestral sampling (temperature, top-p) or greedy decoding with ``transformers``' ``generate``.

    Reported log-probs are those of the distribution each token was drawn from; for greedy decoding
    (temperature 0) that is the untempered softmax, i.e. temperature 1.
    """

    def __init__(self, model: nn.Module, *, pad_token_id: int, batch_size: int, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.pad_token_id = pad_token_id
        self.batch_size = batch_size
        # `generate` fills every option we leave unset from the model's generation config (a checkpoint's
        # generation_config.json may set top_k, repetition_penalty, min_p, eos ids, ...), each of which would bend
        # the sampling distribution away from the one the trainer scores. This copy is ours, so neutralise it.
        self.model.generation_config = GenerationConfig()
        # Every HF name a weight can arrive under; remove_duplicate=False keeps both names of tied weights.
        self._tensors = {
            **dict(self.model.named_buffers(remove_duplicate=False)),
            **dict(self.model.named_parameters(remove_duplicate=False)),
        }

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[list[Completion]]:
        # One draw from the global RNG per call (never per row), so every data-parallel rank draws alike.
        keys = prompt_keys(call_seed(), prompts)
        results: list[list[Completion]] = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = slice(start, start + self.batch_size)
            results.extend(self._generate_chunk(prompts[chunk], params, keys[chunk]))
        return results

    @torch.inference_mode()
    def _generate_chunk(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                        keys: Sequence[int]) -> list[list[Completion]]:
        if params.n == 0 or params.max_new_tokens == 0:  # generate() rejects both; the answer is known anyway
            return [[Completion([], [], "length") for _ in range(params.n)] for _ in prompts]
        input_ids, attention_mask = self._left_pad(prompts)
        config = self._generation_config(params)
        sampler = None
        if params.temperature > 0:
            # generate() runs greedy over our one-hot scores; the sampling itself happens in _KeyedSampler.
            row_keys = torch.tensor([k + j for k in keys for j in range(params.n)], dtype=torch.int64)
            sampler = _KeyedSampler(row_keys.to(self.device), params.temperature, params.top_p)
            input_ids = input_ids.repeat_interleave(params.n, dim=0)
            attention_mask = attention_mask.repeat_interleave(params.n, dim=0)
        output = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                                     logits_processor=LogitsProcessorList([sampler] if sampler else []))
        new_tokens = output.sequences[:, input_ids.shape[1] :]
        scores = sampler.scores if sampler is not None else output.scores
        logprobs = _sampled_logprobs(scores, new_tokens)
        stops = set(params.stop_token_ids)
        rows = [_completion(t, lp, stops) for t, lp in zip(new_tokens.tolist(), logprobs.tolist())]
        # Rows hold the samples of each prompt consecutively.
        per_prompt = params.n if sampler is not None else 1
        groups = [rows[i * per_prompt : (i + 1) * per_prompt] for i in range(len(prompts))]
        if per_prompt < params.n:
            # Greedy decoding ran once per prompt (all n answers would be identical): hand out n independent copies.
            groups = [[copy.deepcopy(group[0]) for _ in range(params.n)] for group in groups]
        return groups

    def _left_pad(self, prompts: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-pad so every row's next token is generated at the same column."""
        length = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), length), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            if prompt:
                input_ids[row, length - len(prompt) :] = torch.as_tensor(prompt, dtype=torch.long)
                attention_mask[row, length - len(prompt) :] = 1
        return input_ids.to(self.device), attention_mask.to(self.device)

    def _generation_config(self, params: SamplingParams) -> GenerationConfig:
        # Always greedy for generate(): with temperature > 0, _KeyedSampler applies temperature and top-p itself and
        # leaves a one-hot score row, so greedy picks its sample (generate's own sampling would use one RNG stream
        # for the whole batch). top_k stays unset, which greedy ignores.
        return GenerationConfig(
            do_sample=False,
            max_new_tokens=params.max_new_tokens,
            eos_token_id=list(params.stop_token_ids) or None,
            pad_token_id=self.pad_token_id,
            return_dict_in_generate=True,
            output_scores=params.temperature <= 0,  # greedy: the raw logits (temperature 1) give the log-probs
        )

    @torch.no_grad()
    def update_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        for name, tensor in weights:
            target = self._tensors.get(name)
            if target is None:
                raise KeyError(f"update_weights: the generation model has no parameter or buffer named {name!r}")
            if target.shape != tensor.shape:
                raise ValueError(
                    f"update_weights: {name!r} has shape {tuple(target.shape)} here but {tuple(tensor.shape)} sent"
                )
            target.copy_(tensor)  # in place, casting to this model's dtype and device


class _KeyedSampler(LogitsProcessor):
    """Temperature, then top-p (as transformers' warpers do), then Gumbel-max with per-row counter-based noise.

    Keeps the processed scores (the distribution each token is drawn from) for the log-probs, and returns a row
    that is 0 at the sampled token and -inf elsewhere, so greedy decoding emits exactly the sample.
    """

    def __init__(self, row_keys: torch.Tensor, temperature: float, top_p: float):
        self.row_keys = row_keys
        self.temperature = temperature
        self.top_p = top_p
        self.scores: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.float() / self.temperature
        if self.top_p < 1.0:
            scores = _top_p(scores, self.top_p)
        self.scores.append(scores)
        position = torch.tensor(len(self.scores), dtype=torch.int64, device=scores.device)
        vocab = torch.arange(scores.shape[-1], device=scores.device, dtype=torch.int64)
        bits = _mix(_mix(self.row_keys[:, None] + position * _GOLDEN) + vocab[None, :])  # int64 ops wrap
        # 53 random bits → a uniform in (0, 1) (never 0 or 1) → Gumbel noise.
        uniform = ((bits >> 11) & ((1 << 53) - 1)).double().add_(0.5).div_(2.0**53)
        gumbel = -torch.log(-torch.log(uniform))
        choice = (torch.log_softmax(scores.double(), dim=-1) + gumbel).argmax(dim=-1, keepdim=True)
        one_hot = torch.full_like(scores, -float("inf"))
        return one_hot.scatter_(-1, choice, 0.0)


def _top_p(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """transformers' TopPLogitsWarper: drop the least likely tokens whose total mass is at most 1 − top_p."""
    sorted_scores, order = torch.sort(scores, descending=False)
    remove = sorted_scores.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
    remove[..., -1:] = False  # always keep the most likely token
    return scores.masked_fill(remove.scatter(1, order, remove), -float("inf"))


_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15 as int64 (splitmix64's increment)
_M1 = -4658895280553007687  # 0xBF58476D1CE4E5B9
_M2 = -7723592293110705685  # 0x94D049BB133111EB


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 tensors (wrapping multiplication, logical shifts), on any device."""
    x = x ^ ((x >> 30) & ((1 << 34) - 1))
    x = x * _M1
    x = x ^ ((x >> 27) & ((1 << 37) - 1))
    x = x * _M2
    return x ^ ((x >> 31) & ((1 << 33) - 1))




def _sampled_logprobs(scores: tuple[torch.Tensor, ...], tokens: torch.Tensor) -> torch.Tensor:
    """[rows, steps] log-prob of each generated token under its step's processed (sampling) distribution.

    One step at a time, so no second [rows, steps, vocab] copy of the scores is made. With greedy decoding the
    scores are the raw logits, so these are log-probs at temperature 1.
    """
    columns = [
        torch.log_softmax(step.float(), dim=-1).gather(-1, tokens[:, k : k + 1]).squeeze(-1)
        for k, step in enumerate(scores)
    ]
    return torch.stack(columns, dim=1) if columns else torch.zeros(tokens.shape, dtype=torch.float32)


def _completion(tokens: list[int], logprobs: list[float], stops: set[int]) -> Completion:
    """Cut a generated row after its first stop token (kept); rows without one ran out of tokens."""
    for index, token in enumerate(tokens):
        if token in stops:
            return Completion(tokens[: index + 1], logprobs[: index + 1], "stop")
    return Completion(tokens, logprobs, "length")

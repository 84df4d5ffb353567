"""The Hugging Face generation backend: ``model.generate`` on a private copy of the policy, CPU or one GPU."""

from __future__ import annotations

import copy
from typing import Iterable, Sequence

import torch
from torch import nn
from transformers import GenerationConfig

from nemo_igrpo.generation.base import Completion, GenerationBackend, SamplingParams


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
        results: list[list[Completion]] = []
        for start in range(0, len(prompts), self.batch_size):
            results.extend(self._generate_chunk(prompts[start : start + self.batch_size], params))
        return results

    @torch.inference_mode()
    def _generate_chunk(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[list[Completion]]:
        if params.n == 0 or params.max_new_tokens == 0:  # generate() rejects both; the answer is known anyway
            return [[Completion([], [], "length") for _ in range(params.n)] for _ in prompts]
        input_ids, attention_mask = self._left_pad(prompts)
        config = self._generation_config(params)
        output = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
        new_tokens = output.sequences[:, input_ids.shape[1] :]
        logprobs = _sampled_logprobs(output.scores, new_tokens)
        stops = set(params.stop_token_ids)
        rows = [_completion(t, lp, stops) for t, lp in zip(new_tokens.tolist(), logprobs.tolist())]
        # generate() returns the samples of each prompt as consecutive rows.
        per_prompt = config.num_return_sequences
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
        if params.temperature > 0:
            # top_k=0 disables top-k; left unset, generate() would apply its global default of 50.
            sampling = dict(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=0)
            samples_per_prompt = params.n
        else:
            # Greedy: generate() rejects num_return_sequences > 1 here, and warns about any sampling option set.
            sampling = dict(do_sample=False)
            samples_per_prompt = 1
        return GenerationConfig(
            **sampling,
            max_new_tokens=params.max_new_tokens,
            num_return_sequences=samples_per_prompt,
            eos_token_id=list(params.stop_token_ids) or None,
            pad_token_id=self.pad_token_id,
            return_dict_in_generate=True,
            output_scores=True,  # the *processed* scores: the distribution each token was actually drawn from
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

"""Prompt construction for both iGRPO stages.

Stage 1 (drafts) sees the problem; stage 2 (refinements) sees the problem followed by the selected draft under a
header. Both go through the tokenizer's own chat template with the same system prompt, so the policy is trained on
the conversation format it will be evaluated with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from nemo_igrpo.rewards.answer import extract_final_answer

PAPER_SYSTEM_PROMPT = (
    "You are a helpful AI Assistant that provides well-reasoned and detailed responses. First think through your "
    "reasoning as an internal monologue, then give the answer: <think>...</think><answer>...</answer>. If the prompt "
    "contains feedback or a prior draft, treat it as guidance, not as ground truth. Use it to produce a strictly "
    "improved final answer: fix mistakes, fill gaps, strengthen justification, and improve clarity. Do not repeat "
    "the draft verbatim. If the feedback is wrong or incomplete, correct it and proceed."
)

DEFAULT_DRAFT_HEADER = "Previous draft (may contain mistakes):"

DraftContent = Literal["full", "answer_only"]


@dataclass
class PromptBuilder:
    """Turns problems (and drafts) into prompt token ids with ``tokenizer``'s chat template.

    ``system_prompt`` None or "" means no system message. ``draft_content="answer_only"`` shows the refinement stage
    only the draft's final answer (last ``\\boxed{}`` or ``<answer>`` content) instead of the whole draft.
    """

    tokenizer: Any  # any Hugging Face tokenizer with a chat template
    system_prompt: str | None = PAPER_SYSTEM_PROMPT
    draft_header: str = DEFAULT_DRAFT_HEADER
    draft_content: DraftContent = "full"

    def __post_init__(self) -> None:
        if self.draft_content not in ("full", "answer_only"):
            raise ValueError(f"draft_content must be 'full' or 'answer_only', got {self.draft_content!r}")
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("PromptBuilder needs a tokenizer with a chat template")

    def problem_ids(self, problem: str) -> list[int]:
        """Stage-1 prompt: the problem as the user turn, ending with the assistant generation prompt."""
        return self._encode(problem)

    def refinement_ids(self, problem: str, draft_text: str) -> list[int]:
        """Stage-2 prompt: the problem plus the selected draft, ending with the assistant generation prompt."""
        return self._encode(self.refinement_text(problem, draft_text))

    def refinement_text(self, problem: str, draft_text: str) -> str:
        """The stage-2 user message: problem, blank line, header, newline, draft."""
        return f"{problem}\n\n{self.draft_header}\n{self._draft_body(draft_text)}"

    def _draft_body(self, draft_text: str) -> str:
        if self.draft_content == "answer_only":
            answer = extract_final_answer(draft_text)
            if answer is not None:
                return answer.strip()
        # Also the answer_only fallback: a draft without a recognisable final answer is shown as it is.
        return draft_text.strip()

    def _encode(self, user_message: str) -> list[int]:
        messages = [{"role": "user", "content": user_message}]
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # The template already wrote every special token the model expects (BOS included, where it has one).
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

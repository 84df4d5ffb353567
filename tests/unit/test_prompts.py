"""Prompts for both stages go through the chat template; refinement prompts carry the draft after the header."""

import pytest

from nemo_igrpo.data.char_tokenizer import build_char_tokenizer
from nemo_igrpo.data.prompts import DEFAULT_DRAFT_HEADER, PAPER_SYSTEM_PROMPT, PromptBuilder

PROBLEM = "Ann has 23 apples and gets 15 more. How many apples now?"
DRAFT = "<think>23+15</think> 23+15=37 \\boxed{37}\n"


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


def test_paper_system_prompt_is_verbatim():
    assert PAPER_SYSTEM_PROMPT == (
        "You are a helpful AI Assistant that provides well-reasoned and detailed responses. First think through "
        "your reasoning as an internal monologue, then give the answer: <think>...</think><answer>...</answer>. "
        "If the prompt contains feedback or a prior draft, treat it as guidance, not as ground truth. Use it to "
        "produce a strictly improved final answer: fix mistakes, fill gaps, strengthen justification, and improve "
        "clarity. Do not repeat the draft verbatim. If the feedback is wrong or incomplete, correct it and proceed."
    )
    assert PAPER_SYSTEM_PROMPT.startswith("You are a helpful AI Assistant") and PAPER_SYSTEM_PROMPT.endswith("proceed.")


def test_problem_ids_without_system_prompt(tokenizer):
    for system_prompt in (None, ""):
        builder = PromptBuilder(tokenizer, system_prompt=system_prompt)
        ids = builder.problem_ids("1+1?")
        assert tokenizer.decode(ids) == "<|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\n"


def test_problem_ids_with_system_prompt(tokenizer):
    ids = PromptBuilder(tokenizer, system_prompt=PAPER_SYSTEM_PROMPT).problem_ids(PROBLEM)
    assert tokenizer.decode(ids) == (
        f"<|im_start|>system\n{PAPER_SYSTEM_PROMPT}<|im_end|>\n"
        f"<|im_start|>user\n{PROBLEM}<|im_end|>\n<|im_start|>assistant\n"
    )
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")  # nothing added in front of the template


def test_refinement_text_full_draft(tokenizer):
    builder = PromptBuilder(tokenizer, system_prompt=None, draft_header="Previous draft (may contain mistakes):")
    assert builder.refinement_text(PROBLEM, DRAFT) == (
        f"{PROBLEM}\n\nPrevious draft (may contain mistakes):\n<think>23+15</think> 23+15=37 \\boxed{{37}}"
    )


def test_refinement_ids_share_the_system_prompt(tokenizer):
    builder = PromptBuilder(tokenizer, system_prompt="S.")
    text = tokenizer.decode(builder.refinement_ids(PROBLEM, DRAFT))
    assert text == (
        "<|im_start|>system\nS.<|im_end|>\n"
        f"<|im_start|>user\n{builder.refinement_text(PROBLEM, DRAFT)}<|im_end|>\n<|im_start|>assistant\n"
    )
    assert text.index(DEFAULT_DRAFT_HEADER) < text.index("\\boxed{37}")


@pytest.mark.parametrize(
    ("draft", "shown"),
    [
        (DRAFT, "37"),
        ("<think>hmm</think><answer> 1/2 </answer>", "1/2"),
        ("first \\boxed{3}, then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("  no final answer here \n", "no final answer here"),
    ],
)
def test_answer_only_keeps_only_the_final_answer(tokenizer, draft, shown):
    builder = PromptBuilder(tokenizer, system_prompt=None, draft_header="Draft:", draft_content="answer_only")
    assert builder.refinement_text("Q?", draft) == f"Q?\n\nDraft:\n{shown}"


def test_rejects_unknown_draft_content(tokenizer):
    with pytest.raises(ValueError, match="draft_content"):
        PromptBuilder(tokenizer, draft_content="summary")

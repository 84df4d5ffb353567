"""A character-level tokenizer built in code, for the embedded demo task and for tests.

It is a real ``tokenizers`` fast tokenizer wrapped as a Hugging Face tokenizer, so everything downstream (chat
template, ``save_pretrained``/``AutoTokenizer.from_pretrained``, decoding) goes through the same code paths as a
hub model's tokenizer, but nothing is ever downloaded.

Layout: five special tokens first (ids 0-4), then one token per printable ASCII character and newline (~100 ids).
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<|pad|>"
UNK_TOKEN = "<|unk|>"
ENDOFTEXT_TOKEN = "<|endoftext|>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
SPECIAL_TOKENS = (PAD_TOKEN, UNK_TOKEN, ENDOFTEXT_TOKEN, IM_START_TOKEN, IM_END_TOKEN)

# Printable ASCII from space to "~", plus newline (chat turns are newline-separated).
CHARACTERS = "\n" + "".join(chr(code) for code in range(ord(" "), ord("~") + 1))

# ChatML. Written on one line with explicit '\n' literals because transformers renders templates with
# trim_blocks/lstrip_blocks, which would silently eat newlines written around block tags.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _vocab() -> dict[str, int]:
    """Special tokens first, then characters, so special ids are stable and small."""
    tokens = list(SPECIAL_TOKENS) + list(CHARACTERS)
    return {token: index for index, token in enumerate(tokens)}


def _build_backend() -> Tokenizer:
    """The raw ``tokenizers`` pipeline: split into single characters, look each up, fuse back when decoding."""
    tokenizer = Tokenizer(models.WordLevel(vocab=_vocab(), unk_token=UNK_TOKEN))
    # "[\s\S]" rather than "." so that newlines are matched too; "isolated" keeps every character as its own piece.
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    # Fuse concatenates tokens as they are: the default WordLevel decoding would join them with spaces.
    tokenizer.decoder = decoders.Fuse()
    # Registered as special so that "<|im_end|>" in text is one token, never 10 characters.
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return tokenizer


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """A ChatML character-level tokenizer whose eos is ``<|im_end|>`` (generation stops at the end of a turn)."""
    return PreTrainedTokenizerFast(
        tokenizer_object=_build_backend(),
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        eos_token=IM_END_TOKEN,
        additional_special_tokens=[ENDOFTEXT_TOKEN, IM_START_TOKEN],
        chat_template=CHAT_TEMPLATE,
        # Character tokens carry their own spaces; the legacy clean-up would drop the one before "." or ",".
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )

"""The code-built character tokenizer behaves like a hub tokenizer: round trips, specials, chat template, save/load."""

from transformers import AutoTokenizer

from nemo_igrpo.data.char_tokenizer import CHARACTERS, SPECIAL_TOKENS, build_char_tokenizer

TEXT = "Ann has 23 apples, gets 15 more.\n  23+15=38 \\boxed{38} ~!"


def test_vocab_is_one_token_per_character_plus_specials():
    tokenizer = build_char_tokenizer()
    assert len(tokenizer) == 101 == len(CHARACTERS) + len(SPECIAL_TOKENS)
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(TEXT)
    assert tokenizer.convert_ids_to_tokens(ids[:3]) == ["A", "n", "n"]


def test_decode_reproduces_text_exactly():
    tokenizer = build_char_tokenizer()
    ids = tokenizer(TEXT)["input_ids"]
    assert tokenizer.decode(ids) == TEXT


def test_special_tokens_are_single_ids_and_skippable():
    tokenizer = build_char_tokenizer()
    for token in ("<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|unk|>"):
        ids = tokenizer(token, add_special_tokens=False)["input_ids"]
        assert ids == [tokenizer.convert_tokens_to_ids(token)]
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|pad|>"
    assert tokenizer.eos_token_id != tokenizer.pad_token_id
    ids = tokenizer("<|im_start|>hi .<|im_end|>", add_special_tokens=False)["input_ids"]
    assert len(ids) == 6
    assert tokenizer.decode(ids, skip_special_tokens=True) == "hi ."


def test_unknown_characters_map_to_unk():
    tokenizer = build_char_tokenizer()
    ids = tokenizer("aé\tb", add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == ["a", "<|unk|>", "<|unk|>", "b"]


def test_chat_template_renders_chatml():
    tokenizer = build_char_tokenizer()
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "1+1?"},
        {"role": "assistant", "content": "\\boxed{2}"},
    ]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n1+1?<|im_end|>\n"
        "<|im_start|>assistant\n\\boxed{2}<|im_end|>\n"
    )
    prompt = tokenizer.apply_chat_template(messages[1:2], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\n"


def test_save_and_load_round_trip(tmp_path):
    tokenizer = build_char_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.get_vocab() == tokenizer.get_vocab()
    assert loaded.chat_template == tokenizer.chat_template
    assert (loaded.eos_token, loaded.pad_token, loaded.unk_token) == ("<|im_end|>", "<|pad|>", "<|unk|>")
    ids = loaded(TEXT + "<|im_end|>")["input_ids"]
    assert ids == tokenizer(TEXT + "<|im_end|>")["input_ids"]
    assert loaded.decode(ids, skip_special_tokens=True) == TEXT
    messages = [{"role": "user", "content": "hi"}]
    assert loaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    )

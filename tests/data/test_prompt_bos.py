"""A plain-text prompt is encoded as transformers' `tokenizer(text)` encodes it: with the tokens the
tokenizer.json's post-processor puts before the text (Llama 3's <|begin_of_text|>, Gemma's <bos>), which
these models are trained to see first; the chat template's text is encoded without them (it writes them)."""

from __future__ import annotations

import pytest

from build_llm.cli.model import start_ids
from build_llm.data.tokenizer import get_tokenizer, load_tokenizer
from build_llm.infer.generate import text_to_token_ids
from tiny import write_chat_tokenizer

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

BOS = "<|begin_of_text|>"


@pytest.fixture(scope="module")
def bos_tokenizer(tmp_path_factory):
    """(transformers' tokenizer, ours) of a directory whose tokenizer.json prepends bos, as Llama 3's does."""
    path = tmp_path_factory.mktemp("bos")
    hf = write_chat_tokenizer(path, "{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}",
                              bos_token=BOS, eos_token="<|eot_id|>")
    tok = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, hf.convert_tokens_to_ids(BOS))])
    tok.save(str(path / "tokenizer.json"))
    return transformers.AutoTokenizer.from_pretrained(path), load_tokenizer(path / "tokenizer.json")


def test_a_prompt_gets_the_bos_transformers_puts_before_it(bos_tokenizer):
    hf, ours = bos_tokenizer
    text = "Hello there, how are you?"
    expected = hf(text)["input_ids"]
    assert expected[0] == hf.bos_token_id and expected[1:] == ours.encode(text)
    assert ours.encode_prompt(text) == expected
    assert text_to_token_ids(text, ours)[0].tolist() == expected


def test_generate_starts_after_bos_and_prints_only_the_prompt(bos_tokenizer):
    hf, ours = bos_tokenizer
    ids, shown = start_ids(ours, "Hello there")
    assert ids == hf("Hello there")["input_ids"] and ours.decode(shown) == "Hello there"
    ids, shown = start_ids(ours, None)  # a new text starts at bos, as transformers' generate does
    assert ids == [hf.bos_token_id] and list(shown) == []


def test_tokenizers_without_a_start_token_are_unchanged():
    gpt2 = get_tokenizer("gpt2")
    assert gpt2.encode_prompt("Hello world") == gpt2.encode("Hello world")
    ids, shown = start_ids(gpt2, "Hello world")
    assert ids == list(shown) == gpt2.encode("Hello world")
    assert start_ids(gpt2, None) == ([gpt2.eos_id], [])

"""Chapter 2: the book's word-level tokenizers and its sliding-window loader, with the book's printed
outputs where they do not depend on "the-verdict.txt" beyond its first words."""

import pytest
import tiktoken
import torch

import build_llm
from build_llm.book.ch02 import (GPTDatasetV1, SimpleTokenizerV1, SimpleTokenizerV2, build_vocab,
                                 create_dataloader_v1, split_text)

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = 'I had always thought -- "so it was no great surprise" -- that the sunlit terraces of the house, do you like tea? In the end.'


def test_split_keeps_punctuation_and_double_dashes_drops_spaces():
    assert split_text("Hello, world. Is this-- a test?") == ["Hello", ",", "world", ".", "Is", "this", "--", "a",
                                                            "test", "?"]


def test_v1_round_trip_and_unknown_words():
    vocab = build_vocab(TEXT)
    assert list(vocab) == sorted(vocab) and list(vocab.values()) == list(range(len(vocab)))
    tokenizer = SimpleTokenizerV1(vocab)
    ids = tokenizer.encode(TEXT)
    assert [tokenizer.int_to_str[i] for i in ids] == split_text(TEXT)
    # The book's decoding removes the space before punctuation, quotes included (so it is lossy):
    assert tokenizer.decode(ids) == ('I had always thought --" so it was no great surprise" -- that the sunlit '
                                     'terraces of the house, do you like tea? In the end.')
    with pytest.raises(KeyError, match="'Hello' is not in the vocabulary"):
        tokenizer.encode("Hello, do you like tea?")
    with pytest.raises(ValueError):  # also a ValueError, the package's kind of bad input
        tokenizer.encode("Hello")


def test_v2_marks_unknown_words_and_document_boundaries():
    vocab = build_vocab(TEXT, special_tokens=["<|endoftext|>", "<|unk|>"])
    assert list(vocab)[-2:] == ["<|endoftext|>", "<|unk|>"]
    tokenizer = SimpleTokenizerV2(vocab)
    text = " <|endoftext|> ".join(("Hello, do you like tea?", "In the sunlit terraces of the palace."))
    # The book prints this decode with its vocabulary, which also lacks "Hello" and "palace":
    assert tokenizer.decode(tokenizer.encode(text)) == \
        "<|unk|>, do you like tea? <|endoftext|> In the sunlit terraces of the <|unk|>."
    with pytest.raises(ValueError, match="vocab lacks"):
        SimpleTokenizerV2(build_vocab(TEXT))


def test_gpt2_encoding_of_the_books_example():
    # Printed in the book's chapter 2 (section 2.5), tiktoken's GPT-2 encoding, offline here.
    tokenizer = tiktoken.get_encoding("gpt2")
    text = "Hello, do you like tea? <|endoftext|> In the sunlit terraces of someunknownPlace."
    ids = build_llm.text_to_token_ids(text, tokenizer)[0].tolist()
    assert ids == [15496, 11, 466, 345, 588, 8887, 30, 220, 50256, 554, 262, 4252, 18250, 8812, 2114, 286, 617,
                   34680, 27271, 13]
    assert tokenizer.decode(ids) == text


def test_the_books_first_two_batches():
    # The story's first words; the book prints these batches for batch_size=1, max_length=4, stride=1.
    loader = create_dataloader_v1("I HAD always thought Jack Gisburn", batch_size=1, max_length=4, stride=1,
                                  shuffle=False)
    batches = iter(loader)
    first, second = next(batches), next(batches)
    assert [t.tolist() for t in first] == [[[40, 367, 2885, 1464]], [[367, 2885, 1464, 1807]]]
    assert [t.tolist() for t in second] == [[[367, 2885, 1464, 1807]], [[2885, 1464, 1807, 3619]]]
    assert GPTDatasetV1 is build_llm.book.ch02.GPTDatasetV1 and isinstance(loader.dataset, GPTDatasetV1)
    assert isinstance(first[0], torch.Tensor)


STORY = ("In the beginning the text was short, and the model was small.\n"
         "Every effort moves you, said the book, and so the windows slid along.\n") * 3


def test_gpt_dataset_v1_is_the_books():
    enc = tiktoken.get_encoding("gpt2")
    ids = enc.encode(STORY)
    ds = GPTDatasetV1(STORY, enc, max_length=8, stride=5)
    starts = list(range(0, len(ids) - 8, 5))
    assert len(ds) == len(starts)
    for k in (0, len(ds) - 1):
        x, y = ds[k]
        assert x.tolist() == ids[starts[k]:starts[k] + 8] and y.tolist() == ids[starts[k] + 1:starts[k] + 9]
    loader = create_dataloader_v1(STORY, batch_size=3, max_length=4, stride=4, shuffle=False)
    x, y = next(iter(loader))
    assert x.shape == (3, 4) and x[0].tolist() == ids[:4] and x[1].tolist() == ids[4:8]
    assert len(loader) == len(range(0, len(ids) - 4, 4)) // 3  # drop_last
    with pytest.raises(ValueError, match="stride"):
        GPTDatasetV1(STORY, enc, max_length=4, stride=0)

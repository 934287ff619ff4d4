"""Chapter 2, working with text data: the book's word-level tokenizers and its sliding-window
dataset and loader (the latter are the package's own, in `build_llm.data.corpus`).

The book builds its vocabulary from "the-verdict.txt"; `build_vocab` does the same from any text,
so the tokenizers can be tried on text you have:

    vocab = build_vocab(text, special_tokens=["<|endoftext|>", "<|unk|>"])
    tokenizer = SimpleTokenizerV2(vocab)
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping

from build_llm.data.corpus import GPTDatasetV1, create_dataloader_v1
from build_llm.errors import UsageError

__all__ = ["split_text", "build_vocab", "SimpleTokenizerV1", "SimpleTokenizerV2", "GPTDatasetV1",
           "create_dataloader_v1"]

# The book's split: punctuation, double dashes and whitespace are separators, kept as tokens
# (whitespace is then dropped).
SPLIT = re.compile(r'([,.:;?_!"()\']|--|\s)')
# Decoding joins tokens with spaces, then removes the space before punctuation.
SPACE_BEFORE_PUNCTUATION_V1 = re.compile(r'\s+([,.?!"()\'])')
SPACE_BEFORE_PUNCTUATION_V2 = re.compile(r'\s+([,.:;?!"()\'])')


def split_text(text: str) -> list[str]:
    """The book's preprocessing: words and punctuation marks, whitespace dropped."""
    return [item.strip() for item in SPLIT.split(text) if item.strip()]


def build_vocab(text: str, special_tokens: Iterable[str] = ()) -> dict[str, int]:
    """Token -> id for the sorted distinct tokens of `text`, then `special_tokens` at the end."""
    tokens = sorted(set(split_text(text)))
    tokens.extend(t for t in special_tokens if t not in tokens)
    return {token: i for i, token in enumerate(tokens)}


class UnknownTokenError(KeyError, UsageError):
    """A token that is not in the vocabulary: a KeyError, as in the book, and a ValueError (UsageError)."""

    def __str__(self) -> str:
        return str(self.args[0])


class SimpleTokenizerV1:
    """Word-level tokenizer over a fixed vocabulary; a token outside it is an error."""

    def __init__(self, vocab: Mapping[str, int]) -> None:
        self.str_to_int = dict(vocab)
        self.int_to_str = {i: s for s, i in vocab.items()}

    def encode(self, text: str) -> list[int]:
        ids = []
        for token in split_text(text):
            if token not in self.str_to_int:
                raise UnknownTokenError(f"{token!r} is not in the vocabulary; use SimpleTokenizerV2, whose "
                                        "<|unk|> token stands for unknown words")
            ids.append(self.str_to_int[token])
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        text = " ".join(self.int_to_str[i] for i in ids)
        return SPACE_BEFORE_PUNCTUATION_V1.sub(r"\1", text)


class SimpleTokenizerV2(SimpleTokenizerV1):
    """V1 plus two special tokens the vocabulary must hold: <|unk|> for unknown words and
    <|endoftext|> to separate documents."""

    def __init__(self, vocab: Mapping[str, int]) -> None:
        missing = [t for t in ("<|unk|>", "<|endoftext|>") if t not in vocab]
        if missing:
            raise UsageError(f"vocab lacks {missing}; build it with "
                             "build_vocab(text, special_tokens=['<|endoftext|>', '<|unk|>'])")
        super().__init__(vocab)

    def encode(self, text: str) -> list[int]:
        return [self.str_to_int.get(token, self.str_to_int["<|unk|>"]) for token in split_text(text)]

    def decode(self, ids: Iterable[int]) -> str:
        text = " ".join(self.int_to_str[i] for i in ids)
        return SPACE_BEFORE_PUNCTUATION_V2.sub(r"\1", text)

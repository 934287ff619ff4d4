"""Chapter 2, working with text data: the book's word-level tokenizers and its sliding-window
dataset and loader.

The book builds its vocabulary from "the-verdict.txt"; `build_vocab` does the same from any text,
so the tokenizers can be tried on text you have:

    vocab = build_vocab(text, special_tokens=["<|endoftext|>", "<|unk|>"])
    tokenizer = SimpleTokenizerV2(vocab)
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Mapping

import tiktoken
import torch
from torch.utils.data import DataLoader, Dataset

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


# --- the sliding-window dataset (section 2.6) -----------------------------------------------------
def _encode(tokenizer: Any, txt: str) -> list[int]:
    if hasattr(tokenizer, "encode_ordinary"):  # a raw tiktoken Encoding, as in the book
        return tokenizer.encode(txt, allowed_special={"<|endoftext|>"})
    return tokenizer.encode(txt)


class GPTDatasetV1(Dataset):
    """The book's dataset: every `stride` tokens, an input chunk of `max_length` and its target
    chunk shifted by one token."""

    def __init__(self, txt: str, tokenizer: Any, max_length: int, stride: int) -> None:
        for name, value in (("max_length", max_length), ("stride", stride)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"{name}={value!r} is invalid; expected an integer >= 1")
        self.input_ids: list[torch.Tensor] = []
        self.target_ids: list[torch.Tensor] = []
        token_ids = _encode(tokenizer, txt)
        for i in range(0, len(token_ids) - max_length, stride):
            input_chunk = token_ids[i:i + max_length]
            target_chunk = token_ids[i + 1:i + max_length + 1]
            self.input_ids.append(torch.tensor(input_chunk))
            self.target_ids.append(torch.tensor(target_chunk))

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.input_ids[idx], self.target_ids[idx]


def create_dataloader_v1(txt: str, batch_size: int = 4, max_length: int = 256, stride: int = 128,
                         shuffle: bool = True, drop_last: bool = True, num_workers: int = 0,
                         tokenizer: Any = None) -> DataLoader:
    """The book's loader over GPTDatasetV1, with the GPT-2 tokenizer unless `tokenizer` is given."""
    if tokenizer is None:
        tokenizer = tiktoken.get_encoding("gpt2")
    dataset = GPTDatasetV1(txt, tokenizer, max_length, stride)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                      num_workers=num_workers)

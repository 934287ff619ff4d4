"""Chapter 7 of the book: instruction fine-tuning, under the book's names.

`format_input` is the book's Alpaca prompt (the same function `build_llm.data.instruct` renders every
conversation with). The book's `custom_collate_fn` trains on the whole text (instruction included),
masking only the padding after the first end token; `collate_instruction` also masks the prompt.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset

from build_llm.data.instruct import IGNORE_INDEX, RESPONSE_HEADER, Example, collate_instruction, format_input

__all__ = ["format_input", "InstructionDataset", "custom_collate_fn"]


class InstructionDataset(Dataset):
    """Alpaca records encoded as the book does: format_input(entry) + the response section."""

    def __init__(self, data: list[dict[str, str]], tokenizer: Any) -> None:
        self.data = data
        self.encoded_texts = [tokenizer.encode(format_input(entry) + RESPONSE_HEADER + entry["output"])
                              for entry in data]

    def __getitem__(self, index: int) -> list[int]:
        return self.encoded_texts[index]

    def __len__(self) -> int:
        return len(self.data)


def custom_collate_fn(batch: list[list[int]], pad_token_id: int = 50256, ignore_index: int = IGNORE_INDEX,
                      allowed_max_length: int | None = None, device: Any = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """inputs and targets (shifted by one) for a batch of token lists: an end token (pad_token_id)
    appended to each, padded with it to the longest; every target pad after a row's first becomes
    `ignore_index`; both cut to `allowed_max_length`."""
    examples = [Example(list(item) + [pad_token_id], [True] * (len(item) + 1)) for item in batch]
    inputs, targets = collate_instruction(examples, pad_token_id, ignore_index, allowed_max_length)
    # The book masks every pad target after the first, also one inside a text (collate_instruction
    # has already masked the padding itself).
    is_pad = targets == pad_token_id
    later_pads = is_pad & (is_pad.cumsum(dim=1) > 1)
    targets = targets.masked_fill(later_pads, ignore_index)
    return inputs.to(device), targets.to(device)

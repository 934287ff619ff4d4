"""The book's chapter 7 (instruction fine-tuning) with build_llm imports, against its printed examples."""

from __future__ import annotations

from functools import partial

import torch

from build_llm import get_tokenizer
from build_llm.book.ch07 import InstructionDataset, custom_collate_fn, format_input


def test_custom_collate_fn_gives_the_books_printed_batch():
    inputs_1, inputs_2, inputs_3 = [0, 1, 2, 3, 4], [5, 6], [7, 8, 9]
    inputs, targets = custom_collate_fn((inputs_1, inputs_2, inputs_3))
    assert inputs.tolist() == [[0, 1, 2, 3, 4], [5, 6, 50256, 50256, 50256], [7, 8, 9, 50256, 50256]]
    assert targets.tolist() == [[1, 2, 3, 4, 50256], [6, 50256, -100, -100, -100], [8, 9, 50256, -100, -100]]


def test_custom_collate_fn_arguments():
    batch = ([0, 1, 2, 3, 4], [5, 6])
    inputs, targets = partial(custom_collate_fn, device="cpu", allowed_max_length=3)(batch)
    assert inputs.tolist() == [[0, 1, 2], [5, 6, 50256]]
    assert targets.tolist() == [[1, 2, 3], [6, 50256, -100]]
    inputs, targets = custom_collate_fn(batch, pad_token_id=0, ignore_index=-1)
    assert targets.tolist() == [[1, 2, 3, 4, 0], [6, 0, -1, -1, -1]]
    # An end token inside a text is masked like padding after the first, as the book's rule does.
    _, targets = custom_collate_fn(([1, 50256, 2, 50256, 3],))
    assert targets.tolist() == [[50256, 2, -100, 3, -100]]


def test_instruction_dataset_encodes_the_books_text():
    tokenizer = get_tokenizer("gpt2")
    entry = {"instruction": "Rewrite the sentence using a simile.", "input": "The car is very fast.",
             "output": "The car is as fast as lightning."}
    data = InstructionDataset([entry, {**entry, "input": ""}], tokenizer)
    assert len(data) == 2
    assert tokenizer.decode(data[0]) == format_input(entry) + "\n\n### Response:\nThe car is as fast as lightning."
    assert "### Input:" not in tokenizer.decode(data[1])
    loader = torch.utils.data.DataLoader(data, batch_size=2, collate_fn=custom_collate_fn)
    inputs, targets = next(iter(loader))
    assert inputs.shape == targets.shape == (2, len(data[0]))

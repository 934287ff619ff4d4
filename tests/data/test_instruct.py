"""Tests for build_llm.data.instruct: the book's Alpaca prompt, the chat template, encoding with
response masks, collation with IGNORE_INDEX, and the instruction file readers and their errors."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from build_llm.data.instruct import (ALPACA_PREAMBLE, IGNORE_INDEX, Example, collate_instruction, encode_conversation,
                                     format_input, read_instruction_data, render_pieces)


def test_format_input_is_the_books_alpaca_prompt():
    entry = {"instruction": "Identify the correct spelling of the following word.", "input": "Ocassion",
             "output": "The correct spelling is 'Occasion.'"}
    assert format_input(entry) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nIdentify the correct spelling of the following word.\n\n### Input:\nOcassion")
    assert format_input({**entry, "input": ""}).endswith("following word.")
    pieces = render_pieces([{"role": "user", "content": entry["instruction"] + "\n\n### Input:\nOcassion"},
                            {"role": "assistant", "content": entry["output"]}])
    assert pieces == [(format_input(entry) + "\n\n### Response:\n", False), (entry["output"], True)]


def test_chat_template_turns_and_generation_prompt():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"}]
    pieces = render_pieces(messages, add_generation_prompt=True)
    assert pieces == [("Be brief.\n\n### Instruction:\nhi\n\n### Response:\n", False), ("hello", True),
                      ("\n\n### Instruction:\nbye\n\n### Response:\n", False)]
    assert render_pieces(messages[:1] + messages[1:2], add_generation_prompt=True)[0][0].startswith("Be brief.")
    assert render_pieces(messages[1:2], add_generation_prompt=True)[0][0].startswith(ALPACA_PREAMBLE)


def test_encode_conversation_marks_responses_and_appends_eos(tokenizer):
    eos = tokenizer.eos_id
    messages = [{"role": "user", "content": "what colour"}, {"role": "assistant", "content": "red"}]
    ids, is_response = encode_conversation(messages, tokenizer, eos)
    n_response = len(tokenizer.encode("red")) + 1
    assert ids[-1] == eos and is_response == [False] * (len(ids) - n_response) + [True] * n_response
    assert tokenizer.decode(ids[:len(ids) - n_response]) == format_input({"instruction": "what colour"}) + \
        "\n\n### Response:\n"


def test_collate_instruction_masks_prompt_and_padding():
    a = Example([1, 2, 3, 4, 5], [False, False, False, True, True])
    b = Example([6, 7, 8], [False, True, True])
    x, y = collate_instruction([a, b], pad_id=0)
    assert x.tolist() == [[1, 2, 3, 4], [6, 7, 0, 0]]
    assert y.tolist() == [[-100, -100, 4, 5], [7, 8, -100, -100]]
    x, y = collate_instruction([a, b], pad_id=0, max_length=2)
    assert x.tolist() == [[1, 2], [6, 7]] and y.tolist() == [[-100, -100], [7, 8]]


def test_the_books_cross_entropy_ignore_index_example():
    # Chapter 7 prints 1.1269 for two tokens, 0.7936 with a third, 1.1269 again with the third ignored.
    logits_1 = torch.tensor([[-1.0, 1.0], [-0.5, 1.5]])
    logits_2 = torch.tensor([[-1.0, 1.0], [-0.5, 1.5], [-0.5, 1.5]])
    assert round(F.cross_entropy(logits_1, torch.tensor([0, 1])).item(), 4) == 1.1269
    assert round(F.cross_entropy(logits_2, torch.tensor([0, 1, 1])).item(), 4) == 0.7936
    assert round(F.cross_entropy(logits_2, torch.tensor([0, 1, IGNORE_INDEX])).item(), 4) == 1.1269


def test_read_instruction_data_alpaca_json_and_chat_jsonl(tmp_path):
    alpaca = tmp_path / "a.json"
    alpaca.write_text(json.dumps([{"instruction": "x", "input": "", "output": "y"}]))
    convs, fmt = read_instruction_data(alpaca)
    assert fmt == "alpaca" and convs == [[{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]]
    chat = tmp_path / "c.jsonl"
    chat.write_text("\n".join(json.dumps({"messages": m}) for m in (
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}],
        [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}],
    )) + "\n")
    convs, fmt = read_instruction_data(chat)
    assert fmt == "chat" and len(convs) == 2 and convs[1][0]["role"] == "system"


@pytest.mark.parametrize("content, message", [
    ("", "holds no records"),
    ("{not json}\n", "line 1 is not JSON"),
    (json.dumps([{"instruction": "x"}]), "expected an Alpaca record"),
    (json.dumps([{"instruction": 3, "output": "y"}]), "'instruction' must be a string"),
    (json.dumps({"messages": [{"role": "user", "content": "q"}]}), "ending with assistant"),
    (json.dumps({"messages": [{"role": "bot", "content": "q"}]}), "role"),
    (json.dumps({"messages": [{"role": "assistant", "content": "q"}, {"role": "user", "content": "r"}]}), "alternating"),
])
def test_read_instruction_data_errors(tmp_path, content, message):
    path = tmp_path / "d.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        read_instruction_data(path)

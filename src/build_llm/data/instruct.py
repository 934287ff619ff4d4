"""Instruction records (the book's chapter 7): the prompt format, the chat template, the file readers
and the collation of encoded conversations into (inputs, targets) batches.

Each example is a conversation rendered with the book's Alpaca prompt format (an Alpaca record
{instruction, input, output} is one user turn and one assistant turn, and renders exactly as the
book's `format_input(entry) + "\\n\\n### Response:\\n" + output`); the end token is appended to every
response. Only response tokens are trained on: prompt and padding targets are IGNORE_INDEX.

`Example` (token ids and a target) is also what classification records encode to (data/classify.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from build_llm.data.tokenizer import check_unicode
from build_llm.errors import UsageError

IGNORE_INDEX = -100
ALPACA_PREAMBLE = ("Below is an instruction that describes a task. "
                   "Write a response that appropriately completes the request.")
INSTRUCTION_HEADER, INPUT_HEADER, RESPONSE_HEADER = "\n\n### Instruction:\n", "\n\n### Input:\n", "\n\n### Response:\n"
ROLES = ("system", "user", "assistant")
# render_pieces' text as a Jinja chat template in Hugging Face's terms (messages, eos_token), which export-hf
# writes for an instruction fine-tune: transformers' apply_chat_template then gives the ids the model was tuned
# on (the end token follows each response; the response header ends every user turn).
ALPACA_CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}{{- messages[0]['content'] -}}"
    "{%- set turns = messages[1:] -%}{%- else -%}{{- " + json.dumps(ALPACA_PREAMBLE) + " -}}"
    "{%- set turns = messages -%}{%- endif -%}{%- for m in turns -%}{%- if m['role'] == 'user' -%}"
    "{{- " + json.dumps(INSTRUCTION_HEADER) + " + m['content'] + " + json.dumps(RESPONSE_HEADER) + " -}}"
    "{%- else -%}{{- m['content'] + eos_token -}}{%- endif -%}{%- endfor -%}")


@dataclass
class Example:
    ids: list[int]
    target: int | list[bool]  # a class id, or per-token "is response" flags


# --- prompt format -------------------------------------------------------------------------------
def format_input(entry: dict[str, str]) -> str:
    """The book's Alpaca prompt for an {instruction, input} record (the input section only when non-empty)."""
    text = ALPACA_PREAMBLE + INSTRUCTION_HEADER + entry["instruction"]
    return text + (INPUT_HEADER + entry["input"] if entry.get("input") else "")


def entry_to_messages(entry: dict[str, str]) -> list[dict[str, str]]:
    """An Alpaca record as a conversation: one user turn (instruction and input), one assistant turn."""
    user = entry["instruction"] + (INPUT_HEADER + entry["input"] if entry.get("input") else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": entry["output"]}]


def render_pieces(messages: Sequence[dict[str, str]], add_generation_prompt: bool = False) -> list[tuple[str, bool]]:
    """The conversation as (text, is_response) pieces: the chat template.

    An optional first system message replaces the Alpaca preamble; each user turn is an
    "### Instruction:" section followed by the "### Response:" header; each assistant turn is the
    response (followed, when encoded, by the end token). With `add_generation_prompt` the last user
    turn's response header ends the text, where the model is to continue.
    """
    system = ALPACA_PREAMBLE
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    pieces: list[tuple[str, bool]] = []
    pending = system
    for m in messages:
        if m["role"] == "user":
            pending += INSTRUCTION_HEADER + m["content"] + RESPONSE_HEADER
        else:
            pieces += [(pending, False), (m["content"], True)]
            pending = ""
    if pending and (add_generation_prompt or not pieces):
        pieces.append((pending, False))
    return pieces


def encode_conversation(messages: Sequence[dict[str, str]], tokenizer: Any, eos_id: int,
                        add_generation_prompt: bool = False) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation and, per token, whether it is response (trained on).

    Pieces are encoded separately so that a response's tokens never merge with the header before it;
    an end token follows every response.
    """
    ids: list[int] = []
    is_response: list[bool] = []
    for text, response in render_pieces(messages, add_generation_prompt):
        piece = tokenizer.encode(text)
        if response:
            piece = piece + [eos_id]
        ids += piece
        is_response += [response] * len(piece)
    return ids, is_response


# --- reading files -------------------------------------------------------------------------------
def _check_messages(messages: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise UsageError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    roles = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
            raise UsageError(f"{where}: each message needs 'role' (one of {list(ROLES)}) and a string 'content'; "
                             f"got {str(m)[:80]}")
        roles.append(m["role"])
    turns = roles[1:] if roles[0] == "system" else roles
    expected = ["user", "assistant"] * (len(turns) // 2 + 1)
    if not turns or turns != expected[:len(turns)] or turns[-1] != "assistant":
        raise UsageError(f"{where}: roles {roles} are invalid; expected an optional system message, then user "
                         "and assistant turns alternating, ending with assistant")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _record_to_messages(record: Any, where: str) -> tuple[list[dict[str, str]], str]:
    if isinstance(record, dict) and "messages" in record:
        return _check_messages(record["messages"], where), "chat"
    if isinstance(record, dict) and "instruction" in record and "output" in record:
        for key in ("instruction", "input", "output"):
            if key in record and not isinstance(record[key], str):
                raise UsageError(f"{where}: {key!r} must be a string, got {type(record[key]).__name__}")
        return entry_to_messages(record), "alpaca"
    raise UsageError(f"{where}: expected an Alpaca record (instruction, input, output) or a chat record "
                     f"({{\"messages\": [...]}}), got {str(record)[:80]}")


def read_instruction_data(path: str | Path) -> tuple[list[list[dict[str, str]]], str]:
    """Conversations from a JSON array or JSONL file of Alpaca records or chat records; and the format
    ("alpaca" or "chat")."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark (Excel, Notepad) is not JSON: drop it
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--data {str(path)!r} cannot be read as UTF-8 text ({e})") from e
    records: list[tuple[Any, str]] = []
    try:
        parsed = json.loads(text)
        if not isinstance(parsed, list):
            parsed = [parsed]
        records = [(r, f"{path} record {i + 1}") for i, r in enumerate(parsed)]
    except json.JSONDecodeError:
        for i, line in enumerate(text.splitlines()):
            if line.strip():
                try:
                    records.append((json.loads(line), f"{path} line {i + 1}"))
                except json.JSONDecodeError as e:
                    raise UsageError(f"{path} line {i + 1} is not JSON ({e.msg}); expected a JSON array or one "
                                     "JSON object per line") from None
    if not records:
        raise UsageError(f"--data {str(path)!r} holds no records; expected Alpaca records or chat records")
    conversations, formats = [], set()
    for record, where in records:
        messages, fmt = _record_to_messages(record, where)
        for m in messages:  # a "\ud800" in JSON: name the record rather than fail later in the tokenizer
            check_unicode(m["content"], f"{where} ({m['role']})")
        conversations.append(messages)
        formats.add(fmt)
    return conversations, "alpaca" if formats == {"alpaca"} else "chat"


# --- batches -------------------------------------------------------------------------------------
def collate_instruction(examples: Sequence[Example], pad_id: int, ignore_index: int = IGNORE_INDEX,
                        max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """inputs (B, T) and next-token targets (B, T); targets that are not response tokens (the prompt)
    or are padding are `ignore_index`. Sequences are cut to `max_length` inputs."""
    rows = []
    for e in examples:
        ids = e.ids if max_length is None else e.ids[:max_length + 1]
        targets = [t if r else ignore_index for t, r in zip(ids[1:], e.target[1:])]
        rows.append((ids[:-1], targets))
    T = max(len(x) for x, _ in rows)
    inputs = torch.full((len(rows), T), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), T), ignore_index, dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        inputs[i, :len(x)] = torch.tensor(x, dtype=torch.long)
        targets[i, :len(y)] = torch.tensor(y, dtype=torch.long)
    return inputs, targets

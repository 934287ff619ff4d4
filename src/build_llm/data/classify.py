"""Classification records (the book's chapter 6): texts and labels from a CSV file, each text encoded
to an Example (ids, class id), and batches padded on the right with the lengths that say where each
text's last real token is (its logits are the class scores)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Sequence

import torch

from build_llm.data.instruct import Example
from build_llm.errors import UsageError


def read_labeled_csv(path: str | Path, text_column: str, label_column: str) -> tuple[list[str], list[str]]:
    """(texts, labels) from a CSV file with a header row."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # Excel's "CSV UTF-8" starts with a BOM
            reader = csv.DictReader(f)
            if reader.fieldnames is None:  # not even a header: say so, not that a column is missing
                raise UsageError(f"{str(path)!r} is empty; expected a CSV file with a header row (the columns "
                                 f"{text_column!r} and {label_column!r}) and one row per example")
            columns = reader.fieldnames
            for col, flag in ((text_column, "--text-column"), (label_column, "--label-column")):
                if col not in columns:
                    raise UsageError(f"{flag} {col!r} is not a column of {str(path)!r}; its columns are {columns}")
            texts, labels = [], []
            for i, row in enumerate(reader):
                text, label = row[text_column], row[label_column]
                if not text or not text.strip() or label is None or not label.strip():
                    raise UsageError(f"{path} row {i + 2}: empty text or label; every row needs both")
                texts.append(text)
                labels.append(label.strip())
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UsageError(f"--data {str(path)!r} cannot be read as a UTF-8 CSV file ({e})") from e
    if not texts:
        raise UsageError(f"--data {str(path)!r} has no rows; expected a header and one row per example")
    return texts, labels


def encode_text(tokenizer: Any, text: str, max_length: int) -> list[int]:
    """The text's token ids, cut to `max_length`; a text that encodes to no tokens is an error."""
    ids = tokenizer.encode(text)
    if not ids:
        raise UsageError(f"text {text[:40]!r} encodes to no tokens; give a non-empty text")
    return ids[:max_length]


def collate_classification(examples: Sequence[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """inputs (B, T) padded on the right with pad_id, lengths (B,), labels (B,)."""
    T = max(len(e.ids) for e in examples)
    inputs = torch.full((len(examples), T), pad_id, dtype=torch.long)
    for i, e in enumerate(examples):
        inputs[i, :len(e.ids)] = torch.tensor(e.ids)
    lengths = torch.tensor([len(e.ids) for e in examples])
    return inputs, lengths, torch.tensor([e.target for e in examples])

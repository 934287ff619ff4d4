"""Chapter 6 of the book: fine-tuning for classification, under the book's names.

The book's semantics are kept where they differ from `build-llm finetune classify`: its dataset pads
every text to one length with `pad_token_id` and its functions read the logits of the LAST POSITION
(padding included), where the package reads each text's last real token. The pieces are the
package's (the head replacement of `store.finetuned.prepare_classifier`, the CSV reader of
`data.classify`, the logits gather of `infer.classify`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset

from build_llm.data.classify import read_labeled_csv
from build_llm.errors import UsageError
from build_llm.infer.classify import last_token_logits
from build_llm.store.finetuned import prepare_classifier

__all__ = ["SpamDataset", "calc_accuracy_loader", "calc_loss_batch", "calc_loss_loader", "evaluate_model",
           "train_classifier_simple", "classify_review", "prepare_classifier", "create_balanced_dataset",
           "random_split"]


class SpamDataset(Dataset):
    """Texts of a CSV file (columns "Text" and "Label", integer labels) encoded, cut to `max_length`
    (default: the longest text) and padded to it with `pad_token_id`."""

    def __init__(self, csv_file: Any, tokenizer: Any, max_length: int | None = None, pad_token_id: int = 50256,
                 *, text_column: str = "Text", label_column: str = "Label") -> None:
        texts, labels = read_labeled_csv(csv_file, text_column, label_column)
        try:
            self.labels = [int(label) for label in labels]
        except ValueError as e:
            raise UsageError(f"{label_column!r} in {str(csv_file)!r} must hold integer class ids ({e})") from None
        self.encoded_texts = [tokenizer.encode(text) for text in texts]
        if max_length is None:
            self.max_length = self._longest_encoded_length()
        else:
            self.max_length = max_length
            self.encoded_texts = [ids[:max_length] for ids in self.encoded_texts]
        self.encoded_texts = [ids + [pad_token_id] * (self.max_length - len(ids)) for ids in self.encoded_texts]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.tensor(self.encoded_texts[index], dtype=torch.long),
                torch.tensor(self.labels[index], dtype=torch.long))

    def __len__(self) -> int:
        return len(self.encoded_texts)

    def _longest_encoded_length(self) -> int:
        return max(len(ids) for ids in self.encoded_texts)


def _last_position_logits(model: nn.Module, input_batch: torch.Tensor) -> torch.Tensor:
    lengths = torch.full((input_batch.shape[0],), input_batch.shape[1])
    return last_token_logits(model, input_batch, lengths)  # the last position, as the book reads it


def calc_loss_batch(input_batch: torch.Tensor, target_batch: torch.Tensor, model: nn.Module, device: Any) -> torch.Tensor:
    """Cross-entropy of the last position's logits against the class labels."""
    input_batch, target_batch = input_batch.to(device), target_batch.to(device)
    return F.cross_entropy(_last_position_logits(model, input_batch), target_batch)


def calc_loss_loader(data_loader, model: nn.Module, device: Any, num_batches: int | None = None) -> float:
    """Mean of calc_loss_batch over the first `num_batches` batches (all by default); nan if empty."""
    if len(data_loader) == 0:
        return float("nan")
    num_batches = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))
    total = 0.0
    for i, (input_batch, target_batch) in enumerate(data_loader):
        if i >= num_batches:
            break
        total += calc_loss_batch(input_batch, target_batch, model, device).item()
    return total / num_batches


def calc_accuracy_loader(data_loader, model: nn.Module, device: Any, num_batches: int | None = None) -> float:
    """Share of correct argmax predictions (last position) over the first `num_batches` batches.
    Puts the model in eval mode, as the book's function does."""
    model.eval()
    correct, seen = 0, 0
    num_batches = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))
    for i, (input_batch, target_batch) in enumerate(data_loader):
        if i >= num_batches:
            break
        input_batch, target_batch = input_batch.to(device), target_batch.to(device)
        with torch.no_grad():
            predicted = torch.argmax(_last_position_logits(model, input_batch), dim=-1)
        seen += predicted.shape[0]
        correct += int((predicted == target_batch).sum())
    return correct / seen


def evaluate_model(model: nn.Module, train_loader, val_loader, device: Any, eval_iter: int) -> tuple[float, float]:
    model.eval()
    with torch.no_grad():
        train_loss = calc_loss_loader(train_loader, model, device, num_batches=eval_iter)
        val_loss = calc_loss_loader(val_loader, model, device, num_batches=eval_iter)
    model.train()
    return train_loss, val_loss


def train_classifier_simple(model: nn.Module, train_loader, val_loader, optimizer, device: Any, num_epochs: int,
                            eval_freq: int, eval_iter: int):
    """The book's loop: returns (train_losses, val_losses, train_accs, val_accs, examples_seen)."""
    train_losses, val_losses, train_accs, val_accs = [], [], [], []
    examples_seen, global_step = 0, -1
    for epoch in range(num_epochs):
        model.train()
        for input_batch, target_batch in train_loader:
            optimizer.zero_grad()
            loss = calc_loss_batch(input_batch, target_batch, model, device)
            loss.backward()
            optimizer.step()
            examples_seen += input_batch.shape[0]
            global_step += 1
            if global_step % eval_freq == 0:
                train_loss, val_loss = evaluate_model(model, train_loader, val_loader, device, eval_iter)
                train_losses.append(train_loss)
                val_losses.append(val_loss)
                print(f"Ep {epoch + 1} (Step {global_step:06d}): Train loss {train_loss:.3f}, Val loss {val_loss:.3f}")
        train_accuracy = calc_accuracy_loader(train_loader, model, device, num_batches=eval_iter)
        val_accuracy = calc_accuracy_loader(val_loader, model, device, num_batches=eval_iter)
        print(f"Training accuracy: {train_accuracy * 100:.2f}% | Validation accuracy: {val_accuracy * 100:.2f}%")
        train_accs.append(train_accuracy)
        val_accs.append(val_accuracy)
    return train_losses, val_losses, train_accs, val_accs, examples_seen


def classify_review(text: str, model: nn.Module, tokenizer: Any, device: Any, max_length: int | None = None,
                    pad_token_id: int = 50256) -> str:
    """"spam" or "not spam" for `text`, encoded, cut and padded as SpamDataset does."""
    model.eval()
    input_ids = tokenizer.encode(text)
    supported_context_length = model.pos_emb.weight.shape[0]
    limit = supported_context_length if max_length is None else min(max_length, supported_context_length)
    input_ids = input_ids[:limit]
    if max_length is not None:
        input_ids += [pad_token_id] * (limit - len(input_ids))
    input_tensor = torch.tensor(input_ids, device=device).unsqueeze(0)
    with torch.no_grad():
        predicted_label = torch.argmax(_last_position_logits(model, input_tensor), dim=-1).item()
    return "spam" if predicted_label == 1 else "not spam"


def create_balanced_dataset(df):
    """A pandas DataFrame with as many "ham" rows (sampled, random_state=123) as "spam" rows."""
    num_spam = df[df["Label"] == "spam"].shape[0]
    ham_subset = df[df["Label"] == "ham"].sample(num_spam, random_state=123)
    import pandas as pd  # optional: only the book's DataFrame helpers need it, and `df` is one already

    return pd.concat([ham_subset, df[df["Label"] == "spam"]])


def random_split(df, train_frac: float, validation_frac: float):
    """Shuffle (random_state=123) and cut a DataFrame into train, validation and test parts."""
    df = df.sample(frac=1, random_state=123).reset_index(drop=True)
    train_end = int(len(df) * train_frac)
    validation_end = train_end + int(len(df) * validation_frac)
    return df[:train_end], df[train_end:validation_end], df[validation_end:]

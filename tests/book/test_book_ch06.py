"""The book's chapter 6 (classification fine-tuning) with build_llm imports."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from build_llm import GPTModel, get_tokenizer
from build_llm.book.ch06 import (SpamDataset, calc_accuracy_loader, calc_loss_batch, calc_loss_loader,
                                 classify_review)

CFG = {"vocab_size": 50257, "context_length": 32, "emb_dim": 16, "n_heads": 2, "n_layers": 1,
       "drop_rate": 0.0, "qkv_bias": True}


def classifier(seed=123):
    torch.manual_seed(seed)
    model = GPTModel(CFG)
    model.out_head = torch.nn.Linear(16, 2)
    return model.eval()


def test_the_books_shapes():
    tokenizer = get_tokenizer("gpt2")
    inputs = torch.tensor(tokenizer.encode("Do you have time")).unsqueeze(0)
    assert inputs.tolist() == [[5211, 345, 423, 640]] and inputs.shape == (1, 4)  # as printed in the book
    with torch.no_grad():
        outputs = classifier()(inputs)
    assert outputs.shape == (1, 4, 2)


def test_spam_dataset_pads_to_the_longest_and_cuts_to_max_length(tmp_path):
    csv = tmp_path / "train.csv"
    csv.write_text("Label,Text\n0,Hello there\n1,WIN a free prize now call\n")
    tokenizer = get_tokenizer("gpt2")
    data = SpamDataset(csv, tokenizer)
    n = len(tokenizer.encode("WIN a free prize now call"))
    assert data.max_length == n and len(data) == 2
    x, y = data[0]
    assert x.tolist() == tokenizer.encode("Hello there") + [50256] * (n - 2) and y.item() == 0
    short = SpamDataset(csv, tokenizer, max_length=3)
    assert short[1][0].tolist() == tokenizer.encode("WIN a free prize now call")[:3]


def test_loss_and_accuracy_read_the_last_position(tmp_path):
    model = classifier()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 50257, (4, 6), generator=g), torch.randint(0, 2, (4,), generator=g)) for _ in range(3)]
    with torch.no_grad():
        last = [model(x)[:, -1, :] for x, _ in batches]
    expected_loss = torch.nn.functional.cross_entropy(last[0], batches[0][1])
    torch.testing.assert_close(calc_loss_batch(*batches[0], model, "cpu"), expected_loss)
    correct = sum(int((logits.argmax(-1) == y).sum()) for logits, (_, y) in zip(last, batches))
    assert calc_accuracy_loader(batches, model, "cpu") == correct / 12
    assert calc_accuracy_loader(batches, model, "cpu", num_batches=1) == int((last[0].argmax(-1) == batches[0][1]).sum()) / 4
    assert calc_loss_loader(batches, model, "cpu") == sum(
        torch.nn.functional.cross_entropy(lg, y).item() for lg, (_, y) in zip(last, batches)) / 3
    assert str(calc_loss_loader(DataLoader([]), model, "cpu")) == "nan"


def test_classify_review_pads_like_the_dataset():
    model = classifier()
    tokenizer = get_tokenizer("gpt2")
    text = "You are a winner you have been specially selected to receive $1000 cash"
    ids = tokenizer.encode(text)[:20]
    ids += [50256] * (20 - len(ids))
    with torch.no_grad():
        label = model(torch.tensor([ids]))[:, -1, :].argmax(-1).item()
    assert classify_review(text, model, tokenizer, "cpu", max_length=20) == ("spam" if label == 1 else "not spam")

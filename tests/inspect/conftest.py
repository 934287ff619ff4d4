"""Fixtures of the inspection tests: a small trained ABC checkpoint, trained once per run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from build_llm import CharTokenizer, GPTConfig, GPTModel, load_checkpoint, save_checkpoint, set_seed
from build_llm.data.markov import ABC, abc_text

ABC_VOCAB = ["<PAD>", *ABC.alphabet]


def train_abc(steps: int = 120, seed: int = 0) -> tuple[GPTModel, CharTokenizer]:
    """The R notebook's model (preset r-abc) trained on ABC text with its loop: random windows, AdamW."""
    set_seed(seed)
    tokenizer = CharTokenizer(ABC_VOCAB)
    data = torch.tensor(tokenizer.encode(abc_text(3000, seed=seed)))
    model = GPTModel(GPTConfig.from_preset("r-abc"))
    ctx = model.cfg.context_length
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(data) - ctx - 1, (32,))
        window = data[starts[:, None] + torch.arange(ctx + 1)]  # (B, ctx + 1)
        logits = model(window[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), window[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), tokenizer


@pytest.fixture(scope="session")
def abc_checkpoint(tmp_path_factory) -> Path:
    """A checkpoint directory of the trained ABC model (shared by every test module of the run)."""
    path = tmp_path_factory.mktemp("abc") / "checkpoint"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is faster, and far faster on a busy machine
    try:
        model, tokenizer = train_abc()
    finally:
        torch.set_num_threads(threads)
    save_checkpoint(path, model, tokenizer)
    return path


@pytest.fixture(scope="module")
def abc(abc_checkpoint):
    """(model, tokenizer) of the ABC checkpoint, shared by a module's tests that only read it
    (test_doctor's tests change the model and take a fresh copy with their own `abc`)."""
    ckpt = load_checkpoint(abc_checkpoint)
    return ckpt.model, ckpt.tokenizer

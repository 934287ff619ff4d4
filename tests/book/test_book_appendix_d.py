"""Appendix D: the book's learning-rate schedule (its numbers are exact maths), `train_model`'s
warm-up, cosine decay and clipping, and `find_highest_gradient`."""

import math

import pytest
import torch

import build_llm
from build_llm.book.appendix_d import book_lr, find_highest_gradient, train_model
from build_llm.book.ch02 import create_dataloader_v1

pytestmark = pytest.mark.usefixtures("one_thread")

# The appendix trains on 9 batches for 15 epochs and takes 20% of the steps for warm-up; it prints 27.
N_BATCHES, N_EPOCHS = 9, 15
TOTAL = N_BATCHES * N_EPOCHS
WARMUP = int(0.2 * TOTAL)


def test_warmup_steps_are_the_books_27():
    assert WARMUP == 27


def test_schedule_of_sections_d1_and_d2():
    # D.1/D.2: initial_lr 0.0001 rising to peak_lr 0.01, then cosine down to min_lr = 0.1 * initial_lr.
    lrs = [book_lr(s, WARMUP, TOTAL, 1e-4, 0.01, 1e-5) for s in range(TOTAL)]
    increment = (0.01 - 1e-4) / 27
    assert lrs[:27] == pytest.approx([1e-4 + s * increment for s in range(27)], rel=1e-12)
    assert lrs[27] == pytest.approx(0.01, rel=1e-12)  # the peak, the first step after warm-up
    assert lrs[27 + 54] == pytest.approx(1e-5 + (0.01 - 1e-5) * 0.5, rel=1e-12)  # half-way down
    assert lrs[-1] == pytest.approx(1e-5 + (0.01 - 1e-5) * 0.5 * (1 + math.cos(math.pi * 107 / 108)), rel=1e-12)
    assert all(a < b for a, b in zip(lrs[:28], lrs[1:28])) and all(a > b for a, b in zip(lrs[27:], lrs[28:]))


TEXT = "Every effort moves you forward, and every step counts. " * 4


def loaders(tokenizer):
    torch.manual_seed(123)
    train = create_dataloader_v1(TEXT[:153], batch_size=2, max_length=8, stride=8, shuffle=True, drop_last=True,
                                 tokenizer=tokenizer)
    val = create_dataloader_v1(TEXT[153:], batch_size=2, max_length=8, stride=8, shuffle=False, drop_last=False,
                               tokenizer=tokenizer)
    return train, val


def test_train_model_warms_up_decays_and_clips_after_warmup(monkeypatch, capsys):
    tok = build_llm.CharTokenizer.from_text(TEXT)
    train_loader, val_loader = loaders(tok)
    assert len(train_loader) == N_BATCHES
    torch.manual_seed(123)
    model = build_llm.GPTModel({"vocab_size": tok.vocab_size, "context_length": 8, "emb_dim": 16, "n_heads": 2,
                                "n_layers": 1, "drop_rate": 0.1, "qkv_bias": False})
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.001, weight_decay=0.1)  # the appendix's peak_lr

    steps_done, lrs_at_step, clipped_at = [0], [], []
    original_step, original_clip = optimizer.step, torch.nn.utils.clip_grad_norm_

    def step(*args, **kwargs):
        lrs_at_step.append(optimizer.param_groups[0]["lr"])
        steps_done[0] += 1
        return original_step(*args, **kwargs)

    def clip(*args, **kwargs):
        clipped_at.append(steps_done[0])
        return original_clip(*args, **kwargs)

    monkeypatch.setattr(optimizer, "step", step)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    train_losses, val_losses, tokens_seen, lrs = train_model(
        model, train_loader, val_loader, optimizer, "cpu", n_epochs=N_EPOCHS, eval_freq=5, eval_iter=1,
        start_context="Every effort", tokenizer=tok, warmup_steps=WARMUP, initial_lr=1e-5, min_lr=1e-5)

    assert lrs == [book_lr(s, WARMUP, TOTAL, 1e-5, 0.001, 1e-5) for s in range(TOTAL)]
    assert lrs_at_step == lrs  # every step ran at the scheduled rate
    assert lrs[0] == 1e-5 and lrs[27] == pytest.approx(0.001)
    assert lrs[-1] == pytest.approx(1e-5 + 0.5 * (0.001 - 1e-5) * (1 + math.cos(math.pi * 107 / 108)))
    assert clipped_at == list(range(WARMUP, TOTAL))  # clipping from the first step after warm-up
    assert len(train_losses) == len(val_losses) == len(tokens_seen) == 27  # steps 0, 5, ..., 130
    assert tokens_seen == [(s + 1) * 16 for s in range(0, TOTAL, 5)]
    assert train_losses[-1] < train_losses[0]
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("Ep 1 (Step 000000): Train loss ") and ", Val loss " in lines[0]
    assert sum(line.startswith("Ep ") for line in lines) == 27
    assert sum(line.startswith("Every effort") for line in lines) == N_EPOCHS  # one sample per epoch


def test_train_model_checks_its_counts():
    with pytest.raises(ValueError, match="warmup_steps=-1"):
        train_model(None, [], [], None, "cpu", 1, 1, 1, "", None, warmup_steps=-1)


def test_find_highest_gradient():
    layer = torch.nn.Linear(2, 2)
    assert find_highest_gradient(layer) is None  # no backward yet
    layer.weight.grad = torch.tensor([[1.0, -5.0], [0.5, 2.0]])
    layer.bias.grad = torch.tensor([3.0, -1.0])
    assert find_highest_gradient(layer).item() == 3.0  # the largest value, signed, as in the book

"""Appendix D, adding bells and whistles to the training loop: linear warm-up, cosine decay and
gradient clipping, in the book's `train_model`.

The schedule is the book's: from `initial_lr`, the learning rate rises by a constant increment
each step until `warmup_steps`, then follows a half cosine from the optimizer's learning rate
(the peak) down to `min_lr` at the last step. `book_lr` is that arithmetic alone, so the
appendix's schedule figures can be redrawn without training:

    lrs = [book_lr(s, warmup_steps=27, total_steps=135, initial_lr=1e-4, peak_lr=0.01, min_lr=1e-5)
           for s in range(135)]
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..errors import UsageError
from ..train import calc_loss_batch, evaluate_model, generate_and_print_sample

__all__ = ["book_lr", "train_model", "find_highest_gradient"]


def book_lr(global_step: int, warmup_steps: int, total_steps: int, initial_lr: float, peak_lr: float,
            min_lr: float) -> float:
    """Learning rate at 0-based `global_step`: linear warm-up from `initial_lr` (reaching `peak_lr`
    at `warmup_steps`), then cosine decay to `min_lr` at `total_steps`."""
    if global_step < warmup_steps:
        return initial_lr + global_step * (peak_lr - initial_lr) / warmup_steps
    progress = (global_step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def train_model(model: nn.Module, train_loader, val_loader, optimizer: torch.optim.Optimizer, device,
                n_epochs: int, eval_freq: int, eval_iter: int, start_context: str, tokenizer,
                warmup_steps: int, initial_lr: float = 3e-05, min_lr: float = 1e-6):
    """The book's `train_model_simple` plus the schedule above (the peak is the optimizer's
    learning rate when called) and gradient-norm clipping at 1.0 once warm-up is over.

    Clipping starts at step `warmup_steps`, the first step after warm-up, as in the book's code
    repository; the printed book's `global_step > warmup_steps` skipped that one step.
    Returns (train_losses, val_losses, track_tokens_seen, track_lrs).
    """
    for name, value, low in (("n_epochs", n_epochs, 1), ("eval_freq", eval_freq, 1), ("warmup_steps", warmup_steps, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise UsageError(f"{name}={value!r} is invalid; expected an integer >= {low}")
    train_losses, val_losses, track_tokens_seen, track_lrs = [], [], [], []
    tokens_seen, global_step = 0, -1
    peak_lr = optimizer.param_groups[0]["lr"]
    total_training_steps = len(train_loader) * n_epochs

    for epoch in range(n_epochs):
        model.train()
        for input_batch, target_batch in train_loader:
            optimizer.zero_grad()
            global_step += 1
            lr = book_lr(global_step, warmup_steps, total_training_steps, initial_lr, peak_lr, min_lr)
            for param_group in optimizer.param_groups:
                param_group["lr"] = lr
            track_lrs.append(lr)

            loss = calc_loss_batch(input_batch, target_batch, model, device)
            loss.backward()
            if global_step >= warmup_steps:
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
            optimizer.step()
            tokens_seen += input_batch.numel()

            if global_step % eval_freq == 0:
                train_loss, val_loss = evaluate_model(model, train_loader, val_loader, device, eval_iter)
                train_losses.append(train_loss)
                val_losses.append(val_loss)
                track_tokens_seen.append(tokens_seen)
                print(f"Ep {epoch+1} (Iter {global_step:06d}): Train loss {train_loss:.3f}, Val loss {val_loss:.3f}")

        generate_and_print_sample(model, tokenizer, device, start_context)

    return train_losses, val_losses, track_tokens_seen, track_lrs


def find_highest_gradient(model: nn.Module) -> torch.Tensor | None:
    """The largest gradient value (signed, as in the book) over all parameters; None before any backward."""
    max_grad = None
    for param in model.parameters():
        if param.grad is not None:
            grad_max = param.grad.detach().max()
            if max_grad is None or grad_max > max_grad:
                max_grad = grad_max
    return max_grad

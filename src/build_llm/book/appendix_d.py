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

from build_llm.errors import UsageError
from build_llm.book.ch05 import train_model_simple

__all__ = ["book_lr", "train_model", "find_highest_gradient"]


def book_lr(global_step: int, warmup_steps: int, total_steps: int, initial_lr: float, peak_lr: float,
            min_lr: float) -> float:
    """Learning rate at 0-based `global_step`: linear warm-up from `initial_lr` (reaching `peak_lr`
    at `warmup_steps`), then cosine decay to `min_lr` at `total_steps`."""
    if global_step < warmup_steps:
        return initial_lr + global_step * (peak_lr - initial_lr) / warmup_steps
    progress = (global_step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


class _ScheduledOptimizer:
    """The optimizer as `train_model_simple` drives it, with the appendix's additions: zero_grad
    starts a step and sets its learning rate, step clips the gradient norm once warm-up is over."""

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module, warmup_steps: int, total_steps: int,
                 initial_lr: float, min_lr: float) -> None:
        self.optimizer, self.model = optimizer, model
        self.schedule = dict(warmup_steps=warmup_steps, total_steps=total_steps, initial_lr=initial_lr,
                             peak_lr=optimizer.param_groups[0]["lr"], min_lr=min_lr)
        self.global_step, self.track_lrs = -1, []

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)
        self.global_step += 1
        lr = book_lr(self.global_step, **self.schedule)
        for param_group in self.optimizer.param_groups:
            param_group["lr"] = lr
        self.track_lrs.append(lr)

    def step(self) -> None:
        if self.global_step >= self.schedule["warmup_steps"]:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm=1.0)
        self.optimizer.step()


def train_model(model: nn.Module, train_loader, val_loader, optimizer: torch.optim.Optimizer, device,
                n_epochs: int, eval_freq: int, eval_iter: int, start_context: str, tokenizer,
                warmup_steps: int, initial_lr: float = 3e-05, min_lr: float = 1e-6):
    """The book's `train_model_simple` (chapter 5's, so it prints its "Ep 1 (Step 000000)"
    lines where the appendix prints "Iter") plus the schedule above, whose peak is the optimizer's
    learning rate when called, and gradient-norm clipping at 1.0 once warm-up is over.

    Clipping starts at step `warmup_steps`, the first step after warm-up, as in the book's code
    repository; the printed book's `global_step > warmup_steps` skipped that one step.
    Returns (train_losses, val_losses, track_tokens_seen, track_lrs).
    """
    for name, value, low in (("n_epochs", n_epochs, 1), ("eval_freq", eval_freq, 1), ("warmup_steps", warmup_steps, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise UsageError(f"{name}={value!r} is invalid; expected an integer >= {low}")
    scheduled = _ScheduledOptimizer(optimizer, model, warmup_steps, len(train_loader) * n_epochs, initial_lr, min_lr)
    train_losses, val_losses, track_tokens_seen = train_model_simple(
        model, train_loader, val_loader, scheduled, device, n_epochs, eval_freq, eval_iter, start_context, tokenizer)
    return train_losses, val_losses, track_tokens_seen, scheduled.track_lrs


def find_highest_gradient(model: nn.Module) -> torch.Tensor | None:
    """The largest gradient value (signed, as in the book) over all parameters; None before any backward."""
    max_grad = None
    for param in model.parameters():
        if param.grad is not None:
            grad_max = param.grad.detach().max()
            if max_grad is None or grad_max > max_grad:
                max_grad = grad_max
    return max_grad

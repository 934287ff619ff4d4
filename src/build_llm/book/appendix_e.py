"""Appendix E of the book: parameter-efficient fine-tuning with LoRA, under the book's names.

The book scales the low-rank update by `alpha` itself; `build_llm.lora` (which these build on) uses
alpha / rank by default. The layers here keep the book's convention, so the book's code and numbers
carry over unchanged: with rank 16 and alpha 16, GPT-2 small's classifier has 2,666,528 LoRA
parameters.
"""

from __future__ import annotations

import torch.nn as nn

from build_llm import lora as _lora

__all__ = ["LoRALayer", "LinearWithLoRA", "replace_linear_with_lora"]


class LoRALayer(_lora.LoRALayer):
    """alpha * (x @ A @ B), A (in_dim, rank) Kaiming-uniform, B (rank, out_dim) zeros."""

    def __init__(self, in_dim: int, out_dim: int, rank: int, alpha: float) -> None:
        super().__init__(in_dim, out_dim, rank, alpha, scaling=alpha)


class LinearWithLoRA(_lora.LinearWithLoRA):
    """linear(x) + LoRALayer(x), the book's scaling."""

    def __init__(self, linear: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__(linear, rank, alpha, scaling=alpha)


def replace_linear_with_lora(model: nn.Module, rank: int, alpha: float) -> None:
    """Wrap every nn.Linear in `model` (recursively, the output head included) in LinearWithLoRA."""
    for name, module in model.named_children():
        if isinstance(module, nn.Linear):
            setattr(model, name, LinearWithLoRA(module, rank, alpha))
        else:
            replace_linear_with_lora(module, rank, alpha)

"""GELU, in the tanh approximation (GPT-2 and the book) or exact (erf; PyTorch's and R's default)."""

import torch
import torch.nn as nn
import torch.nn.functional as F

from build_llm.config import GELU_KINDS
from build_llm.errors import UsageError


class GELU(nn.Module):
    """x * Phi(x); `approximate="tanh"` is 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""

    def __init__(self, approximate: str = "tanh") -> None:
        super().__init__()
        if approximate not in GELU_KINDS:
            raise UsageError(f"GELU: approximate={approximate!r} is invalid; expected one of {GELU_KINDS}")
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate="tanh" if self.approximate == "tanh" else "none")


class ReLUSquared(nn.Module):
    """max(x, 0)^2 (Primer; modded-nanogpt's MLP): cheaper than GELU and sparser."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x).square()

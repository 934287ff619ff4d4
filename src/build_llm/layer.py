"""LayerNorm with the book's parameter names (`scale`, `shift`)."""

import torch
import torch.nn as nn
import torch.nn.functional as F

from build_llm.errors import UsageError


class LayerNorm(nn.Module):
    """Normalise the last dimension to zero mean and unit (biased) variance, then scale and shift.

    The book writes the formula out; `F.layer_norm` computes the same thing in one fused kernel.
    """

    def __init__(self, emb_dim: int, eps: float = 1e-5, bias: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.scale.shape, self.scale, self.shift, self.eps)


class RMSNorm(nn.Module):
    """Divide the last dimension by its root mean square, then scale (Llama's norm: no mean, no shift).

    `shift` is None so code that reads a norm's shift treats it as a LayerNorm without bias.
    `plus_one` (Gemma): multiply by 1 + scale, the scale starting at zero, as Gemma's weights are stored.
    """

    shift = None

    def __init__(self, emb_dim: int, eps: float = 1e-5, plus_one: bool = False) -> None:
        super().__init__()
        self.eps, self.plus_one = eps, plus_one
        self.scale = nn.Parameter(torch.zeros(emb_dim) if plus_one else torch.ones(emb_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.scale.shape, self.scale + 1 if self.plus_one else self.scale, self.eps)


def make_norm(kind: str, emb_dim: int, eps: float = 1e-5, bias: bool = True, plus_one: bool = False) -> nn.Module:
    """The config's `norm`: "layernorm" (with a shift when `bias`) or "rmsnorm" (of 1 + scale when `plus_one`)."""
    if kind == "rmsnorm":
        return RMSNorm(emb_dim, eps, plus_one)
    if kind == "layernorm":
        return LayerNorm(emb_dim, eps, bias)
    raise UsageError(f"norm={kind!r} is invalid; expected 'layernorm' or 'rmsnorm'")

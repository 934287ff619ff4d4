"""Model sizing: parameter counts and tables, sizes in MB, and the bytes a model holds.

One home for the arithmetic that the CLI's `info`, the time budget, the memory checks and the
benchmark all need (training FLOPs and memory estimates live here too)."""

from __future__ import annotations

import torch
import torch.nn as nn

from build_llm.gpt import GPTModel
from build_llm.runtime import get_dtype


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters; a tied matrix counts once (as `model.parameters()` yields it once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def parameter_table(model: nn.Module) -> list[tuple[str, tuple[int, ...], int]]:
    """(name, shape, count) for each parameter, like the R notebook's listing."""
    return [(name, tuple(p.shape), p.numel()) for name, p in model.named_parameters()]


def format_parameter_table(model: nn.Module) -> str:
    rows = parameter_table(model)
    width = max(len(name) for name, _, _ in rows)
    lines = [f"{name:<{width}}  {' x '.join(map(str, shape)):>14}  {count:>13,}" for name, shape, count in rows]
    return "\n".join(lines)


def model_size_mb(model: nn.Module, dtype: torch.dtype | str = torch.float32) -> float:
    """Size of the parameters in MiB (1024 * 1024 bytes, as the seed computes it) at `dtype`."""
    if isinstance(dtype, str):
        dtype = get_dtype(dtype)
    return count_parameters(model) * torch.empty((), dtype=dtype).element_size() / (1024 * 1024)


def model_memory(cfg, dtype: torch.dtype = torch.float32) -> int:
    """Bytes a GPTModel of `cfg` holds: its parameters plus each block's causal-mask buffer."""
    with torch.device("meta"):
        model = GPTModel(cfg)
    params = sum(p.numel() for p in model.parameters()) * torch.empty(0, dtype=dtype).element_size()
    return params + sum(b.numel() * b.element_size() for b in model.buffers())

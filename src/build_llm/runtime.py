"""Where and how the model runs: seeding, device and dtype choice."""

from __future__ import annotations

import random

import numpy as np
import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def set_seed(seed: int = 42) -> None:
    """Seed Python, NumPy and PyTorch (CPU and every CUDA device)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed={seed!r} is invalid; expected an integer >= 0")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def get_device(name: str | None = None) -> torch.device:
    """The named device, or the best available one: cuda, then mps, then cpu."""
    if name not in (None, "auto"):
        try:
            device = torch.device(name)
        except RuntimeError as e:
            raise ValueError(f"device={name!r} is invalid; expected auto, cpu, cuda, cuda:N or mps") from e
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={name!r} is not available here: no CUDA device; use cpu")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise ValueError(f"device={name!r} is not available here; use cpu")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def get_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype={name!r} is invalid; expected one of {sorted(DTYPES)}")
    return DTYPES[name]

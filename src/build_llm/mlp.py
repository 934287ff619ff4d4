"""FeedForward: the position-wise MLP, emb_dim -> 4 * emb_dim -> emb_dim."""

from typing import Any, Mapping

import torch
import torch.nn as nn

from .activation import GELU
from .config import GPTConfig


class FeedForward(nn.Module):
    def __init__(self, cfg: GPTConfig | Mapping[str, Any]) -> None:
        super().__init__()
        cfg = GPTConfig.coerce(cfg)
        self.layers = nn.Sequential(
            nn.Linear(cfg.emb_dim, 4 * cfg.emb_dim, bias=cfg.bias),
            GELU(cfg.gelu),
            nn.Linear(4 * cfg.emb_dim, cfg.emb_dim, bias=cfg.bias),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)

"""FeedForward: the position-wise MLP, emb_dim -> hidden -> emb_dim.

The book's is Linear, GELU, Linear with hidden = 4 * emb_dim; `mlp="relu2"` swaps GELU for ReLU
squared; `mlp="swiglu"` is Llama's gated form, W_down(SiLU(W_gate x) * W_up x), and `mlp="geglu"`
Gemma's, with GELU (the config's `gelu` form) in place of SiLU.
"""

from typing import Any, Mapping

import torch
import torch.nn as nn

from build_llm.activation import GELU, ReLUSquared
from build_llm.config import GPTConfig


class FeedForward(nn.Module):
    def __init__(self, cfg: GPTConfig | Mapping[str, Any]) -> None:
        super().__init__()
        cfg = GPTConfig.coerce(cfg)
        hidden = cfg.ff_hidden
        self.gated = cfg.mlp in ("swiglu", "geglu")
        if self.gated:
            self.act = nn.SiLU() if cfg.mlp == "swiglu" else GELU(cfg.gelu)
            self.gate = nn.Linear(cfg.emb_dim, hidden, bias=cfg.bias)
            self.up = nn.Linear(cfg.emb_dim, hidden, bias=cfg.bias)
            self.down = nn.Linear(hidden, cfg.emb_dim, bias=cfg.bias)
        else:
            self.layers = nn.Sequential(
                nn.Linear(cfg.emb_dim, hidden, bias=cfg.bias),
                GELU(cfg.gelu) if cfg.mlp == "gelu" else ReLUSquared(),
                nn.Linear(hidden, cfg.emb_dim, bias=cfg.bias),
            )

    @property
    def out_proj(self) -> nn.Linear:
        """The projection that writes back into the residual stream."""
        return self.down if self.gated else self.layers[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.down(self.act(self.gate(x)) * self.up(x))  # (B, T, hidden) gated, then (B, T, C)
        return self.layers(x)

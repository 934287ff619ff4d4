"""TransformerBlock: pre-norm attention and feed-forward, each added back to the residual stream."""

from typing import Any, Mapping

import torch
import torch.nn as nn

from build_llm.attention import LayerKV, MultiHeadAttention
from build_llm.config import GPTConfig
from build_llm.layer import make_norm
from build_llm.mlp import FeedForward
from build_llm.moe import MoEFeedForward


class TransformerBlock(nn.Module):
    def __init__(self, cfg: GPTConfig | Mapping[str, Any]) -> None:
        super().__init__()
        cfg = GPTConfig.coerce(cfg)
        # Creation order is the book's: the seed's random initialisation depends on it.
        self.att = MultiHeadAttention(
            d_in=cfg.emb_dim, d_out=cfg.emb_dim, context_length=cfg.context_length,
            dropout=cfg.drop_rate, num_heads=cfg.n_heads, qkv_bias=cfg.qkv_bias,
            fused_qkv=cfg.fused_qkv, out_bias=cfg.bias, impl=cfg.attn_impl,
            rope_base=cfg.rope_base if cfg.pos_emb == "rope" else None, qk_norm=cfg.qk_norm, norm_eps=cfg.ln_eps,
        )
        self.ff = MoEFeedForward(cfg) if cfg.n_experts else FeedForward(cfg)
        self.norm1 = make_norm(cfg.norm, cfg.emb_dim, eps=cfg.ln_eps, bias=cfg.bias)
        self.norm2 = make_norm(cfg.norm, cfg.emb_dim, eps=cfg.ln_eps, bias=cfg.bias)
        self.drop_shortcut = nn.Dropout(cfg.drop_rate)
        self.attn_out_dropout = cfg.attn_out_dropout

    def forward(self, x: torch.Tensor, cache: LayerKV | None = None) -> torch.Tensor:
        shortcut = x
        x = self.att(self.norm1(x), cache)
        if self.attn_out_dropout:
            x = self.drop_shortcut(x)
        x = x + shortcut

        shortcut = x
        x = self.drop_shortcut(self.ff(self.norm2(x)))
        return x + shortcut

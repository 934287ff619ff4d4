"""TransformerBlock: pre-norm attention and feed-forward, each added back to the residual stream.

With `post_norms` (Gemma 3) each sub-layer's output is normalised again before the add."""

from typing import Any, Mapping

import torch
import torch.nn as nn

from build_llm.attention import LayerKV, MultiHeadAttention, Rotary
from build_llm.config import GPTConfig
from build_llm.layer import make_norm
from build_llm.mlp import FeedForward
from build_llm.moe import MoEFeedForward


def layer_rotary(cfg: GPTConfig, layer: int) -> Rotary | None:
    """Layer `layer`'s rotary positions: the global base and scaling, or for a sliding layer of a
    model with its own local base (Gemma 3), that base unscaled; None for a learned position table."""
    if cfg.pos_emb != "rope":
        return None
    if cfg.types_of_layers[layer] == "sliding" and cfg.rope_local_base is not None:
        return Rotary(cfg.rope_local_base)
    return Rotary(cfg.rope_base, cfg.rope_scaling, cfg.rope_factor, cfg.rope_low_freq_factor,
                  cfg.rope_high_freq_factor, cfg.rope_original_context)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: GPTConfig | Mapping[str, Any], layer: int = 0) -> None:
        super().__init__()
        cfg = GPTConfig.coerce(cfg)
        sliding = cfg.types_of_layers[layer] == "sliding"
        # Creation order is the book's: the seed's random initialisation depends on it.
        self.att = MultiHeadAttention(
            d_in=cfg.emb_dim, d_out=cfg.emb_dim, context_length=cfg.context_length,
            dropout=cfg.drop_rate, num_heads=cfg.n_heads, qkv_bias=cfg.qkv_bias,
            fused_qkv=cfg.fused_qkv, out_bias=cfg.bias, impl=cfg.attn_impl, rope=layer_rotary(cfg, layer),
            qk_norm=cfg.qk_norm, norm_eps=cfg.ln_eps, num_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_size,
            window=cfg.sliding_window if sliding else None, scale=cfg.attn_scale, norm_plus_one=cfg.norm_plus_one,
        )
        self.ff = MoEFeedForward(cfg) if cfg.n_experts else FeedForward(cfg)
        norm = dict(kind=cfg.norm, emb_dim=cfg.emb_dim, eps=cfg.ln_eps, bias=cfg.bias, plus_one=cfg.norm_plus_one)
        self.norm1 = make_norm(**norm)
        self.norm2 = make_norm(**norm)
        self.post_norm1 = make_norm(**norm) if cfg.post_norms else nn.Identity()
        self.post_norm2 = make_norm(**norm) if cfg.post_norms else nn.Identity()
        self.drop_shortcut = nn.Dropout(cfg.drop_rate)
        self.attn_out_dropout = cfg.attn_out_dropout

    def forward(self, x: torch.Tensor, cache: LayerKV | None = None) -> torch.Tensor:
        shortcut = x
        x = self.post_norm1(self.att(self.norm1(x), cache))
        if self.attn_out_dropout:
            x = self.drop_shortcut(x)
        x = x + shortcut

        shortcut = x
        x = self.drop_shortcut(self.post_norm2(self.ff(self.norm2(x))))
        return x + shortcut

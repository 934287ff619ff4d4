"""Causal multi-head self-attention, with a preallocated key/value cache for decoding.

Two paths compute the same function: the book's explicit one (scores, causal mask, softmax,
dropout on the weights, weighted sum) and PyTorch's fused `scaled_dot_product_attention`, which
never materialises the T x T weights. "auto" takes the fused path except when dropout on the
weights is active, because the fused kernel draws its dropout mask differently and the seed's
training-mode numbers are those of the explicit path.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from build_llm.config import ATTN_IMPLS
from build_llm.errors import UsageError
from build_llm.layer import RMSNorm


def rotary(x: torch.Tensor, start: int | torch.Tensor, base: float) -> torch.Tensor:
    """Rotary positions for x (B, nh, T, hs) at positions start..start+T-1 (`start` an int, or per-row
    starts (B,)): each pair (x_i, x_{i+hs/2}) turns by the angle position * base^(-2i/hs), so a
    query-key dot product depends on their distance only. The rotate-half pairing is Llama's (Hugging
    Face's layout), so its weights load unchanged."""
    hs, num_tokens = x.shape[-1], x.shape[-2]
    inv_freq = 1.0 / base ** (torch.arange(0, hs, 2, device=x.device, dtype=torch.float32) / hs)  # (hs/2,)
    positions = torch.arange(num_tokens, device=x.device, dtype=torch.float32)
    if isinstance(start, torch.Tensor):
        positions = (positions + start.to(x.device, torch.float32)[:, None])[:, None, :, None]  # (B, 1, T, 1)
    else:
        positions = (positions + start)[:, None]  # (T, 1)
    angles = positions * inv_freq  # (T, hs/2) or (B, 1, T, hs/2)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., :hs // 2], x[..., hs // 2:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)  # (B, nh, T, hs)


class KVCache:
    """Keys and values of every layer for up to `max_len` positions, allocated once.

    `pos` is the number of positions already written; the model advances it after each forward.
    It may also be a LongTensor (B,) of per-row positions, for batching sequences of different
    lengths (the server's continuous batching): each row's new tokens go at its own position.
    """

    def __init__(self, n_layers: int, batch_size: int, n_heads: int, max_len: int, head_dim: int,
                 *, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> None:
        shape = (n_layers, batch_size, n_heads, max_len, head_dim)
        # Zeros, not empty: with per-row positions a short row's masked slots still enter the
        # weighted sum (with weight 0), and 0 * NaN from uninitialised memory would be NaN.
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.pos: int | torch.Tensor = 0

    @classmethod
    def over(cls, k: torch.Tensor, v: torch.Tensor, pos: int | torch.Tensor) -> "KVCache":
        """A cache over existing (n_layers, B, nh, max_len, hs) buffers, e.g. some rows of a larger one."""
        cache = cls.__new__(cls)
        cache.k, cache.v, cache.max_len, cache.pos = k, v, k.shape[3], pos
        return cache

    def layer(self, i: int) -> "LayerKV":
        return LayerKV(self.k[i], self.v[i], self.pos)


class LayerKV:
    """One layer's view of a KVCache: (B, nh, max_len, hs) buffers and the write position."""

    __slots__ = ("k", "v", "pos")

    def __init__(self, k: torch.Tensor, v: torch.Tensor, pos: int) -> None:
        self.k, self.v, self.pos = k, v, pos


class MultiHeadAttention(nn.Module):
    def __init__(self, d_in: int, d_out: int, context_length: int, dropout: float, num_heads: int,
                 qkv_bias: bool = False, *, fused_qkv: bool = False, out_bias: bool = True,
                 impl: str = "auto", rope_base: float | None = None, qk_norm: bool = False,
                 norm_eps: float = 1e-5) -> None:
        super().__init__()
        if d_out % num_heads:
            raise UsageError(f"MultiHeadAttention: d_out={d_out} is not divisible by num_heads={num_heads}")
        if impl not in ATTN_IMPLS:
            raise UsageError(f"MultiHeadAttention: impl={impl!r} is invalid; expected one of {ATTN_IMPLS}")
        self.d_out, self.num_heads, self.head_dim = d_out, num_heads, d_out // num_heads
        self.impl = impl
        self.fused_qkv = fused_qkv
        if fused_qkv:
            self.W_qkv = nn.Linear(d_in, 3 * d_out, bias=qkv_bias)
        else:  # the book's three projections, created in its order (the seed's numbers depend on it)
            self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
            self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
            self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out, bias=out_bias)
        self.dropout = nn.Dropout(dropout)
        self.rope_base = rope_base  # None: no rotary positions (the model adds a position table instead)
        if qk_norm:
            self.q_norm = RMSNorm(self.head_dim, norm_eps)
            self.k_norm = RMSNorm(self.head_dim, norm_eps)
        self.qk_norm = qk_norm
        # True above the diagonal: position i may not look at j > i. Not saved with the weights.
        self.register_buffer("mask", torch.triu(torch.ones(context_length, context_length, dtype=torch.bool),
                                                diagonal=1), persistent=False)

    # The book registers its mask as a saved buffer, so a book `model.state_dict()` carries
    # `trf_blocks.N.att.mask` and a book model loads strictly only a state dict that has it. To load
    # either way with strict=True, state_dict() reports the mask under that key (the buffer itself,
    # no copy; checkpoints leave it out) and loading takes a given mask only after checking that it
    # is this layer's causal mask, whatever its dtype (the book's is float 0/1).
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "mask"] = self.mask if keep_vars else self.mask.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        given = state_dict.pop(prefix + "mask", None)
        n = self.mask.shape[0]
        if given is not None and given.shape != self.mask.shape:
            error_msgs.append(f"{prefix}mask has shape {tuple(given.shape)}; expected ({n}, {n}), the causal mask "
                              f"of context_length {n}")
        elif given is not None and not self.mask.is_meta and not torch.equal(given.to(self.mask.device, torch.bool),
                                                                              self.mask):
            error_msgs.append(f"{prefix}mask is not a causal mask; expected ones above the diagonal, zeros elsewhere")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def qkv(self, x: torch.Tensor, start: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Project x (B, T, d_in) at positions start.. to queries, keys and values, each (B, nh, T, hs)."""
        b, num_tokens, _ = x.shape
        if self.fused_qkv:
            queries, keys, values = self.W_qkv(x).split(self.d_out, dim=2)
        else:
            keys, queries, values = self.W_key(x), self.W_query(x), self.W_value(x)
        split = lambda t: t.view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)  # noqa: E731
        queries, keys, values = split(queries), split(keys), split(values)  # (B, nh, T, hs)
        if self.qk_norm:
            queries, keys = self.q_norm(queries), self.k_norm(keys)
        if self.rope_base is not None:
            queries, keys = rotary(queries, start, self.rope_base), rotary(keys, start, self.rope_base)
        return queries, keys, values

    def use_fused(self) -> bool:
        if self.impl == "auto":
            return not (self.training and self.dropout.p > 0)
        return self.impl == "sdpa"

    def forward(self, x: torch.Tensor, cache: LayerKV | None = None) -> torch.Tensor:
        b, num_tokens, _ = x.shape
        start = 0 if cache is None else cache.pos  # an int, or per-row positions (B,)
        queries, keys, values = self.qkv(x, start)  # (B, nh, T, hs)
        if cache is not None and isinstance(cache.pos, torch.Tensor):
            return self.out_proj(self.attend_rows(queries, keys, values, cache))
        if cache is not None:
            end = start + num_tokens
            cache.k[:, :, start:end] = keys
            cache.v[:, :, start:end] = values
            keys, values = cache.k[:, :, :end], cache.v[:, :, :end]  # (B, nh, start+T, hs)

        if self.use_fused():
            dropout_p = self.dropout.p if self.training else 0.0
            if start == 0:
                context = F.scaled_dot_product_attention(queries, keys, values, dropout_p=dropout_p, is_causal=True)
            elif num_tokens == 1:  # one decoding step: the newest query sees every key, so no mask to build
                context = F.scaled_dot_product_attention(queries, keys, values, dropout_p=dropout_p)
            else:  # queries sit at positions start..start+T-1 and see every key up to their own position
                allowed = self.causal_mask(start, num_tokens, x.device).logical_not()
                context = F.scaled_dot_product_attention(queries, keys, values, attn_mask=allowed, dropout_p=dropout_p)
        else:
            attn_weights = self.dropout(self.weights(queries, keys, start))
            context = attn_weights @ values  # (B, nh, T, hs)

        context = context.transpose(1, 2).contiguous().view(b, num_tokens, self.d_out)  # (B, T, C)
        return self.out_proj(context)

    def attend_rows(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                    cache: LayerKV) -> torch.Tensor:
        """Cached attention where row b's T new tokens sit at positions cache.pos[b] ... + T - 1 and
        see every key of that row up to their own position. Returns the context (B, T, d_out)."""
        b, _, num_tokens, _ = queries.shape
        pos = cache.pos[:, None] + torch.arange(num_tokens, device=queries.device)  # (B, T)
        rows = torch.arange(b, device=queries.device)[:, None]  # (B, 1)
        cache.k[rows, :, pos] = keys.transpose(1, 2)  # (B, T, nh, hs) into each row's own slots
        cache.v[rows, :, pos] = values.transpose(1, 2)
        end = int(pos.max()) + 1
        allowed = torch.arange(end, device=queries.device) <= pos[:, :, None]  # (B, T, S)
        context = F.scaled_dot_product_attention(queries, cache.k[:, :, :end], cache.v[:, :, :end],
                                                 attn_mask=allowed[:, None])  # (B, nh, T, hs)
        return context.transpose(1, 2).reshape(b, num_tokens, self.d_out)  # (B, T, C)

    def causal_mask(self, start: int, num_tokens: int, device: torch.device) -> torch.Tensor:
        """(T, start+T) bool, True where a query may NOT attend."""
        if start + num_tokens <= self.mask.shape[0]:
            return self.mask[start:start + num_tokens, :start + num_tokens]
        rows = torch.arange(start, start + num_tokens, device=device)[:, None]
        return torch.arange(start + num_tokens, device=device)[None, :] > rows

    def weights(self, queries: torch.Tensor, keys: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Softmax attention weights (B, nh, T, S), as the book computes them (no dropout)."""
        attn_scores = queries @ keys.transpose(2, 3)  # (B, nh, T, S)
        attn_scores = attn_scores.masked_fill(self.causal_mask(start, queries.shape[2], queries.device), -torch.inf)
        return torch.softmax(attn_scores / keys.shape[-1] ** 0.5, dim=-1)

    def attention_weights(self, x: torch.Tensor) -> torch.Tensor:
        """The weights this layer puts on each earlier position for input x (B, T, d_in)."""
        queries, keys, _ = self.qkv(x)
        return self.weights(queries, keys)

"""Causal multi-head self-attention, with a preallocated key/value cache for decoding.

Two paths compute the same function: the book's explicit one (scores, causal mask, softmax,
dropout on the weights, weighted sum) and PyTorch's fused `scaled_dot_product_attention`, which
never materialises the T x T weights. "auto" takes the fused path except when dropout on the
weights is active, because the fused kernel draws its dropout mask differently and the seed's
training-mode numbers are those of the explicit path.

No layer stores a causal mask: the fused path is told `is_causal`, and where a mask is needed
(the explicit path, a cache offset, a sliding window) it is built for that call's queries and
keys only, so memory stays linear in the context length.

Options of today's open models, each off by default: grouped-query attention (fewer key/value
heads than query heads, each shared by a group; the cache holds only the key/value heads), a head
size apart from d_out / num_heads, rotary positions with Llama 3's or linear scaling, a sliding
window (Mistral, Gemma 3's local layers), RMS-normalised queries and keys, and a score multiplier
other than 1 / sqrt(head size) (Gemma 3).
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from build_llm.config import ATTN_IMPLS
from build_llm.errors import UsageError
from build_llm.layer import RMSNorm

# A state dict reports each layer's causal mask for the book's sake (see _save_to_state_dict), up to
# this context length; the book's models are far below it, and beyond it the T x T tensor would cost
# more than the weights (a 131,072-token context: 16 GiB per mask).
BOOK_MASK_LIMIT = 4096
_masks: "weakref.WeakValueDictionary[tuple, torch.Tensor]" = weakref.WeakValueDictionary()


@dataclass(frozen=True)
class Rotary:
    """Rotary positions: base, and optional scaling of the frequencies for a longer context
    ("linear": positions / factor; "llama3": Llama 3's bands, see `inv_freq`)."""
    base: float
    scaling: str = "none"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_context: int | None = None

    def inv_freq(self, hs: int, device: torch.device | str | None = None) -> torch.Tensor:
        """The pairs' angular frequencies (hs/2,), float32: base^(-2i/hs), scaled."""
        inv_freq = 1.0 / self.base ** (torch.arange(0, hs, 2, device=device, dtype=torch.float32) / hs)
        if self.scaling == "linear":
            return inv_freq / self.factor
        if self.scaling != "llama3":
            return inv_freq
        # Llama 3: wavelengths longer than original_context / low_freq_factor are slowed by `factor`,
        # those shorter than original_context / high_freq_factor kept, and the band between blended
        # linearly in original_context / wavelength.
        wavelen = 2 * math.pi / inv_freq
        low, high = self.low_freq_factor, self.high_freq_factor
        smooth = (self.original_context / wavelen - low) / (high - low)
        blended = (1 - smooth) * inv_freq / self.factor + smooth * inv_freq
        slowed = torch.where(wavelen > self.original_context / low, inv_freq / self.factor, blended)
        return torch.where(wavelen < self.original_context / high, inv_freq, slowed)


def rotary(x: torch.Tensor, start: int | torch.Tensor, rope: float | Rotary) -> torch.Tensor:
    """Rotary positions for x (B, nh, T, hs) at positions start..start+T-1 (`start` an int, or per-row
    starts (B,)): each pair (x_i, x_{i+hs/2}) turns by the angle position * base^(-2i/hs) (scaled as
    `rope` says; a number is a plain base), so a query-key dot product depends on their distance
    only. The rotate-half pairing is Llama's (Hugging Face's layout), so its weights load unchanged."""
    rope = rope if isinstance(rope, Rotary) else Rotary(rope)
    hs, num_tokens = x.shape[-1], x.shape[-2]
    inv_freq = rope.inv_freq(hs, x.device)  # (hs/2,)
    positions = torch.arange(num_tokens, device=x.device, dtype=torch.float32)
    if isinstance(start, torch.Tensor):
        positions = (positions + start.to(x.device, torch.float32)[:, None])[:, None, :, None]  # (B, 1, T, 1)
    else:
        positions = (positions + start)[:, None]  # (T, 1)
    angles = positions * inv_freq  # (T, hs/2) or (B, 1, T, hs/2)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., :hs // 2], x[..., hs // 2:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)  # (B, nh, T, hs)


def blocked(query_pos: torch.Tensor, num_keys: int, window: int | None = None) -> torch.Tensor:
    """True where a query may NOT attend: keys after it, and with a window, keys `window` or more
    positions back. query_pos (T,) or (B, T) -> (T, S) or (B, T, S) bool, S = num_keys."""
    distance = query_pos[..., None] - torch.arange(num_keys, device=query_pos.device)  # (..., T, S)
    return (distance < 0) | (distance >= window) if window is not None else distance < 0


class KVCache:
    """Keys and values of every layer for up to `max_len` positions, allocated once.

    `pos` is the number of positions already written; the model advances it after each forward.
    It may also be a LongTensor (B,) of per-row positions, for batching sequences of different
    lengths (the server's continuous batching): each row's new tokens go at its own position.
    `n_heads` is the key/value heads (fewer than the query heads under grouped-query attention).
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
    """One layer's view of a KVCache: (B, n_kv, max_len, hs) buffers and the write position."""

    __slots__ = ("k", "v", "pos")

    def __init__(self, k: torch.Tensor, v: torch.Tensor, pos: int) -> None:
        self.k, self.v, self.pos = k, v, pos


class MultiHeadAttention(nn.Module):
    def __init__(self, d_in: int, d_out: int, context_length: int, dropout: float, num_heads: int,
                 qkv_bias: bool = False, *, fused_qkv: bool = False, out_bias: bool = True,
                 impl: str = "auto", rope: Rotary | float | None = None, qk_norm: bool = False,
                 norm_eps: float = 1e-5, num_kv_heads: int | None = None, head_dim: int | None = None,
                 window: int | None = None, scale: float | None = None, norm_plus_one: bool = False) -> None:
        super().__init__()
        if head_dim is None and d_out % num_heads:
            raise UsageError(f"MultiHeadAttention: d_out={d_out} is not divisible by num_heads={num_heads}")
        if impl not in ATTN_IMPLS:
            raise UsageError(f"MultiHeadAttention: impl={impl!r} is invalid; expected one of {ATTN_IMPLS}")
        self.num_heads, self.head_dim = num_heads, head_dim or d_out // num_heads
        self.num_kv_heads = num_kv_heads or num_heads
        if num_heads % self.num_kv_heads:
            raise UsageError(f"MultiHeadAttention: num_kv_heads={num_kv_heads} does not divide num_heads={num_heads}")
        self.d_out = num_heads * self.head_dim  # the heads side by side (the book: d_out itself)
        kv_out = self.num_kv_heads * self.head_dim
        self.context_length, self.window, self.scale = context_length, window, scale
        self.impl = impl
        self.fused_qkv = fused_qkv
        if fused_qkv:
            self.W_qkv = nn.Linear(d_in, self.d_out + 2 * kv_out, bias=qkv_bias)
        else:  # the book's three projections, created in its order (the seed's numbers depend on it)
            self.W_query = nn.Linear(d_in, self.d_out, bias=qkv_bias)
            self.W_key = nn.Linear(d_in, kv_out, bias=qkv_bias)
            self.W_value = nn.Linear(d_in, kv_out, bias=qkv_bias)
        self.out_proj = nn.Linear(self.d_out, d_out, bias=out_bias)
        self.dropout = nn.Dropout(dropout)
        # None: no rotary positions (the model adds a position table instead)
        self.rope = Rotary(rope) if isinstance(rope, (int, float)) else rope
        if qk_norm:
            self.q_norm = RMSNorm(self.head_dim, norm_eps, plus_one=norm_plus_one)
            self.k_norm = RMSNorm(self.head_dim, norm_eps, plus_one=norm_plus_one)
        self.qk_norm = qk_norm

    @property
    def mask(self) -> torch.Tensor:
        """The book's (context_length, context_length) causal mask, True above the diagonal. Built
        when asked for, never stored: the book's code and `inspect` read it, the forward pass does not."""
        rows = torch.arange(self.context_length, device=self.device)
        return blocked(rows, self.context_length)

    @property
    def device(self) -> torch.device:
        """Where the weights are (a LoRA-wrapped projection has no `.weight` of its own)."""
        return next(self.parameters()).device

    # The book registers its mask as a saved buffer, so a book `model.state_dict()` carries
    # `trf_blocks.N.att.mask` and a book model loads strictly only a state dict that has it. To load
    # either way with strict=True, state_dict() reports the mask under that key (up to
    # BOOK_MASK_LIMIT; one tensor shared by all layers while the state dict holds it; checkpoints
    # leave it out) and loading takes a given mask only after checking that it is this layer's causal
    # mask, whatever its dtype (the book's is float 0/1).
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        n, device = self.context_length, self.device
        if n <= BOOK_MASK_LIMIT and device.type != "meta":
            mask = _masks.get((n, str(device)))
            if mask is None:
                mask = _masks[(n, str(device))] = self.mask
            destination[prefix + "mask"] = mask

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        given = state_dict.pop(prefix + "mask", None)
        n = self.context_length
        if given is not None and given.shape != (n, n):
            error_msgs.append(f"{prefix}mask has shape {tuple(given.shape)}; expected ({n}, {n}), the causal mask "
                              f"of context_length {n}")
        elif given is not None and not given.is_meta and not torch.equal(given.to(torch.bool),
                                                                          blocked(torch.arange(n), n)):
            error_msgs.append(f"{prefix}mask is not a causal mask; expected ones above the diagonal, zeros elsewhere")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def qkv(self, x: torch.Tensor, start: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Project x (B, T, d_in) at positions start.. to queries (B, nh, T, hs), keys and values
        (B, n_kv, T, hs) each."""
        b, num_tokens, _ = x.shape
        if self.fused_qkv:
            kv_out = self.num_kv_heads * self.head_dim
            queries, keys, values = self.W_qkv(x).split([self.d_out, kv_out, kv_out], dim=2)
        else:
            keys, queries, values = self.W_key(x), self.W_query(x), self.W_value(x)
        split = lambda t: t.view(b, num_tokens, -1, self.head_dim).transpose(1, 2)  # noqa: E731
        queries, keys, values = split(queries), split(keys), split(values)  # (B, heads, T, hs)
        if self.qk_norm:
            queries, keys = self.q_norm(queries), self.k_norm(keys)
        if self.rope is not None:
            queries, keys = rotary(queries, start, self.rope), rotary(keys, start, self.rope)
        return queries, keys, values

    def use_fused(self) -> bool:
        if self.impl == "auto":
            return not (self.training and self.dropout.p > 0)
        return self.impl == "sdpa"

    def forward(self, x: torch.Tensor, cache: LayerKV | None = None) -> torch.Tensor:
        b, num_tokens, _ = x.shape
        start = 0 if cache is None else cache.pos  # an int, or per-row positions (B,)
        queries, keys, values = self.qkv(x, start)  # (B, nh, T, hs), (B, n_kv, T, hs)
        if cache is not None and isinstance(cache.pos, torch.Tensor):
            return self.out_proj(self.attend_rows(queries, keys, values, cache))
        if cache is not None:
            end = start + num_tokens
            cache.k[:, :, start:end] = keys
            cache.v[:, :, start:end] = values
            # (B, n_kv, start+T, hs), read as they are kept (a bfloat16 cache: rounded) in the queries' dtype
            keys, values = cache.k[:, :, :end].to(queries.dtype), cache.v[:, :, :end].to(queries.dtype)

        if self.use_fused():
            dropout_p = self.dropout.p if self.training else 0.0
            gqa = dict(enable_gqa=True) if self.num_kv_heads != self.num_heads else {}
            if start == 0 and self.window is None:
                context = F.scaled_dot_product_attention(queries, keys, values, dropout_p=dropout_p, is_causal=True,
                                                         scale=self.scale, **gqa)
            elif num_tokens == 1 and (self.window is None or start < self.window):
                # one decoding step inside the window: the newest query sees every key, so no mask to build
                context = F.scaled_dot_product_attention(queries, keys, values, dropout_p=dropout_p, scale=self.scale,
                                                         **gqa)
            else:  # queries at positions start..start+T-1 see the keys up to their own position (in the window)
                allowed = self.causal_mask(start, num_tokens, x.device).logical_not()  # (T, start+T)
                context = F.scaled_dot_product_attention(queries, keys, values, attn_mask=allowed, dropout_p=dropout_p,
                                                         scale=self.scale, **gqa)
        else:
            attn_weights = self.dropout(self.weights(queries, keys, start))
            context = attn_weights @ self.expand(values)  # (B, nh, T, hs)

        context = context.transpose(1, 2).contiguous().view(b, num_tokens, self.d_out)  # (B, T, nh * hs)
        return self.out_proj(context)

    def attend_rows(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                    cache: LayerKV) -> torch.Tensor:
        """Cached attention where row b's T new tokens sit at positions cache.pos[b] ... + T - 1 and
        see every key of that row up to their own position. Returns the context (B, T, nh * hs)."""
        b, _, num_tokens, _ = queries.shape
        pos = cache.pos[:, None] + torch.arange(num_tokens, device=queries.device)  # (B, T)
        rows = torch.arange(b, device=queries.device)[:, None]  # (B, 1)
        cache.k[rows, :, pos] = keys.transpose(1, 2).to(cache.k.dtype)  # (B, T, n_kv, hs) into each row's own slots
        cache.v[rows, :, pos] = values.transpose(1, 2).to(cache.v.dtype)
        end = int(pos.max()) + 1
        allowed = blocked(pos, end, self.window).logical_not()  # (B, T, S)
        keys, values = cache.k[:, :, :end].to(queries.dtype), cache.v[:, :, :end].to(queries.dtype)  # as kept
        context = F.scaled_dot_product_attention(queries, self.expand(keys), self.expand(values), attn_mask=allowed[:, None],
                                                 scale=self.scale)  # (B, nh, T, hs)
        return context.transpose(1, 2).reshape(b, num_tokens, self.d_out)  # (B, T, nh * hs)

    def expand(self, kv: torch.Tensor) -> torch.Tensor:
        """(B, n_kv, S, hs) keys or values -> (B, nh, S, hs), each shared by its group of query heads."""
        group = self.num_heads // self.num_kv_heads
        return kv if group == 1 else kv.repeat_interleave(group, dim=1)

    def causal_mask(self, start: int, num_tokens: int, device: torch.device) -> torch.Tensor:
        """(T, start+T) bool, True where a query may NOT attend (built for this call, never stored)."""
        return blocked(torch.arange(start, start + num_tokens, device=device), start + num_tokens, self.window)

    def weights(self, queries: torch.Tensor, keys: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Softmax attention weights (B, nh, T, S), as the book computes them (no dropout)."""
        attn_scores = queries @ self.expand(keys).transpose(2, 3)  # (B, nh, T, S)
        attn_scores = attn_scores.masked_fill(self.causal_mask(start, queries.shape[2], queries.device), -torch.inf)
        if self.scale is not None:
            return torch.softmax(attn_scores * self.scale, dim=-1)
        return torch.softmax(attn_scores / keys.shape[-1] ** 0.5, dim=-1)

    def attention_weights(self, x: torch.Tensor) -> torch.Tensor:
        """The weights this layer puts on each earlier position for input x (B, T, d_in)."""
        queries, keys, _ = self.qkv(x)
        return self.weights(queries, keys)

"""GPTConfig: the model's hyper-parameters as a validated, frozen dataclass with presets.

The first seven fields are the seed notebook's dict keys (`GPT_CONFIG_124M`); the rest are the
choices in which the book's model, OpenAI's GPT-2 and the R course's model differ. Their defaults
are the book's, so the seed's plain dict builds exactly the seed's model.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

from build_llm.errors import UsageError, UsageTypeError

GELU_KINDS = ("tanh", "exact")
ATTN_IMPLS = ("auto", "explicit", "sdpa")
POS_EMBS = ("learned", "rope")
NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu", "relu2")


def _finite_positive(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 50257
    context_length: int = 1024
    emb_dim: int = 768
    n_heads: int = 12
    n_layers: int = 12
    drop_rate: float = 0.1
    qkv_bias: bool = False
    # Output head shares the token-embedding matrix (GPT-2) or has its own (the book, the R model).
    tie_weights: bool = False
    # Biases of the attention output, the feed-forward layers and the LayerNorm shift.
    bias: bool = True
    gelu: str = "tanh"
    # One (emb, 3*emb) projection for Q, K, V (GPT-2's c_attn, R's in_proj) or three (the book's).
    fused_qkv: bool = False
    # Token id whose embedding is fixed at zero (the R model's <PAD>), or None.
    padding_idx: int | None = None
    # Dropout on the attention output before the residual add (the book); the R model has none there.
    attn_out_dropout: bool = True
    # "auto": fused scaled_dot_product_attention except where dropout on the weights is active, so
    # that training-mode numbers match the book's explicit path draw for draw (the seed's model);
    # "sdpa": fused with dropout too (the GPT-2 presets, imported GPT-2s, the trainer's own models).
    attn_impl: str = "auto"
    # None: PyTorch's default initialisation (the book). A float: GPT-2's normal(0, std) scheme.
    init_std: float | None = None
    ln_eps: float = 1e-5
    # --- options beyond the book (docs/speed.md measures each): the defaults are the book's ---
    # "learned": a position-embedding table (the book, GPT-2); "rope": rotary positions applied to
    # queries and keys (Llama's rotate-half convention, base `rope_base`), no table.
    pos_emb: str = "learned"
    rope_base: float = 10000.0
    # "layernorm" (the book) or "rmsnorm" (no mean subtraction, no shift; Llama).
    norm: str = "layernorm"
    # Feed-forward: "gelu" (the book: Linear, GELU, Linear), "relu2" (ReLU squared in place of GELU)
    # or "swiglu" (SiLU(x W_gate) * (x W_up), then W_down; Llama).
    mlp: str = "gelu"
    # Hidden width of the feed-forward; None: 4 * emb_dim (swiglu: 8/3 * emb_dim rounded up to a
    # multiple of 8, the same parameter count as 4 * emb_dim with two matrices).
    ff_dim: int | None = None
    # RMS-normalise each head's queries and keys (learned scale) before the dot product.
    qk_norm: bool = False

    def __post_init__(self) -> None:
        for key in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"GPTConfig: {key}={value!r} is invalid; expected an integer >= 1")
        if self.emb_dim % self.n_heads:
            raise UsageError(
                f"GPTConfig: emb_dim={self.emb_dim} is not divisible by n_heads={self.n_heads}; "
                "choose emb_dim a multiple of n_heads"
            )
        if isinstance(self.drop_rate, bool) or not isinstance(self.drop_rate, (int, float)) or not 0 <= self.drop_rate < 1:
            raise UsageError(f"GPTConfig: drop_rate={self.drop_rate!r} is invalid; expected a number in [0, 1)")
        for key in ("qkv_bias", "tie_weights", "bias", "fused_qkv", "attn_out_dropout"):
            if not isinstance(getattr(self, key), bool):
                raise UsageError(f"GPTConfig: {key}={getattr(self, key)!r} is invalid; expected true or false")
        if self.gelu not in GELU_KINDS:
            raise UsageError(f"GPTConfig: gelu={self.gelu!r} is invalid; expected one of {GELU_KINDS}")
        if self.attn_impl not in ATTN_IMPLS:
            raise UsageError(f"GPTConfig: attn_impl={self.attn_impl!r} is invalid; expected one of {ATTN_IMPLS}")
        if self.padding_idx is not None and (
            isinstance(self.padding_idx, bool) or not isinstance(self.padding_idx, int)
            or not 0 <= self.padding_idx < self.vocab_size
        ):
            raise UsageError(
                f"GPTConfig: padding_idx={self.padding_idx!r} is invalid; expected None or an integer "
                f"in [0, {self.vocab_size})"
            )
        if self.init_std is not None and not _finite_positive(self.init_std):
            raise UsageError(f"GPTConfig: init_std={self.init_std!r} is invalid; expected None or a finite number > 0")
        if not _finite_positive(self.ln_eps):
            raise UsageError(f"GPTConfig: ln_eps={self.ln_eps!r} is invalid; expected a finite number > 0")
        for key, valid in (("pos_emb", POS_EMBS), ("norm", NORMS), ("mlp", MLPS)):
            if getattr(self, key) not in valid:
                raise UsageError(f"GPTConfig: {key}={getattr(self, key)!r} is invalid; expected one of {valid}")
        if (isinstance(self.rope_base, bool) or not isinstance(self.rope_base, (int, float))
                or not self.rope_base > 1):
            raise UsageError(f"GPTConfig: rope_base={self.rope_base!r} is invalid; expected a number > 1")
        if self.pos_emb == "rope" and self.head_dim % 2:
            raise UsageError(f"GPTConfig: pos_emb='rope' needs an even head size, but emb_dim / n_heads = "
                             f"{self.head_dim}; choose emb_dim a multiple of 2 * n_heads")
        if self.ff_dim is not None and (isinstance(self.ff_dim, bool) or not isinstance(self.ff_dim, int)
                                        or self.ff_dim < 1):
            raise UsageError(f"GPTConfig: ff_dim={self.ff_dim!r} is invalid; expected None or an integer >= 1")
        if not isinstance(self.qk_norm, bool):
            raise UsageError(f"GPTConfig: qk_norm={self.qk_norm!r} is invalid; expected true or false")

    @property
    def head_dim(self) -> int:
        return self.emb_dim // self.n_heads

    @property
    def ff_hidden(self) -> int:
        """The feed-forward's hidden width (ff_dim, or its default for the mlp kind)."""
        if self.ff_dim is not None:
            return self.ff_dim
        return 4 * self.emb_dim if self.mlp != "swiglu" else -(-8 * self.emb_dim // 24) * 8

    # --- dict <-> config -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "GPTConfig":
        """Build from a dict with the seed's keys (and optionally the extra fields)."""
        if not isinstance(d, Mapping):
            raise UsageTypeError(f"GPTConfig.from_dict: expected a dict, got {type(d).__name__}")
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(valid))
        if unknown:
            raise UsageError(f"GPTConfig: unknown key(s) {unknown}; valid keys are {valid}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def coerce(cls, cfg: "GPTConfig | Mapping[str, Any]") -> "GPTConfig":
        """Accept a GPTConfig or the seed's plain dict."""
        if isinstance(cfg, GPTConfig):
            return cfg
        if isinstance(cfg, Mapping):
            return cls.from_dict(cfg)
        raise TypeError(f"cfg: expected a GPTConfig or a dict, got {type(cfg).__name__}")

    def replace(self, **changes: Any) -> "GPTConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    # --- presets ---------------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "GPTConfig":
        """One of PRESETS by name, with optional field overrides."""
        if name not in PRESETS:
            raise UsageError(f"unknown preset {name!r}; valid presets are {sorted(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})


# OpenAI's GPT-2: biased QKV in one projection, head tied to the token embedding, N(0, 0.02) init.
# No seed pins its training-mode numbers, so attention takes the fused kernel with dropout too (on
# CUDA a flash/memory-efficient kernel that never holds the T x T weights; on CPU PyTorch falls back
# to the same arithmetic as the explicit path).
_GPT2 = dict(vocab_size=50257, context_length=1024, drop_rate=0.1, qkv_bias=True,
             tie_weights=True, fused_qkv=True, init_std=0.02, attn_impl="sdpa")

PRESETS: dict[str, dict[str, Any]] = {
    "gpt2-small": dict(_GPT2, emb_dim=768, n_heads=12, n_layers=12),
    "gpt2-medium": dict(_GPT2, emb_dim=1024, n_heads=16, n_layers=24),
    "gpt2-large": dict(_GPT2, emb_dim=1280, n_heads=20, n_layers=36),
    "gpt2-xl": dict(_GPT2, emb_dim=1600, n_heads=25, n_layers=48),
    # The seed notebook's GPT_CONFIG_124M (163,009,536 parameters: untied head, no QKV bias).
    "book-124m": dict(vocab_size=50257, context_length=1024, emb_dim=768, n_heads=12, n_layers=12,
                      drop_rate=0.1, qkv_bias=False),
    # The R course's model: nn_multihead_attention (biased in_proj, no dropout after it), exact
    # GELU, <PAD> embedding at zero, vocabulary of the ABC text (<PAD>, \n, A, B, C).
    "r-abc": dict(vocab_size=5, context_length=16, emb_dim=128, n_heads=2, n_layers=2, drop_rate=0.2,
                  qkv_bias=True, fused_qkv=True, gelu="exact", padding_idx=0, attn_out_dropout=False),
}

"""GPTConfig: the model's hyper-parameters as a validated, frozen dataclass with presets (GPT-2, the
book's, the R course's, and today's open models: SmolLM2, Llama 3.2, Qwen3, Gemma 3, Mistral).

The first seven fields are the seed notebook's dict keys (`GPT_CONFIG_124M`); the rest are the
choices in which the book's model, OpenAI's GPT-2 and the R course's model differ. Their defaults
are the book's, so the seed's plain dict builds exactly the seed's model. Each field is declared
once (settings.setting): its help, its valid values, and whether `train` has a flag for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from build_llm.errors import UsageError
from build_llm.settings import Config, invalid, setting

GELU_KINDS = ("tanh", "exact")
ATTN_IMPLS = ("auto", "explicit", "sdpa")
POS_EMBS = ("learned", "rope")
NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu", "geglu", "relu2")
ROPE_SCALINGS = ("none", "linear", "llama3")
LAYER_TYPES = ("full", "sliding")


@dataclass(frozen=True)
class GPTConfig(Config):
    # The seed's seven keys. `internal`: no `train` flag (set by the tokenizer, a preset or a checkpoint).
    vocab_size: int = setting(50257, "token ids the model reads and predicts", at_least=1, internal=True)
    context_length: int = setting(1024, "longest input, in tokens", at_least=1)
    emb_dim: int = setting(768, "embedding width", at_least=1)
    n_heads: int = setting(12, "attention heads per layer (emb_dim a multiple of it)", at_least=1)
    n_layers: int = setting(12, "transformer blocks", at_least=1)
    drop_rate: float = setting(0.1, "dropout probability", at_least=0, below=1)
    qkv_bias: bool = setting(False, "biases in the query, key and value projections")
    tie_weights: bool = setting(False, "output head shares the token-embedding matrix (GPT-2) or has its own "
                                       "(the book, the R model)")
    bias: bool = setting(True, "biases in the attention output, the feed-forward and the LayerNorm shift")
    gelu: str = setting("tanh", "GELU's tanh approximation (the book) or the exact erf form (the R model)",
                        choices=GELU_KINDS, internal=True)
    fused_qkv: bool = setting(False, "one (emb, 3*emb) projection for Q, K, V (GPT-2's c_attn, R's in_proj) or "
                                     "three (the book's)", internal=True)
    padding_idx: int | None = setting(None, "token id whose embedding is fixed at zero (the R model's <PAD>)",
                                      at_least=0, internal=True)
    attn_out_dropout: bool = setting(True, "dropout on the attention output before the residual add (the book); "
                                           "the R model has none there", internal=True)
    # "auto" keeps training-mode numbers equal to the book's explicit path draw for draw (the seed's model).
    attn_impl: str = setting("auto", "auto: fused scaled_dot_product_attention except where dropout on the "
                                     "weights is active; sdpa: fused with dropout too (the GPT-2 presets, imported "
                                     "GPT-2s, the trainer's own models); explicit: the book's arithmetic",
                             choices=ATTN_IMPLS, internal=True)
    init_std: float | None = setting(None, "None: PyTorch's default initialisation (the book); a number: "
                                           "GPT-2's normal(0, std) scheme", above=0, internal=True)
    ln_eps: float = setting(1e-5, "the norms' epsilon", above=0, internal=True)
    # --- options beyond the book (docs/speed.md measures each): the defaults are the book's ---
    pos_emb: str = setting("learned", "learned: a position-embedding table (the book, GPT-2); rope: rotary "
                                      "positions on queries and keys (Llama's rotate-half), no table",
                           choices=POS_EMBS)
    rope_base: float = setting(10000.0, "rotary positions' base", above=1, internal=True)
    norm: str = setting("layernorm", "layernorm (the book) or rmsnorm (no mean subtraction, no shift; Llama)",
                        choices=NORMS)
    mlp: str = setting("gelu", "feed-forward: gelu (the book: Linear, GELU, Linear), relu2 (ReLU squared) or "
                               "swiglu (SiLU(x W_gate) * (x W_up), then W_down; Llama)", choices=MLPS)
    ff_dim: int | None = setting(None, "feed-forward hidden width; unset: 4 x emb_dim (swiglu: 8/3 x emb_dim up "
                                       "to a multiple of 8, the same parameters with three matrices)", at_least=1)
    qk_norm: bool = setting(False, "RMS-normalise each head's queries and keys (learned scale) before the dot "
                                   "product")
    # --- today's open models (Llama 3, Qwen, Mistral, Gemma 3); unset, each is the book's arithmetic ---
    n_kv_heads: int | None = setting(None, "key/value heads, shared by groups of query heads (grouped-query "
                                           "attention; 1: multi-query); unset: n_heads", at_least=1)
    head_size: int | None = setting(None, "channels per attention head; unset: emb_dim / n_heads", at_least=1,
                                    internal=True)
    rope_scaling: str = setting("none", "rotary frequencies stretched for a longer context: linear (positions / "
                                        "rope_factor) or llama3 (Llama 3's frequency bands)", choices=ROPE_SCALINGS,
                                internal=True)
    rope_factor: float = setting(1.0, "rotary scaling factor", at_least=1, internal=True)
    rope_low_freq_factor: float = setting(1.0, "llama3 scaling: wavelengths above original context / this are "
                                               "divided by rope_factor", above=0, internal=True)
    rope_high_freq_factor: float = setting(4.0, "llama3 scaling: wavelengths below original context / this are "
                                                "kept", above=0, internal=True)
    rope_original_context: int | None = setting(None, "llama3 scaling: the context length the model was "
                                                      "pretrained at", at_least=1, internal=True)
    sliding_window: int | None = setting(None, "sliding-window attention: a query sees only the last this-many "
                                               "positions, itself included (Mistral, Gemma 3's local layers)",
                                         at_least=1)
    layer_types: tuple[str, ...] | None = setting(None, "each layer's attention, full or sliding (Gemma 3: five "
                                                        "sliding, then one full); unset: all sliding when "
                                                        "sliding_window is set, else all full", choices=LAYER_TYPES,
                                                  internal=True)
    rope_local_base: float | None = setting(None, "rotary base of the sliding layers, which take no rope_scaling "
                                                  "(Gemma 3); unset: rope_base", above=1, internal=True)
    attn_scale: float | None = setting(None, "multiplier of the attention scores; unset: 1 / sqrt(head size) "
                                             "(Gemma 3: query_pre_attn_scalar^-1/2)", above=0, internal=True)
    norm_plus_one: bool = setting(False, "RMSNorms multiply by (1 + scale), their scales starting at zero (Gemma)",
                                  internal=True)
    scale_emb: bool = setting(False, "token embeddings multiplied by sqrt(emb_dim) (Gemma)", internal=True)
    post_norms: bool = setting(False, "a norm after each sub-layer too, before its residual add (Gemma 3)",
                               internal=True)
    # --- mixture of experts (Qwen3-MoE, Mixtral): n_experts=0 keeps the dense feed-forward ---
    n_experts: int = setting(0, "experts in each block's feed-forward (a mixture of SwiGLU experts, each token "
                                "routed to n_experts_per_token of them); 0: one dense feed-forward", at_least=0)
    n_experts_per_token: int = setting(2, "experts each token is routed to (top-k of the router's softmax)",
                                       at_least=1)
    moe_ff_dim: int | None = setting(None, "each expert's hidden width; unset: ff_hidden (each expert as wide as "
                                           "the dense feed-forward, as Mixtral's)", at_least=1)
    moe_norm_topk: bool = setting(False, "rescale the chosen experts' router probabilities to sum to 1 "
                                         "(Qwen3-MoE's norm_topk_prob)")

    def check(self) -> None:
        if self.head_size is None and self.emb_dim % self.n_heads:
            raise invalid(self, f"emb_dim={self.emb_dim} is not divisible by n_heads={self.n_heads}; "
                                "choose emb_dim a multiple of n_heads (or set head_size)", "emb_dim", "n_heads")
        if self.n_heads % self.kv_heads:
            raise invalid(self, f"n_kv_heads={self.n_kv_heads} does not divide n_heads={self.n_heads}; choose a "
                                "divisor of n_heads", "n_kv_heads")
        if self.padding_idx is not None and self.padding_idx >= self.vocab_size:
            raise invalid(self, f"padding_idx={self.padding_idx!r} is invalid; expected None or an integer "
                                f"in [0, {self.vocab_size})", "padding_idx")
        if self.pos_emb == "rope" and self.head_dim % 2:
            raise invalid(self, f"pos_emb='rope' needs an even head size, but emb_dim / n_heads = {self.head_dim}; "
                                "choose emb_dim a multiple of 2 * n_heads", "pos_emb", "emb_dim", "n_heads")
        if self.layer_types is not None and len(self.layer_types) != self.n_layers:
            raise invalid(self, f"layer_types has {len(self.layer_types)} entries; expected one per layer "
                                f"(n_layers={self.n_layers})", "layer_types")
        if "sliding" in self.types_of_layers and self.sliding_window is None:
            raise invalid(self, "layer_types has sliding layers but sliding_window is unset; set sliding_window",
                          "layer_types", "sliding_window")
        if self.rope_scaling == "llama3" and self.rope_original_context is None:
            raise invalid(self, "rope_scaling='llama3' needs rope_original_context (the pretraining context)",
                          "rope_scaling", "rope_original_context")
        if self.rope_scaling == "llama3" and self.rope_high_freq_factor <= self.rope_low_freq_factor:
            raise invalid(self, f"rope_high_freq_factor={self.rope_high_freq_factor} must exceed "
                                f"rope_low_freq_factor={self.rope_low_freq_factor}", "rope_high_freq_factor")
        if self.norm_plus_one and self.norm != "rmsnorm":
            raise invalid(self, "norm_plus_one needs norm='rmsnorm'", "norm_plus_one", "norm")
        if self.n_experts and self.mlp != "swiglu":
            raise invalid(self, f"n_experts={self.n_experts} needs mlp='swiglu' (the experts are SwiGLUs), got "
                                f"mlp={self.mlp!r}; set mlp='swiglu' or n_experts=0", "n_experts", "mlp")
        if self.n_experts and self.n_experts_per_token > self.n_experts:
            raise invalid(self, f"n_experts_per_token={self.n_experts_per_token} exceeds n_experts={self.n_experts}; "
                                f"choose 1 to {self.n_experts}", "n_experts_per_token", "n_experts")

    @property
    def head_dim(self) -> int:
        """Channels per head: head_size, or emb_dim / n_heads."""
        return self.head_size if self.head_size is not None else self.emb_dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        """Key/value heads: n_kv_heads, or n_heads."""
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def types_of_layers(self) -> tuple[str, ...]:
        """Each layer's attention, "full" or "sliding" (layer_types, or its default)."""
        if self.layer_types is not None:
            return self.layer_types
        return ("sliding" if self.sliding_window is not None else "full",) * self.n_layers

    @property
    def ff_hidden(self) -> int:
        """The feed-forward's hidden width (ff_dim, or its default for the mlp kind)."""
        if self.ff_dim is not None:
            return self.ff_dim
        return 4 * self.emb_dim if self.mlp not in ("swiglu", "geglu") else -(-8 * self.emb_dim // 24) * 8

    @property
    def expert_hidden(self) -> int:
        """Each expert's hidden width (moe_ff_dim, or the dense feed-forward's)."""
        return self.moe_ff_dim if self.moe_ff_dim is not None else self.ff_hidden

    @classmethod
    def coerce(cls, cfg: "GPTConfig | Mapping[str, Any]") -> "GPTConfig":
        """Accept a GPTConfig or the seed's plain dict."""
        if isinstance(cfg, GPTConfig):
            return cfg
        if isinstance(cfg, Mapping):
            return cls.from_dict(cfg)
        raise TypeError(f"cfg: expected a GPTConfig or a dict, got {type(cfg).__name__}")

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

# The Llama family's common ground: rotary positions, RMSNorm, SwiGLU, no biases, no dropout.
_LLAMA = dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False, qkv_bias=False, drop_rate=0.0, ln_eps=1e-5,
              init_std=0.02, attn_impl="sdpa")

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
    # Today's open models, their public shapes (random weights; `import-hf` brings the real ones).
    "smollm2-135m": dict(_LLAMA, vocab_size=49152, context_length=8192, emb_dim=576, n_heads=9, n_kv_heads=3,
                         n_layers=30, ff_dim=1536, rope_base=100000.0, tie_weights=True),
    "smollm2-360m": dict(_LLAMA, vocab_size=49152, context_length=8192, emb_dim=960, n_heads=15, n_kv_heads=5,
                         n_layers=32, ff_dim=2560, rope_base=100000.0, tie_weights=True),
    # 131,072 positions: rotary (no table) and no stored causal masks, so nothing context-squared.
    "llama-3.2-1b": dict(_LLAMA, vocab_size=128256, context_length=131072, emb_dim=2048, n_heads=32, n_kv_heads=8,
                         n_layers=16, ff_dim=8192, rope_base=500000.0, rope_scaling="llama3", rope_factor=32.0,
                         rope_low_freq_factor=1.0, rope_high_freq_factor=4.0, rope_original_context=8192,
                         tie_weights=True),
    "qwen3-0.6b": dict(_LLAMA, vocab_size=151936, context_length=40960, emb_dim=1024, n_heads=16, n_kv_heads=8,
                       head_size=128, n_layers=28, ff_dim=3072, rope_base=1000000.0, ln_eps=1e-6, qk_norm=True,
                       tie_weights=True),
    # Five local layers (a 512-token window, rotary base 10^4) to one global (base 10^6).
    "gemma-3-270m": dict(_LLAMA, vocab_size=262144, context_length=32768, emb_dim=640, n_heads=4, n_kv_heads=1,
                         head_size=256, n_layers=18, ff_dim=2048, mlp="geglu", gelu="tanh", rope_base=1000000.0,
                         rope_local_base=10000.0, sliding_window=512,
                         layer_types=tuple("full" if (i + 1) % 6 == 0 else "sliding" for i in range(18)),
                         ln_eps=1e-6, qk_norm=True, norm_plus_one=True, scale_emb=True, post_norms=True,
                         tie_weights=True),
    # Mistral 7B v0.1: a 4096-token sliding window on every layer.
    "mistral-7b": dict(_LLAMA, vocab_size=32000, context_length=32768, emb_dim=4096, n_heads=32, n_kv_heads=8,
                       n_layers=32, ff_dim=14336, sliding_window=4096),
    # Qwen/Qwen3-30B-A3B's shape (random weights), for `info` and planning: 48 blocks of 128 SwiGLU
    # experts, 8 per token, normalised top-k; 30.5 billion parameters, 3.3 billion used per token.
    "qwen3-30b-a3b": dict(vocab_size=151936, context_length=40960, emb_dim=2048, n_heads=32, n_kv_heads=4,
                          head_size=128, n_layers=48, drop_rate=0.0, bias=False, qkv_bias=False, pos_emb="rope",
                          norm="rmsnorm", mlp="swiglu", ff_dim=6144, qk_norm=True, rope_base=1_000_000.0,
                          ln_eps=1e-6, n_experts=128, n_experts_per_token=8, moe_ff_dim=768, moe_norm_topk=True),
}

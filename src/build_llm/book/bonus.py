"""What the book's bonus chapters (Llama 3.2 and Qwen3 from scratch) share, on the package's one GPTModel.

The bonus material builds each model from a dict config (`LLAMA32_CONFIG_1B`, `QWEN_CONFIG_06_B`)
and calls it three ways: `model(idx)`; `model(idx, cache=KVCache(n_layers))` after
`model.reset_kv_cache()`, the model advancing `model.current_pos`; and the batched chapter's
`model(idx, cache=KVCache(n_layers, batch_size), start_pos=positions)`, the caller advancing them.
`BookModel` is a GPTModel built from the translated config (`gpt_config`) that answers all three:
the book's cache object holds the package's preallocated KVCache, grown when a sequence outgrows
it (the book's cache grows by concatenation; a full-context cache of a 40,960-token Qwen3 would
be gigabytes). Given the package's own KVCache, the model is the plain GPTModel.

The rotary helpers keep the book's form (cos and sin tables of shape (context_length, head_dim),
rotate-half pairing) with the package's frequencies (attention.Rotary, Llama 3's bands included);
weights load from a state dict with Hugging Face's names, as the book's `load_weights_into_*` do.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping

import torch

from build_llm.attention import KVCache as PackageKVCache
from build_llm.attention import Rotary
from build_llm.config import GPTConfig
from build_llm.errors import UsageError
from build_llm.gpt import GPTModel
from build_llm.interop.hf_decoders import decoder_names, expert_slice


# --- the book's dict config -> GPTConfig -----------------------------------------------------------
def gpt_config(cfg: Mapping[str, Any], *, norm_eps: float) -> GPTConfig:
    """The GPTConfig of a book dict config: Llama 3.2's keys (`rope_freq`) or Qwen3's (`head_dim`,
    `qk_norm`, `num_experts`...). Both are pre-norm RMSNorm, SwiGLU, rotary, no biases, no dropout, an
    untied head (the book copies the embedding into it when a checkpoint has no lm_head)."""
    if not isinstance(cfg, Mapping):
        raise TypeError(f"cfg: expected the book's dict config, got {type(cfg).__name__}")
    missing = [k for k in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "hidden_dim")
               if k not in cfg]
    if missing:
        raise UsageError(f"cfg: missing key(s) {missing}; the book's configs have vocab_size, context_length, "
                         "emb_dim, n_heads, n_layers and hidden_dim")
    fields = dict(vocab_size=cfg["vocab_size"], context_length=cfg["context_length"], emb_dim=cfg["emb_dim"],
                  n_heads=cfg["n_heads"], n_layers=cfg["n_layers"], ff_dim=cfg["hidden_dim"], drop_rate=0.0,
                  qkv_bias=False, bias=False, tie_weights=False, pos_emb="rope", norm="rmsnorm", mlp="swiglu",
                  ln_eps=norm_eps, rope_base=float(cfg.get("rope_base", 10_000.0)),
                  qk_norm=bool(cfg.get("qk_norm", False)), n_kv_heads=cfg.get("n_kv_groups"),
                  head_size=cfg.get("head_dim"))
    orig = cfg.get("orig_context_length", cfg["context_length"])
    if orig != cfg["context_length"]:  # the book's first Llama 3.2 version: the base scaled with the context
        fields["rope_base"] *= cfg["context_length"] / orig
    freq = cfg.get("rope_freq")
    if freq is not None:  # Llama 3's frequency bands
        fields.update(rope_scaling="llama3", rope_factor=float(freq["factor"]),
                      rope_low_freq_factor=float(freq["low_freq_factor"]),
                      rope_high_freq_factor=float(freq["high_freq_factor"]),
                      rope_original_context=int(freq["original_context_length"]))
    if cfg.get("num_experts", 0):  # Qwen3-MoE: the book's top-k softmax is normalised top-k routing
        fields.update(n_experts=cfg["num_experts"], n_experts_per_token=cfg["num_experts_per_tok"],
                      moe_ff_dim=cfg.get("moe_intermediate_size", cfg.get("moe_hidden_dim")), moe_norm_topk=True)
    return GPTConfig(**fields)


# --- rotary positions in the book's form -------------------------------------------------------------
def compute_rope_params(head_dim: int, theta_base: float = 10_000, context_length: int = 4096,
                        freq_config: Mapping[str, float] | None = None,
                        dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """The book's cos and sin tables, (context_length, head_dim) each: position p's angle for pair i
    (channels i and i + head_dim/2) in both halves. `freq_config`: Llama 3's frequency scaling
    (factor, low_freq_factor, high_freq_factor, original_context_length)."""
    if head_dim % 2:
        raise UsageError(f"head_dim={head_dim} is odd; rotary positions pair channels, so it must be even")
    rope = Rotary(float(theta_base))
    if freq_config is not None:
        rope = Rotary(float(theta_base), "llama3", float(freq_config["factor"]), float(freq_config["low_freq_factor"]),
                      float(freq_config["high_freq_factor"]), int(freq_config["original_context_length"]))
    angles = torch.arange(context_length, dtype=dtype)[:, None] * rope.inv_freq(head_dim)[None, :]  # (T, hs/2)
    angles = torch.cat([angles, angles], dim=1)  # (T, hs)
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               offset: int | torch.Tensor = 0) -> torch.Tensor:
    """Rotate x (B, heads, T, head_dim) to positions offset..offset+T-1 (an int, or per-row (B,))."""
    num_tokens, hs = x.shape[-2], x.shape[-1]
    if isinstance(offset, torch.Tensor):
        positions = offset.to(cos.device)[:, None] + torch.arange(num_tokens, device=cos.device)  # (B, T)
        cos, sin = cos[positions][:, None], sin[positions][:, None]  # (B, 1, T, hs)
    else:
        cos, sin = cos[offset:offset + num_tokens], sin[offset:offset + num_tokens]  # (T, hs)
    rotated = torch.cat((-x[..., hs // 2:], x[..., :hs // 2]), dim=-1)  # (B, heads, T, hs)
    return (x * cos + rotated * sin).to(x.dtype)


# --- the model and its cache ----------------------------------------------------------------------
class KVCache:
    """The book's cache object: `KVCache(n_layers)`, or `KVCache(n_layers, batch_size)` for the batched
    chapter. It holds the package's KVCache (`inner`), allocated at the first forward pass."""

    def __init__(self, n_layers: int, batch_size: int | None = None) -> None:
        self.n_layers, self.batch_size = n_layers, batch_size
        self.inner: PackageKVCache | None = None

    def reset(self) -> None:
        self.inner = None

    def room(self, model: GPTModel, batch_size: int, needed: int) -> PackageKVCache:
        """The package cache, with room for `needed` positions (grown to at least twice its length,
        up to the context, keeping what it holds)."""
        old = self.inner
        if old is not None and old.k.shape[1] != batch_size:
            raise UsageError(f"cache: it holds {old.k.shape[1]} sequences, but the input has {batch_size}; "
                             "call model.reset_kv_cache() and start a new KVCache")
        if old is None or old.max_len < needed:
            length = min(model.cfg.context_length, max(needed, 2 * old.max_len if old else 256))
            self.inner = model.new_cache(batch_size, max_len=length)
            if old is not None:
                self.inner.k[..., :old.max_len, :] = old.k
                self.inner.v[..., :old.max_len, :] = old.v
        return self.inner


class BookModel(GPTModel):
    """A GPTModel built from a book dict config, answering the book's forward calls (see the module)."""

    norm_eps = 1e-5  # the subclass's: Llama's norms use 1e-5, Qwen3's 1e-6

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        gpt_cfg = gpt_config(cfg, norm_eps=self.norm_eps)
        default = torch.get_default_dtype()
        torch.set_default_dtype(cfg.get("dtype") or default)  # made in the book's dtype: no float32 copy first
        try:
            super().__init__(gpt_cfg)
        finally:
            torch.set_default_dtype(default)
        self.book_cfg = dict(cfg)
        self.current_pos: int | torch.Tensor = 0

    def reset_kv_cache(self, batch_size: int | None = None, device: torch.device | str | None = None) -> None:
        """Start over at position 0 (per row, as a LongTensor (B,), for the batched chapter)."""
        if batch_size is None:
            self.current_pos = 0
        else:
            self.current_pos = torch.zeros(batch_size, dtype=torch.long, device=device or self.tok_emb.weight.device)

    def forward(self, in_idx: torch.Tensor, cache: Any = None, start_pos: torch.Tensor | None = None,
                last_only: bool = False) -> torch.Tensor:
        if not isinstance(cache, KVCache):  # no cache, or the package's own
            return super().forward(in_idx, cache, last_only=last_only)
        batch_size, num_tokens = in_idx.shape
        start = self.current_pos if start_pos is None else start_pos
        end = (int(start.max()) if isinstance(start, torch.Tensor) else start) + num_tokens
        if end > self.cfg.context_length:
            raise UsageError(f"sequence length {end} exceeds the model's context length of "
                             f"{self.cfg.context_length} tokens")
        inner = cache.room(self, batch_size, end)
        inner.pos = start.clone() if isinstance(start, torch.Tensor) else start
        logits = super().forward(in_idx, inner, last_only=last_only)
        if start_pos is None:  # the unbatched chapter's model keeps its own position
            self.current_pos = start + num_tokens
        return logits


# --- weights with Hugging Face's names --------------------------------------------------------------
@torch.no_grad()
def load_hf_weights(model: GPTModel, param_config: Mapping[str, Any], params: Mapping[str, torch.Tensor]) -> None:
    """The book's load_weights_into_llama / _qwen: copy a Hugging Face state dict (Llama, Qwen3 or
    Qwen3-MoE names, as interop reads them) into `model`, each tensor checked for shape, after the
    book's config dict is checked to have the model's layers; without `lm_head.weight` the head gets
    the embedding (the tied checkpoints)."""
    if param_config.get("n_layers", model.cfg.n_layers) != model.cfg.n_layers:
        raise UsageError(f"param_config: n_layers={param_config['n_layers']} but the model has {model.cfg.n_layers}")
    ours = dict(model.named_parameters())
    family = "qwen3_moe" if model.cfg.n_experts else "qwen3" if model.cfg.qk_norm else "llama"
    for hf, name in decoder_names(model.cfg, family).items():
        if hf == "lm_head.weight" and hf not in params:
            hf = "model.embed_tokens.weight"
        if hf not in params:
            raise UsageError(f"params: {hf!r} is missing; expected a Hugging Face state dict of this model's config")
        target, given = expert_slice(ours, name), params[hf]
        if tuple(given.shape) != tuple(target.shape):
            raise ValueError(f"Shape mismatch in tensor '{hf}'. Left: {tuple(target.shape)}, "
                             f"Right: {tuple(given.shape)}")
        target.copy_(torch.as_tensor(given))


# --- generation, as the book's kv_cache chapters do it ---------------------------------------------
@torch.no_grad()
def generate_text_simple(model: BookModel, idx: torch.Tensor, max_new_tokens: int, context_size: int | None = None,
                         use_cache: bool = True) -> torch.Tensor:
    """Greedy decoding of `max_new_tokens` tokens after idx (B, T): with the KV cache (one batched
    cache, every row at its own position), or re-reading the last context_size tokens each step."""
    model.eval()
    ctx_len = context_size or model.cfg.context_length
    if not use_cache:
        for _ in range(max_new_tokens):
            next_idx = model(idx[:, -ctx_len:])[:, -1].argmax(dim=-1, keepdim=True)  # (B, 1)
            idx = torch.cat([idx, next_idx], dim=1)
        return idx
    cache = KVCache(model.cfg.n_layers, batch_size=idx.shape[0])
    model.reset_kv_cache(idx.shape[0], idx.device)
    prompt = idx[:, -ctx_len:]
    logits = model(prompt, cache=cache, start_pos=model.current_pos.clone())
    model.current_pos += prompt.shape[1]
    for step in range(max_new_tokens):
        next_idx = logits[:, -1].argmax(dim=-1, keepdim=True)  # (B, 1)
        idx = torch.cat([idx, next_idx], dim=1)
        if step + 1 < max_new_tokens:  # the last token needs no forward pass
            logits = model(next_idx, cache=cache, start_pos=model.current_pos.clone())
            model.current_pos += 1
    return idx


@torch.no_grad()
def generate_text_simple_stream(model: BookModel, token_ids: torch.Tensor, max_new_tokens: int,
                                eos_token_id: int | None = None) -> Iterator[torch.Tensor]:
    """Yield each greedy next token (B, 1) as it is decoded with the KV cache; stop early when every
    row produced `eos_token_id` (which is not yielded)."""
    model.eval()
    cache = KVCache(model.cfg.n_layers)
    model.reset_kv_cache()
    logits = model(token_ids, cache=cache)
    for step in range(max_new_tokens):
        next_token = logits[:, -1].argmax(dim=-1, keepdim=True)  # (B, 1)
        if eos_token_id is not None and torch.all(next_token == eos_token_id):
            break
        yield next_token
        if step + 1 < max_new_tokens:
            logits = model(next_token, cache=cache)


@torch.no_grad()
def generate_text_basic_stream(model: BookModel, token_ids: torch.Tensor, max_new_tokens: int,
                               eos_token_id: int | None = None) -> Iterator[torch.Tensor]:
    """The standalone notebooks' streaming loop without a cache: each greedy next token (B, 1), the
    whole sequence read again each step; stops early as generate_text_simple_stream does."""
    model.eval()
    for _ in range(max_new_tokens):
        next_token = model(token_ids)[:, -1].argmax(dim=-1, keepdim=True)  # (B, 1)
        if eos_token_id is not None and torch.all(next_token == eos_token_id):
            break
        yield next_token
        token_ids = torch.cat([token_ids, next_token], dim=1)

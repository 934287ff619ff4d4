"""GPTModel: token + position embeddings, a stack of TransformerBlocks, final norm, vocabulary head."""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.nn as nn

from build_llm.attention import KVCache
from build_llm.config import GPTConfig
from build_llm.errors import UsageError
from build_llm.layer import make_norm
from build_llm.moe import MoEFeedForward
from build_llm.transformer import TransformerBlock

INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


class GPTModel(nn.Module):
    # A compiled one-token decoding step (quant.CompiledStep), set by quant.prepare_for_decoding when the model's
    # weights are in the decoding kernels' layout: `forward` hands it every cached one-token step.
    decode_step = None

    def __init__(self, cfg: GPTConfig | Mapping[str, Any]) -> None:
        super().__init__()
        cfg = GPTConfig.coerce(cfg)
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim, padding_idx=cfg.padding_idx)
        # Rotary positions live in the attention; a learned table only for pos_emb="learned".
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.emb_dim) if cfg.pos_emb == "learned" else None
        self.drop_emb = nn.Dropout(cfg.drop_rate)
        self.trf_blocks = nn.Sequential(*[TransformerBlock(cfg, i) for i in range(cfg.n_layers)])
        self.final_norm = make_norm(cfg.norm, cfg.emb_dim, eps=cfg.ln_eps, bias=cfg.bias, plus_one=cfg.norm_plus_one)
        self.out_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        if cfg.tie_weights:
            self.out_head.weight = self.tok_emb.weight
        if cfg.init_std is not None:
            self.init_gpt2(cfg.init_std)

    @torch.no_grad()
    def init_gpt2(self, std: float) -> None:
        """GPT-2's scheme: N(0, std) weights, zero biases; the projections that write into the
        residual stream get std / sqrt(2 * n_layers) so its variance does not grow with depth."""
        residual_out = {id(m) for b in self.trf_blocks for m in (b.att.out_proj, b.ff.out_proj)}
        for module in self.modules():
            if isinstance(module, nn.Linear):
                scale = math.sqrt(2 * self.cfg.n_layers) if id(module) in residual_out else 1.0
                module.weight.normal_(0.0, std / scale)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                module.weight.normal_(0.0, std)
                if module.padding_idx is not None:
                    module.weight[module.padding_idx].zero_()
            elif isinstance(module, MoEFeedForward):  # the experts' stacked matrices, as if each were a Linear
                for w in (module.fc1, module.fc2, module.fc3):
                    scale = math.sqrt(2 * self.cfg.n_layers) if id(w) in residual_out else 1.0
                    w.normal_(0.0, std / scale)

    def forward(self, in_idx: torch.Tensor, cache: KVCache | None = None, last_only: bool = False) -> torch.Tensor:
        """Logits (B, T, vocab_size) for token ids (B, T); with `cache`, T new tokens after cache.pos.
        `last_only`: only the last position's logits (B, 1, vocab_size), all generation needs from a
        prompt (the head is a large share of a prompt's work: 38M of gpt2-small's 124M weights)."""
        start = 0 if cache is None else cache.pos  # an int, or per-row positions (B,)
        per_row = isinstance(start, torch.Tensor)
        self.check_input(in_idx, int(start.max()) if per_row else start)
        batch_size, seq_len = in_idx.shape
        if (cache is not None and seq_len == 1 and self.decode_step is not None and not self.training
                and cache.k.dtype == self.decode_step.cache_dtype):  # a cache of another dtype: the modules
            return self.decode_step(self, in_idx, cache)  # (B, 1, vocab_size): the same numbers, in one C call

        x = self.tok_emb(in_idx)  # (B, T, C)
        if self.cfg.scale_emb:  # Gemma: sqrt(C), rounded to the embeddings' dtype first as Gemma does
            x = x * torch.tensor(self.cfg.emb_dim ** 0.5, dtype=x.dtype)
        if self.pos_emb is not None:  # rotary positions (pos_emb="rope") act inside the attention instead
            pos_ids = torch.arange(seq_len, device=in_idx.device) + (start[:, None] if per_row else start)
            x = x + self.pos_emb(pos_ids)  # (T, C) broadcast over B, or (B, T, C) per row
        x = self.drop_emb(x)  # (B, T, C)

        if cache is None:
            x = self.trf_blocks(x)
        else:
            for i, block in enumerate(self.trf_blocks):
                x = block(x, cache.layer(i))
            cache.pos += seq_len

        if last_only:
            x = x[:, -1:, :]  # (B, 1, C)
        x = self.final_norm(x)
        return self.out_head(x)  # (B, T, vocab_size)

    def check_input(self, in_idx: torch.Tensor, start: int = 0) -> None:
        if not isinstance(in_idx, torch.Tensor):
            raise TypeError(f"in_idx: expected a torch.Tensor of token ids, got {type(in_idx).__name__}")
        if in_idx.ndim != 2:
            raise UsageError(f"in_idx: expected shape (batch_size, seq_len), got {tuple(in_idx.shape)}")
        if in_idx.dtype not in INT_DTYPES:
            raise TypeError(f"in_idx: expected an integer dtype (e.g. torch.long), got {in_idx.dtype}")
        if in_idx.shape[1] < 1:
            raise UsageError("in_idx: seq_len is 0; give at least one token")
        if start + in_idx.shape[1] > self.cfg.context_length:
            raise UsageError(
                f"in_idx: {start + in_idx.shape[1]} positions exceed context_length={self.cfg.context_length}; "
                "crop the input to the last context_length tokens"
            )

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """An empty KVCache for this model, sized by its context length; it holds the key/value heads only."""
        return KVCache(self.cfg.n_layers, batch_size, self.cfg.kv_heads, max_len or self.cfg.context_length,
                       self.cfg.head_dim, device=self.tok_emb.weight.device, dtype=self.cache_dtype())

    def cache_dtype(self) -> torch.dtype:
        """The KV cache's dtype: the compiled decoding step's (bfloat16) where the model has one, else the token
        table's (float32, or bfloat16 for a model in bfloat16)."""
        return self.tok_emb.weight.dtype if self.decode_step is None else self.decode_step.cache_dtype


@torch.no_grad()
def use_decoding_layout(model: nn.Module) -> None:
    """Lay out each Linear weight in memory the way decoding reads it fastest on a CPU.

    Decoding multiplies one row vector by each weight, streaming the weights from memory. For
    float32, storing the (out, in) weight column-major (i.e. as the contiguous (in, out) matrix)
    lets `F.linear` hand the BLAS a plain product that streams about 25% faster than the default
    layout; for bfloat16 the default row-major layout is as fast or faster, so it is kept (or
    restored). Values, shapes and names are unchanged (a checkpoint saves the same tensors), and so
    is every result up to float rounding. `load_model` and `build-llm generate` apply it; a
    training run does not, so that its numbers never depend on when a sample was drawn.
    """
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.weight.device.type == "cpu":
            w = module.weight.data
            column_major = w.t().contiguous().t() if w.dtype == torch.float32 else w.contiguous()
            if column_major.data_ptr() != w.data_ptr():
                module.weight.data = column_major

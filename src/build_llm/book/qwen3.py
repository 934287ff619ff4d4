"""The book's bonus chapter on Qwen3 (dense and mixture of experts), on the package's GPTModel.

    from build_llm.book.qwen3 import Qwen3Model, QWEN_CONFIG_06_B, load_weights_into_qwen, Qwen3Tokenizer

`Qwen3Model(cfg)` is a GPTModel built from the book's dict config (bonus.BookModel): grouped-query
attention with RMS-normalised queries and keys, RMSNorm with epsilon 1e-6, SwiGLU or a mixture of
SwiGLU experts (`num_experts` > 0), rotary positions. It answers `model(idx)`, the KV-cache
chapter's `model(idx, cache=KVCache(n_layers))` and the batched chapter's `start_pos` calls; the
parts (`GroupedQueryAttention`, `FeedForward`, `MoEFeedForward`, `RMSNorm`) are the package's own
modules, built from the book's arguments. `Qwen3Tokenizer` reads a model's `tokenizer.json` and
wraps a prompt in Qwen's chat format, as the book's does (no download: give a local file).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn

from build_llm.attention import MultiHeadAttention
from build_llm.book.bonus import (BookModel, KVCache, apply_rope, compute_rope_params, generate_text_basic_stream,
                                  generate_text_simple, generate_text_simple_stream, gpt_config, load_hf_weights)
from build_llm.errors import UsageError
from build_llm.layer import RMSNorm as PackageRMSNorm
from build_llm.mlp import FeedForward as PackageFeedForward
from build_llm.moe import MoEFeedForward as PackageMoEFeedForward

__all__ = ["QWEN_CONFIG_06_B", "QWEN3_CONFIG_1_7B", "QWEN3_CONFIG_4B", "QWEN3_CONFIG_8B", "QWEN3_CONFIG_14B",
           "QWEN3_CONFIG_32B", "QWEN3_CONFIG_30B_A3B", "Qwen3Model", "GroupedQueryAttention", "FeedForward",
           "MoEFeedForward", "RMSNorm", "compute_rope_params", "apply_rope", "load_weights_into_qwen",
           "Qwen3Tokenizer", "KVCache",
           "generate_text_simple", "generate_text_simple_stream", "generate_text_basic_stream"]


def _qwen3(emb_dim: int, n_heads: int, n_layers: int, hidden_dim: int, **extra: Any) -> dict[str, Any]:
    return {"vocab_size": 151_936, "context_length": 40_960, "emb_dim": emb_dim, "n_heads": n_heads,
            "n_layers": n_layers, "hidden_dim": hidden_dim, "head_dim": 128, "qk_norm": True, "n_kv_groups": 8,
            "rope_base": 1_000_000.0, "dtype": torch.bfloat16, **extra}


# The published sizes (Qwen/Qwen3-*/config.json), in the book's keys.
QWEN_CONFIG_06_B = _qwen3(1024, 16, 28, 3072)
QWEN3_CONFIG_1_7B = _qwen3(2048, 16, 28, 6144)
QWEN3_CONFIG_4B = _qwen3(2560, 32, 36, 9728)
QWEN3_CONFIG_8B = _qwen3(4096, 32, 36, 12288)
QWEN3_CONFIG_14B = _qwen3(5120, 40, 40, 17408)
QWEN3_CONFIG_32B = _qwen3(5120, 64, 64, 25600)
QWEN3_CONFIG_30B_A3B = _qwen3(2048, 32, 48, 6144, n_kv_groups=4, num_experts=128, num_experts_per_tok=8,
                              moe_intermediate_size=768)


class Qwen3Model(BookModel):
    """The book's Qwen3Model: a GPTModel of the dict config (see bonus.BookModel)."""

    norm_eps = 1e-6


class GroupedQueryAttention(MultiHeadAttention):
    """The book's GroupedQueryAttention(d_in, num_heads, num_kv_groups, head_dim, qk_norm, dtype): the
    package's attention with those heads, called as the book calls it, `att(x, mask, cos, sin)` (the
    rotary tables from compute_rope_params; `mask` True where a query may not look)."""

    def __init__(self, d_in: int, num_heads: int, num_kv_groups: int, head_dim: int | None = None,
                 qk_norm: bool = False, dtype: torch.dtype | None = None) -> None:
        super().__init__(d_in, d_in, context_length=1, dropout=0.0, num_heads=num_heads, out_bias=False,
                         qk_norm=qk_norm, norm_eps=1e-6, num_kv_heads=num_kv_groups, head_dim=head_dim)
        if dtype is not None:
            self.to(dtype)

    # The book's attention holds no mask (the caller passes one), so its state dict has none: a model
    # block's reported mask is ignored on loading, and none is reported.
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        nn.Module._save_to_state_dict(self, destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, *args):
        state_dict.pop(prefix + "mask", None)
        nn.Module._load_from_state_dict(self, state_dict, prefix, *args)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                start_pos: int | torch.Tensor = 0) -> torch.Tensor:
        b, num_tokens, _ = x.shape
        queries, keys, values = self.qkv(x)  # (B, nh, T, hs), (B, n_kv, T, hs): no rotary of its own
        queries, keys = apply_rope(queries, cos, sin, start_pos), apply_rope(keys, cos, sin, start_pos)
        group = self.num_heads // self.num_kv_heads
        keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)  # (B, nh, T, hs)
        context = nn.functional.scaled_dot_product_attention(queries, keys, values, attn_mask=~mask)
        return self.out_proj(context.transpose(1, 2).reshape(b, num_tokens, self.d_out))  # (B, T, C)


class FeedForward(PackageFeedForward):
    """The book's FeedForward(cfg): SwiGLU of width cfg["hidden_dim"] (the package's gate, up, down are
    the book's fc1, fc2, fc3)."""

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        super().__init__(gpt_config(cfg, norm_eps=1e-6).replace(n_experts=0))
        if cfg.get("dtype") is not None:
            self.to(cfg["dtype"])


class MoEFeedForward(PackageMoEFeedForward):
    """The book's MoEFeedForward(cfg): cfg["num_experts"] SwiGLU experts of width moe_intermediate_size,
    cfg["num_experts_per_tok"] per token, their softmax weights over the chosen ones."""

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        super().__init__(gpt_config(cfg, norm_eps=1e-6))
        if cfg.get("dtype") is not None:
            self.to(cfg["dtype"])


class RMSNorm(PackageRMSNorm):
    """The book's RMSNorm(emb_dim, eps=1e-6, bias=False, qwen3_compatible=True): computed in float32
    whatever the input's dtype (as Qwen3 computes it) unless qwen3_compatible is False; `bias` adds a
    learned shift."""

    def __init__(self, emb_dim: int, eps: float = 1e-6, bias: bool = False, qwen3_compatible: bool = True) -> None:
        super().__init__(emb_dim, eps)
        self.qwen3_compatible = qwen3_compatible
        self.shift = nn.Parameter(torch.zeros(emb_dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x.float() if self.qwen3_compatible else x)
        return (y + self.shift if self.shift is not None else y).to(x.dtype)


def load_weights_into_qwen(model: Qwen3Model, param_config: Mapping[str, Any],
                           params: Mapping[str, torch.Tensor]) -> None:
    """Copy a Hugging Face Qwen3 (or Qwen3-MoE) state dict into `model`, shapes checked; without
    lm_head.weight (the tied checkpoints) the head gets a copy of the embedding."""
    load_hf_weights(model, param_config, params)


class Qwen3Tokenizer:
    """The book's Qwen3Tokenizer over a model's tokenizer.json: `encode` wraps the text in Qwen's chat
    format (unless apply_chat_template=False), `decode` keeps special tokens. The end token is
    <|im_end|> for a chat model, <|endoftext|> for a base one (`repo_id` naming "Base"); padding is
    <|endoftext|>."""

    _SPECIAL = re.compile(r"(<\|[^>]+?\|>)")

    def __init__(self, tokenizer_file_path: str = "tokenizer.json", repo_id: str | None = None,
                 apply_chat_template: bool = True, add_generation_prompt: bool = False,
                 add_thinking: bool = False) -> None:
        from tokenizers import Tokenizer  # a dependency of the package, needed only by these wrappers

        path = Path(tokenizer_file_path)
        if not path.is_file():
            raise UsageError(f"tokenizer_file_path={str(path)!r} is not a file; give a model's tokenizer.json "
                             "(this package does not download)")
        self._tok = Tokenizer.from_file(str(path))
        self.apply_chat_template, self.add_generation_prompt = apply_chat_template, add_generation_prompt
        self.add_thinking = add_thinking
        self._special_to_id = {t.content: i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        self.pad_token_id = self._special_to_id.get("<|endoftext|>")
        chat = repo_id is None or "Base" not in repo_id
        self.eos_token_id = self._special_to_id.get("<|im_end|>" if chat else "<|endoftext|>", self.pad_token_id)

    def encode(self, text: str, chat_wrapped: bool | None = None) -> list[int]:
        stripped = text.strip()
        if stripped in self._special_to_id and "\n" not in stripped:  # a lone special token is itself
            return [self._special_to_id[stripped]]
        if self.apply_chat_template if chat_wrapped is None else chat_wrapped:
            text = self._wrap_chat(text)
        ids: list[int] = []
        for part in filter(None, self._SPECIAL.split(text)):
            special = self._special_to_id.get(part)
            ids += [special] if special is not None else self._tok.encode(part, add_special_tokens=False).ids
        return ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def _wrap_chat(self, user_msg: str) -> str:
        text = f"<|im_start|>user\n{user_msg}<|im_end|>\n"
        if self.add_generation_prompt:
            # Qwen3's template: thinking on, the model opens <think> itself; off, an empty think block
            text += "<|im_start|>assistant\n" + ("" if self.add_thinking else "<think>\n\n</think>\n\n")
        return text

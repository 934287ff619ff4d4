"""The book's bonus chapter on Llama 3.2, on the package's GPTModel.

    from build_llm.book.llama3 import Llama3Model, LLAMA32_CONFIG_1B, load_weights_into_llama, Llama3Tokenizer

`Llama3Model(cfg)` is a GPTModel built from the book's dict config (bonus.BookModel): grouped-query
attention, rotary positions with Llama 3's frequency bands (`rope_freq`), RMSNorm with epsilon
1e-5, SwiGLU. It answers `model(idx)` and the KV-cache chapters' calls. `GroupedQueryAttention` and
`FeedForward` are the package's modules built from the book's arguments; `Llama3Tokenizer` reads a
model's `tokenizer.json` (the book reads the original tiktoken file; the special tokens and ids are
the same), and `ChatFormat` writes Llama 3's header and end-of-turn tokens around a message.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from build_llm.book import qwen3
from build_llm.book.bonus import (BookModel, KVCache, apply_rope, compute_rope_params, generate_text_basic_stream,
                                  generate_text_simple, generate_text_simple_stream, gpt_config, load_hf_weights)
from build_llm.errors import UsageError
from build_llm.mlp import FeedForward as PackageFeedForward

__all__ = ["LLAMA32_CONFIG_1B", "LLAMA32_CONFIG_3B", "Llama3Model", "GroupedQueryAttention", "FeedForward",
           "compute_rope_params", "apply_rope", "rescale_theta", "load_weights_into_llama", "Llama3Tokenizer",
           "ChatFormat", "clean_text", "KVCache",
           "generate_text_simple", "generate_text_simple_stream", "generate_text_basic_stream"]


def _llama32(emb_dim: int, n_heads: int, n_layers: int) -> dict[str, Any]:
    return {"vocab_size": 128_256, "context_length": 131_072, "emb_dim": emb_dim, "n_heads": n_heads,
            "n_layers": n_layers, "hidden_dim": 8192, "n_kv_groups": 8, "rope_base": 500_000.0,
            "dtype": torch.bfloat16,
            "rope_freq": {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_context_length": 8192}}


# The published sizes (meta-llama/Llama-3.2-*/config.json), in the book's keys.
LLAMA32_CONFIG_1B = _llama32(2048, 32, 16)
LLAMA32_CONFIG_3B = _llama32(3072, 24, 28)


class Llama3Model(BookModel):
    """The book's Llama3Model: a GPTModel of the dict config (see bonus.BookModel)."""

    norm_eps = 1e-5


class GroupedQueryAttention(qwen3.GroupedQueryAttention):
    """The book's Llama GroupedQueryAttention(d_in, d_out, num_heads, num_kv_groups, dtype), called as
    `att(x, mask, cos, sin)`."""

    def __init__(self, d_in: int, d_out: int, num_heads: int, num_kv_groups: int,
                 dtype: torch.dtype | None = None) -> None:
        if d_out % num_heads:
            raise UsageError(f"d_out={d_out} is not divisible by num_heads={num_heads}")
        super().__init__(d_in, num_heads, num_kv_groups, head_dim=d_out // num_heads, dtype=dtype)


class FeedForward(PackageFeedForward):
    """The book's FeedForward(cfg): SwiGLU of width cfg["hidden_dim"] (gate, up, down: the book's fc1,
    fc2, fc3)."""

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        super().__init__(gpt_config(cfg, norm_eps=1e-5))
        if cfg.get("dtype") is not None:
            self.to(cfg["dtype"])


def rescale_theta(theta_old: float, context_length_old: int, context_length_new: int) -> float:
    """The rotary base scaled with the context length, as the book's first Llama 3.2 version did."""
    return theta_old * context_length_new / context_length_old


def load_weights_into_llama(model: Llama3Model, param_config: Mapping[str, Any],
                            params: Mapping[str, torch.Tensor]) -> None:
    """Copy a Hugging Face Llama state dict into `model`, shapes checked; without lm_head.weight (Llama
    3.2's tied checkpoints) the head gets a copy of the embedding."""
    load_hf_weights(model, param_config, params)


class Llama3Tokenizer:
    """The book's Llama3Tokenizer, over a model's tokenizer.json: `special_tokens` maps each special
    token to its id; `encode(text, bos, eos)` adds <|begin_of_text|> / <|end_of_text|> on request.
    Special tokens written in the text are read as those tokens."""

    def __init__(self, model_path: str) -> None:
        from tokenizers import Tokenizer  # a dependency of the package, needed only by these wrappers

        if not Path(model_path).is_file():
            raise UsageError(f"model_path={str(model_path)!r} is not a file; give the model's tokenizer.json")
        self.model = Tokenizer.from_file(str(model_path))
        self.special_tokens = {t.content: i for i, t in self.model.get_added_tokens_decoder().items() if t.special}

    def encode(self, text: str, bos: bool = False, eos: bool = False, allowed_special: Any = (),
               disallowed_special: Any = ()) -> list[int]:
        ids = [self.special_tokens["<|begin_of_text|>"]] if bos else []
        ids += self.model.encode(text, add_special_tokens=False).ids  # the file's own BOS template left out
        return ids + ([self.special_tokens["<|end_of_text|>"]] if eos else [])

    def decode(self, tokens: list[int]) -> str:
        return self.model.decode(list(tokens), skip_special_tokens=False)


class ChatFormat:
    """Llama 3's chat format: <|start_header_id|>role<|end_header_id|>\\n\\n, the message, <|eot_id|>."""

    def __init__(self, tokenizer: Llama3Tokenizer) -> None:
        self.tokenizer = tokenizer

    def encode_header(self, message: Mapping[str, str]) -> list[int]:
        special = self.tokenizer.special_tokens
        return ([special["<|start_header_id|>"]] + self.tokenizer.encode(message["role"])
                + [special["<|end_header_id|>"]] + self.tokenizer.encode("\n\n"))

    def encode(self, text: str, allowed_special: Any = None) -> list[int]:
        """A user message: its header, the stripped text, <|eot_id|>."""
        tokens = self.encode_header({"role": "user", "content": text})
        tokens += self.tokenizer.encode(text.strip())
        return tokens + [self.tokenizer.special_tokens["<|eot_id|>"]]

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids)


def clean_text(text: str, header_end: str = "assistant<|end_header_id|>\n\n") -> str:
    """The text after the first `header_end` (the assistant's answer), stripped; else the text."""
    index = text.find(header_end)
    return text[index + len(header_end):].strip() if index != -1 else text

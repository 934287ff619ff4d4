"""What the decoding dtypes cost in quality: the held-out perplexity of a trained checkpoint with
float32, bfloat16, int8 and int4 decoding weights (`build-llm bench --checkpoint`).

float32, bfloat16 and int8 score each window as a prompt: at quant.PREFILL_ROWS rows or more, PyTorch's float32
product on the dequantised weights, the same numbers as decoding up to float rounding (int8's kernels round the
inputs to 15 bits). int4's kernels also round each product's input to int8 per group of 64 (see quant), so where
they run int4 scores each window as `generate` decodes it: one token at a time through the KV cache and the
compiled step, the windows of a batch as its rows. (Without them, int4's products are PyTorch's on the
dequantised weights, the inputs unrounded, and a window is scored as a prompt: one token at a time would
dequantise every weight once a token.)"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from build_llm.data.corpus import read_text
from build_llm.data.markov import ABC_EVAL_SEED, ABC_EVAL_WORDS, abc_text
from build_llm.errors import UsageError
from build_llm.gpt import GPTModel
from build_llm.infer import kernels
from build_llm.infer.quant import DECODE_DTYPES, prepare_for_decoding
from build_llm.store.checkpoint import load_checkpoint


def heldout_ids(tokenizer: Any, text: str | os.PathLike[str] | None) -> tuple[list[int], str]:
    """Token ids of held-out text: the last 10% of `text` (the trainer's validation split), or with
    no text a held-out draw of the ABC source (as `build-llm eval` uses)."""
    if text is None:
        return tokenizer.encode(abc_text(ABC_EVAL_WORDS, ABC_EVAL_SEED)), "a held-out ABC draw"
    ids = tokenizer.encode(read_text(text))
    return ids[len(ids) - len(ids) // 10:], f"the last 10% of {Path(text).name}"


@torch.no_grad()
def heldout_loss(model: nn.Module, ids: list[int], max_windows: int, one_token_steps: bool = False) -> tuple[float, int]:
    """Mean next-token cross-entropy over up to `max_windows` non-overlapping context windows: each window as one
    prompt, or with `one_token_steps` one token at a time through a KV cache (as decoding computes them)."""
    T = model.cfg.context_length
    n = min(max_windows, (len(ids) - 1) // T)
    if n < 1:
        raise UsageError(f"held-out text has {len(ids)} tokens: too short for one window of {T + 1}")
    data = torch.tensor(ids[:n * T + 1])
    x, y = data[:-1].view(n, T), data[1:].view(n, T)
    total = 0.0
    for i in range(0, n, 8):
        xb, yb = x[i:i + 8], y[i:i + 8]
        if one_token_steps:  # each step's logits scored and let go (all T of them at once: twice a prompt's memory)
            cache = model.new_cache(len(xb), T)
            for t in range(T):
                logits = model(xb[:, t:t + 1], cache=cache)[:, 0].float()  # (b, 1, V) -> (b, V)
                total += F.cross_entropy(logits, yb[:, t], reduction="sum").item()
        else:
            total += F.cross_entropy(model(xb).float().flatten(0, 1), yb.flatten(), reduction="sum").item()
    return total / (n * T), n * T


def bench_perplexity(checkpoint: str | os.PathLike[str], text: str | os.PathLike[str] | None, max_windows: int,
                     log: Callable[[str], None]) -> dict[str, Any]:
    """Held-out perplexity of a trained checkpoint with float32, bfloat16, int8 and int4 decoding weights."""
    ckpt = load_checkpoint(checkpoint)
    if ckpt.tokenizer is None:
        raise UsageError(f"checkpoint {str(checkpoint)!r} has no tokenizer.json; it cannot encode the held-out text")
    ids, source = heldout_ids(ckpt.tokenizer, text)
    log(f"perplexity of {ckpt.path} on {source}: float32, bfloat16, int8, int4 weights")
    out: dict[str, Any] = {"checkpoint": str(ckpt.path), "text": source, "perplexity": {}}
    state = ckpt.model.state_dict()
    for dtype in DECODE_DTYPES:
        model = GPTModel(ckpt.model.cfg)
        model.load_state_dict(state)
        one_token_steps = dtype == "int4" and kernels.available()  # see the top: the kernels' input rounding
        loss, tokens = heldout_loss(prepare_for_decoding(model, dtype), ids, max_windows, one_token_steps)
        out["perplexity"][dtype] = math.exp(loss)
        out["tokens"] = tokens
    fp32 = out["perplexity"]["float32"]
    out["relative_change"] = {k: v / fp32 - 1 for k, v in out["perplexity"].items() if k != "float32"}
    return out

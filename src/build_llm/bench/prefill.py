"""Prefill speed: one long prompt (512 tokens in the full suite) run through the model into an empty KV
cache, as `generate` runs it before its first new token: ours with each decoding dtype, its output head
for the last position only (all generation needs), and ours with every position's logits, against
Hugging Face's forward over the same prompt (every position's logits, as its forward gives them).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn

from build_llm.bench.decode import LOW
from build_llm.bench.suite import Suite, alternate, medians
from build_llm.gpt import GPTModel


def prefill(model: GPTModel, ids: torch.Tensor, last_only: bool = True) -> torch.Tensor:
    """The prompt's logits (the last position's, or all) after a cached prefill, as `generate` runs it."""
    with torch.inference_mode():
        return model(ids, cache=model.new_cache(ids.shape[0]), last_only=last_only)


def bench_prefill(suite: Suite, models: tuple[GPTModel, dict[str, GPTModel], nn.Module],
                  log: Callable[[str], None]) -> dict[str, Any]:
    """Tokens/s of a `suite.prefill_tokens` prompt (random ids, seed 0) for each candidate, alternating rounds;
    and whether ours and Hugging Face's last logits agree (float32, the same weights)."""
    model, low, hf = models
    n = suite.prefill_tokens
    ids = torch.randint(0, model.cfg.vocab_size, (1, n), generator=torch.Generator().manual_seed(0))

    def hf_forward() -> torch.Tensor:
        with torch.inference_mode():
            return hf(ids).logits  # (1, n, V)

    ours, theirs = prefill(model, ids)[0, -1], hf_forward()[0, -1]
    agree = bool(torch.allclose(ours, theirs, atol=1e-3 * theirs.abs().max().item(), rtol=0))
    candidates = {"ours": lambda: prefill(model, ids).shape[0] * n,
                  **{LOW[dtype]: (lambda m=m: prefill(m, ids).shape[0] * n) for dtype, m in low.items()},
                  "ours all positions": lambda: prefill(model, ids, last_only=False).shape[0] * n,
                  "hf forward": lambda: hf_forward().shape[0] * n}
    log(f"prefill of {n} tokens: {len(candidates)} candidates x {suite.rounds} rounds; last logits agree with "
        f"Hugging Face: {agree}")
    rates = alternate(candidates, suite.rounds)
    return {"prompt_tokens": n, "tokens_per_s": medians(rates), "rounds": rates, "last_logits_agree_with_hf": agree}

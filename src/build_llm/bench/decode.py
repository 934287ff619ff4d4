"""Decoding speed, batch 1, greedy, from a short prompt: this package's cached `generate` (fp32, and
the opt-in bf16, int8 and int4 decoding weights of quant.py) vs Hugging Face `GPT2LMHeadModel.generate`
holding the same weights (so the tokens can be compared too) vs the seed's `generate_text_simple`,
which recomputes the whole context for every token; a Llama-shaped model (smollm2-360m: RMSNorm,
rotary positions, SwiGLU, 3:1 grouped key/value heads) in bf16 and int8 vs `LlamaForCausalLM.generate`
fp32 on the same weights; and the tiny r-abc model, whose steps are too small to share among threads.

`generate_text_simple` at 1,000 new tokens costs minutes on a CPU (step t runs a t-token forward),
so its time is integrated over the context length from steps measured at a few lengths: each
measured step is one call of the real function, and the total is the trapezoid sum over all steps.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch
import torch.nn as nn

from build_llm import runtime
from build_llm.bench.ceilings import fits_in
from build_llm.bench.suite import Suite, alternate, medians
from build_llm.config import GPTConfig
from build_llm.errors import UsageError
from build_llm.gpt import GPTModel, use_decoding_layout
from build_llm.infer.generate import generate, generate_text_simple
from build_llm.infer.quant import prepare_for_decoding
from build_llm.interop.hf import to_hf
from build_llm.sizing import decode_bytes_per_token, kv_cache_bytes

PROMPT = [46, 308, 5549, 523, 1350, 645]  # the seed notebook's prompt ("O gato dorme no")
LOW = {"bfloat16": "ours bf16 weights", "int8": "ours int8 weights", "int4": "ours int4 weights"}  # dtype -> row


def prompt_ids(cfg: GPTConfig) -> torch.Tensor:
    ids = PROMPT if cfg.vocab_size > max(PROMPT) else [i % cfg.vocab_size for i in PROMPT]
    return torch.tensor([ids])


def hf_twin(model: GPTModel) -> nn.Module:
    """GPT2LMHeadModel holding copies of `model`'s weights; it never stops early at an end token."""
    hf = to_hf(model).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return hf


def hf_generate(hf: nn.Module, idx: torch.Tensor, new_tokens: int) -> torch.Tensor:
    with torch.inference_mode():
        return hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False)


# --- the seed's loop, integrated over the context ------------------------------------------------
def simple_step_lengths(prompt_len: int, new_tokens: int, samples: int) -> list[int]:
    """Context lengths at which to time one step of generate_text_simple (first and last included)."""
    last = prompt_len + new_tokens - 1
    return sorted({round(prompt_len + i * (last - prompt_len) / (samples - 1)) for i in range(samples)})


def integrate_steps(lengths: list[int], step_seconds: list[float]) -> float:
    """Total seconds of the steps at every length from lengths[0] to lengths[-1], interpolating
    linearly between the measured lengths (exact when a step's cost is linear in its length)."""
    total = step_seconds[0]
    for (a, ta), (b, tb) in zip(zip(lengths, step_seconds), zip(lengths[1:], step_seconds[1:])):
        total += (b - a) * (ta + tb) / 2 + (tb - ta) / 2  # the steps a+1..b
    return total


def simple_step(model: GPTModel, length: int, step_times: dict[int, list[float]]) -> Callable[[], float]:
    """A candidate: one step of generate_text_simple at `length` context tokens (their values do not
    change its cost), its seconds appended to step_times[length]."""
    cfg = model.cfg
    window = torch.randint(0, cfg.vocab_size, (1, length), generator=torch.Generator().manual_seed(length))

    def run() -> float:
        start = time.perf_counter()
        generate_text_simple(model, window, 1, cfg.context_length)
        step_times.setdefault(length, []).append(time.perf_counter() - start)
        return 1.0
    return run


def seed_style(new_tokens: int, lengths: list[int], step_times: dict[int, list[float]], cached: float,
               rounds: int) -> dict[str, Any]:
    """generate_text_simple's tokens/s for `new_tokens` (each round's steps integrated over the
    lengths; the median round) beside the cached rate `cached`."""
    per_round = [integrate_steps(lengths, [step_times[length][-rounds:][r] for length in lengths])
                 for r in range(rounds)]
    simple_tps = new_tokens / statistics.median(per_round)
    return {"new_tokens": new_tokens, "simple_tokens_per_s": simple_tps, "cached_tokens_per_s": cached,
            "speedup": cached / simple_tps, "measured_lengths": lengths}


# --- gpt2-small: ours vs Hugging Face vs the seed ------------------------------------------------
def decoding_models(cfg: GPTConfig) -> tuple[GPTModel, dict[str, GPTModel], nn.Module]:
    """The decoding model (random weights, seed 0), its copies with bf16, int8 and int4 decoding weights (by
    dtype), and its Hugging Face twin."""
    torch.manual_seed(0)
    model = GPTModel(cfg).eval()
    low = {}
    for dtype in LOW:
        low[dtype] = GPTModel(cfg).eval()
        low[dtype].load_state_dict(model.state_dict())
        prepare_for_decoding(low[dtype], dtype)  # as `build-llm generate --dtype` does
    hf = hf_twin(model)
    use_decoding_layout(model)  # as load_model and `build-llm generate` do
    return model, low, hf


def bench_decoding(suite: Suite, models: tuple[GPTModel, dict[str, GPTModel], nn.Module],
                   log: Callable[[str], None]) -> dict[str, Any]:
    """`models` as `decoding_models` makes them."""
    cfg = suite.decode_cfg
    model, low, hf = models
    idx = prompt_ids(cfg)
    n, n_long = suite.decode_tokens, suite.long_tokens
    if idx.shape[1] + n_long > cfg.context_length:
        raise UsageError(f"bench: prompt + {n_long} tokens exceed the context {cfg.context_length}")

    ours = generate(model, idx, n)
    same_as_hf = torch.equal(ours, hf_generate(hf, idx, n))
    agree = {dtype: int((generate(m, idx, n) == ours)[0, idx.shape[1]:].cumprod(0).sum()) for dtype, m in low.items()}
    log(f"decoding {n} tokens: ours == Hugging Face tokens: {same_as_hf}; bf16 weights agree on the first "
        f"{agree['bfloat16']}, int8 on the first {agree['int8']}, int4 on the first {agree['int4']}")

    lengths = {k: simple_step_lengths(idx.shape[1], k, suite.simple_samples) for k in (n, n_long)}
    step_times: dict[int, list[float]] = {}
    candidates = {
        "ours": lambda: generate(model, idx, n).shape[1] - idx.shape[1],
        **{LOW[dtype]: (lambda m=m: generate(m, idx, n).shape[1] - idx.shape[1]) for dtype, m in low.items()},
        "hf generate": lambda: hf_generate(hf, idx, n).shape[1] - idx.shape[1],
        f"ours {n_long}": lambda: generate(model, idx, n_long).shape[1] - idx.shape[1],
    }
    for length in sorted(set(lengths[n]) | set(lengths[n_long])):
        candidates[f"simple step @{length}"] = simple_step(model, length, step_times)
    log(f"decoding: {len(candidates)} candidates x {suite.rounds} rounds")
    rates = alternate(candidates, suite.rounds, warmup=0)
    tps = medians({k: v for k, v in rates.items() if not k.startswith("simple")})
    cached = {n: tps["ours"], n_long: tps[f"ours {n_long}"]}
    return {
        "model": cfg.to_dict(), "prompt_tokens": idx.shape[1], "new_tokens": n,
        "tokens_per_s": {k: tps[k] for k in ("ours", *LOW.values(), "hf generate")},
        "rounds": rates, "same_tokens_as_hf": same_as_hf, "bf16_tokens_agree": agree["bfloat16"],
        "int8_tokens_agree": agree["int8"], "int4_tokens_agree": agree["int4"],
        "weight_bytes_per_token": {"float32": decode_bytes_per_token(model),
                                   **{dtype: decode_bytes_per_token(m) for dtype, m in low.items()}},
        "kv_cache_bytes": kv_cache_bytes(cfg),
        "seed_style": {str(k): seed_style(k, lengths[k], step_times, cached[k], suite.rounds) for k in (n, n_long)},
    }


def add_bandwidth_bounds(decoding: dict[str, Any], bandwidth_gbs: float) -> None:
    """Each dtype's bound (bandwidth / weight bytes read per token) and the fraction of it reached,
    into `decoding`; Hugging Face's against the float32 bound."""
    for dtype, key in {"float32": "ours", **LOW}.items():
        if key not in decoding["tokens_per_s"]:  # a report from before int4
            continue
        bound = bandwidth_gbs * 1e9 / decoding["weight_bytes_per_token"][dtype]
        decoding.setdefault("bound_tokens_per_s", {})[key] = bound
        decoding.setdefault("fraction_of_bound", {})[key] = decoding["tokens_per_s"][key] / bound
    decoding["fraction_of_bound"]["hf generate"] = (decoding["tokens_per_s"]["hf generate"]
                                                    / decoding["bound_tokens_per_s"]["ours"])


# --- a Llama-shaped model: ours bf16 and int8 vs Hugging Face's LlamaForCausalLM fp32 ------------------
def bench_llama_decoding(suite: Suite, log: Callable[[str], None]) -> dict[str, Any]:
    """`suite.llama_cfg` (random weights, seed 0) decoding `suite.decode_tokens` greedy tokens at batch 1: ours with
    bf16 and int8 decoding weights (the compiled one-token step) vs Hugging Face `generate` fp32 of the same model
    (LlamaForCausalLM, made by interop's export), in alternating rounds."""
    cfg, n = suite.llama_cfg, suite.decode_tokens
    torch.manual_seed(0)
    model = GPTModel(cfg).eval()
    hf = hf_twin(model)
    low = {}
    for dtype in ("bfloat16", "int8"):
        low[dtype] = GPTModel(cfg).eval()
        low[dtype].load_state_dict(model.state_dict())
        prepare_for_decoding(low[dtype], dtype)  # as `build-llm generate --dtype` does
    del model  # the float32 weights live on in the Hugging Face copy only
    idx = prompt_ids(cfg)
    theirs = hf_generate(hf, idx, n)
    agree = {dtype: int((generate(m, idx, n) == theirs)[0, idx.shape[1]:].cumprod(0).sum()) for dtype, m in low.items()}
    log(f"decoding {suite.llama_name}: {n} tokens; with bf16 weights the first {agree['bfloat16']} equal Hugging "
        f"Face's fp32, with int8 the first {agree['int8']}")
    candidates = {
        "ours bf16 weights": lambda: generate(low["bfloat16"], idx, n).shape[1] - idx.shape[1],
        "ours int8 weights": lambda: generate(low["int8"], idx, n).shape[1] - idx.shape[1],
        "hf generate": lambda: hf_generate(hf, idx, n).shape[1] - idx.shape[1],
    }
    log(f"decoding {suite.llama_name}: {len(candidates)} candidates x {suite.rounds} rounds")
    rates = alternate(candidates, suite.rounds)
    return {"name": suite.llama_name, "model": cfg.to_dict(), "prompt_tokens": idx.shape[1], "new_tokens": n,
            "tokens_per_s": medians(rates), "rounds": rates, "tokens_agree_with_hf": agree,
            "compiled_step": all(m.decode_step is not None for m in low.values())}


def add_cache_levels(decoding: dict[str, Any], caches: dict[str, int]) -> None:
    """Where each dtype's weights (the bytes a token reads) fit, into `decoding`: the smallest cache level of
    `caches` that holds them, else "DRAM". Weights that fit in a cache can be read faster than the DRAM
    bound says, so the bound is only indicative for them."""
    decoding["weights_fit_in"] = {dtype: fits_in(nbytes, caches)
                                  for dtype, nbytes in decoding["weight_bytes_per_token"].items()}


# --- r-abc: the one-thread rule ------------------------------------------------------------------
def bench_tiny_decoding(suite: Suite, log: Callable[[str], None]) -> dict[str, Any]:
    """The `r-abc` model (a few hundred thousand weights) decoding `suite.tiny_tokens` characters:
    ours (one thread for a small model, runtime.decoding_threads) vs ours on every thread vs the
    seed's `generate_text_simple`; all greedy from "A", so all give the same characters."""
    cfg = GPTConfig.from_preset("r-abc")
    torch.manual_seed(0)
    model = GPTModel(cfg).eval()
    use_decoding_layout(model)
    idx, n = torch.tensor([[2]]), suite.tiny_tokens  # "A" (id 2 after <PAD> and the newline)

    def every_thread() -> float:
        rule = runtime.ONE_THREAD_BELOW
        runtime.ONE_THREAD_BELOW = 0  # the one-thread rule off: torch's own thread count
        try:
            return generate(model, idx, n).shape[1] - 1
        finally:
            runtime.ONE_THREAD_BELOW = rule

    same = torch.equal(generate(model, idx, n), generate_text_simple(model, idx, n, cfg.context_length))
    candidates = {"ours": lambda: generate(model, idx, n).shape[1] - 1,
                  f"ours {torch.get_num_threads()} threads": every_thread,
                  "seed generate_text_simple": lambda: generate_text_simple(model, idx, n, cfg.context_length).shape[1] - 1}
    log(f"decoding r-abc: {n} characters, {len(candidates)} candidates x {suite.rounds} rounds")
    rates = alternate(candidates, suite.rounds)
    return {"model": cfg.to_dict(), "new_tokens": n, "tokens_per_s": medians(rates), "rounds": rates,
            "same_tokens": same, "one_thread_below": runtime.ONE_THREAD_BELOW}

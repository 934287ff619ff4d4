"""Benchmarks against peers, measured side by side in one run.

Every comparison runs its candidates in alternating rounds inside this one process (A B C, A B C,
...), so that a machine that gets busier or quieter part-way slows every candidate alike; the report
gives the median of the rounds and ratios of medians, never a single timing.

- decoding: `gpt2-small` (random weights), batch 1, greedy, from a short prompt: this package's
  cached `generate` (fp32, and the opt-in bf16 and int8 decoding weights of quant.py) vs Hugging Face
  `GPT2LMHeadModel.generate` holding the same weights (so the tokens can be compared too) vs the
  seed's `generate_text_simple`, which recomputes the whole context for every token.
- training: tokens/s of one optimizer step (forward, loss, backward, AdamW) of GPTModel vs
  GPT2LMHeadModel of the same shape, fp32 and under bf16 autocast.
- ceilings, measured in the same run: memory bandwidth (a matrix-vector product far larger than the
  caches) and matrix-multiply FLOP/s; decoding is reported as a fraction of the bandwidth bound
  (weight bytes read per token), training as model FLOPs utilisation (PaLM appendix B: 6N plus
  12 * layers * context * width FLOPs per token) against the measured matmul rate of its dtype.
- peak memory of decoding and training, each measured in a fresh child process (peak RSS above an
  interpreter with torch imported).
- perplexity (with `--checkpoint`, a trained model): fp32 vs bf16 vs int8 decoding weights on
  held-out text (the last 10% of `--text`, the trainer's validation split, or a held-out ABC draw).

`generate_text_simple` at 1,000 new tokens costs minutes on a CPU (step t runs a t-token forward),
so its time is integrated over the context length from steps measured at a few lengths: each
measured step is one call of the real function, and the total is the trapezoid sum over all steps.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from build_llm.config import GPTConfig
from build_llm.errors import UsageError
from build_llm.store.fsio import atomic_path
from build_llm.infer.generate import generate, generate_text_simple
from build_llm.gpt import GPTModel, use_decoding_layout
from build_llm.infer.quant import DecodeLinear, prepare_for_decoding
from build_llm.runtime import autocast

PROMPT = [46, 308, 5549, 523, 1350, 645]  # the seed notebook's prompt ("O gato dorme no")


@dataclass(frozen=True)
class TrainShape:
    name: str
    cfg: GPTConfig
    batch_size: int


@dataclass(frozen=True)
class Plan:
    """What one run measures: the full benchmark or the seconds-long `--quick` one."""

    decode_cfg: GPTConfig
    decode_tokens: int
    long_tokens: int
    simple_samples: int
    train_shapes: tuple[TrainShape, ...]
    rounds: int
    bandwidth_mb: int
    matmul_n: int
    memory_peers: bool
    cli_steps: int = 20
    cli_rounds: int = 2
    cli_shape: tuple[str, ...] = ()  # extra `build-llm train` flags that shrink the model for --quick
    tiny_tokens: int = 1000  # characters the r-abc model decodes (its context is 16: the window slides)


def shakespeare_char(**overrides: Any) -> GPTConfig:
    """nanoGPT's shakespeare-char shape in GPT-2's layout: 6 layers, 6 heads, 384 wide, context 256,
    a 65-character vocabulary and its dropout of 0.2."""
    return GPTConfig.from_preset("gpt2-small", **{"vocab_size": 65, "context_length": 256, "emb_dim": 384,
                                                  "n_heads": 6, "n_layers": 6, "drop_rate": 0.2, **overrides})


def full_plan() -> Plan:
    return Plan(
        decode_cfg=GPTConfig.from_preset("gpt2-small"), decode_tokens=200, long_tokens=1000, simple_samples=5,
        train_shapes=(TrainShape("shakespeare-char", shakespeare_char(), 8),
                      TrainShape("gpt2-small ctx256", GPTConfig.from_preset("gpt2-small", context_length=256), 2)),
        rounds=3, bandwidth_mb=512, matmul_n=2048, memory_peers=True,
    )


def quick_plan() -> Plan:
    tiny = dict(vocab_size=96, context_length=64, emb_dim=64, n_heads=4, n_layers=2)
    return Plan(
        decode_cfg=GPTConfig.from_preset("gpt2-small", **tiny), decode_tokens=12, long_tokens=40, simple_samples=3,
        train_shapes=(TrainShape("tiny-char", shakespeare_char(**{**tiny, "context_length": 32}), 2),),
        rounds=2, bandwidth_mb=16, matmul_n=256, memory_peers=False, cli_steps=3, cli_rounds=1, tiny_tokens=40,
        cli_shape=("--context-length", "32", "--emb-dim", "64", "--n-layers", "2", "--n-heads", "4"),
    )


# --- timing --------------------------------------------------------------------------------------
def alternate(candidates: dict[str, Callable[[], float]], rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Run each candidate once per round, in turn; each returns its units of work (tokens).

    Returns the rate (units per second) of every round, per candidate.
    """
    for run in candidates.values():
        for _ in range(warmup):
            run()
    rates: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, run in candidates.items():
            start = time.perf_counter()
            units = run()
            rates[name].append(units / (time.perf_counter() - start))
    return rates


def medians(rates: dict[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(values) for name, values in rates.items()}


# --- ceilings ------------------------------------------------------------------------------------
def measure_bandwidth(megabytes: int = 512, rounds: int = 5) -> float:
    """Memory bandwidth in GB/s: an fp32 matrix-vector product whose matrix is far larger than the
    caches, so that each round streams it from memory once (what decoding does with the weights)."""
    cols = 4096
    matrix = torch.randn(megabytes * 2**20 // (4 * cols), cols)
    vector = torch.randn(cols)
    times = []
    for _ in range(rounds + 1):
        start = time.perf_counter()
        torch.mv(matrix, vector)
        times.append(time.perf_counter() - start)
    return matrix.numel() * 4 / statistics.median(times[1:]) / 1e9


def measure_matmul(dtype: torch.dtype, n: int = 2048, rounds: int = 5) -> float:
    """Matrix-multiply throughput in GFLOP/s for square n x n matrices of `dtype`."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    times = []
    for _ in range(rounds + 1):
        start = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times[1:]) / 1e9


# --- model arithmetic ----------------------------------------------------------------------------
def decode_bytes_per_token(model: GPTModel) -> int:
    """Bytes of weights one decoding step reads: every parameter (and int8 weight) once, except the
    embedding tables, of which a lookup reads one row (a tied table is read whole, as the output head)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())  # tied weights appear once
    total += sum(b.numel() * b.element_size() for m in model.modules() if isinstance(m, DecodeLinear) for b in m.buffers())
    tied = model.cfg.tie_weights and not isinstance(model.out_head, DecodeLinear)
    tables = [t.weight for t in (model.pos_emb,) if t is not None] + ([] if tied else [model.tok_emb.weight])
    return total - sum(t.numel() * t.element_size() for t in tables)


def matmul_params(cfg: GPTConfig) -> int:
    """N of the FLOP count: parameters that take part in matrix products (not the lookup tables)."""
    with torch.device("meta"):
        model = GPTModel(cfg)
    n = sum(p.numel() for p in model.parameters()) - (model.pos_emb.weight.numel() if model.pos_emb is not None else 0)
    return n if cfg.tie_weights else n - model.tok_emb.weight.numel()


def train_flops_per_token(cfg: GPTConfig) -> int:
    """PaLM appendix B: 6N for the matrix products (forward 2N, backward 4N) plus 12 * L * T * C for
    attention's scores and weighted sums over a context of T."""
    return 6 * matmul_params(cfg) + 12 * cfg.n_layers * cfg.context_length * cfg.emb_dim


# --- decoding ------------------------------------------------------------------------------------
def prompt_ids(cfg: GPTConfig) -> torch.Tensor:
    ids = PROMPT if cfg.vocab_size > max(PROMPT) else [i % cfg.vocab_size for i in PROMPT]
    return torch.tensor([ids])


def hf_twin(model: GPTModel) -> nn.Module:
    """GPT2LMHeadModel holding copies of `model`'s weights; it never stops early at an end token."""
    from build_llm.interop.hf import to_hf

    hf = to_hf(model).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return hf


def hf_generate(hf: nn.Module, idx: torch.Tensor, new_tokens: int) -> torch.Tensor:
    with torch.inference_mode():
        return hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False)


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


def bench_decoding(plan: Plan, log: Callable[[str], None]) -> dict[str, Any]:
    cfg = plan.decode_cfg
    torch.manual_seed(0)
    model = GPTModel(cfg).eval()
    low = {}
    for dtype in ("bfloat16", "int8"):
        low[dtype] = GPTModel(cfg).eval()
        low[dtype].load_state_dict(model.state_dict())
        prepare_for_decoding(low[dtype], dtype)  # as `build-llm generate --dtype` does
    model_bf16, model_int8 = low["bfloat16"], low["int8"]
    hf = hf_twin(model)
    use_decoding_layout(model)  # as load_model and `build-llm generate` do
    idx = prompt_ids(cfg)
    n, n_long = plan.decode_tokens, plan.long_tokens
    if idx.shape[1] + n_long > cfg.context_length:
        raise UsageError(f"bench: prompt + {n_long} tokens exceed the context {cfg.context_length}")

    ours = generate(model, idx, n)
    same_as_hf = torch.equal(ours, hf_generate(hf, idx, n))
    bf16_agree = int((generate(model_bf16, idx, n) == ours)[0, idx.shape[1]:].cumprod(0).sum())
    int8_agree = int((generate(model_int8, idx, n) == ours)[0, idx.shape[1]:].cumprod(0).sum())
    log(f"decoding {n} tokens: ours == Hugging Face tokens: {same_as_hf}; bf16 weights agree on the first "
        f"{bf16_agree}, int8 on the first {int8_agree}")

    lengths = {k: simple_step_lengths(idx.shape[1], k, plan.simple_samples) for k in (n, n_long)}
    step_times: dict[int, list[float]] = {}

    def simple_step(length: int) -> Callable[[], float]:
        # One step at `length` context tokens; their values do not change its cost.
        window = torch.randint(0, cfg.vocab_size, (1, length), generator=torch.Generator().manual_seed(length))

        def run() -> float:
            start = time.perf_counter()
            generate_text_simple(model, window, 1, cfg.context_length)
            step_times.setdefault(length, []).append(time.perf_counter() - start)
            return 1.0
        return run

    candidates = {
        "ours": lambda: generate(model, idx, n).shape[1] - idx.shape[1],
        "ours bf16 weights": lambda: generate(model_bf16, idx, n).shape[1] - idx.shape[1],
        "ours int8 weights": lambda: generate(model_int8, idx, n).shape[1] - idx.shape[1],
        "hf generate": lambda: hf_generate(hf, idx, n).shape[1] - idx.shape[1],
        f"ours {n_long}": lambda: generate(model, idx, n_long).shape[1] - idx.shape[1],
    }
    for length in sorted(set(lengths[n]) | set(lengths[n_long])):
        candidates[f"simple step @{length}"] = simple_step(length)
    log(f"decoding: {len(candidates)} candidates x {plan.rounds} rounds")
    rates = alternate(candidates, plan.rounds, warmup=0)
    step_times = {k: v[-plan.rounds:] for k, v in step_times.items()}
    tps = medians({k: v for k, v in rates.items() if not k.startswith("simple")})

    seed_style = {}
    for k in (n, n_long):
        per_round = [integrate_steps(lengths[k], [step_times[length][r] for length in lengths[k]])
                     for r in range(plan.rounds)]
        cached = tps["ours"] if k == n else tps[f"ours {n_long}"]
        simple_tps = k / statistics.median(per_round)
        seed_style[str(k)] = {"new_tokens": k, "simple_tokens_per_s": simple_tps, "cached_tokens_per_s": cached,
                              "speedup": cached / simple_tps, "measured_lengths": lengths[k]}

    bytes32, bytes16, bytes8 = (decode_bytes_per_token(m) for m in (model, model_bf16, model_int8))
    kv = 2 * cfg.n_layers * cfg.context_length * cfg.emb_dim * 4
    return {
        "model": cfg.to_dict(), "prompt_tokens": idx.shape[1], "new_tokens": n,
        "tokens_per_s": {k: tps[k] for k in ("ours", "ours bf16 weights", "ours int8 weights", "hf generate")},
        "rounds": rates, "same_tokens_as_hf": same_as_hf, "bf16_tokens_agree": bf16_agree,
        "int8_tokens_agree": int8_agree,
        "weight_bytes_per_token": {"float32": bytes32, "bfloat16": bytes16, "int8": bytes8}, "kv_cache_bytes": kv,
        "seed_style": seed_style,
    }


def bench_tiny_decoding(plan: Plan, log: Callable[[str], None]) -> dict[str, Any]:
    """The `r-abc` model (a few hundred thousand weights) decoding `plan.tiny_tokens` characters:
    ours (one thread for a small model, runtime.decoding_threads) vs ours on every thread vs the
    seed's `generate_text_simple`; all greedy from "A", so all give the same characters."""
    from build_llm import runtime

    cfg = GPTConfig.from_preset("r-abc")
    torch.manual_seed(0)
    model = GPTModel(cfg).eval()
    use_decoding_layout(model)
    idx, n = torch.tensor([[2]]), plan.tiny_tokens  # "A" (id 2 after <PAD> and the newline)

    def every_thread() -> float:
        rule = runtime.DECODE_ONE_THREAD_BELOW
        runtime.DECODE_ONE_THREAD_BELOW = 0  # the one-thread rule off: torch's own thread count
        try:
            return generate(model, idx, n).shape[1] - 1
        finally:
            runtime.DECODE_ONE_THREAD_BELOW = rule

    same = torch.equal(generate(model, idx, n), generate_text_simple(model, idx, n, cfg.context_length))
    candidates = {"ours": lambda: generate(model, idx, n).shape[1] - 1,
                  f"ours {torch.get_num_threads()} threads": every_thread,
                  "seed generate_text_simple": lambda: generate_text_simple(model, idx, n, cfg.context_length).shape[1] - 1}
    log(f"decoding r-abc: {n} characters, {len(candidates)} candidates x {plan.rounds} rounds")
    rates = alternate(candidates, plan.rounds)
    return {"model": cfg.to_dict(), "new_tokens": n, "tokens_per_s": medians(rates), "rounds": rates,
            "same_tokens": same, "one_thread_below": runtime.DECODE_ONE_THREAD_BELOW}


# --- perplexity of the decoding dtypes ------------------------------------------------------------
def heldout_ids(tokenizer: Any, text: str | os.PathLike[str] | None) -> tuple[list[int], str]:
    """Token ids of held-out text: the last 10% of `text` (the trainer's validation split), or with
    no text a held-out draw of the ABC source (as `build-llm eval` uses)."""
    from build_llm.data.corpus import read_text

    if text is None:
        from build_llm.data.markov import abc_text
        from build_llm.train.run import ABC_EVAL_SEED, ABC_EVAL_WORDS
        return tokenizer.encode(abc_text(ABC_EVAL_WORDS, ABC_EVAL_SEED)), "a held-out ABC draw"
    ids = tokenizer.encode(read_text(text))
    return ids[len(ids) - len(ids) // 10:], f"the last 10% of {Path(text).name}"


@torch.no_grad()
def heldout_loss(model: nn.Module, ids: list[int], max_windows: int) -> tuple[float, int]:
    """Mean next-token cross-entropy over up to `max_windows` non-overlapping context windows."""
    T = model.cfg.context_length
    n = min(max_windows, (len(ids) - 1) // T)
    if n < 1:
        raise UsageError(f"held-out text has {len(ids)} tokens: too short for one window of {T + 1}")
    data = torch.tensor(ids[:n * T + 1])
    x, y = data[:-1].view(n, T), data[1:].view(n, T)
    total = 0.0
    for i in range(0, n, 8):
        logits = model(x[i:i + 8]).float()
        total += F.cross_entropy(logits.flatten(0, 1), y[i:i + 8].flatten(), reduction="sum").item()
    return total / (n * T), n * T


def bench_perplexity(checkpoint: str | os.PathLike[str], text: str | os.PathLike[str] | None, max_windows: int,
                     log: Callable[[str], None]) -> dict[str, Any]:
    """Held-out perplexity of a trained checkpoint with float32, bfloat16 and int8 decoding weights."""
    from build_llm.store.checkpoint import load_checkpoint

    ckpt = load_checkpoint(checkpoint)
    if ckpt.tokenizer is None:
        raise UsageError(f"checkpoint {str(checkpoint)!r} has no tokenizer.json; it cannot encode the held-out text")
    ids, source = heldout_ids(ckpt.tokenizer, text)
    log(f"perplexity of {ckpt.path} on {source}: float32, bfloat16, int8 weights")
    out: dict[str, Any] = {"checkpoint": str(ckpt.path), "text": source, "perplexity": {}}
    state = ckpt.model.state_dict()
    for dtype in ("float32", "bfloat16", "int8"):
        model = GPTModel(ckpt.model.cfg)
        model.load_state_dict(state)
        loss, tokens = heldout_loss(prepare_for_decoding(model, dtype), ids, max_windows)
        out["perplexity"][dtype] = math.exp(loss)
        out["tokens"] = tokens
    fp32 = out["perplexity"]["float32"]
    out["relative_change"] = {k: v / fp32 - 1 for k, v in out["perplexity"].items() if k != "float32"}
    return out


# --- training ------------------------------------------------------------------------------------
def training_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                  dtype: torch.dtype, hf: bool = False) -> float:
    """One step: forward (under autocast unless fp32), cross-entropy, backward, AdamW. Returns the loss."""
    optimizer.zero_grad(set_to_none=True)
    with autocast("cpu", dtype):
        logits = model(x).logits if hf else model(x)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
    loss.backward()
    optimizer.step()
    return loss.detach().item()


def make_trainer(model: nn.Module, shape: TrainShape, dtype: torch.dtype, hf: bool, seed: int = 0) -> Callable[[], float]:
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    gen = torch.Generator().manual_seed(seed)
    data = torch.randint(0, shape.cfg.vocab_size, (shape.batch_size, shape.cfg.context_length + 1), generator=gen)
    x, y = data[:, :-1], data[:, 1:]

    def run() -> float:
        training_step(model, optimizer, x, y, dtype, hf)
        return x.numel()
    return run


def bench_training(shape: TrainShape, plan: Plan, ceilings: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any]:
    torch.manual_seed(0)
    ours_cfg = shape.cfg  # attn_impl "auto", as `build-llm train` runs it
    ours32, ours16 = GPTModel(ours_cfg), GPTModel(ours_cfg)
    ours16.load_state_dict(ours32.state_dict())
    hf32, hf16 = hf_twin(ours32), hf_twin(ours32)
    candidates = {
        "ours": make_trainer(ours32, shape, torch.float32, False),
        "ours bf16 autocast": make_trainer(ours16, shape, torch.bfloat16, False),
        "hf": make_trainer(hf32, shape, torch.float32, True),
        "hf bf16 autocast": make_trainer(hf16, shape, torch.bfloat16, True),
    }
    log(f"training {shape.name}: {len(candidates)} candidates x {plan.rounds} rounds")
    rates = alternate(candidates, plan.rounds)
    tps = medians(rates)
    flops = train_flops_per_token(shape.cfg)
    peak = ceilings["matmul_gflops"]
    mfu = {k: v * flops / (peak["bfloat16" if "bf16" in k else "float32"] * 1e9) for k, v in tps.items()}
    return {"shape": shape.name, "model": shape.cfg.to_dict(), "batch_size": shape.batch_size,
            "tokens_per_step": shape.batch_size * shape.cfg.context_length, "flops_per_token": flops,
            "tokens_per_s": tps, "mfu": mfu, "rounds": rates}


# --- the user-facing trainer ---------------------------------------------------------------------
# nanoGPT's shakespeare-char shape, as flags (on a CPU `train --steps` defaults to a smaller model)
SHAKESPEARE_CHAR_FLAGS = ("--n-layers", "6", "--n-heads", "6", "--emb-dim", "384", "--context-length", "256",
                          "--drop-rate", "0.2")
def bench_train_cli(text: str | os.PathLike[str], plan: Plan, workdir: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """tokens/s that `build-llm train --data TEXT --tokenizer char --batch-size 8` reports in its
    metrics.jsonl at the shakespeare-char shape, fp32 and `--dtype bfloat16`,
    in alternating rounds of fresh runs."""
    import subprocess

    rates: dict[str, list[float]] = {"float32": [], "bfloat16": []}
    final_loss: dict[str, list[float]] = {"float32": [], "bfloat16": []}
    final_bits: dict[str, list[float]] = {"float32": [], "bfloat16": []}  # tokenizer-independent, beside the loss
    log(f"build-llm train on {Path(text).name}: {plan.cli_steps} steps x 2 dtypes x {plan.cli_rounds} rounds")
    for r in range(plan.cli_rounds):
        for dtype in rates:
            out = workdir / f"train-{dtype}-{r}"
            cmd = [sys.executable, "-m", "build_llm.cli", "train", "--data", str(text), "--tokenizer", "char",
                   "--batch-size", "8", "--steps", str(plan.cli_steps), "--eval-every", str(plan.cli_steps),
                   "--eval-batches", "2", "--dtype", dtype, "--out", str(out), *SHAKESPEARE_CHAR_FLAGS,
                   *plan.cli_shape]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"build-llm train failed: {done.stderr.strip().splitlines()[-1:]}")
            last = json.loads((out / "metrics.jsonl").read_text().strip().splitlines()[-1])
            rates[dtype].append(float(last["tokens_per_s"]))
            final_loss[dtype].append(float(last["val_loss"]))
            final_bits[dtype].append(float(last["val_bits_per_char"]))
    return {"steps": plan.cli_steps, "tokens_per_s": medians(rates), "rounds": rates, "val_loss": final_loss,
            "val_bits_per_char": final_bits}


# --- memory --------------------------------------------------------------------------------------
def _max_rss_mb() -> float:
    """This process's peak resident memory in MB. Linux's VmHWM starts afresh at exec; ru_maxrss
    does not (a spawned child would inherit its parent's peak), so it is only the fallback."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _memory_child(kind: str, peer: str, cfg_dict: dict, size: int, queue: Any) -> None:
    """Runs in a fresh process: peak RSS of one phase above the interpreter with torch imported."""
    try:
        torch.manual_seed(0)
        if peer == "hf":
            import transformers  # noqa: F401  imported before the baseline: its own footprint is not the model's
        base = _max_rss_mb()
        cfg = GPTConfig.from_dict(cfg_dict)
        model = GPTModel(cfg)
        if peer == "hf":
            model = hf_twin(model)
        if kind == "decoding":
            idx = prompt_ids(cfg)
            if peer == "hf":
                hf_generate(model, idx, size)
            else:
                use_decoding_layout(model)
                generate(model.eval(), idx, size)
        else:
            run = make_trainer(model, TrainShape("", cfg, size), torch.float32, peer == "hf")
            for _ in range(2):
                run()
        queue.put({"peak_rss_mb": _max_rss_mb(), "above_torch_mb": _max_rss_mb() - base})
    except Exception as e:  # reported, not raised: a child's traceback would be lost
        queue.put({"error": f"{type(e).__name__}: {e}"})


def measure_peak_memory(kind: str, peer: str, cfg: GPTConfig, size: int, timeout: float = 300) -> dict[str, Any]:
    """Peak resident memory of decoding `size` tokens or of training steps at batch `size`, in a child."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_memory_child, args=(kind, peer, cfg.to_dict(), size, queue), daemon=True)
    child.start()
    try:
        result = queue.get(timeout=timeout)
    except Exception:
        result = {"error": "the child process gave no answer"}
    child.join(10)
    if child.is_alive():
        child.kill()
    return result


def bench_memory(plan: Plan, log: Callable[[str], None]) -> dict[str, Any]:
    peers = ("ours", "hf") if plan.memory_peers else ("ours",)
    shape = plan.train_shapes[0]
    out: dict[str, Any] = {}
    for peer in peers:
        log(f"peak memory ({peer}): decoding and training in child processes")
        out[f"decoding {peer}"] = measure_peak_memory("decoding", peer, plan.decode_cfg, plan.decode_tokens)
        out[f"training {peer}"] = measure_peak_memory("training", peer, shape.cfg,
                                                     shape.batch_size)
    return out


# --- the run -------------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    try:
        import transformers
        hf_version = transformers.__version__
    except ImportError:
        hf_version = None
    return {"cpu": model, "logical_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
            "transformers": hf_version, "python": platform.python_version(), "system": platform.system()}


def run_bench(quick: bool = False, text: str | os.PathLike[str] | None = None,
              log: Callable[[str], None] | None = None,
              checkpoint: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Run the benchmark (`quick`: tiny shapes, seconds) and return its results as a JSON-ready dict.

    With `text`, also time the user-facing `build-llm train` on it (character tokenizer). With
    `checkpoint` (a trained model), also compare its held-out perplexity with float32, bfloat16 and
    int8 decoding weights (held out: the last 10% of `text`, or an ABC draw without text).
    """
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    plan = quick_plan() if quick else full_plan()
    started = time.perf_counter()
    log("ceilings: memory bandwidth and matmul throughput")
    ceilings = {"bandwidth_gbs": measure_bandwidth(plan.bandwidth_mb),
                "matmul_gflops": {"float32": measure_matmul(torch.float32, plan.matmul_n),
                                  "bfloat16": measure_matmul(torch.bfloat16, plan.matmul_n)}}
    decoding = bench_decoding(plan, log)
    tiny = bench_tiny_decoding(plan, log)
    for dtype, key in (("float32", "ours"), ("bfloat16", "ours bf16 weights"), ("int8", "ours int8 weights")):
        bound = ceilings["bandwidth_gbs"] * 1e9 / decoding["weight_bytes_per_token"][dtype]
        decoding.setdefault("bound_tokens_per_s", {})[key] = bound
        decoding.setdefault("fraction_of_bound", {})[key] = decoding["tokens_per_s"][key] / bound
    decoding["fraction_of_bound"]["hf generate"] = (decoding["tokens_per_s"]["hf generate"]
                                                    / decoding["bound_tokens_per_s"]["ours"])
    perplexity = None
    if checkpoint is not None:
        perplexity = bench_perplexity(checkpoint, text, 8 if quick else 64, log)
    gc.collect()
    training = [bench_training(shape, plan, ceilings, log) for shape in plan.train_shapes]
    gc.collect()
    memory = bench_memory(plan, log)
    train_cli = None
    if text is not None:
        import tempfile
        with tempfile.TemporaryDirectory(prefix="build-llm-bench-") as tmp:
            train_cli = bench_train_cli(text, plan, Path(tmp), log)
    dec = decoding["tokens_per_s"]
    ratios = {
        "decoding vs hf": dec["ours"] / dec["hf generate"],
        "decoding bf16 weights vs hf": dec["ours bf16 weights"] / dec["hf generate"],
        "decoding int8 weights vs hf": dec["ours int8 weights"] / dec["hf generate"],
        **{f"cached vs seed-style at {k}": v["speedup"] for k, v in decoding["seed_style"].items()},
        **{f"r-abc {k} vs seed": v / tiny["tokens_per_s"]["seed generate_text_simple"]
           for k, v in tiny["tokens_per_s"].items() if k.startswith("ours")},
    }
    for t in training:
        ratios[f"training {t['shape']} vs hf"] = t["tokens_per_s"]["ours"] / t["tokens_per_s"]["hf"]
        ratios[f"training {t['shape']} bf16 vs hf fp32"] = t["tokens_per_s"]["ours bf16 autocast"] / t["tokens_per_s"]["hf"]
        ratios[f"training {t['shape']} bf16 vs hf bf16"] = (t["tokens_per_s"]["ours bf16 autocast"]
                                                          / t["tokens_per_s"]["hf bf16 autocast"])
    if train_cli is not None:
        cli_tps = train_cli["tokens_per_s"]
        hf_tps = training[0]["tokens_per_s"]["hf"]
        ratios["build-llm train fp32 vs hf"] = cli_tps["float32"] / hf_tps
        ratios["build-llm train bf16 vs hf fp32"] = cli_tps["bfloat16"] / hf_tps
    first = training[0]["shape"]
    goals = [
        {"goal": "decoding >= 1.5x hf generate (fp32)", "value": ratios["decoding vs hf"], "target": 1.5},
        {"goal": "decoding >= 1.8x hf generate fp32 (bf16 weights, --dtype bfloat16)",
         "value": ratios["decoding bf16 weights vs hf"], "target": 1.8},
        {"goal": "decoding >= 2.5x hf generate fp32 (int8 weights, --dtype int8)",
         "value": ratios["decoding int8 weights vs hf"], "target": 2.5},
        {"goal": "decoding >= 75% of the bandwidth bound (fp32)", "value": decoding["fraction_of_bound"]["ours"], "target": 0.75},
        {"goal": f"cached >= 10x seed-style at {plan.long_tokens} tokens",
         "value": decoding["seed_style"][str(plan.long_tokens)]["speedup"], "target": 10.0},
        {"goal": f"training {first} >= 1.75x hf (ours bf16 autocast vs hf fp32)",
         "value": ratios[f"training {first} bf16 vs hf fp32"], "target": 1.75},
    ]
    if train_cli is not None:
        goals.append({"goal": f"build-llm train --dtype bfloat16 >= 1.75x hf fp32 ({first})",
                      "value": ratios["build-llm train bf16 vs hf fp32"], "target": 1.75})
    for g in goals:
        g["met"] = bool(g["value"] >= g["target"])
    if perplexity is not None:
        for dtype, limit in (("bfloat16", 0.01), ("int8", 0.03)):
            change = perplexity["relative_change"][dtype]
            goals.append({"goal": f"held-out perplexity with {dtype} weights within {limit:.0%} of float32",
                          "value": change, "target": limit, "met": bool(abs(change) <= limit)})
    return {"machine": machine(), "quick": quick, "rounds": plan.rounds, "ceilings": ceilings, "decoding": decoding,
            "tiny_decoding": tiny, "training": training, "train_cli": train_cli, "perplexity": perplexity, "memory": memory, "ratios": ratios, "goals": goals,
            "elapsed_s": time.perf_counter() - started}


# --- reporting -----------------------------------------------------------------------------------
def format_report(r: dict[str, Any]) -> str:
    """The results as the plain-text table `build-llm bench` prints."""
    m, c, d = r["machine"], r["ceilings"], r["decoding"]
    lines = [f"machine: {m['cpu']}, {m['logical_cores']} logical cores, {m['torch_threads']} torch threads, "
             f"{m['cpu_capability']}; torch {m['torch']}, transformers {m['transformers']}",
             f"ceilings: memory bandwidth {c['bandwidth_gbs']:.1f} GB/s; matmul {c['matmul_gflops']['float32']:.0f} "
             f"GFLOP/s fp32, {c['matmul_gflops']['bfloat16']:.0f} GFLOP/s bf16",
             "", f"decoding ({d['model']['n_layers']} layers, {d['model']['emb_dim']} wide, batch 1, greedy, "
             f"{d['prompt_tokens']}-token prompt, {d['new_tokens']} new tokens; median of {r['rounds']} rounds)",
             f"  {'':24s} {'tokens/s':>9s} {'bound':>9s} {'of bound':>9s}"]
    for k, v in d["tokens_per_s"].items():
        bound = d["bound_tokens_per_s"].get(k, d["bound_tokens_per_s"]["ours"])
        lines.append(f"  {k:24s} {v:9.1f} {bound:9.1f} {d['fraction_of_bound'][k]:9.0%}")
    lines.append(f"  same tokens as Hugging Face: {d['same_tokens_as_hf']}; bf16 weights agree with fp32 on the first "
                 f"{d['bf16_tokens_agree']} of {d['new_tokens']} tokens, int8 on the first {d['int8_tokens_agree']}")
    for k, v in d["seed_style"].items():
        lines.append(f"  seed-style generate_text_simple at {k} tokens: {v['simple_tokens_per_s']:.2f} tokens/s; "
                     f"cached {v['cached_tokens_per_s']:.1f} tokens/s = {v['speedup']:.1f}x")
    tiny = r["tiny_decoding"]
    lines += ["", f"decoding r-abc ({tiny['model']['n_layers']} layers, {tiny['model']['emb_dim']} wide, context "
                  f"{tiny['model']['context_length']}; {tiny['new_tokens']} characters from \"A\", greedy; same "
                  f"characters: {tiny['same_tokens']})", f"  {'':24s} {'tokens/s':>9s}"]
    lines += [f"  {k:24s} {v:9.1f}" for k, v in tiny["tokens_per_s"].items()]
    for t in r["training"]:
        cfg = t["model"]
        lines += ["", f"training {t['shape']} ({cfg['n_layers']} layers, {cfg['n_heads']} heads, {cfg['emb_dim']} wide, "
                      f"context {cfg['context_length']}, vocab {cfg['vocab_size']}, batch {t['batch_size']}, dropout "
                      f"{cfg['drop_rate']}, AdamW; {t['flops_per_token'] / 1e6:.0f} MFLOP/token)",
                  f"  {'':24s} {'tokens/s':>9s} {'MFU':>6s}"]
        for k, v in t["tokens_per_s"].items():
            lines.append(f"  {k:24s} {v:9.0f} {t['mfu'][k]:6.0%}")
    if r.get("train_cli"):
        c = r["train_cli"]
        lines += ["", f"build-llm train --data TEXT --tokenizer char --batch-size 8 ({c['steps']} steps, its metrics.jsonl)"]
        for k, v in c["tokens_per_s"].items():
            bits = c.get("val_bits_per_char", {}).get(k)
            lines.append(f"  {k:24s} {v:9.0f} tokens/s" + (f", validation {statistics.median(c['val_loss'][k]):.4f} nats/token"
                                                          f" = {statistics.median(bits):.4f} bits/char" if bits else ""))
    if r.get("perplexity"):
        p = r["perplexity"]
        lines += ["", f"perplexity of {p['checkpoint']} on {p['text']} ({p['tokens']} tokens)"]
        for k, v in p["perplexity"].items():
            change = p["relative_change"].get(k)
            lines.append(f"  {k:24s} {v:9.4f}" + ("" if change is None else f"  {change:+.2%} vs float32"))
    lines += ["", "peak memory (RSS above an interpreter with torch imported, fresh process each)"]
    for k, v in r["memory"].items():
        lines.append(f"  {k:24s} " + (f"{v['above_torch_mb']:8.0f} MB" if "error" not in v else v["error"]))
    lines.append(f"  KV cache of the decoding model (its whole context, fp32): {d['kv_cache_bytes'] / 2**20:.0f} MB")
    lines += ["", "ratios"] + [f"  {k:44s} {v:7.2f}x" for k, v in r["ratios"].items()]
    lines += ["", "goals"] + [f"  [{'met' if g['met'] else 'NOT met'}] {g['goal']}: "
                              + (f"{g['value']:+.2%}" if "perplexity" in g["goal"] else f"{g['value']:.2f}")
                              for g in r["goals"]]
    lines.append(f"\n(benchmark took {r['elapsed_s']:.0f} s)")
    return "\n".join(lines)


def plot_report(r: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """A PNG bar chart: tokens/s of each candidate, decoding and each training shape side by side."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = r["decoding"]
    panels = [(f"decoding ({d['new_tokens']} tokens)", {**d["tokens_per_s"], "seed-style": d["seed_style"][str(d["new_tokens"])]["simple_tokens_per_s"]})]
    panels += [(f"training {t['shape']}", t["tokens_per_s"]) for t in r["training"]]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.2), squeeze=False)
    for ax, (title, values) in zip(axes[0], panels):
        names = list(values)
        bars = ax.barh(names, [values[n] for n in names],
                       color=["tab:blue" if n.startswith("ours") else "tab:gray" for n in names])
        ax.bar_label(bars, fmt="%.0f", padding=2, fontsize=8)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("tokens/s")
        ax.margins(x=0.2)
    fig.suptitle(f"build-llm bench on {r['machine']['cpu']} ({r['machine']['torch_threads']} threads)", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, format=path.suffix[1:] or "png")
    finally:
        plt.close(fig)
    return path


def to_json(r: dict[str, Any]) -> str:
    def clean(v: Any) -> Any:  # JSON has no inf or nan: such a value is reported as null
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v
    return json.dumps(clean(r), indent=2)

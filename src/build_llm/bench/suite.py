"""What a benchmark run measures (the full suite or the seconds-long `--quick` one) and how it
times candidates against each other: in alternating rounds, the median of each."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

from build_llm.config import GPTConfig


@dataclass(frozen=True)
class TrainShape:
    name: str
    cfg: GPTConfig
    batch_size: int


@dataclass(frozen=True)
class Suite:
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
    llama_name: str = "smollm2-360m"  # the Llama-shaped decoding row: its name and shape (random weights)
    llama_cfg: GPTConfig = GPTConfig.from_preset("smollm2-360m")
    cache_multiple: int = 4  # the bandwidth buffer is at least this many times the largest cache (0: bandwidth_mb)
    prefill_tokens: int = 512  # the prompt whose prefill is timed
    fresh_processes: int = 5  # fresh processes decoding int8, for each setting whose steadiness is measured
    all_settings: bool = True  # every process-wide setting of steady.SETTINGS (else only the default)
    serve_streams: int = 16  # the server row's concurrent streams (and the server's --max-batch)


def shakespeare_char(**overrides: Any) -> GPTConfig:
    """nanoGPT's shakespeare-char shape in GPT-2's layout: 6 layers, 6 heads, 384 wide, context 256,
    a 65-character vocabulary and its dropout of 0.2."""
    return GPTConfig.from_preset("gpt2-small", **{"vocab_size": 65, "context_length": 256, "emb_dim": 384,
                                                  "n_heads": 6, "n_layers": 6, "drop_rate": 0.2, **overrides})


def full_suite() -> Suite:
    return Suite(
        decode_cfg=GPTConfig.from_preset("gpt2-small"), decode_tokens=200, long_tokens=1000, simple_samples=5,
        train_shapes=(TrainShape("shakespeare-char", shakespeare_char(), 8),
                      TrainShape("gpt2-small ctx256", GPTConfig.from_preset("gpt2-small", context_length=256), 2)),
        rounds=3, bandwidth_mb=512, matmul_n=2048, memory_peers=True,
    )


def quick_suite() -> Suite:
    tiny = dict(vocab_size=96, context_length=64, emb_dim=64, n_heads=4, n_layers=2)
    return Suite(
        decode_cfg=GPTConfig.from_preset("gpt2-small", **tiny), decode_tokens=12, long_tokens=40, simple_samples=3,
        train_shapes=(TrainShape("tiny-char", shakespeare_char(**{**tiny, "context_length": 32}), 2),),
        rounds=2, bandwidth_mb=16, matmul_n=256, memory_peers=False, cli_steps=3, cli_rounds=1, tiny_tokens=40,
        cache_multiple=0, prefill_tokens=48, fresh_processes=1, all_settings=False, serve_streams=4,
        cli_shape=("--context-length", "32", "--emb-dim", "64", "--n-layers", "2", "--n-heads", "4"),
        llama_name="tiny smollm2", llama_cfg=GPTConfig.from_preset("smollm2-360m", **{**tiny, "n_heads": 6, "emb_dim": 48,
                                                                                        "n_kv_heads": 2, "ff_dim": 128}),
    )


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

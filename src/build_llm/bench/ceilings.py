"""The machine's ceilings, measured in the same run as the candidates: memory bandwidth (what bounds
decoding, which streams every weight once per token) and matrix-multiply FLOP/s (what bounds
training)."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from build_llm.bench.suite import Suite


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


def measure_ceilings(suite: Suite) -> dict[str, Any]:
    """Bandwidth in GB/s and matmul GFLOP/s in float32 and bfloat16, at the suite's sizes."""
    return {"bandwidth_gbs": measure_bandwidth(suite.bandwidth_mb),
            "matmul_gflops": {"float32": measure_matmul(torch.float32, suite.matmul_n),
                              "bfloat16": measure_matmul(torch.bfloat16, suite.matmul_n)}}

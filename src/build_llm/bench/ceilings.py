"""The machine's ceilings, measured in the same run as the candidates: memory bandwidth (what bounds
decoding, which streams every weight once per token) and matrix-multiply FLOP/s (what bounds
training); and the CPU's caches, which decide whether decoding's weights come from memory at all."""

from __future__ import annotations

import contextlib
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from build_llm.bench.suite import Suite
from build_llm.runtime import available_memory, cpu_has_bf16

CPU_CACHES = Path("/sys/devices/system/cpu/cpu0/cache")


def cache_levels(root: Path = CPU_CACHES) -> dict[str, int]:
    """Bytes of each data (or unified) cache level the first CPU reports, {"L1": ..., "L2": ..., "L3": ...}; {}
    where the system does not say (not Linux). A shared level is the size of the cache that CPU uses."""
    out: dict[str, int] = {}
    with contextlib.suppress(OSError, ValueError):
        for index in sorted(root.glob("index*")):
            if (index / "type").read_text().strip() == "Instruction":
                continue
            size = (index / "size").read_text().strip()  # "32K", "32768K", "1M"
            bytes_ = int(size.rstrip("KMG")) * {"K": 2**10, "M": 2**20, "G": 2**30}.get(size[-1], 1)
            out[f"L{int((index / 'level').read_text())}"] = bytes_
    return out


def fits_in(nbytes: int, caches: dict[str, int]) -> str:
    """The smallest cache level of `caches` that holds `nbytes`, else "DRAM"."""
    for level, size in sorted(caches.items()):
        if nbytes <= size:
            return level
    return "DRAM"


def bandwidth_megabytes(suite: Suite, caches: dict[str, int]) -> int:
    """The bandwidth buffer's size: the suite's, or `suite.cache_multiple` times the largest cache if more (a
    buffer that fits in a cache measures the cache), at most a quarter of the memory available."""
    mb = max(suite.bandwidth_mb, suite.cache_multiple * max(caches.values(), default=0) // 2**20)
    free = available_memory()
    return mb if free is None else max(suite.bandwidth_mb, min(mb, free // 4 // 2**20))


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
    """Bandwidth in GB/s (through a buffer several times the largest cache) and matmul GFLOP/s in float32 and
    bfloat16, at the suite's sizes; the cache levels."""
    caches = cache_levels()
    mb = bandwidth_megabytes(suite, caches)
    # Without bfloat16 instructions PyTorch emulates bf16 products: a 2048-wide one took minutes a round on a
    # 2-core AMD EPYC; a 256-wide one still gives the (low) rate, for the report and bf16's MFU.
    bf16_n = suite.matmul_n if cpu_has_bf16() else min(suite.matmul_n, 256)
    return {"bandwidth_gbs": measure_bandwidth(mb), "bandwidth_buffer_mb": mb, "caches": caches,
            "matmul_gflops": {"float32": measure_matmul(torch.float32, suite.matmul_n),
                              "bfloat16": measure_matmul(torch.bfloat16, bf16_n)}}

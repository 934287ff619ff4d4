"""Steadiness: the same int8 decoding run in several fresh processes, under each of a few process-wide
settings that could make one process faster than the next (how the kernels' pool threads wait between
products, huge pages), so that the cause of a spread shows as the setting without it.

A process's speed can differ from the next one's although the code and the weights are the same: where
its threads land on the cores (and whether they move), where its buffers land in memory (page faults,
transparent huge pages, alignment), and how its threads wait between products (spinning keeps a core
busy, sleeping costs a wake-up; the compiled step shares its products in infer.kernels' own pool, not
OpenMP, whose settings now reach only the prompt). Each child builds the decoding model (seed 0), decodes
once to warm up, then times `rounds` decodes and reports their median tokens/s, with its minor page faults
per token over the timed decodes and the anonymous huge-page memory it ended with. Settings alternate
process by process (A B C, A B C, ...), so that a machine getting busier slows every setting alike.

Run as a module, it is the child: `python -m build_llm.bench.steady '<json: cfg, tokens, threads, rounds>'`.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from build_llm.bench.decode import prompt_ids
from build_llm.bench.suite import Suite
from build_llm.config import GPTConfig
from build_llm.gpt import GPTModel
from build_llm.infer.generate import generate
from build_llm.infer.quant import prepare_for_decoding

# setting -> the environment it adds to the child's (each read once, when the process starts)
SETTINGS = {
    "default": {},
    "pool threads sleep at once (BUILD_LLM_POOL_SPIN_US=0)": {"BUILD_LLM_POOL_SPIN_US": "0"},
    "pool threads spin 500 us (BUILD_LLM_POOL_SPIN_US=500)": {"BUILD_LLM_POOL_SPIN_US": "500"},
    "huge pages (THP_MEM_ALLOC_ENABLE=1)": {"THP_MEM_ALLOC_ENABLE": "1"},  # torch: 2 MB-aligned, MADV_HUGEPAGE
}


def _huge_pages_mb() -> float:
    """This process's anonymous memory in transparent huge pages, MB (0 where the system does not say)."""
    try:
        for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return 0.0


def child(spec: dict[str, Any]) -> dict[str, float]:
    """In a fresh process: the median tokens/s of `spec["rounds"]` int8 decodes, minor faults per token, huge pages."""
    torch.set_num_threads(spec["threads"])
    cfg = GPTConfig.from_dict(spec["cfg"])
    torch.manual_seed(0)
    model = prepare_for_decoding(GPTModel(cfg).eval(), "int8")
    idx, n = prompt_ids(cfg), spec["tokens"]
    generate(model, idx, n)  # warm-up: the kernels built and loaded, the buffers allocated
    faults, rates = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, []
    for _ in range(spec["rounds"]):
        start = time.perf_counter()
        generate(model, idx, n)
        rates.append(n / (time.perf_counter() - start))
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    return {"tokens_per_s": statistics.median(rates), "minor_faults_per_token": faults / (n * spec["rounds"]),
            "huge_pages_mb": _huge_pages_mb()}


def run_child(spec: dict[str, Any], env: dict[str, str], workdir: Path) -> dict[str, float]:
    # `python -m` puts its working directory first on sys.path: the bench's own directory, never the user's.
    try:
        done = subprocess.run([sys.executable, "-m", "build_llm.bench.steady", json.dumps(spec)], capture_output=True,
                              text=True, cwd=workdir, env={**os.environ, **env}, timeout=600)
    except subprocess.TimeoutExpired:  # a process slowed past all use (a busy machine): reported, not raised
        return {"error": "no answer in 600 s"}
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def spread(rates: list[float]) -> float:
    """Half the range over the median: the +- fraction the processes vary by."""
    return (max(rates) - min(rates)) / 2 / statistics.median(rates) if rates else float("nan")


def bench_steadiness(suite: Suite, log: Callable[[str], None]) -> dict[str, Any]:
    """int8 decoding in `suite.fresh_processes` fresh processes: the default on one thread (the steadiness the
    issue measured, where no thread waits for another), then every setting on every thread."""
    threads = torch.get_num_threads()
    spec = {"cfg": suite.decode_cfg.to_dict(), "tokens": suite.decode_tokens, "rounds": 3}
    runs = {"default, 1 thread": (dict(spec, threads=1), {})}
    settings = SETTINGS if suite.all_settings else {"default": {}}
    runs.update({f"{name}, {threads} threads": (dict(spec, threads=threads), env) for name, env in settings.items()})
    log(f"steadiness: int8 decoding in {suite.fresh_processes} fresh processes x {len(runs)} settings")
    results: dict[str, list[dict[str, float]]] = {name: [] for name in runs}
    with tempfile.TemporaryDirectory(prefix="build-llm-bench-") as tmp:
        for _ in range(suite.fresh_processes):
            for name, (child_spec, env) in runs.items():
                results[name].append(run_child(child_spec, env, Path(tmp)))
    out: dict[str, Any] = {"processes": suite.fresh_processes, "new_tokens": suite.decode_tokens, "settings": {}}
    for name, rows in results.items():
        good = [r for r in rows if "error" not in r]
        rates = [r["tokens_per_s"] for r in good]
        out["settings"][name] = {
            "tokens_per_s": rates, "median": statistics.median(rates) if rates else float("nan"),
            "spread": spread(rates), "errors": [r["error"] for r in rows if "error" in r],
            "minor_faults_per_token": statistics.median([r["minor_faults_per_token"] for r in good]) if good else None,
            "huge_pages_mb": statistics.median([r["huge_pages_mb"] for r in good]) if good else None}
    return out


if __name__ == "__main__":
    print(json.dumps(child(json.loads(sys.argv[1]))))

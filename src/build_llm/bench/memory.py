"""Peak memory of decoding and of training, each measured in a fresh child process: the peak
resident memory above an interpreter with torch imported."""

from __future__ import annotations

import contextlib
import multiprocessing
import resource
from pathlib import Path
from typing import Any, Callable

import torch

from build_llm.bench.decode import hf_generate, hf_twin, prompt_ids
from build_llm.bench.suite import Suite, TrainShape
from build_llm.bench.train import make_trainer
from build_llm.config import GPTConfig
from build_llm.gpt import GPTModel, use_decoding_layout
from build_llm.infer.generate import generate


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
            import transformers  # noqa: F401  optional; imported before the baseline: its own footprint is not the model's
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


def bench_memory(suite: Suite, log: Callable[[str], None]) -> dict[str, Any]:
    peers = ("ours", "hf") if suite.memory_peers else ("ours",)
    shape = suite.train_shapes[0]
    out: dict[str, Any] = {}
    for peer in peers:
        log(f"peak memory ({peer}): decoding and training in child processes")
        out[f"decoding {peer}"] = measure_peak_memory("decoding", peer, suite.decode_cfg, suite.decode_tokens)
        out[f"training {peer}"] = measure_peak_memory("training", peer, shape.cfg, shape.batch_size)
    return out

"""Training speed: tokens/s of one optimizer step (forward, loss, backward, AdamW) of GPTModel vs
GPT2LMHeadModel of the same shape, fp32 and under bf16 autocast (only where the CPU reports bfloat16
instructions: elsewhere PyTorch emulates it), as model FLOPs utilisation
against the measured matmul rate of its dtype; and the user-facing `build-llm train`, run as the
user runs it (a fresh process), read from its metrics.jsonl."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from build_llm.bench.decode import hf_twin
from build_llm.bench.suite import Suite, TrainShape, alternate, medians
from build_llm.gpt import GPTModel
from build_llm.runtime import autocast, cpu_has_bf16
from build_llm.sizing import train_flops_per_token


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


def bench_training(shape: TrainShape, suite: Suite, ceilings: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any]:
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
    if not cpu_has_bf16():  # bf16 autocast is emulated there, several times slower: build-llm trains float32
        candidates = {k: v for k, v in candidates.items() if "bf16" not in k}
    log(f"training {shape.name}: {len(candidates)} candidates x {suite.rounds} rounds")
    rates = alternate(candidates, suite.rounds)
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


def bench_train_cli(text: str | os.PathLike[str], suite: Suite, workdir: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """tokens/s that `build-llm train --data TEXT --tokenizer char --batch-size 8` reports in its
    metrics.jsonl at the shakespeare-char shape, fp32 and `--dtype bfloat16` (where the CPU has bfloat16
    instructions), in alternating rounds of fresh runs."""
    dtypes = ("float32", "bfloat16") if cpu_has_bf16() else ("float32",)  # as bench_training
    rates: dict[str, list[float]] = {d: [] for d in dtypes}
    final_loss: dict[str, list[float]] = {d: [] for d in dtypes}
    final_bits: dict[str, list[float]] = {d: [] for d in dtypes}  # tokenizer-independent, beside the loss
    log(f"build-llm train on {Path(text).name}: {suite.cli_steps} steps x {len(dtypes)} dtypes x {suite.cli_rounds} rounds")
    for r in range(suite.cli_rounds):
        for dtype in rates:
            out = Path(workdir).resolve() / f"train-{dtype}-{r}"
            cmd = [sys.executable, "-m", "build_llm.cli", "train", "--data", os.path.abspath(text), "--tokenizer", "char",
                   "--batch-size", "8", "--steps", str(suite.cli_steps), "--eval-every", str(suite.cli_steps),
                   "--eval-batches", "2", "--dtype", dtype, "--out", str(out), *SHAKESPEARE_CHAR_FLAGS,
                   *suite.cli_shape]
            # `python -m` puts its working directory first on sys.path: run it in the bench's own directory,
            # never in the user's (a build_llm/ or torch.py planted there would run).
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=workdir)
            if done.returncode != 0:
                raise RuntimeError(f"build-llm train failed: {done.stderr.strip().splitlines()[-1:]}")
            last = json.loads((out / "metrics.jsonl").read_text().strip().splitlines()[-1])
            rates[dtype].append(float(last["tokens_per_s"]))
            final_loss[dtype].append(float(last["val_loss"]))
            final_bits[dtype].append(float(last["val_bits_per_char"]))
    return {"steps": suite.cli_steps, "tokens_per_s": medians(rates), "rounds": rates, "val_loss": final_loss,
            "val_bits_per_char": final_bits}

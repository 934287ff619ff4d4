"""Scoring a model on text: mean loss over windows, bits per character and per byte, and `build-llm eval`.

The trainer's evaluations (train/pretrain.py) and `build-llm eval` share `evaluate_windows`; under
torchrun the processes share the windows and sum (pass the run's `Dist`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from build_llm.data.corpus import random_windows, read_text, sliding_starts
from build_llm.data.markov import ABC, ABC_EVAL_SEED, ABC_EVAL_WORDS, abc_text, optimal_loss_on_text
from build_llm.errors import UsageError
from build_llm.progress import Progress
from build_llm.runtime import autocast, get_device, set_cpu_threads
from build_llm.sizing import count_parameters
from build_llm.store.checkpoint import TRAINER_FILE, load_checkpoint
from build_llm.store.fsio import read_json


def evaluate_windows(model: nn.Module, ids: np.ndarray, starts: np.ndarray, context_length: int,
                     batch_size: int, device: torch.device, d: Any = None, dtype: str = "float32",
                     progress: bool = False) -> tuple[float, int]:
    """(mean loss per token, tokens) over the windows at `starts`. `d` (train.distributed.Dist: rank,
    world, sum) shares them among processes, each taking every world-th window; None: this process alone.
    `progress`: show it (a long evaluation, outside training's own bar)."""
    rank, world = (d.rank, d.world) if d is not None else (0, 1)
    mine = starts[rank::world]
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (loss sum, tokens)
    was_training = model.training
    model.eval()
    with torch.no_grad(), Progress("evaluate", len(mine), "windows", enabled=progress and rank == 0) as shown:
        for i in range(0, len(mine), batch_size):
            shown.update(len(mine[i:i + batch_size]))
            x, y = random_windows(ids, mine[i:i + batch_size], context_length)
            with autocast(device, dtype):
                logits = model(x.to(device))  # (B, T, V)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), y.to(device).flatten(), reduction="sum")
            total += torch.stack([loss.double(), torch.tensor(float(y.numel()), dtype=torch.float64, device=device)])
    model.train(was_training)
    loss_sum, n = (d.sum(total) if d is not None else total).tolist()
    return (loss_sum / n if n else float("nan")), int(n)


def bits_per_unit(loss: float, tokens: int, text: str) -> dict[str, float]:
    """Bits per character and per UTF-8 byte of `text`, whose `tokens` tokens cost `loss` nats each
    on average: total nats / ln 2 / characters (or bytes). Unlike the loss per token, these do not
    depend on the tokenizer, so character and BPE models compare."""
    return bits_per_counts(loss, tokens, len(text), len(text.encode("utf-8")))


def bits_per_counts(loss: float, tokens: int, chars: int, n_bytes: int) -> dict[str, float]:
    """bits_per_unit from the text's counts of characters and bytes (data.tokenizer.text_size)."""
    total_bits = loss * tokens / math.log(2)
    return {"bits_per_char": total_bits / max(1, chars), "bits_per_byte": total_bits / max(1, n_bytes)}


def evaluate_checkpoint(checkpoint: str | Path, data: str | None = None, batch_size: int = 64,
                        device: str = "cpu") -> dict[str, Any]:
    """`build-llm eval`: loss, perplexity and tokens of a checkpoint on the non-overlapping windows
    of a text (or, with no data, of a held-out ABC draw); for the ABC source also the exact optimum
    on the same windows and the excess over it."""
    dev = get_device(device)
    ckpt = load_checkpoint(checkpoint, dev)
    if ckpt.tokenizer is None:
        raise UsageError(f"checkpoint {str(ckpt.path)!r} has no tokenizer.json; it cannot encode the data")
    trained_on_abc = _trained_on_abc(ckpt.path)
    text = abc_text(ABC_EVAL_WORDS, ABC_EVAL_SEED) if data is None else read_text(data)
    T = ckpt.model.cfg.context_length
    ids = np.asarray(ckpt.tokenizer.encode(text), dtype=np.int64)
    starts = sliding_starts(len(ids), T)
    if len(starts) == 0:
        raise UsageError(f"data has {len(ids)} tokens: too short for one window of context_length + 1 = {T + 1}")
    threads = torch.get_num_threads()  # restored at the end: the setting is process-wide
    try:
        set_cpu_threads(count_parameters(ckpt.model.cfg), dev)
        loss, n = evaluate_windows(ckpt.model, ids, starts, T, batch_size, dev, progress=True)
    finally:
        torch.set_num_threads(threads)
    if not math.isfinite(loss):
        raise UsageError(f"checkpoint {str(ckpt.path)!r}: the loss is {loss} (its weights hold NaN or infinity: a "
                         "damaged checkpoint or a diverged run); evaluate another checkpoint")
    scored = ckpt.tokenizer.decode(ids[1:n + 1].tolist())  # the windows' targets: one stretch of the text
    result: dict[str, Any] = {"loss": loss, "perplexity": math.exp(loss), **bits_per_unit(loss, n, scored),
                              "tokens": n, "characters": len(scored), "bytes": len(scored.encode("utf-8")),
                              "windows": len(starts)}
    if data is None or trained_on_abc:
        try:
            optimum = float(optimal_loss_on_text(ABC, text, T).mean())
            result.update(optimal_loss=optimum, excess=loss - optimum)
        except ValueError:
            pass  # the text is not an ABC text: no optimum to compare with
    return result


def _trained_on_abc(ckpt_dir: Path) -> bool:
    """Whether the checkpoint's trainer state says it trained on the ABC source."""
    if not (ckpt_dir / TRAINER_FILE).is_file():
        return False
    saved = read_json(ckpt_dir / TRAINER_FILE)
    return isinstance(saved, dict) and isinstance(saved.get("data"), dict) and saved["data"].get("source") == "abc"

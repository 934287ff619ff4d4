"""Scoring a model on text: mean loss over windows, bits per character and per byte, and `build-llm eval`.

The trainer's evaluations (train/pretrain.py) and `build-llm eval` share `window_loss`: the trainer's over
a split's token ids (`evaluate_windows`; under torchrun the processes share the windows and sum: pass the
run's `Dist`), `build-llm eval`'s over a text streamed in pieces, window by window (`evaluate_text`), in
memory that does not grow with the text.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from build_llm.data.corpus import random_windows, read_showing_progress, read_text, small_pieces, text_files
from build_llm.data.markov import ABC, ABC_EVAL_SEED, ABC_EVAL_WORDS, abc_text, optimal_loss_on_text
from build_llm.data.tokenizer import token_sizes
from build_llm.errors import UsageError
from build_llm.infer.load import load_decoder
from build_llm.progress import Progress
from build_llm.runtime import autocast, get_device, set_cpu_threads
from build_llm.sizing import count_parameters
from build_llm.store.checkpoint import TRAINER_FILE, resolve_checkpoint
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
            total += window_loss(model, *random_windows(ids, mine[i:i + batch_size], context_length), device, dtype)
    model.train(was_training)
    loss_sum, n = (d.sum(total) if d is not None else total).tolist()
    return (loss_sum / n if n else float("nan")), int(n)


def window_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device,
                dtype: str = "float32") -> torch.Tensor:
    """float64 (loss summed over the targets y, their count) of the windows x (B, T)."""
    with autocast(device, dtype):
        logits = model(x.to(device))  # (B, T, V)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), y.to(device).flatten(), reduction="sum")
    return torch.stack([loss.double(), torch.tensor(float(y.numel()), dtype=torch.float64, device=device)])


def text_windows(pieces: Iterable[str], tokenizer: Any, context_length: int, batch_size: int) -> Iterator[np.ndarray]:
    """The non-overlapping windows (context_length + 1 ids: inputs and targets) of the text's tokens, as
    `sliding_starts` places them over the whole text's ids, in batches (B, T + 1) of batch_size, from its
    pieces tokenized one by one (cut where a tokenizer would: data.corpus.safe_cut): a window is sent on as
    soon as its ids are in, so only a piece's ids and a batch are held, whatever the text's length."""
    T = context_length
    carry, batch = np.empty(0, dtype=np.int64), []
    for piece in pieces:
        ids = np.concatenate([carry, np.asarray(tokenizer.encode(piece), dtype=np.int64)])
        n = (len(ids) - 1) // T  # windows whose T + 1 ids are in; the last id starts the next one
        batch += [ids[i * T:(i + 1) * T + 1] for i in range(n)]
        carry = ids[n * T:]
        while len(batch) >= batch_size:
            yield np.stack(batch[:batch_size])
            batch = batch[batch_size:]
    if batch:
        yield np.stack(batch)


def evaluate_text(model: nn.Module, tokenizer: Any, pieces: Iterable[str], batch_size: int,
                  device: torch.device) -> dict[str, Any]:
    """Loss, tokens, windows, and the characters and bytes of the targets scored (counted per id, not decoded)
    of `model` on the text_windows of `pieces`: evaluate_windows's numbers over the whole text's
    sliding_starts, window by window, in memory that does not grow with the text."""
    n_chars, n_bytes = token_sizes(tokenizer)
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (loss sum, tokens)
    chars = nbytes = windows = 0
    model.eval()
    with torch.no_grad():
        for batch in text_windows(pieces, tokenizer, model.cfg.context_length, batch_size):
            windows += len(batch)
            targets = batch[:, 1:]
            chars, nbytes = chars + int(n_chars[targets].sum()), nbytes + int(n_bytes[targets].sum())
            window = torch.from_numpy(batch)
            total += window_loss(model, window[:, :-1], window[:, 1:], device)
    loss_sum, tokens = total.tolist()
    return {"loss": loss_sum / tokens if tokens else float("nan"), "tokens": int(tokens), "characters": chars,
            "bytes": nbytes, "windows": windows}


def not_empty(pieces: Iterable[str], data: str | Path) -> Iterator[str]:
    """The pieces, then read_text's refusal if they were all blank."""
    blank = True
    for piece in pieces:
        blank = blank and not piece.strip()
        yield piece
    if blank:
        raise UsageError(f"data {str(data)!r} is empty; give a non-empty UTF-8 text")


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
                        device: str = "cpu", abc: bool = False) -> dict[str, Any]:
    """`build-llm eval`: loss, perplexity and tokens of a checkpoint on the non-overlapping windows
    of a text (or, with no data, of a held-out ABC draw: for a model trained on it, or with `abc`);
    for the ABC source also the exact optimum on the same windows and the excess over it."""
    dev = get_device(device)
    model, tokenizer = load_decoder(checkpoint, dev)  # a LoRA run merged in memory
    if tokenizer is None:
        raise UsageError(f"checkpoint {str(checkpoint)!r} has no tokenizer.json; it cannot encode the data")
    trained_on_abc = _trained_on_abc(checkpoint)
    if data is None and not (abc or trained_on_abc):  # its numbers would say nothing of the model (exit 0 before)
        raise UsageError(f"give --data (a held-out text): {str(checkpoint)!r} was not trained on the ABC source, "
                         "eval's default text; --abc scores it on that source all the same")
    if data is None:
        text = abc_text(ABC_EVAL_WORDS, ABC_EVAL_SEED)
        pieces: Iterable[str] = [text]
    else:
        pieces = not_empty(small_pieces(read_showing_progress(text_files(data), "evaluate")), data)
        text = read_text(data) if trained_on_abc else None  # the exact optimum reads it whole (ABC texts are small)
    threads = torch.get_num_threads()  # restored at the end: the setting is process-wide
    try:
        set_cpu_threads(count_parameters(model.cfg), dev)
        scored = evaluate_text(model, tokenizer, pieces, batch_size, dev)
    finally:
        torch.set_num_threads(threads)
    T = model.cfg.context_length
    if scored["windows"] == 0:  # then the text is shorter than a window: read whole to say how short
        n_ids = len(tokenizer.encode(text if data is None else read_text(data)))
        raise UsageError(f"data has {n_ids} tokens, fewer than one window of the model's context + 1 = {T + 1} (eval "
                         f"scores whole windows); give a text of at least {T + 1} tokens")
    loss, n = scored["loss"], scored["tokens"]
    if not math.isfinite(loss):
        raise UsageError(f"checkpoint {str(checkpoint)!r}: the loss is {loss} (its weights hold NaN or infinity: a "
                         "damaged checkpoint or a diverged run); evaluate another checkpoint")
    result: dict[str, Any] = {"loss": loss, "perplexity": math.exp(loss),
                              **bits_per_counts(loss, n, scored["characters"], scored["bytes"]), "tokens": n,
                              "characters": scored["characters"], "bytes": scored["bytes"], "windows": scored["windows"]}
    if data is None or trained_on_abc:
        try:
            optimum = float(optimal_loss_on_text(ABC, text, T).mean())
            result.update(optimal_loss=optimum, excess=loss - optimum)
        except ValueError:
            pass  # the text is not an ABC text: no optimum to compare with
    return result


def _trained_on_abc(checkpoint: str | Path) -> bool:
    """Whether the checkpoint's trainer state says it trained on the ABC source (a LoRA run has no weights of
    its own to resolve: it did not)."""
    try:
        ckpt_dir = resolve_checkpoint(checkpoint)
    except UsageError:
        return False
    if not (ckpt_dir / TRAINER_FILE).is_file():
        return False
    saved = read_json(ckpt_dir / TRAINER_FILE)
    return isinstance(saved, dict) and isinstance(saved.get("data"), dict) and saved["data"].get("source") == "abc"

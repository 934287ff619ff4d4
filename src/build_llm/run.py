"""The command glue behind `build-llm train` and `build-llm eval`: resolve settings (flags, a
checkpoint being resumed, defaults), prepare the data, train, and build the report.

No argparse and no printing here: functions return results (the text for stdout is part of them)
and raise UsageError (a ValueError) or TrainingStopped; cli.py prints and chooses exit codes.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import CHECKPOINT_DIR, load_trainer_state
from .data import Corpus, sliding_starts
from .distributed import Dist, close_distributed, init_distributed
from .errors import UsageError
from .fsio import check_writable_dir, claim_dir, lock_dir, read_json
from .runtime import check_fits
from .train import (ABC_TRAIN, TrainConfig, TrainingStopped, TrainResult, evaluate_windows, sample_text,
                    train)

# With --data and no --preset: a character model that trains on a laptop (nanoGPT's shakespeare-char),
# with rotary positions (the option that paid on this CPU, docs/speed.md) and fused attention (no
# seed pins its training-mode numbers).
DATA_DEFAULT_MODEL = dict(context_length=256, emb_dim=384, n_heads=6, n_layers=6, drop_rate=0.2, qkv_bias=False,
                          pos_emb="rope", attn_impl="sdpa")
# What --resume may change: when and how the steps run, not what they compute.
RESUMABLE = {"steps", "eval_every", "eval_batches", "device", "compile", "dtype", "fsdp"}
ABC_EVAL_WORDS, ABC_EVAL_SEED = 30_000, 2027  # a held-out ABC draw (training uses seed 1)
RUN_KIND = "run"  # the kind in the ownership marker of a run directory
SMALL_MODEL = 2_000_000  # parameters; below this, CPU training uses one thread unless OMP_NUM_THREADS says otherwise


def _contradiction(what: str, key: str, saved: Any, given: Any) -> ValueError:
    return UsageError(f"--resume: {what} {key}={given!r} contradicts the checkpoint's {key}={saved!r}; "
                      "drop the option or start a new run with another --out")


@dataclass
class TrainingRun:
    result: TrainResult
    report: str          # the end of the run for stdout: final loss and samples ("" on other processes)


def check_run_dir(out: str | Path, resume: bool) -> Path:
    """--out of a run: a directory that holds a checkpoint exactly when resuming."""
    from .checkpoint import PREVIOUS_DIR

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {str(out)!r} is a file; give a directory for the run")
    has_ckpt = (out / CHECKPOINT_DIR).exists() or (out / PREVIOUS_DIR).exists()
    if resume and not has_ckpt:
        raise UsageError(f"--resume: no checkpoint in {str(out)!r}; start without --resume to begin a run there")
    if not resume and has_ckpt:
        raise UsageError(f"--out {str(out)!r} already holds a run; add --resume to continue it or give another --out")
    return out


def run_training(out: str | Path, *, data: str | None = None, tokenizer: str | None = None,
                 preset: str | None = None, model_options: dict[str, Any] | None = None,
                 train_options: dict[str, Any] | None = None, resume: bool = False) -> TrainingRun:
    """`build-llm train`: resolve settings (flags > checkpoint when resuming > defaults), prepare the
    corpus in out/data, train, and return the result with its report (final validation loss and
    samples). Raises ValueError for bad settings and TrainingStopped when interrupted or diverged
    (its `main_process` says whether this process should tell the user).

    `data` None is the R notebook's ABC experiment. Options left None take their default.
    """
    from .checkpoint import resolve_checkpoint
    from .config import GPTConfig
    from .data import prepare_corpus

    model_options = {k: v for k, v in (model_options or {}).items() if v is not None}
    train_options = {k: v for k, v in (train_options or {}).items() if v is not None}
    out = check_run_dir(out, resume)
    check_writable_dir(out, RUN_KIND)  # only a new or empty folder, or a run of ours (nothing written yet)

    saved_state, saved_model = None, None
    if resume:
        ckpt_dir = resolve_checkpoint(out)
        saved_state = load_trainer_state(ckpt_dir).state
        saved_model = GPTConfig.from_dict(read_json(ckpt_dir / "config.json"))
        saved_cfg = TrainConfig.from_dict(saved_state["train_config"])
        if train_options.get("steps", saved_cfg.steps) <= saved_state["step"]:
            raise UsageError(f"--resume: the run in {str(out)!r} is already at step {saved_state['step']}; give "
                             f"--steps above {saved_state['step']} to train further")
        saved_source = saved_state["data"].get("source")
        if (saved_source == "abc") != (data is None):
            raise UsageError(f"--resume: the run trained on {'the ABC source' if saved_source == 'abc' else 'a text corpus'}"
                             f"; {'drop --data' if saved_source == 'abc' else 'give the same --data'}")
        for key, value in train_options.items():
            old = getattr(saved_cfg, key)
            if key not in RESUMABLE and (tuple(value) if key == "betas" else value) != old:
                raise _contradiction("option", key, old, value)
        cfg = saved_cfg.replace(**train_options)
        tokenizer = tokenizer or str(ckpt_dir / "tokenizer.json")
    else:
        cfg = (ABC_TRAIN if data is None else TrainConfig()).replace(**train_options)
        tokenizer = tokenizer or "char"

    d, device = init_distributed(cfg.device)
    from .runtime import configure_backends
    configure_backends(device)  # TF32 matmuls on CUDA; nothing on CPU
    threads = torch.get_num_threads()  # restored at the end: the setting is process-wide
    lock = contextlib.ExitStack()
    try:
        if cfg.fsdp and not d.active:
            raise UsageError("--fsdp needs several processes: launch with torchrun --nproc_per_node N")
        if d.is_main:  # the run directory is ours and locked for as long as this run writes there
            claim_dir(out, RUN_KIND)
            lock.enter_context(lock_dir(out))
        same_as = saved_state["data"] if saved_state is not None else None  # checked before tokens are written
        if d.local_rank == 0:  # each node's first process tokenizes; the others then reuse its files
            corpus, tok = prepare_corpus(data, tokenizer, out / "data", cfg.val_ratio, same_as=same_as)
        d.barrier()
        if d.local_rank != 0:
            corpus, tok = prepare_corpus(data, tokenizer, out / "data", cfg.val_ratio, same_as=same_as)

        if saved_state is not None:
            model_cfg = saved_model
            if preset is not None:
                want = GPTConfig.from_preset(preset, vocab_size=tok.vocab_size)
                if want != saved_model:
                    raise UsageError(f"--resume: --preset {preset} contradicts the checkpoint's model; drop --preset")
            for key, value in model_options.items():
                if getattr(saved_model, key) != value:
                    raise _contradiction("model option", key, getattr(saved_model, key), value)
        else:
            if preset is not None:
                base = GPTConfig.from_preset(preset).to_dict()
            elif data is None:
                base = GPTConfig.from_preset("r-abc").to_dict()
            else:
                base = GPTConfig(**DATA_DEFAULT_MODEL).to_dict()
            model_cfg = GPTConfig.from_dict({**base, **model_options, "vocab_size": tok.vocab_size})

        check_fits(training_memory(model_cfg, cfg), "training this model with these settings", device)
        cpu_threads_for(model_cfg, device)
        optimum = None
        if data is None:
            from .markov import ABC, optimal_loss as exact_optimum

            optimum = exact_optimum(ABC, model_cfg.context_length)
        prompt = "A" if data is None else tok.decode(np.asarray(corpus.val[:8]).tolist())
        try:
            result = train(out, model_cfg, cfg, corpus, tok, resume=resume, optimal_loss=optimum,
                           sample_prompt=prompt, d=d, device=device)
        except TrainingStopped as e:
            e.main_process = d.is_main
            raise
        return TrainingRun(result, report(result, corpus, tok, model_cfg, cfg, optimum, prompt, d, device,
                                          data is None))
    finally:
        lock.close()
        torch.set_num_threads(threads)
        close_distributed(d)


def training_memory(model_cfg, cfg: TrainConfig) -> int:
    """A lower bound of the bytes training needs: fp32 weights, gradients and AdamW's two moments,
    the fixed validation windows, a step's micro-batches (inputs and targets, int64, all drawn at
    once) and one micro-batch's logits with their gradient."""
    from .runtime import model_memory

    windows = cfg.batch_size * cfg.eval_batches * 8 + cfg.batch_size * cfg.grad_accum * model_cfg.context_length * 16
    logits = 2 * cfg.batch_size * model_cfg.context_length * model_cfg.vocab_size * 4
    return 4 * model_memory(model_cfg) + windows + logits


def cpu_threads_for(model_cfg, device: torch.device) -> None:
    """One CPU thread for a tiny model unless OMP_NUM_THREADS says otherwise: its matrices are too
    small to share among threads, coordinating them costs more than it saves, and many times more
    when other processes compete for the cores."""
    from .gpt import GPTModel

    if device.type != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return
    with torch.device("meta"):
        if sum(p.numel() for p in GPTModel(model_cfg).parameters()) < SMALL_MODEL:
            torch.set_num_threads(1)


def report(result: TrainResult, corpus: Corpus, tok, model_cfg, cfg: TrainConfig, optimum: float | None,
           prompt: str, d: Dist, device: torch.device, is_abc: bool) -> str:
    """The end of a run for stdout: validation loss (for ABC on the whole validation split, beside
    the exact optimum on the same windows) and samples. "" on processes other than the main one."""
    model, T = result.model, model_cfg.context_length
    if is_abc:
        from .markov import ABC, optimal_loss_on_text

        starts = sliding_starts(len(corpus.val), T)  # every non-overlapping window of the split
        val_loss, n = evaluate_windows(model, corpus.val, starts, T, 256, device, Dist() if cfg.fsdp else d, cfg.dtype)
        if not d.is_main:
            if cfg.fsdp:  # a sharded forward needs every rank: run the same samples, report nothing
                sample_text(model, tok, prompt, 700, device)
                sample_text(model, tok, prompt, 700, device, top_k=2, seed=cfg.seed)
            return ""
        on_windows = float(optimal_loss_on_text(ABC, tok.decode(np.asarray(corpus.val).tolist()), T).mean())
        return (f"validation loss {val_loss:.6f} on {n:,} tokens ({len(starts):,} windows of {T})\n"
                f"exact optimum   {optimum:.6f} (on these windows {on_windows:.6f}); "
                f"excess {val_loss - optimum:+.6f} nats\n"
                f"\nGreedy from {prompt!r}:\n{sample_text(model, tok, prompt, 700, device)}\n"
                f"\nTop-k 2 from {prompt!r}:\n{sample_text(model, tok, prompt, 700, device, top_k=2, seed=cfg.seed)}")
    if not (d.is_main or cfg.fsdp):
        return ""
    sample = sample_text(model, tok, prompt, 200, device, top_k=40, seed=cfg.seed)
    if not d.is_main:
        return ""
    return f"validation loss {result.val_loss:.6f} after {result.step} steps\n\nSample from {prompt!r}:\n{sample}"


def evaluate_checkpoint(checkpoint: str | Path, data: str | None = None, batch_size: int = 64,
                        device: str = "cpu") -> dict[str, Any]:
    """`build-llm eval`: loss, perplexity and tokens of a checkpoint on the non-overlapping windows
    of a text (or, with no data, of a held-out ABC draw); for the ABC source also the exact optimum
    on the same windows and the excess over it."""
    from .checkpoint import TRAINER_FILE, load_checkpoint
    from .data import read_pieces, text_files
    from .markov import ABC, abc_text, optimal_loss_on_text
    from .runtime import get_device

    dev = get_device(device)
    ckpt = load_checkpoint(checkpoint, dev)
    if ckpt.tokenizer is None:
        raise UsageError(f"checkpoint {str(ckpt.path)!r} has no tokenizer.json; it cannot encode the data")
    trained_on_abc = False
    if (ckpt.path / TRAINER_FILE).is_file():
        saved = read_json(ckpt.path / TRAINER_FILE)
        trained_on_abc = isinstance(saved, dict) and isinstance(saved.get("data"), dict) and \
            saved["data"].get("source") == "abc"
    if data is None:
        text = abc_text(ABC_EVAL_WORDS, ABC_EVAL_SEED)
    else:
        text = "".join(read_pieces(text_files(data)))
        if not text.strip():
            raise UsageError(f"data {str(data)!r} is empty; give a non-empty UTF-8 text")
    T = ckpt.model.cfg.context_length
    ids = np.asarray(ckpt.tokenizer.encode(text), dtype=np.int64)
    starts = sliding_starts(len(ids), T)
    if len(starts) == 0:
        raise UsageError(f"data has {len(ids)} tokens: too short for one window of context_length + 1 = {T + 1}")
    threads = torch.get_num_threads()
    try:
        cpu_threads_for(ckpt.model.cfg, dev)
        loss, n = evaluate_windows(ckpt.model, ids, starts, T, batch_size, dev)
    finally:
        torch.set_num_threads(threads)
    if not math.isfinite(loss):
        raise UsageError(f"checkpoint {str(ckpt.path)!r}: the loss is {loss} (its weights hold NaN or infinity: a "
                         "damaged checkpoint or a diverged run); evaluate another checkpoint")
    result: dict[str, Any] = {"loss": loss, "perplexity": math.exp(loss), "tokens": n, "windows": len(starts)}
    if data is None or trained_on_abc:
        try:
            optimum = float(optimal_loss_on_text(ABC, text, T).mean())
            result.update(optimal_loss=optimum, excess=loss - optimum)
        except ValueError:
            pass  # the text is not an ABC text: no optimum to compare with
    return result


def run_finetune(out: str | Path, init_from: str | Path, task: str, *, data: str | Path,
                 val_data: str | Path | None = None, text_column: str = "text", label_column: str = "label",
                 options: dict[str, Any] | None = None, resume: bool = False) -> dict[str, Any]:
    """`build-llm finetune classify|instruct`: check the run directory (a new or empty one, or our
    fine-tuning run; locked while writing), resolve the settings (given options > the checkpoint's
    when resuming > defaults), fine-tune; returns the last evaluation row. Raises UsageError for bad
    settings and TrainingStopped when interrupted or diverged."""
    from .checkpoint import load_trainer_state
    from .finetune import FinetuneConfig, finetune, resolve_finetuned
    from .fsio import claim_dir, lock_dir

    options = {k: v for k, v in (options or {}).items() if v is not None}
    out = check_run_dir(out, resume)
    if resume:
        saved = load_trainer_state(resolve_finetuned(out)).state["finetune_config"]
        if saved["task"] != task:
            raise UsageError(f"--resume: the run in {str(out)!r} is a {saved['task']} fine-tune, not {task}")
        cfg = FinetuneConfig.from_dict({**saved, **options})
    else:
        cfg = FinetuneConfig(task=task, **options)
    claim_dir(out, "finetune")  # a new or empty directory, or one of our fine-tuning runs
    with lock_dir(out):
        return finetune(out, init_from, cfg, data=data, val_data=val_data, text_column=text_column,
                        label_column=label_column, resume=resume)

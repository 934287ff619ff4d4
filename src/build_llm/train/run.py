"""The command glue behind `build-llm train` and `build-llm eval`: resolve settings (flags, a
checkpoint being resumed, defaults), prepare the data, train, and build the report.

No argparse and no printing here: functions return results (the text for stdout is part of them)
and raise UsageError (a ValueError) or TrainingStopped; cli.py prints and chooses exit codes.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from build_llm.store.checkpoint import CHECKPOINT_DIR, load_trainer_state
from build_llm.data.corpus import Corpus, sliding_starts
from build_llm.train.distributed import Dist, close_distributed, init_distributed
from build_llm.errors import UsageError
from build_llm.store.fsio import check_writable_dir, claim_dir, lock_dir, read_json
from build_llm.runtime import check_fits, set_cpu_threads
from build_llm.sizing import count_parameters, matmul_parameters, training_memory
from build_llm.train.loop import (TrainingStopped, TrainResult, bits_per_unit, evaluate_windows, read_metrics, sample_text, train)
from build_llm.train.config import ABC_TRAIN, BUDGET_TRAIN, TrainConfig

# With --data and no --preset: a character model with learned positions, so that it exports to
# Hugging Face GPT-2 (rotary positions pay on this CPU, docs/speed.md, but are opt-in: --pos-emb rope),
# and fused attention (no seed pins its training-mode numbers). With --steps and
# no shape flag: nanoGPT's shakespeare-char shape on a GPU; on a CPU its CPU recipe (4 layers, 4
# heads, 128 wide, context 64, no dropout), whose steps take tens of milliseconds.
DATA_DEFAULT_MODEL = dict(context_length=256, emb_dim=384, n_heads=6, n_layers=6, drop_rate=0.2, qkv_bias=False,
                          pos_emb="learned", attn_impl="sdpa")
CPU_DEFAULT_MODEL = dict(context_length=64, emb_dim=128, n_heads=4, n_layers=4, drop_rate=0.0, qkv_bias=False,
                         pos_emb="learned", attn_impl="sdpa")
SHAPE_KEYS = ("context_length", "emb_dim", "n_layers", "n_heads")
DEFAULT_BUDGET_S = {"cpu": 300.0, "cuda": 900.0}  # `train --data FILE` with no --steps: a time-budgeted run
# What --resume may change: when and how the steps run, not what they compute.
RESUMABLE = {"steps", "eval_every", "eval_batches", "device", "compile", "dtype", "fsdp"}
ABC_EVAL_WORDS, ABC_EVAL_SEED = 30_000, 2027  # a held-out ABC draw (training uses seed 1)
RUN_KIND = "run"  # the kind in the ownership marker of a run directory


def _contradiction(what: str, key: str, saved: Any, given: Any) -> ValueError:
    return UsageError(f"--resume: {what} {key}={given!r} contradicts the checkpoint's {key}={saved!r}; "
                      "drop the option or start a new run with another --out")


@dataclass
class TrainingRun:
    result: TrainResult
    report: str          # the end of the run for stdout: final loss and samples ("" on other processes)


def run_training(out: str | Path, *, data: str | None = None, tokenizer: str | None = None,
                 preset: str | None = None, model_options: dict[str, Any] | None = None,
                 train_options: dict[str, Any] | None = None, resume: bool = False,
                 init_from: str | Path | None = None, time_budget: str | float | None = None,
                 log: Callable[[str], None] | None = None) -> TrainingRun:
    """`build-llm train`: resolve settings (flags > checkpoint when resuming > defaults), prepare the
    corpus in out/data, train, and return the result with its report (final validation loss and
    samples). Raises UsageError for bad settings and TrainingStopped when interrupted or diverged
    (its `main_process` says whether this process should tell the user).

    `data` None is the R notebook's ABC experiment. Options left None take their default.
    `init_from` (a checkpoint, run directory or Hugging Face GPT-2 directory) gives the starting
    weights, the shape and the tokenizer of a new run; the optimizer starts fresh.
    `time_budget` ("90s", "5m", "2h" or seconds) sizes the model (unless a shape is given) and the
    steps to end within it; with --data and no --steps a budget is the default. `log` receives the
    plan and progress lines (the CLI prints them on stderr).
    """
    from build_llm.train.budget import Deadline, process_started

    started = process_started()
    log = log or (lambda s: None)
    model_options = {k: v for k, v in (model_options or {}).items() if v is not None}
    train_options = {k: v for k, v in (train_options or {}).items() if v is not None}
    out = check_run_dir(out, resume)
    check_writable_dir(out, RUN_KIND)  # only a new or empty folder, or a run of ours (nothing written yet)
    init = load_init(init_from, preset, tokenizer) if init_from is not None else None
    if init is not None:
        init_config(init, model_options)  # a contradicting shape flag fails before anything is written
    saved = resumed_settings(out, data, train_options) if resume else None
    budget_s = budget_seconds(time_budget, data, resume, train_options)
    if saved is not None:
        cfg, tokenizer = saved.cfg, tokenizer or saved.tokenizer
    else:
        base = ABC_TRAIN if data is None else TrainConfig() if budget_s is None else BUDGET_TRAIN
        cfg = base.replace(**train_options)
        tokenizer = init.tokenizer if init is not None else (tokenizer or "char")

    d, device = init_distributed(cfg.device)
    from build_llm.runtime import configure_backends
    configure_backends(device)  # TF32 matmuls on CUDA; nothing on CPU
    threads = torch.get_num_threads()  # restored at the end: the setting is process-wide
    lock = contextlib.ExitStack()
    try:
        if cfg.fsdp and not d.active:
            raise UsageError("--fsdp needs several processes: launch with torchrun --nproc_per_node N")
        if d.is_main:  # the run directory is ours and locked for as long as this run writes there
            claim_dir(out, RUN_KIND)
            lock.enter_context(lock_dir(out))
        same_as = saved.state["data"] if saved is not None else None  # checked before tokens are written
        corpus, tok = prepare_corpus_once(data, tokenizer, out / "data", cfg.val_ratio, d, same_as)
        explicit_shape = preset is not None or init is not None or any(k in model_options for k in SHAPE_KEYS)
        if budget_s is not None and not explicit_shape:
            model_cfg = None  # the budget's rule chooses it
        else:
            model_cfg = model_config(data, preset, model_options, tok, init, saved, corpus, device)
        from build_llm.train.budget import BUDGET_CONTEXT
        from build_llm.data.corpus import check_splits

        check_splits(corpus, model_cfg.context_length if model_cfg is not None else BUDGET_CONTEXT)  # before the plan
        # The plan's estimate refuses first (with what to change); check_fits is the lower bound behind it.
        plan = make_plan(model_cfg, cfg, corpus, tok, device, d, started, budget_s, model_options, preset, log)
        model_cfg, cfg = plan.model_cfg, plan.train_cfg
        check_fits(training_memory(model_cfg, cfg), "training this model with these settings", device)
        if d.is_main:
            log(plan.text())
        set_cpu_threads(count_parameters(model_cfg), device, threads)
        optimum = None
        if data is None:
            from build_llm.data.markov import ABC, optimal_loss as exact_optimum

            optimum = exact_optimum(ABC, model_cfg.context_length)
        prompt = "A" if data is None else tok.decode(np.asarray(corpus.val[:8]).tolist())
        try:
            result = train(out, model_cfg, cfg, corpus, tok, resume=resume, optimal_loss=optimum,
                           sample_prompt=prompt, d=d, device=device,
                           init_weights=init.model.state_dict() if init is not None and not resume else None,
                           log=log if d.is_main else None,
                           adjust=Deadline(started + budget_s, plan.reserve_s) if budget_s is not None else None)
        except TrainingStopped as e:
            e.main_process = d.is_main
            raise
        return TrainingRun(result, report(result, corpus, tok, model_cfg, cfg, optimum, prompt, d, device,
                                          data is None))
    finally:
        lock.close()
        torch.set_num_threads(threads)
        close_distributed(d)




def budget_seconds(time_budget: str | float | None, data: str | None, resume: bool,
                   train_options: dict[str, Any]) -> float | None:
    """Seconds of the run's time budget: --time-budget, or by default (--data, no --steps, not
    resuming) DEFAULT_BUDGET_S for the device; None for a run of --steps steps."""
    from build_llm.train.budget import parse_duration
    from build_llm.runtime import get_device

    if time_budget is None:
        if data is None or resume or "steps" in train_options:
            return None
        return DEFAULT_BUDGET_S["cuda" if get_device(train_options.get("device", "auto")).type == "cuda" else "cpu"]
    if resume:
        raise UsageError("--time-budget with --resume: a resumed run continues its schedule to its last step; "
                         "drop --time-budget (or give --steps N to run to step N)")
    if "steps" in train_options:
        raise UsageError("--time-budget and --steps both set the run's length; drop one of them")
    return parse_duration(time_budget) if isinstance(time_budget, str) else float(time_budget)


def make_plan(model_cfg, cfg: TrainConfig, corpus: Corpus, tok, device: torch.device, d: Dist, started: float,
              budget_s: float | None, model_options: dict[str, Any], preset: str | None,
              log: Callable[[str], None]):
    """The run's plan, before anything big is allocated: the memory check (refusing what would not
    fit), then the measured throughput; with a budget, the shape (if not given) and the steps."""
    import time

    from build_llm.train.budget import BUDGET_CONTEXT, Plan, check_memory, choose_shape, load_fit, probe_tokens_per_s

    if model_cfg is None:  # the rule chooses the shape, within the time left after a 5% share for probing
        from build_llm.config import GPTConfig

        left = budget_s - (time.perf_counter() - started)
        model_cfg, rate, predicted, considered = choose_shape(
            0.9 * left, tok.vocab_size, corpus.train, device, cfg.dtype, load_fit(), probe_s=min(20.0, 0.05 * budget_s),
            log=log if d.is_main else None)
        extra = {k: v for k, v in model_options.items() if k not in ("drop_rate",)}
        model_cfg = GPTConfig.from_dict({**model_cfg.to_dict(), **extra,
                                         "drop_rate": model_options.get("drop_rate", 0.0)})
        assert model_cfg.context_length == BUDGET_CONTEXT
        peak = check_memory(model_cfg, cfg.batch_size, cfg.grad_accum, preset)
    else:
        peak = check_memory(model_cfg, cfg.batch_size, cfg.grad_accum, preset)
        predicted, considered = None, []
        rate = probe_tokens_per_s(model_cfg, cfg.batch_size, corpus.train, device, cfg.dtype) if not d.active else 0.0
    plan = Plan(model_cfg, cfg.batch_size, cfg.grad_accum, cfg.steps, rate, peak, budget_s, considered=considered,
                predicted_loss=predicted)
    if budget_s is not None:
        # What follows the last step: the final evaluation, checkpoint and report (a 200-token sample).
        plan.reserve_s = 2.0 + 0.04 * budget_s
        plan.train_s = budget_s - (time.perf_counter() - started) - plan.reserve_s
        tokens_per_step = cfg.batch_size * cfg.grad_accum * model_cfg.context_length
        steps = max(1, int(rate * plan.train_s / tokens_per_step))
        if predicted is not None:
            plan.predicted_loss = load_fit().predict(matmul_parameters(model_cfg), steps * tokens_per_step)
        changes = {"steps": steps}
        if cfg.warmup_steps >= steps // 5:
            changes["warmup_steps"] = steps // 10
        changes["eval_every"] = max(1, min(cfg.eval_every, steps // 10))
        plan.steps = steps
        cfg = cfg.replace(**changes)
    plan.train_cfg = cfg
    return plan


def check_run_dir(out: str | Path, resume: bool) -> Path:
    """--out of a run: a directory that holds a checkpoint exactly when resuming."""
    from build_llm.store.checkpoint import PREVIOUS_DIR

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {str(out)!r} is a file; give a directory for the run")
    has_ckpt = (out / CHECKPOINT_DIR).exists() or (out / PREVIOUS_DIR).exists()
    if resume and not has_ckpt:
        raise UsageError(f"--resume: no checkpoint in {str(out)!r}; start without --resume to begin a run there")
    if not resume and has_ckpt:
        raise UsageError(f"--out {str(out)!r} already holds a run; add --resume to continue it or give another --out")
    return out


@dataclass
class Resumed:
    """What a resumed run takes from its checkpoint."""
    cfg: TrainConfig             # the saved train config with the resumable flags applied
    tokenizer: str               # the checkpoint's tokenizer.json
    state: dict[str, Any]        # trainer_state.json
    model_cfg: Any               # the saved GPTConfig


def resumed_settings(out: Path, data: str | None, train_options: dict[str, Any]) -> Resumed:
    """The checkpoint's settings; a flag may change only what RESUMABLE lists."""
    from build_llm.store.checkpoint import check_weights_file, resolve_checkpoint
    from build_llm.config import GPTConfig

    ckpt_dir = resolve_checkpoint(out)
    state = load_trainer_state(ckpt_dir).state
    saved_model = GPTConfig.from_dict(read_json(ckpt_dir / "config.json"))
    check_weights_file(ckpt_dir, saved_model)  # damaged files are the one line, before the plan is printed
    if (out / "metrics.jsonl").exists():
        read_metrics(out / "metrics.jsonl", state["step"])
    saved_cfg = TrainConfig.from_dict(state["train_config"])
    if train_options.get("steps", saved_cfg.steps) <= state["step"]:
        raise UsageError(f"--resume: the run in {str(out)!r} is already at step {state['step']}; give "
                         f"--steps above {state['step']} to train further")
    saved_source = state["data"].get("source")
    if (saved_source == "abc") != (data is None):
        raise UsageError(f"--resume: the run trained on {'the ABC source' if saved_source == 'abc' else 'a text corpus'}"
                         f"; {'drop --data' if saved_source == 'abc' else 'give the same --data'}")
    for key, value in train_options.items():
        old = getattr(saved_cfg, key)
        if key not in RESUMABLE and (tuple(value) if key == "betas" else value) != old:
            raise _contradiction("option", key, old, value)
    return Resumed(saved_cfg.replace(**train_options), str(ckpt_dir / "tokenizer.json"), state, saved_model)


def prepare_corpus_once(data: str | None, tokenizer: str, data_dir: Path, val_ratio: float, d: Dist,
                        same_as: dict[str, Any] | None = None):
    """(corpus, tokenizer): each node's first process tokenizes; the others then reuse its files."""
    from build_llm.data.corpus import prepare_corpus

    if d.local_rank == 0:
        corpus, tok = prepare_corpus(data, tokenizer, data_dir, val_ratio, same_as=same_as)
    d.barrier()
    if d.local_rank != 0:
        corpus, tok = prepare_corpus(data, tokenizer, data_dir, val_ratio, same_as=same_as)
    return corpus, tok


def model_config(data: str | None, preset: str | None, model_options: dict[str, Any], tok, init: "InitFrom | None",
                 saved: Resumed | None, corpus: Corpus, device: torch.device):
    """The model's GPTConfig: the checkpoint's when resuming (flags may only repeat it), the
    --init-from model's (only --drop-rate may change), or preset/default + flags."""
    from build_llm.config import GPTConfig

    if saved is not None:
        for key in ("data_sha256", "tokenizer_sha256"):
            if corpus.meta[key] != saved.state["data"][key]:
                what = "data" if key == "data_sha256" else "tokenizer"
                raise UsageError(f"--resume: the {what} differs from the one the checkpoint was trained on; "
                                 f"give the same --data and --tokenizer, or start a new run with another --out")
        if preset is not None and GPTConfig.from_preset(preset, vocab_size=tok.vocab_size) != saved.model_cfg:
            raise UsageError(f"--resume: --preset {preset} contradicts the checkpoint's model; drop --preset")
        for key, value in model_options.items():
            if getattr(saved.model_cfg, key) != value:
                raise _contradiction("model option", key, getattr(saved.model_cfg, key), value)
        if init is not None and init_config(init, model_options) != saved.model_cfg:
            raise UsageError(f"--resume: --init-from {str(init.path)!r} is not the model this run started from "
                             "(its shape differs); drop --init-from")
        return saved.model_cfg
    if init is not None:
        return init_config(init, model_options)
    if preset is not None:
        base = GPTConfig.from_preset(preset).to_dict()
    elif data is None:
        base = GPTConfig.from_preset("r-abc").to_dict()
    else:
        base = GPTConfig(**(DATA_DEFAULT_MODEL if device.type == "cuda" else CPU_DEFAULT_MODEL)).to_dict()
    return GPTConfig.from_dict({**base, **model_options, "vocab_size": tok.vocab_size})


# --- --init-from ---------------------------------------------------------------------------------
@dataclass
class InitFrom:
    """A model a new run starts from: its weights and shape, and its tokenizer."""
    model: Any                   # GPTModel on the CPU
    tokenizer: str               # what prepare_corpus reads: "gpt2" or a tokenizer JSON path
    path: Path


def load_init(path: str | Path, preset: str | None = None, tokenizer: str | None = None) -> InitFrom:
    """Read --init-from: a checkpoint or run directory of this package (with its tokenizer.json), or
    a Hugging Face GPT-2 directory (its tokenizer.json if it has one, else GPT-2's BPE)."""
    from build_llm.store.checkpoint import TOKENIZER_FILE, load_checkpoint
    from build_llm.interop.hf import from_hf
    from build_llm.data.tokenizer import GPT2_VOCAB_SIZE

    p = Path(path)
    if preset is not None:
        raise UsageError(f"--init-from and --preset {preset} both give the model's shape; drop one of them")
    if tokenizer is not None:
        raise UsageError(f"--tokenizer {tokenizer!r}: a model given with --init-from keeps its own tokenizer; "
                         "drop --tokenizer")
    if not p.is_dir():
        raise UsageError(f"--init-from {str(path)!r} is not a directory; give a checkpoint, a run directory or a "
                         "Hugging Face GPT-2 directory")
    if _is_hf_dir(p):
        model = from_hf(p)
        if (p / TOKENIZER_FILE).is_file():
            tok = str(p / TOKENIZER_FILE)
        elif model.cfg.vocab_size == GPT2_VOCAB_SIZE:
            tok = "gpt2"
        else:
            raise UsageError(f"--init-from {str(path)!r} has no tokenizer.json and a {model.cfg.vocab_size}-token "
                             "vocabulary that is not GPT-2's; save its tokenizer there (tokenizer.save_pretrained)")
        return InitFrom(model, tok, p)
    ckpt = load_checkpoint(p)
    if ckpt.tokenizer is None:
        raise UsageError(f"--init-from {str(path)!r} has no tokenizer.json: the new data cannot be encoded as the "
                         "model was trained; give a checkpoint with its tokenizer")
    return InitFrom(ckpt.model, str(ckpt.path / TOKENIZER_FILE), ckpt.path)


def _is_hf_dir(path: Path) -> bool:
    """A Hugging Face model directory: its config.json names a model_type (ours never does)."""
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "model_type" in config


def init_config(init: InitFrom, model_options: dict[str, Any]):
    """The --init-from model's config; a shape flag may only repeat it, --drop-rate may change."""
    from build_llm.config import GPTConfig

    cfg = init.model.cfg
    for key, value in model_options.items():
        if key != "drop_rate" and getattr(cfg, key) != value:
            raise UsageError(f"--init-from: --{key.replace('_', '-')} {value!r} contradicts the model's "
                             f"{key}={getattr(cfg, key)!r} (its shape comes from --init-from); drop the option")
    return GPTConfig.from_dict({**cfg.to_dict(), **{k: v for k, v in model_options.items() if k == "drop_rate"}})


def report(result: TrainResult, corpus: Corpus, tok, model_cfg, cfg: TrainConfig, optimum: float | None,
           prompt: str, d: Dist, device: torch.device, is_abc: bool) -> str:
    """The end of a run for stdout: validation loss (for ABC on the whole validation split, beside
    the exact optimum on the same windows) and samples. "" on processes other than the main one."""
    model, T = result.model, model_cfg.context_length
    if is_abc:
        from build_llm.data.markov import ABC, optimal_loss_on_text

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
    bits = result.history[-1].get("val_bits_per_char") if result.history else None
    bits_text = f" ({bits:.4f} bits per character)" if bits is not None else ""
    return f"validation loss {result.val_loss:.6f}{bits_text} after {result.step} steps\n\nSample from {prompt!r}:\n{sample}"


def evaluate_checkpoint(checkpoint: str | Path, data: str | None = None, batch_size: int = 64,
                        device: str = "cpu") -> dict[str, Any]:
    """`build-llm eval`: loss, perplexity and tokens of a checkpoint on the non-overlapping windows
    of a text (or, with no data, of a held-out ABC draw); for the ABC source also the exact optimum
    on the same windows and the excess over it."""
    from build_llm.store.checkpoint import TRAINER_FILE, load_checkpoint
    from build_llm.data.corpus import read_pieces, text_files
    from build_llm.data.markov import ABC, abc_text, optimal_loss_on_text
    from build_llm.runtime import get_device

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
        set_cpu_threads(count_parameters(ckpt.model.cfg), dev)
        loss, n = evaluate_windows(ckpt.model, ids, starts, T, batch_size, dev)
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


def run_finetune(out: str | Path, init_from: str | Path, task: str, *, data: str | Path,
                 val_data: str | Path | None = None, text_column: str = "text", label_column: str = "label",
                 options: dict[str, Any] | None = None, resume: bool = False) -> dict[str, Any]:
    """`build-llm finetune classify|instruct`: check the run directory (a new or empty one, or our
    fine-tuning run; locked while writing), resolve the settings (given options > the checkpoint's
    when resuming > defaults), fine-tune; returns the last evaluation row. Raises UsageError for bad
    settings and TrainingStopped when interrupted or diverged."""
    from build_llm.store.checkpoint import load_trainer_state
    from build_llm.train.finetune import finetune
    from build_llm.store.finetuned import resolve_finetuned
    from build_llm.train.config import FinetuneConfig
    from build_llm.store.fsio import claim_dir, lock_dir

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

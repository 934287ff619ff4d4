"""Pretraining: next-token prediction on a corpus (`train`), and the `build-llm train` command
around it (`run_training`: settings, the corpus, the plan, the report).

Determinism: the batch of step s is drawn from a generator seeded by (seed, s), and torch's generator
(dropout) is reseeded from (seed, s, rank) before every step. So a run stopped at step k and resumed
draws exactly what an uninterrupted run draws, and under torchrun every rank draws the same global
batch and takes its own slice of it: the global batch does not depend on the world size.

No argparse and no printing here: functions return results (the text for stdout is part of them)
and raise UsageError (a ValueError) or TrainingStopped; the CLI prints and chooses exit codes.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file

from build_llm.config import GPTConfig
from build_llm.data.corpus import (Corpus, check_splits, check_tokenizer_choice, draw_starts, prepare_corpus,
                                   random_windows, sliding_starts, step_rng)
from build_llm.data.markov import ABC, optimal_loss, optimal_loss_on_text
from build_llm.data.tokenizer import GPT2_VOCAB_SIZE, text_size
from build_llm.errors import UsageError
from build_llm.gpt import GPTModel
from build_llm.infer.evaluate import bits_per_counts, evaluate_windows
from build_llm.infer.generate import decodable_ids, generate, text_to_token_ids
from build_llm.interop.hf import from_hf
from build_llm.runtime import check_fits, configure_backends, cpu_has_bf16, set_cpu_threads, set_seed, training_dtype
from build_llm.sizing import count_parameters, training_memory
from build_llm.store.checkpoint import (CHECKPOINT_DIR, MODEL_FILE, TOKENIZER_FILE, load_checkpoint,
                                        load_trainer_state, save_checkpoint, set_rng_state, trainer_files)
from build_llm.store.fsio import check_writable_dir
from build_llm.train.budget import Deadline, budget_context, budget_seconds, make_plan, process_started
from build_llm.train.config import ABC_TRAIN, BUDGET_TRAIN, TrainConfig
from build_llm.train.distributed import Dist, close_distributed, full_state_options, init_distributed, wrap_model
from build_llm.train.loop import (Prefetcher, RunLog, TrainingStopped, TrainState, grad_scaler, lr_at, make_optimizer,
                                  run_loop, train_step)
from build_llm.train.rundir import RUN_KIND, Resumed, check_run_dir, contradiction, owned, resumed_settings

# Keys of step_rng streams: training batches, the fixed validation windows, dropout.
TRAIN_STREAM, VAL_STREAM, DROPOUT_STREAM = 0, 1, 2
# With --data, --steps and no --preset: learned positions, so that the model exports to Hugging Face
# GPT-2 (rotary positions pay on this CPU, docs/speed.md, but are opt-in: --pos-emb rope), and fused
# attention (no seed pins its training-mode numbers). On a GPU nanoGPT's shakespeare-char shape; on a
# CPU its CPU recipe (4 layers, 4 heads, 128 wide, no dropout), whose steps take tens of
# milliseconds, with context 64 for a character model and 256 for a subword one.
DATA_DEFAULT_MODEL = dict(context_length=256, emb_dim=384, n_heads=6, n_layers=6, drop_rate=0.2, qkv_bias=False,
                          pos_emb="learned", attn_impl="sdpa")
CPU_DEFAULT_MODEL = dict(context_length=64, emb_dim=128, n_heads=4, n_layers=4, drop_rate=0.0, qkv_bias=False,
                         pos_emb="learned", attn_impl="sdpa")
SHAPE_KEYS = ("context_length", "emb_dim", "n_layers", "n_heads")
# Tokens sampled at an evaluation and in the report (ABC's report: two samples of ABC_REPORT_TOKENS).
SAMPLE_TOKENS, REPORT_TOKENS, ABC_REPORT_TOKENS = 60, 200, 700


# --- the objective: next-token prediction on a corpus --------------------------------------------
def micro_batches(ids: np.ndarray, step: int, cfg: TrainConfig, context_length: int, d: Dist):
    """This process's slice of each of the step's `grad_accum` global micro-batches."""
    rng = step_rng(cfg.seed, TRAIN_STREAM, step)
    starts = draw_starts(len(ids), context_length, cfg.batch_size * cfg.grad_accum, rng)
    per_rank = cfg.batch_size // d.world
    for m in range(cfg.grad_accum):
        global_batch = starts[m * cfg.batch_size:(m + 1) * cfg.batch_size]
        yield random_windows(ids, global_batch[d.rank * per_rank:(d.rank + 1) * per_rank], context_length)


def eval_starts(corpus: Corpus, context_length: int, cfg: TrainConfig) -> np.ndarray:
    """The fixed validation windows of every evaluation: `eval_batches` batches drawn once."""
    return draw_starts(len(corpus.val), context_length, cfg.batch_size * cfg.eval_batches,
                       step_rng(cfg.seed, VAL_STREAM))


def sample_text(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int, device: torch.device,
                top_k: int | None = None, seed: int = 0) -> str:
    """Greedy continuation of `prompt` (or top-k sampling at temperature 1 with `top_k`)."""
    was_training = model.training
    model.eval()
    idx = text_to_token_ids(prompt, tokenizer).to(device)[:, -model.cfg.context_length:]
    generator = torch.Generator(device=device).manual_seed(seed)
    out = generate(model, idx, max_new_tokens, temperature=1.0 if top_k else 0.0, top_k=top_k, generator=generator,
                   vocab_size=decodable_ids(model, tokenizer))  # an --init-from with a padded vocabulary (Qwen's)
    model.train(was_training)
    return tokenizer.decode(out[0].tolist())


class LanguageModelling:
    """What `run_loop` calls for pretraining: the step (micro-batches of windows, dropout reseeded),
    the schedule, the evaluation on fixed validation windows, a sample, the checkpoint."""

    def __init__(self, out_dir: Path, corpus: Corpus, tokenizer, cfg: TrainConfig, context_length: int, d: Dist,
                 device: torch.device, sample_prompt: str | None) -> None:
        self.out_dir, self.corpus, self.tokenizer, self.cfg, self.T = out_dir, corpus, tokenizer, cfg, context_length
        self.d, self.device, self.sample_prompt = d, device, sample_prompt
        self.tokens_per_step = cfg.batch_size * cfg.grad_accum * context_length
        self.val_starts = eval_starts(corpus, context_length, cfg)
        # A sharded (FSDP) forward is collective: every rank must run the same forwards, so each
        # evaluates every window; otherwise the ranks share the windows and sum.
        self.eval_dist = None if cfg.fsdp else d
        # The evaluation windows are a sample of the validation split: its tokens per character (and
        # per byte) turn their mean loss into bits per character (and per byte) of the split's text,
        # counted from the ids (the split is never decoded: it may be gigabytes).
        self.val_chars, self.val_bytes = text_size(corpus.val, tokenizer)
        # The next step's micro-batches are gathered while this one computes (entered by `train`).
        self.loader = Prefetcher(lambda step: micro_batches(corpus.train, step, cfg, context_length, d), device)

    def step(self, state: TrainState, stop: Callable[[], bool]) -> tuple[float, int] | None:
        cfg, d = self.cfg, self.d
        torch.manual_seed(int(step_rng(cfg.seed, DROPOUT_STREAM, state.step, d.rank).integers(2**62)))  # dropout
        batches = self.loader.get(state.step, state.total_steps)
        loss = train_step(state.model, state.optimizer, batches, self.device, cfg, d, stop=stop, scaler=state.scaler)
        return None if loss is None else (loss, self.tokens_per_step)  # the loop reads it when it syncs

    def lr(self, state: TrainState) -> float:
        return lr_at(state.step, self.cfg, state.total_steps)

    def evaluate(self, state: TrainState) -> dict[str, float]:
        val = self.corpus.val
        loss = evaluate_windows(state.core, val, self.val_starts, self.T, self.cfg.batch_size, self.device,
                                self.eval_dist, self.cfg.dtype)[0]
        bits = bits_per_counts(loss, len(val), self.val_chars, self.val_bytes)
        return {"val_loss": loss, **{f"val_{k}": v for k, v in bits.items()}}

    def sample(self, state: TrainState) -> str | None:
        # With the evaluation, at most every 50 steps (generation is slow next to a tiny step)
        due = state.step % max(self.cfg.eval_every, 50) == 0 or state.step == state.total_steps
        if not self.sample_prompt or not due or not (self.d.is_main or self.cfg.fsdp):  # FSDP: every rank forwards
            return None
        text = sample_text(state.core, self.tokenizer, self.sample_prompt, SAMPLE_TOKENS, self.device)
        return text if self.d.is_main else None

    def save(self, state: TrainState) -> Path:
        return save_training_checkpoint(self.out_dir, state, self.cfg, self.tokenizer, self.corpus.meta, self.d)


# --- a run: the model on its device, wrapped, its optimizer, its checkpoint -----------------------
@dataclass
class TrainResult:
    model: nn.Module             # the plain GPTModel, on the training device, eval mode
    step: int
    val_loss: float
    history: list[dict[str, Any]] = field(default_factory=list)


def setup(core: nn.Module, cfg: TrainConfig, *, out_dir: str | Path | None = None, resume: bool = False,
          d: Dist | None = None, device: torch.device | None = None) -> TrainState:
    """Put `core` on the device, wrap it for the processes, build its AdamW; with `resume`, restore
    the weights, optimizer, RNG states, step, tokens and clock of out_dir's checkpoint.

    Weights a new run starts from (an imported or fine-tuned model) are loaded into `core` first.
    """
    d, device = d or Dist(), device or torch.device("cpu")
    saved = load_trainer_state(out_dir) if resume else None
    core = core.to(device)
    if saved is not None:
        load_weights(core, saved.path, device)
    model = wrap_model(core, d, device, fsdp=cfg.fsdp, compile=cfg.compile, dtype=cfg.dtype)
    state = TrainState(core, model, make_optimizer(core, cfg, device), total_steps=cfg.steps,
                       scaler=grad_scaler(cfg.dtype, device))
    if saved is not None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict  # heavy: seconds to import

        set_optimizer_state_dict(core, state.optimizer, saved.optimizer, options=full_state_options(cfg.fsdp))
        set_rng_state(saved.rng, saved.state["rng"])
        state.step, state.elapsed = saved.state["step"], saved.state["elapsed_s"]
        state.tokens_seen = saved.state["tokens_seen"]
        if state.scaler is not None and "grad_scaler" in saved.state:
            state.scaler.load_state_dict(saved.state["grad_scaler"])
    return state


def load_weights(core: nn.Module, checkpoint_dir: str | Path, device: torch.device) -> None:
    """Load a checkpoint directory's model.safetensors into `core`, whose shape must match (a tied
    head is stored once, as the token embedding)."""
    path = Path(checkpoint_dir) / MODEL_FILE
    try:
        state = load_file(path, device=str(device))
        if "out_head.weight" not in state and "tok_emb.weight" in state and "out_head.weight" in core.state_dict():
            state["out_head.weight"] = state["tok_emb.weight"]
        core.load_state_dict(state)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:  # a damaged file: not the model's shape
        raise UsageError(f"checkpoint {str(path.parent)!r}: {MODEL_FILE} is unreadable, truncated or of another "
                         f"shape ({' '.join(str(e).split())[:300]})") from e


def save_training_checkpoint(out_dir: str | Path, state: TrainState, cfg: TrainConfig, tokenizer,
                             data_meta: dict[str, Any], d: Dist | None = None) -> Path:
    """Write out_dir/checkpoint/ atomically: weights, config, tokenizer and the trainer's state
    (optimizer, RNG, step, tokens, clock, train config, data identity). Collective under FSDP (every
    rank gathers the full state); the main process writes."""
    # heavy: seconds to import, and only saving needs it
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    d = d or Dist()
    full = full_state_options(cfg.fsdp)
    weights = get_model_state_dict(state.core, options=full) if cfg.fsdp else None
    opt_state = get_optimizer_state_dict(state.core, state.optimizer, options=full)
    path = Path(out_dir) / CHECKPOINT_DIR
    if d.is_main:
        trainer = {"format": 1, "step": state.step, "tokens_seen": state.tokens_seen, "elapsed_s": state.elapsed,
                   "train_config": cfg.replace(steps=max(state.total_steps, state.step)).to_dict(), "data": data_meta,
                   "world_size": d.world}
        if state.scaler is not None:  # float16: the loss scale it has found, and its count towards growing it
            trainer["grad_scaler"] = state.scaler.state_dict()
        save_checkpoint(path, state.core, tokenizer, trainer_files(opt_state, trainer), state=weights)
    d.barrier()
    return path


def train(out_dir: str | Path, model_cfg: GPTConfig, cfg: TrainConfig, corpus: Corpus, tokenizer, *,
          resume: bool = False, optimal_loss: float | None = None, sample_prompt: str | None = None,
          d: Dist | None = None, device: torch.device | None = None, log: Callable[[str], None] | None = None,
          init_weights: dict[str, torch.Tensor] | None = None,
          adjust: Callable[[TrainState], int] | None = None) -> TrainResult:
    """Train a GPTModel(model_cfg) on `corpus`, writing metrics.jsonl, loss.png and checkpoint/ in out_dir.

    A new run starts from `init_weights` (a state dict of that shape) if given, else from a seeded
    random initialisation. With `resume`, continue from out_dir's checkpoint up to cfg.steps in total. Raises
    TrainingStopped on Ctrl-C (after saving) and on a non-finite loss (keeping the last checkpoint).
    `adjust(state)` may move the last step as the run goes (see run_loop; budget.Deadline).
    """
    out_dir, d, device = Path(out_dir), d or Dist(), device or torch.device("cpu")
    check_splits(corpus, model_cfg.context_length)
    if cfg.batch_size % d.world:
        raise UsageError(f"batch_size={cfg.batch_size} is not divisible by the {d.world} processes; "
                         f"choose a multiple of {d.world}")
    set_seed(cfg.seed)  # the model's initialisation
    core = GPTModel(model_cfg)
    if init_weights is not None and not resume:
        core.load_state_dict(init_weights)
    state = setup(core, cfg, out_dir=out_dir, resume=resume, d=d, device=device)
    lm = LanguageModelling(out_dir, corpus, tokenizer, cfg, model_cfg.context_length, d, device, sample_prompt)
    with lm.loader, RunLog(out_dir, state.total_steps, state, d=d, resume=resume, optimal_loss=optimal_loss,
                           log=log) as run_log:
        run_loop(state, lm.step, lr=lm.lr, evaluate=lm.evaluate, save=lm.save, log=run_log,
                 eval_every=cfg.eval_every, d=d, device=device, sample=lm.sample, adjust=adjust)
    state.core.eval()
    return TrainResult(state.core, state.step, run_log.last["val_loss"] if run_log.last else float("nan"),
                       run_log.history)


# --- `build-llm train` ---------------------------------------------------------------------------
@dataclass
class TrainingRun:
    result: TrainResult
    report: str          # the end of the run for stdout: final loss and samples ("" on other processes)


@dataclass
class Request:
    """What `build-llm train` was asked, checked before anything is written."""
    out: Path
    data: str | None             # None: the ABC source
    preset: str | None
    model_options: dict[str, Any]
    cfg: TrainConfig
    tokenizer: str
    init: InitFrom | None        # --init-from of a new run
    saved: Resumed | None        # the checkpoint of a resumed run
    budget_s: float | None       # the time budget, if any
    dtype_given: bool            # --dtype given: the probe measures it alone
    started: float               # time.perf_counter() at the process's start
    log: Callable[[str], None]


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
    req = request(out, data, tokenizer, preset, model_options, train_options, resume, init_from, time_budget,
                  log or (lambda s: None))
    d, device = init_distributed(req.cfg.device, req.log)
    configure_backends(device)  # TF32 matmuls on CUDA; nothing on CPU
    dtype, why = training_dtype(req.cfg.dtype, device)
    if why and d.is_main:
        req.log(why)
    req.cfg = req.cfg.replace(dtype=dtype)
    threads = torch.get_num_threads()  # restored at the end: the setting is process-wide
    try:
        if req.cfg.fsdp and not d.active:
            raise UsageError("--fsdp needs several processes: launch with torchrun --nproc_per_node N")
        with owned(req.out, RUN_KIND, d.is_main):  # ours and locked for as long as this run writes there
            same_as = req.saved.state["data"] if req.saved is not None else None  # checked before tokens are written
            corpus, tok = prepare_corpus_once(req.data, req.tokenizer, req.out / "data", req.cfg.val_ratio, d, same_as)
            plan = plan_run(req, corpus, tok, d, device, threads)
            return train_planned(req, plan, corpus, tok, d, device)
    finally:
        torch.set_num_threads(threads)
        close_distributed(d)


def request(out: str | Path, data: str | None, tokenizer: str | None, preset: str | None,
            model_options: dict[str, Any] | None, train_options: dict[str, Any] | None, resume: bool,
            init_from: str | Path | None, time_budget: str | float | None, log: Callable[[str], None]) -> Request:
    """The settings of a `build-llm train` (options left None take their default), checked before
    anything is written: the run directory, --init-from, the checkpoint being resumed, the budget."""
    started = process_started()
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
        cfg = (ABC_TRAIN if data is None else TrainConfig() if budget_s is None else BUDGET_TRAIN).replace(**train_options)
        tokenizer = init.tokenizer if init is not None else (tokenizer or ("char" if data is None else "bpe"))
    check_tokenizer_choice(tokenizer, data)
    return Request(out, data, preset, model_options, cfg, tokenizer, init, saved, budget_s, "dtype" in train_options,
                   started, log)


def plan_run(req: Request, corpus: Corpus, tok, d: Dist, device: torch.device, threads: int):
    """The run's budget.Plan: the model's shape (the budget's rule chooses it when no shape is given),
    memory checks and steps; printed, and the CPU threads set for the model's size."""
    explicit_shape = req.preset is not None or req.init is not None or any(k in req.model_options for k in SHAPE_KEYS)
    if req.budget_s is not None and not explicit_shape:
        model_cfg = None  # the budget's rule chooses it
    else:
        model_cfg = model_config(req.data, req.preset, req.model_options, tok, req.init, req.saved, corpus, device)
    check_splits(corpus, model_cfg.context_length if model_cfg is not None else budget_context(tok))  # before the plan
    # The plan's estimate refuses first (with what to change); check_fits is the lower bound behind it.
    # Unless --dtype is given, the budget's probe also measures bf16 autocast, and takes it where it is faster
    # (not on a CPU without bf16 instructions, where autocast is emulated: its probe would eat the budget).
    dtypes = ("bfloat16",) if not req.dtype_given and req.cfg.dtype == "float32" else ()
    if dtypes and device.type == "cpu" and not cpu_has_bf16():
        dtypes = ()
        if d.is_main and req.budget_s is not None and model_cfg is None:
            req.log("dtype: float32 only: this CPU reports no bfloat16 instructions (avx512_bf16, amx_bf16), "
                    "so bfloat16 autocast would be emulated and slower")
    plan = make_plan(model_cfg, req.cfg, corpus, tok, device, d, req.started, req.budget_s, req.model_options,
                     req.preset, req.log, start_step=req.saved.state["step"] if req.saved is not None else 0,
                     dtypes=dtypes)
    check_fits(training_memory(plan.model_cfg, plan.train_cfg), "training this model with these settings", device)
    if d.is_main:
        req.log(plan.text() + "\n" + held_out_line(corpus))
    set_cpu_threads(count_parameters(plan.model_cfg), device, threads)
    return plan


def held_out_line(corpus: Corpus) -> str:
    """The plan's line on the validation text: the last part of each file (data/corpus.py), so that
    a folder's validation represents all its files, not its last ones."""
    where = "the ABC draw" if corpus.meta.get("source") == "abc" else "each file"
    return (f"plan: validation: the last {corpus.meta['val_ratio']:.0%} of {where} ({len(corpus.val):,} tokens), "
            "never trained on")


def train_planned(req: Request, plan, corpus: Corpus, tok, d: Dist, device: torch.device) -> TrainingRun:
    """Train as planned (ABC: beside the exact optimum) and build the report."""
    model_cfg, cfg, is_abc = plan.model_cfg, plan.train_cfg, req.data is None
    optimum = optimal_loss(ABC, model_cfg.context_length) if is_abc else None
    prompt = "A" if is_abc else tok.decode(np.asarray(corpus.val[:8]).tolist())
    init = req.init if req.saved is None else None
    # The budget keeps time after the last step for its round and the report (in samples of an evaluation's size).
    report_samples = (2 * ABC_REPORT_TOKENS if is_abc else REPORT_TOKENS) / SAMPLE_TOKENS
    deadline = (Deadline(req.started + req.budget_s, plan.reserve_s, eval_every=cfg.eval_every,
                         report_samples=report_samples) if req.budget_s is not None else None)
    try:
        result = train(req.out, model_cfg, cfg, corpus, tok, resume=req.saved is not None, optimal_loss=optimum,
                       sample_prompt=prompt, d=d, device=device,
                       init_weights=init.model.state_dict() if init is not None else None,
                       log=req.log if d.is_main else None,
                       adjust=deadline)
    except TrainingStopped as e:
        e.main_process = d.is_main
        raise
    text = report(result, corpus, tok, model_cfg, cfg, optimum, prompt, d, device, is_abc)
    return TrainingRun(result, text and text + "\n\n" + next_steps(req.out, tok, prompt, is_abc))


def next_steps(out: Path, tok, prompt: str, is_abc: bool) -> str:
    """Where the checkpoint is and what to run next, with this run's own path."""
    run, sft, classify = (shlex.quote(f"{out}{suffix}") for suffix in ("", "-sft", "-classify"))
    lines = [f"checkpoint: {out / CHECKPOINT_DIR}", "next:",
             f"  build-llm generate --checkpoint {run} --prompt {shlex.quote(prompt.split(chr(10))[0] or prompt)}"]
    if is_abc:
        lines.append(f"  build-llm eval --checkpoint {run}")
    elif getattr(tok, "eos_id", None) is not None:
        lines += [f"  build-llm finetune instruct --init-from {run} --data RECORDS.json --out {sft}",
                  f"  build-llm chat --checkpoint {sft}"]
    else:  # a character model cannot instruction-tune (no end token); it can learn to classify
        lines.append(f"  build-llm finetune classify --init-from {run} --data LABELLED.csv --out {classify}")
    return "\n".join(lines)


def prepare_corpus_once(data: str | None, tokenizer: str, data_dir: Path, val_ratio: float, d: Dist,
                        same_as: dict[str, Any] | None = None):
    """(corpus, tokenizer): each node's first process tokenizes; the others then reuse its files."""
    if d.local_rank == 0:
        corpus, tok = prepare_corpus(data, tokenizer, data_dir, val_ratio, same_as=same_as)
    d.barrier()
    if d.local_rank != 0:
        corpus, tok = prepare_corpus(data, tokenizer, data_dir, val_ratio, same_as=same_as)
    return corpus, tok


def model_config(data: str | None, preset: str | None, model_options: dict[str, Any], tok, init: "InitFrom | None",
                 saved: Resumed | None, corpus: Corpus, device: torch.device) -> GPTConfig:
    """The model's GPTConfig: the checkpoint's when resuming (flags may only repeat it), the
    --init-from model's (only --drop-rate may change), or preset/default + flags."""
    if saved is not None:
        return _resumed_model(saved, preset, model_options, tok, init, corpus)
    if init is not None:
        return init_config(init, model_options)
    if preset is not None:
        base = GPTConfig.from_preset(preset).to_dict()
    elif data is None:
        base = GPTConfig.from_preset("r-abc").to_dict()
    else:
        base = GPTConfig(**(DATA_DEFAULT_MODEL if device.type == "cuda" else CPU_DEFAULT_MODEL)).to_dict()
        if device.type != "cuda":  # a subword model's context holds instruction records and chats
            base["context_length"] = budget_context(tok)
    return GPTConfig.from_dict({**base, **model_options, "vocab_size": tok.vocab_size})


def _resumed_model(saved: Resumed, preset: str | None, model_options: dict[str, Any], tok, init: "InitFrom | None",
                   corpus: Corpus) -> GPTConfig:
    """The checkpoint's model config; the data, tokenizer and shape flags may only repeat the run's."""
    for key in ("data_sha256", "tokenizer_sha256"):
        if corpus.meta[key] != saved.state["data"][key]:
            what = "data" if key == "data_sha256" else "tokenizer"
            raise UsageError(f"--resume: the {what} differs from the one the checkpoint was trained on; "
                             f"give the same --data and --tokenizer, or start a new run with another --out")
    if preset is not None and GPTConfig.from_preset(preset, vocab_size=tok.vocab_size) != saved.model_cfg:
        raise UsageError(f"--resume: --preset {preset} contradicts the checkpoint's model; drop --preset")
    for key, value in model_options.items():
        if getattr(saved.model_cfg, key) != value:
            raise contradiction("model option", key, getattr(saved.model_cfg, key), value)
    if init is not None and init_config(init, model_options) != saved.model_cfg:
        raise UsageError(f"--resume: --init-from {str(init.path)!r} is not the model this run started from "
                         "(its shape differs); drop --init-from")
    return saved.model_cfg


def report(result: TrainResult, corpus: Corpus, tok, model_cfg: GPTConfig, cfg: TrainConfig, optimum: float | None,
           prompt: str, d: Dist, device: torch.device, is_abc: bool) -> str:
    """The end of a run for stdout: validation loss (for ABC on the whole validation split, beside
    the exact optimum on the same windows) and samples. "" on processes other than the main one."""
    model, T = result.model, model_cfg.context_length
    if is_abc:
        starts = sliding_starts(len(corpus.val), T)  # every non-overlapping window of the split
        val_loss, n = evaluate_windows(model, corpus.val, starts, T, 256, device, None if cfg.fsdp else d, cfg.dtype,
                                       progress=True)
        if not d.is_main:
            if cfg.fsdp:  # a sharded forward needs every rank: run the same samples, report nothing
                sample_text(model, tok, prompt, ABC_REPORT_TOKENS, device)
                sample_text(model, tok, prompt, ABC_REPORT_TOKENS, device, top_k=2, seed=cfg.seed)
            return ""
        on_windows = float(optimal_loss_on_text(ABC, tok.decode(np.asarray(corpus.val).tolist()), T).mean())
        return (f"validation loss {val_loss:.6f} on {n:,} tokens ({len(starts):,} windows of {T})\n"
                f"exact optimum   {optimum:.6f} (on these windows {on_windows:.6f}); "
                f"excess {val_loss - optimum:+.6f} nats\n"
                f"\nGreedy from {prompt!r}:\n{sample_text(model, tok, prompt, ABC_REPORT_TOKENS, device)}\n"
                f"\nTop-k 2 from {prompt!r}:\n"
                f"{sample_text(model, tok, prompt, ABC_REPORT_TOKENS, device, top_k=2, seed=cfg.seed)}")
    if not (d.is_main or cfg.fsdp):
        return ""
    sample = sample_text(model, tok, prompt, REPORT_TOKENS, device, top_k=40, seed=cfg.seed)
    if not d.is_main:
        return ""
    bits = result.history[-1].get("val_bits_per_char") if result.history else None
    bits_text = f" ({bits:.4f} bits per character)" if bits is not None else ""
    return f"validation loss {result.val_loss:.6f}{bits_text} after {result.step} steps\n\nSample from {prompt!r}:\n{sample}"


# --- --init-from ---------------------------------------------------------------------------------
@dataclass
class InitFrom:
    """A model a new run starts from: its weights and shape, and its tokenizer."""
    model: GPTModel              # on the CPU
    tokenizer: str               # what prepare_corpus reads: "gpt2" or a tokenizer JSON path
    path: Path


def load_init(path: str | Path, preset: str | None = None, tokenizer: str | None = None) -> InitFrom:
    """Read --init-from: a checkpoint or run directory of this package (with its tokenizer.json), or
    a Hugging Face GPT-2 directory (its tokenizer.json if it has one, else GPT-2's BPE)."""
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


def init_config(init: InitFrom, model_options: dict[str, Any]) -> GPTConfig:
    """The --init-from model's config; a shape flag may only repeat it, --drop-rate may change."""
    cfg = init.model.cfg
    for key, value in model_options.items():
        if key != "drop_rate" and getattr(cfg, key) != value:
            raise UsageError(f"--init-from: --{key.replace('_', '-')} {value!r} contradicts the model's "
                             f"{key}={getattr(cfg, key)!r} (its shape comes from --init-from); drop the option")
    return GPTConfig.from_dict({**cfg.to_dict(), **{k: v for k, v in model_options.items() if k == "drop_rate"}})

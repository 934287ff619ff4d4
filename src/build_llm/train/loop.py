"""Training: AdamW, warm-up + cosine schedule, clipping, accumulation, evaluation, checkpoints.

Read it top to bottom: the book's loop (`train_model_simple` and its helpers); the pieces of ours
(`lr_at`, `make_optimizer`, `micro_batches`, `train_step`, the one place a step's arithmetic lives,
`evaluate_windows`); `setup` (model on its device, wrapped for torchrun, optimizer, resume);
`save_training_checkpoint`; `RunLog` (metrics.jsonl, progress, plots); `run_loop`, which any
objective can drive with its own batches and loss (fine-tuning does); and `train`, the loop behind
`build-llm train`, which wires them for language modelling. The command's glue is in run.py, the
torchrun helpers in distributed.py.

Determinism: the batch of step s is drawn from a generator seeded by (seed, s), and torch's generator
(dropout) is reseeded from (seed, s, rank) before every step. So a run stopped at step k and resumed
draws exactly what an uninterrupted run draws, and under torchrun every rank draws the same global
batch and takes its own slice of it: the global batch does not depend on the world size.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from build_llm.store.checkpoint import (CHECKPOINT_DIR, load_trainer_state, save_checkpoint, set_rng_state, trainer_files,
                         unwrap)
from build_llm.data.corpus import Corpus, check_splits, draw_starts, random_windows, step_rng
from build_llm.train.distributed import Dist, full_state_options, wrap_model
from build_llm.errors import UsageError
from build_llm.train.config import TrainConfig
from build_llm.store.fsio import write_text
from build_llm.runtime import autocast

# Keys of step_rng streams: one for training batches, one for the fixed validation windows.
TRAIN_STREAM, VAL_STREAM, DROPOUT_STREAM = 0, 1, 2




# --- the book's functions ------------------------------------------------------------------------
def calc_loss_batch(input_batch: torch.Tensor, target_batch: torch.Tensor, model: nn.Module,
                    device: torch.device | str) -> torch.Tensor:
    """Mean cross-entropy of the model's next-token logits against the targets of one batch."""
    from build_llm.runtime import to_device
    input_batch, target_batch = to_device(input_batch, device), to_device(target_batch, device)  # pinned, async on CUDA
    logits = model(input_batch)  # (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1).float(), target_batch.flatten().long())


def calc_loss_loader(data_loader, model: nn.Module, device: torch.device | str, num_batches: int | None = None) -> float:
    """Mean batch loss over the first `num_batches` batches of a loader (all of them by default)."""
    total_loss = 0.0
    if len(data_loader) == 0:
        return float("nan")
    num_batches = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))
    for i, (input_batch, target_batch) in enumerate(data_loader):
        if i >= num_batches:
            break
        total_loss += calc_loss_batch(input_batch, target_batch, model, device).item()
    return total_loss / num_batches


def evaluate_model(model: nn.Module, train_loader, val_loader, device, eval_iter: int) -> tuple[float, float]:
    """(train loss, validation loss) on `eval_iter` batches each, in eval mode."""
    model.eval()
    with torch.no_grad():
        train_loss = calc_loss_loader(train_loader, model, device, num_batches=eval_iter)
        val_loss = calc_loss_loader(val_loader, model, device, num_batches=eval_iter)
    model.train()
    return train_loss, val_loss


def generate_and_print_sample(model: nn.Module, tokenizer, device, start_context: str) -> None:
    """Print a 50-token greedy continuation of `start_context` on one line."""
    from build_llm.infer.generate import generate_text_simple, text_to_token_ids, token_ids_to_text

    model.eval()
    context_size = unwrap(model).cfg.context_length
    encoded = text_to_token_ids(start_context, tokenizer).to(device)
    with torch.no_grad():
        token_ids = generate_text_simple(model=model, idx=encoded, max_new_tokens=50, context_size=context_size)
    print(token_ids_to_text(token_ids, tokenizer).replace("\n", " "))
    model.train()


def train_model_simple(model: nn.Module, train_loader, val_loader, optimizer, device, num_epochs: int,
                       eval_freq: int, eval_iter: int, start_context: str, tokenizer):
    """The book's loop: epochs over the loader, evaluation every `eval_freq` steps, a sample per epoch.

    Returns (train_losses, val_losses, track_tokens_seen), one entry per evaluation.
    """
    train_losses, val_losses, track_tokens_seen = [], [], []
    tokens_seen, global_step = 0, -1
    for epoch in range(num_epochs):
        model.train()
        for input_batch, target_batch in train_loader:
            optimizer.zero_grad()
            loss = calc_loss_batch(input_batch, target_batch, model, device)
            loss.backward()
            optimizer.step()
            tokens_seen += input_batch.numel()
            global_step += 1
            if global_step % eval_freq == 0:
                train_loss, val_loss = evaluate_model(model, train_loader, val_loader, device, eval_iter)
                train_losses.append(train_loss)
                val_losses.append(val_loss)
                track_tokens_seen.append(tokens_seen)
                print(f"Ep {epoch+1} (Step {global_step:06d}): Train loss {train_loss:.3f}, Val loss {val_loss:.3f}")
        generate_and_print_sample(model, tokenizer, device, start_context)
    return train_losses, val_losses, track_tokens_seen


# --- pieces of the loop --------------------------------------------------------------------------
def lr_at(step: int, cfg: TrainConfig, total: int | None = None) -> float:
    """Learning rate for step `step` (0-based): linear warm-up, then cosine (or constant) decay to
    the last step, `total` (default cfg.steps; a time budget moves it as the run measures its speed)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_decay == "constant":
        return cfg.lr
    total = cfg.steps if total is None else total
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    min_lr = cfg.lr * cfg.min_lr_ratio
    return min_lr + 0.5 * (cfg.lr - min_lr) * (1 + math.cos(math.pi * progress))


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices (linear weights and embeddings), none on biases and LayerNorm
    scales/shifts, whose size is not what overfits (nanoGPT's split)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = {"fused": True} if device.type == "cuda" and not cfg.fsdp else {}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, **fused)


def micro_batches(ids: np.ndarray, step: int, cfg: TrainConfig, context_length: int, d: Dist):
    """This process's slice of each of the step's `grad_accum` global micro-batches."""
    rng = step_rng(cfg.seed, TRAIN_STREAM, step)
    starts = draw_starts(len(ids), context_length, cfg.batch_size * cfg.grad_accum, rng)
    per_rank = cfg.batch_size // d.world
    for m in range(cfg.grad_accum):
        global_batch = starts[m * cfg.batch_size:(m + 1) * cfg.batch_size]
        yield random_windows(ids, global_batch[d.rank * per_rank:(d.rank + 1) * per_rank], context_length)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batches, device: torch.device,
               cfg: TrainConfig, d: Dist, loss_fn: Callable | None = None,
               stop: Callable[[], bool] | None = None) -> torch.Tensor | None:
    """One optimizer step over `grad_accum` micro-batches; returns the mean loss over all processes.
    `loss_fn(x, y, model, device)` is the micro-batch's loss (default: calc_loss_batch).

    Gradients of every micro-batch are averaged (DDP also averages across processes, and only syncs
    on the last micro-batch), clipped to `grad_clip`, then AdamW steps. If `stop()` turns true
    between micro-batches (a single process only: under torchrun every rank must run the same
    micro-batches), the step is abandoned, the weights unchanged, and None returned.
    """
    loss_fn = loss_fn or calc_loss_batch
    optimizer.zero_grad(set_to_none=True)
    total = torch.zeros((), device=device)
    # A generator (micro_batches) is read one micro-batch at a time: cfg.grad_accum of them, never all
    # in memory at once; a sequence may hold any number.
    n = len(batches) if hasattr(batches, "__len__") else cfg.grad_accum
    i = -1
    for i, (x, y) in enumerate(batches):
        if stop is not None and i > 0 and not d.active and stop():
            optimizer.zero_grad(set_to_none=True)
            return None
        last = i == n - 1
        sync = model.no_sync() if (d.active and not last and hasattr(model, "no_sync")) else contextlib.nullcontext()
        with sync:
            with autocast(device, cfg.dtype):
                loss = loss_fn(x, y, model, device)
            (loss / n).backward()
        total += loss.detach()
    if i + 1 != n:
        raise RuntimeError(f"train_step: got {i + 1} micro-batches, expected {n} (cfg.grad_accum)")
    if cfg.grad_clip > 0:
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    return d.sum(total / n) / d.world


def evaluate_windows(model: nn.Module, ids: np.ndarray, starts: np.ndarray, context_length: int,
                     batch_size: int, device: torch.device, d: Dist = Dist(), dtype: str = "float32") -> tuple[float, int]:
    """(mean loss per token, tokens) over the windows at `starts`, each process taking a share."""
    mine = starts[d.rank::d.world]
    total = torch.zeros(2, dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i in range(0, len(mine), batch_size):
            x, y = random_windows(ids, mine[i:i + batch_size], context_length)
            with autocast(device, dtype):
                logits = model(x.to(device))
            loss = F.cross_entropy(logits.flatten(0, 1).float(), y.to(device).flatten(), reduction="sum")
            total += torch.stack([loss.double(), torch.tensor(float(y.numel()), dtype=torch.float64, device=device)])
    model.train(was_training)
    loss_sum, n = d.sum(total).tolist()
    return (loss_sum / n if n else float("nan")), int(n)


def bits_per_unit(loss: float, tokens: int, text: str) -> dict[str, float]:
    """Bits per character and per UTF-8 byte of `text`, whose `tokens` tokens cost `loss` nats each
    on average: total nats / ln 2 / characters (or bytes). Unlike the loss per token, these do not
    depend on the tokenizer, so character and BPE models compare."""
    total_bits = loss * tokens / math.log(2)
    return {"bits_per_char": total_bits / max(1, len(text)),
            "bits_per_byte": total_bits / max(1, len(text.encode("utf-8")))}


def eval_starts(corpus: Corpus, context_length: int, cfg: TrainConfig) -> np.ndarray:
    """The fixed validation windows of every evaluation: `eval_batches` batches drawn once."""
    return draw_starts(len(corpus.val), context_length, cfg.batch_size * cfg.eval_batches,
                       step_rng(cfg.seed, VAL_STREAM))


class StopFlag:
    """SIGINT/SIGTERM set a flag; the loop checks it at each step boundary, saves and exits.
    A second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.raised: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "StopFlag":
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.raised = signum
        signal.signal(signum, self._old.get(signum, signal.SIG_DFL))

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


class TrainingStopped(Exception):
    """Training ended early: interrupted (exit_code 130) or diverged (exit_code 1)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.main_process = True  # False on the other torchrun processes: only the main one tells the user


@dataclass
class TrainResult:
    model: nn.Module             # the plain GPTModel, on the training device, eval mode
    step: int
    val_loss: float
    history: list[dict[str, Any]] = field(default_factory=list)


def _seed_model_init(seed: int) -> None:
    from build_llm.runtime import set_seed

    set_seed(seed)




# --- setup: the model on its device, wrapped, its optimizer, and what a resumed run restores -----
@dataclass
class TrainState:
    """What the loop advances. `core` is the plain model (the optimizer and checkpoints use it);
    `model` is what the loop calls (core itself, or DDP/FSDP/compiled around it)."""
    core: nn.Module
    model: nn.Module
    optimizer: torch.optim.Optimizer
    step: int = 0                # optimizer steps done
    total_steps: int = 0         # the step the schedule ends at (cfg.steps, unless a time budget moves it)
    tokens_seen: int = 0         # training tokens over all processes
    elapsed: float = 0.0         # seconds of training, carried across resumes


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
    model = wrap_model(core, d, device, fsdp=cfg.fsdp, compile=cfg.compile)
    state = TrainState(core, model, make_optimizer(core, cfg, device), total_steps=cfg.steps)
    if saved is not None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(core, state.optimizer, saved.optimizer, options=full_state_options(cfg.fsdp))
        set_rng_state(saved.rng, saved.state["rng"])
        state.step, state.elapsed = saved.state["step"], saved.state["elapsed_s"]
        state.tokens_seen = saved.state["tokens_seen"]
    return state


def load_weights(core: nn.Module, checkpoint_dir: str | Path, device: torch.device) -> None:
    """Load a checkpoint directory's model.safetensors into `core`, whose shape must match (a tied
    head is stored once, as the token embedding)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from build_llm.store.checkpoint import MODEL_FILE

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
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    d = d or Dist()
    full = full_state_options(cfg.fsdp)
    weights = get_model_state_dict(state.core, options=full) if cfg.fsdp else None
    opt_state = get_optimizer_state_dict(state.core, state.optimizer, options=full)
    path = Path(out_dir) / CHECKPOINT_DIR
    if d.is_main:
        trainer = {"format": 1, "step": state.step, "tokens_seen": state.tokens_seen, "elapsed_s": state.elapsed,
                   "train_config": cfg.replace(steps=max(state.total_steps, state.step)).to_dict(), "data": data_meta, "world_size": d.world}
        save_checkpoint(path, state.core, tokenizer, trainer_files(opt_state, trainer), state=weights)
    d.barrier()
    return path


# --- the run's record: metrics.jsonl, progress, plots -------------------------------------------
def read_metrics(path: Path, up_to_step: int) -> list[dict[str, Any]]:
    """The rows of a run's metrics.jsonl up to `up_to_step` (a resumed run drops the later ones)."""
    try:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return [r for r in rows if r["step"] <= up_to_step]
    except (ValueError, KeyError, TypeError, RecursionError):
        raise UsageError(f"{str(path)!r} is damaged (not one JSON row with a step per line); move it "
                         "away to resume without the earlier rows") from None


class RunLog:
    """A run's record. On the main process: metrics.jsonl (one row per evaluation; a resumed run
    first drops the rows logged after its checkpoint), the progress bar with a line per
    evaluation, and loss.png redrawn at most every 30 s (matplotlib is slow next to a tiny model's
    step). Other processes keep the rows but write nothing."""

    PLOT_EVERY_S = 30.0

    LINE_EVERY_S = 30.0  # when the progress output is not a terminal (no bar): a line at least this often

    def __init__(self, out_dir: str | Path, total_steps: int, state: TrainState, *, d: Dist | None = None,
                 resume: bool = False, optimal_loss: float | None = None,
                 log: Callable[[str], None] | None = None) -> None:
        self.out_dir, self.total_steps, self.d = Path(out_dir), total_steps, d or Dist()
        self.steps_done = state.step
        self.optimal_loss = optimal_loss
        self.log = log or (lambda s: print(s, file=sys.stderr, flush=True))
        self.path = self.out_dir / "metrics.jsonl"
        self.history: list[dict[str, Any]] = []  # every row of the run (including a resumed run's earlier ones)
        self.last: dict[str, Any] | None = None  # the last row this process logged
        if self.d.is_main and resume and self.path.exists():
            self.history = read_metrics(self.path, state.step)
            write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.history))
        elif self.d.is_main and not resume:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.path.write_text("")
        self.t_start = time.perf_counter() - state.elapsed
        self.losses, self.seconds, self.tokens = [], 0.0, 0  # since the last evaluation
        self.last_plot = self.last_line = time.perf_counter()
        self.bar = None
        if self.d.is_main:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=state.step, file=sys.stderr, dynamic_ncols=True,
                            disable=None, desc="train", unit="step")

    def elapsed(self) -> float:
        """Seconds of training so far, including the runs this one resumes."""
        return time.perf_counter() - self.t_start

    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)

    def step(self, loss: float, lr: float, seconds: float, tokens: int, total_steps: int | None = None) -> None:
        """One optimizer step done: its loss, learning rate, time spent in it and tokens trained
        (and the run's last step, when a time budget moved it)."""
        self.losses.append(loss)
        self.seconds += seconds
        self.tokens += tokens
        self.steps_done += 1
        if total_steps is not None:
            self.total_steps = total_steps
        if self.bar is None:
            return
        if self.bar.total != self.total_steps:
            self.bar.total = self.total_steps
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{self.tokens_per_s():.0f}")
        if self.bar.disable and time.perf_counter() - self.last_line > self.LINE_EVERY_S:
            self.line(f"step {self.steps_done}/{self.total_steps}: loss {loss:.4f}, lr {lr:.2e}, "
                      f"{self.tokens_per_s():.0f} tokens/s, {self.elapsed():.0f} s")

    def line(self, msg: str) -> None:
        """A line on the progress output (above the bar when there is one)."""
        (self.bar.write(msg, file=sys.stderr) if self.bar is not None else self.log(msg))
        self.last_line = time.perf_counter()

    def evaluation(self, state: TrainState, lr: float, metrics: dict[str, float], sample: str | None = None) -> dict[str, Any]:
        """Log a row: the mean training loss since the last one, `metrics` (e.g. val_loss), tokens,
        lr, clock and throughput; print it (with a sample, if given) on the progress output."""
        row = {"step": state.step, "train_loss": float(np.mean(self.losses)), **metrics,
               "tokens_seen": state.tokens_seen, "lr": lr, "elapsed_s": round(state.elapsed, 3),
               "tokens_per_s": round(self.tokens_per_s(), 1)}
        if self.optimal_loss is not None:
            row["optimal_loss"] = self.optimal_loss
        self.history.append(row)
        self.last = row
        if self.d.is_main:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(row) + "\n")
            shown = "".join(f", {k.removesuffix('_loss').replace('_', ' ')} {v:.4f}" for k, v in metrics.items()
                            if "bits_per" not in k)
            if "val_bits_per_char" in metrics:
                bpc, bpb = metrics["val_bits_per_char"], metrics["val_bits_per_byte"]
                shown += f" ({bpc:.3f} bits/char" + (f", {bpb:.3f} bits/byte)" if abs(bpb - bpc) > 5e-4 else ")")
            msg = (f"step {state.step}/{self.total_steps}: train {row['train_loss']:.4f}{shown}"
                   + (f" (optimum {self.optimal_loss:.4f})" if self.optimal_loss is not None else "")
                   + f", {row['tokens_per_s']:.0f} tokens/s")
            if sample:
                msg += f"\n  sample: {sample!r}"
            self.line(msg)
        self.losses, self.seconds, self.tokens = [], 0.0, 0
        return row

    def plot(self, force: bool = False) -> None:
        """Redraw out_dir/loss.png if 30 s passed since the last drawing (or if `force`)."""
        if self.d.is_main and self.history and (force or time.perf_counter() - self.last_plot > self.PLOT_EVERY_S):
            from build_llm.inspect.plots import plot_losses

            plot_losses([r["tokens_seen"] for r in self.history], [r["train_loss"] for r in self.history],
                        [r["val_loss"] for r in self.history], self.out_dir / "loss.png",
                        optimal_loss=self.optimal_loss)
            self.last_plot = time.perf_counter()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --- the loop ------------------------------------------------------------------------------------
def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> float:
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def run_loop(state: TrainState, cfg: TrainConfig, batches: Callable[[int], Iterable], *,
             evaluate: Callable[[TrainState], dict[str, float]], save: Callable[[TrainState], Path],
             log: RunLog, tokens_per_step: int, d: Dist, device: torch.device,
             loss_fn: Callable | None = None, sample: Callable[[TrainState], str | None] | None = None,
             adjust: Callable[[TrainState], int] | None = None) -> TrainState:
    """Optimizer steps from state.step up to state.total_steps (cfg.steps, or where `adjust(state)`,
    asked after every step, moves it: a time budget). `batches(step)` yields this process's
    micro-batches (x, y) of a step; `loss_fn(x, y, model, device)` (default calc_loss_batch) is the
    loss; every cfg.eval_every steps and at the end, `evaluate(state)` gives the row's metrics,
    `sample(state)` an optional sample, then `save(state)` checkpoints.

    Ctrl-C (SIGINT, SIGTERM) saves and raises TrainingStopped (exit code 130) at the next step
    boundary; a non-finite loss raises TrainingStopped (exit code 1), keeping the last checkpoint.
    """
    state.model.train()
    with StopFlag() as stop:
        while state.step < state.total_steps:
            lr = set_lr(state.optimizer, lr_at(state.step, cfg, state.total_steps))
            torch.manual_seed(int(step_rng(cfg.seed, DROPOUT_STREAM, state.step, d.rank).integers(2**62)))
            t0 = time.perf_counter()
            loss = train_step(state.model, state.optimizer, batches(state.step), device, cfg, d, loss_fn,
                              stop=lambda: stop.raised is not None)
            if loss is None:  # interrupted between micro-batches: the step is not taken
                state.elapsed = log.elapsed()
                if not (log.path.parent / CHECKPOINT_DIR).exists() or state.step % cfg.eval_every:
                    save(state)
                log.plot(force=True)
                raise TrainingStopped(f"interrupted during step {state.step + 1}/{cfg.steps}; checkpoint of step "
                                      f"{state.step} saved in {log.out_dir / CHECKPOINT_DIR}; continue with --resume",
                                      130)
            loss = loss.item()
            if not math.isfinite(loss):
                raise _diverged(f"loss is {loss} at step {state.step + 1}", log.out_dir)
            state.step, state.tokens_seen = state.step + 1, state.tokens_seen + tokens_per_step
            if adjust is not None:
                state.total_steps = max(state.step, adjust(state))
            log.step(loss, lr, time.perf_counter() - t0, tokens_per_step, state.total_steps)
            evaluated = state.step % cfg.eval_every == 0 or state.step == state.total_steps
            if evaluated:
                metrics = evaluate(state)
                # The loss above was computed before this step's update, which may have blown the weights
                # up: never save a checkpoint whose weights or validation loss are not finite.
                bad = [k for k, v in metrics.items() if not math.isfinite(v)]
                if bad or not _finite_weights(state.core, d, device):
                    raise _diverged(f"after step {state.step} the " + (f"{bad[0]} is {metrics[bad[0]]}" if bad else
                                    "weights hold NaN or infinity"), log.out_dir)
                state.elapsed = log.elapsed()
                log.evaluation(state, lr, metrics, sample(state) if sample else None)
                save(state)
                log.plot(force=state.step == state.total_steps)
            if d.sum(torch.tensor(float(stop.raised is not None), device=device)).item() > 0:
                state.elapsed = log.elapsed()
                if not evaluated:
                    save(state)
                log.plot(force=True)
                raise TrainingStopped(f"interrupted at step {state.step}/{state.total_steps}; checkpoint saved in "
                                      f"{log.out_dir / CHECKPOINT_DIR}; continue with --resume", 130)
    return state


def _finite_weights(model: nn.Module, d: Dist, device: torch.device) -> bool:
    """Whether every parameter is finite, on every process (a sharded parameter checks its shard)."""
    local = all(bool(torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all())
                for p in model.parameters())
    return d.sum(torch.tensor(float(not local), device=device)).item() == 0


def _diverged(what: str, out_dir: Path) -> TrainingStopped:
    kept = out_dir / CHECKPOINT_DIR
    where = (f"the last good checkpoint is kept in {kept}" if kept.exists() else "no checkpoint was saved")
    return TrainingStopped(f"{what}: training diverged; {where} (try a lower --lr or --grad-clip)", 1)


def train(out_dir: str | Path, model_cfg, cfg: TrainConfig, corpus: Corpus, tokenizer, *, resume: bool = False,
          optimal_loss: float | None = None, sample_prompt: str | None = None, d: Dist | None = None,
          device: torch.device | None = None, log: Callable[[str], None] | None = None,
          init_weights: dict[str, torch.Tensor] | None = None,
          adjust: Callable[[TrainState], int] | None = None) -> TrainResult:
    """Train a GPTModel(model_cfg) on `corpus`, writing metrics.jsonl, loss.png and checkpoint/ in out_dir.

    A new run starts from `init_weights` (a state dict of that shape) if given, else from a seeded
    random initialisation. With `resume`, continue from out_dir's checkpoint up to cfg.steps in total. Raises
    TrainingStopped on Ctrl-C (after saving) and on a non-finite loss (keeping the last checkpoint).
    `adjust(state)` may move the last step as the run goes (see run_loop; budget.Deadline).
    """
    from build_llm.gpt import GPTModel

    out_dir, d, device = Path(out_dir), d or Dist(), device or torch.device("cpu")
    T = model_cfg.context_length
    check_splits(corpus, T)
    if cfg.batch_size % d.world:
        raise UsageError(f"batch_size={cfg.batch_size} is not divisible by the {d.world} processes; "
                         f"choose a multiple of {d.world}")
    _seed_model_init(cfg.seed)
    core = GPTModel(model_cfg)
    if init_weights is not None and not resume:
        core.load_state_dict(init_weights)
    state = setup(core, cfg, out_dir=out_dir, resume=resume, d=d, device=device)
    val_starts = eval_starts(corpus, T, cfg)
    # A sharded (FSDP) forward is collective: every rank must run the same forwards, so each
    # evaluates every window; otherwise the ranks share the windows and sum.
    eval_dist = Dist() if cfg.fsdp else d

    # The evaluation windows are a sample of the validation split: its tokens per character (and per
    # byte) turn their mean loss into bits per character (and per byte) of the split's text.
    val_text = tokenizer.decode(np.asarray(corpus.val).tolist())

    def evaluate(s: TrainState) -> dict[str, float]:
        loss = evaluate_windows(s.core, corpus.val, val_starts, T, cfg.batch_size, device, eval_dist, cfg.dtype)[0]
        return {"val_loss": loss, **{f"val_{k}": v for k, v in bits_per_unit(loss, len(corpus.val), val_text).items()}}

    def sample(s: TrainState) -> str | None:
        # With the evaluation, at most every 50 steps (generation is slow next to a tiny step)
        if not sample_prompt or not (s.step % max(cfg.eval_every, 50) == 0 or s.step == s.total_steps):
            return None
        if not (d.is_main or cfg.fsdp):  # a sharded forward needs every rank
            return None
        text = sample_text(s.core, tokenizer, sample_prompt, 60, device)
        return text if d.is_main else None

    run_log = RunLog(out_dir, state.total_steps, state, d=d, resume=resume, optimal_loss=optimal_loss, log=log)
    try:
        run_loop(state, cfg, lambda step: micro_batches(corpus.train, step, cfg, T, d), evaluate=evaluate,
                 save=lambda s: save_training_checkpoint(out_dir, s, cfg, tokenizer, corpus.meta, d), log=run_log,
                 tokens_per_step=cfg.batch_size * cfg.grad_accum * T, d=d, device=device, sample=sample,
                 adjust=adjust)
    finally:
        run_log.close()
    state.core.eval()
    return TrainResult(state.core, state.step, run_log.last["val_loss"] if run_log.last else float("nan"),
                       run_log.history)


def sample_text(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int, device: torch.device,
                top_k: int | None = None, seed: int = 0) -> str:
    """Greedy continuation of `prompt` (or top-k sampling at temperature 1 with `top_k`)."""
    from build_llm.infer.generate import generate, text_to_token_ids

    was_training = model.training
    model.eval()
    idx = text_to_token_ids(prompt, tokenizer).to(device)[:, -model.cfg.context_length:]
    generator = torch.Generator(device=device).manual_seed(seed)
    out = generate(model, idx, max_new_tokens, temperature=1.0 if top_k else 0.0, top_k=top_k, generator=generator)
    model.train(was_training)
    return tokenizer.decode(out[0].tolist())

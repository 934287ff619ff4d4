"""The one training loop: pretraining, classification, instruction fine-tuning and LoRA all run
through `run_loop`.

An objective comes to the loop as functions of the `TrainState`: `step(state, stop)` takes one
optimizer step (it draws the step's batch and dropout from (seed, step), so that a resumed run takes
exactly the steps an uninterrupted one takes) and returns (loss, tokens trained), the loss a float or
a tensor still on the device (read when the loop syncs), or None when `stop()` turned true between
its micro-batches; `lr(state)` is the step's learning rate;
`evaluate(state)` gives a row's metrics; `save(state)` writes the checkpoint. The loop alone owns
what every objective shares:
- when losses are read on the host (every SYNC_EVERY steps: 1 on CPU, 16 on CUDA);
- the stop flag: SIGINT or SIGTERM saves at the next read and raises TrainingStopped (exit 130);
- the divergence rule: a non-finite loss, evaluation metric or weight raises TrainingStopped (exit 1),
  keeping the last good checkpoint;
- when to evaluate, save and plot: every `eval_every` steps and at the last one.

Read on for the pieces objectives share: `TrainState`, `make_optimizer` (AdamW with the weight-decay
split), `lr_at` (pretraining's schedule), `train_step` (a language-model step over accumulated
micro-batches) and `RunLog` (metrics.jsonl, progress, loss.png drawn by `plot_losses`).
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from build_llm.errors import UsageError
from build_llm.runtime import autocast, to_device
from build_llm.store.checkpoint import CHECKPOINT_DIR
from build_llm.store.fsio import clean_stale, open_append, save_figure, write_text
from build_llm.train.config import TrainConfig
from build_llm.train.distributed import Dist

@dataclass
class TrainState:
    """What the loop advances. `core` is the plain model (the optimizer and checkpoints use it);
    `model` is what a step calls (core itself, or DDP/FSDP/compiled around it)."""
    core: nn.Module
    model: nn.Module
    optimizer: torch.optim.Optimizer
    step: int = 0                # optimizer steps done
    total_steps: int = 0         # the step the run ends at (a time budget may move it)
    tokens_seen: int = 0         # training tokens over all processes
    elapsed: float = 0.0         # seconds of training, carried across resumes
    scaler: Any = None           # float16 training: the GradScaler that keeps small gradients from underflowing
    # Measured for what the last step's round will take (budget.Deadline): the seconds of each
    # evaluation round of this run (evaluation, sample, checkpoint, plot), its longest sample's.
    round_times: list[float] = field(default_factory=list)
    sample_s: float = 0.0


# An objective's step: (state, stop) -> (loss, tokens trained), or None when stopped between micro-batches;
# the loss a float or a 0-d tensor (read with the other pending ones when the loop syncs).
Step = Callable[[TrainState, Callable[[], bool]], "tuple[float | torch.Tensor, int] | None"]


class TrainingStopped(Exception):
    """Training ended early: interrupted (exit_code 130) or diverged (exit_code 1)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.main_process = True  # False on the other torchrun processes: only the main one tells the user


class StopFlag:
    """SIGINT/SIGTERM set a flag; the loop checks it after each step (under torchrun, when it reads the
    losses: every SYNC_EVERY steps), saves and exits.
    A second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.raised: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "StopFlag":
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.raised = signum
        signal.signal(signum, self._old.get(signum, signal.SIG_DFL))

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


# --- the optimizer and pretraining's schedule ----------------------------------------------------
def make_optimizer(model: nn.Module, cfg: Any, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters: weight decay on matrices (linear weights and embeddings),
    none on biases and norm scales/shifts, whose size is not what overfits (nanoGPT's split); fused
    on CUDA. `cfg` gives lr and weight_decay, and betas and fsdp where it has them (a TrainConfig;
    a FinetuneConfig keeps torch's default betas)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    fused = {"fused": True} if device.type == "cuda" and not getattr(cfg, "fsdp", False) else {}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=getattr(cfg, "betas", (0.9, 0.999)), **fused)


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


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> float:
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


# --- a language-model step -----------------------------------------------------------------------
def next_token_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Mean cross-entropy of the model's next-token logits against the targets of one batch."""
    x, y = to_device(x, device), to_device(y, device)  # pinned, async on CUDA
    logits = model(x)  # (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten().long())


def grad_scaler(dtype: str, device: torch.device) -> torch.amp.GradScaler | None:
    """float16 training's loss scaler (float16 gradients underflow below 6e-8); None otherwise."""
    return torch.amp.GradScaler(torch.device(device).type) if dtype == "float16" else None


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batches: Iterable, device: torch.device,
               cfg: TrainConfig, d: Dist, stop: Callable[[], bool] | None = None,
               scaler: torch.amp.GradScaler | None = None) -> torch.Tensor | None:
    """One optimizer step over `grad_accum` micro-batches (x, y) of next-token loss; returns the
    mean loss over all processes.

    Gradients of every micro-batch are averaged (DDP also averages across processes, and only syncs
    on the last micro-batch), clipped to `grad_clip`, then AdamW steps. If `stop()` turns true
    between micro-batches (a single process only: under torchrun every rank must run the same
    micro-batches), the step is abandoned, the weights unchanged, and None returned.
    """
    optimizer.zero_grad(set_to_none=True)
    total = torch.zeros((), device=device)
    # An iterable without a length is read one micro-batch at a time: cfg.grad_accum of them; a sequence
    # may hold any number (pretraining's: the step's micro-batches, drawn ahead by the Prefetcher).
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
                loss = next_token_loss(model, x, y, device)
            (loss / n if scaler is None else scaler.scale(loss / n)).backward()
        total += loss.detach()
    if i + 1 != n:
        raise RuntimeError(f"train_step: got {i + 1} micro-batches, expected {n} (cfg.grad_accum)")
    if scaler is not None:
        scaler.unscale_(optimizer)  # clip the true gradients; a step with inf/NaN among them is skipped
    if cfg.grad_clip > 0:
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)
        scaler.update()
    return d.sum(total / n) / d.world


class Prefetcher:
    """A step's micro-batches prepared on a background thread while the step before computes:
    `make(step)` gives them, drawn from (seed, step), so what is prepared ahead is what the step would
    draw itself (a run is bit-identical with or without it). On CUDA they are pinned there too, so
    that their copy to the device (next_token_loss: non_blocking) neither waits for the host nor
    makes it wait. A context manager: leaving waits for the thread (one step's batches at most) and
    ends it, whatever ended the loop."""

    def __init__(self, make: Callable[[int], Iterable], device: torch.device) -> None:
        self.make, self.pin = make, torch.device(device).type == "cuda"
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")  # its thread starts at the first submit
        self.ahead: tuple[int, Future] | None = None  # (step, its batches being prepared)

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    def _prepare(self, step: int) -> list:
        batches = list(self.make(step))
        return [tuple(t.pin_memory() for t in batch) for batch in batches] if self.pin else batches

    def get(self, step: int, last: int) -> list:
        """Step `step`'s micro-batches; the next one's start preparing unless `step` is the last
        (0-based steps; `last` is the run's number of steps)."""
        ahead, self.ahead = self.ahead, None
        batches = ahead[1].result() if ahead is not None and ahead[0] == step else self._prepare(step)
        if step + 1 < last:
            self.ahead = (step + 1, self.pool.submit(self._prepare, step + 1))
        return batches


# --- the run's record: metrics.jsonl, progress, plots -------------------------------------------
def read_metrics(path: Path, up_to_step: int) -> list[dict[str, Any]]:
    """The rows of a run's metrics.jsonl up to `up_to_step` (a resumed run drops the later ones)."""
    try:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return [r for r in rows if r["step"] <= up_to_step]
    except (ValueError, KeyError, TypeError, RecursionError):
        raise UsageError(f"{str(path)!r} is damaged (not one JSON row with a step per line); move it "
                         "away to resume without the earlier rows") from None


def plot_losses(tokens_seen: Sequence[float], train_losses: Sequence[float], val_losses: Sequence[float],
                path: str | Path, optimal_loss: float | None = None, title: str = "Training") -> Path:
    """Training and validation loss against tokens seen, as a PNG; for a synthetic source, the exact
    optimum as a horizontal line (the gap to it is what the model has still to learn)."""
    from matplotlib.figure import Figure  # deferred: slow to import, and only drawing needs it

    fig = Figure(figsize=(6.4, 4.0), dpi=100)  # no pyplot: no backend, no window, nothing to close
    ax = fig.subplots()
    ax.plot(tokens_seen, train_losses, marker=".", label="train (mean since previous evaluation)")
    ax.plot(tokens_seen, val_losses, marker=".", label="validation")
    if optimal_loss is not None:
        ax.axhline(optimal_loss, color="black", linestyle="--", linewidth=1, label=f"exact optimum {optimal_loss:.4f}")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("cross-entropy (nats per token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path, bbox_inches="tight")


class RunLog:
    """A run's record. On the main process: metrics.jsonl (one row per evaluation; a resumed run
    first drops the rows logged after its checkpoint), the progress bar with a line per
    evaluation, and loss.png redrawn at most every 30 s (matplotlib is slow next to a tiny model's
    step). Other processes keep the rows but write nothing. A context manager: leaving closes the bar."""

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
        if self.d.is_main:  # what a process killed while writing them left (e.g. during the last plot)
            clean_stale(self.path)
            clean_stale(self.out_dir / "loss.png")
        if self.d.is_main and resume and self.path.exists():
            self.history = read_metrics(self.path, state.step)
            write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.history))
        elif self.d.is_main and not resume:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            write_text(self.path, "")  # a new file: a link planted at the name is replaced, its target untouched
        self.t_start = time.perf_counter() - state.elapsed
        self.losses, self.seconds, self.tokens = [], 0.0, 0  # since the last evaluation
        self.last_plot = self.last_line = time.perf_counter()
        self.bar = None
        if self.d.is_main:
            self.bar = tqdm(total=total_steps, initial=state.step, file=sys.stderr, dynamic_ncols=True,
                            disable=None, desc="train", unit="step")

    def __enter__(self) -> "RunLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

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
            with open_append(self.path) as fh:
                fh.write(json.dumps(row) + "\n")
            self.line(self._row_text(row, metrics, sample))
        self.losses, self.seconds, self.tokens = [], 0.0, 0
        return row

    def _row_text(self, row: dict[str, Any], metrics: dict[str, float], sample: str | None) -> str:
        shown = "".join(f", {k.removesuffix('_loss').replace('_', ' ')} {v:.4f}" for k, v in metrics.items()
                        if "bits_per" not in k)
        if "val_bits_per_char" in metrics:
            bpc, bpb = metrics["val_bits_per_char"], metrics["val_bits_per_byte"]
            shown += f" ({bpc:.3f} bits/char" + (f", {bpb:.3f} bits/byte)" if abs(bpb - bpc) > 5e-4 else ")")
        msg = (f"step {row['step']}/{self.total_steps}: train {row['train_loss']:.4f}{shown}"
               + (f" (optimum {self.optimal_loss:.4f})" if self.optimal_loss is not None else "")
               + f", {row['tokens_per_s']:.0f} tokens/s")
        return msg + (f"\n  sample: {sample!r}" if sample else "")

    def plot(self, force: bool = False) -> None:
        """Redraw out_dir/loss.png if 30 s passed since the last drawing (or if `force`)."""
        if self.d.is_main and self.history and (force or time.perf_counter() - self.last_plot > self.PLOT_EVERY_S):
            plot_losses([r["tokens_seen"] for r in self.history], [r["train_loss"] for r in self.history],
                        [r["val_loss"] for r in self.history], self.out_dir / "loss.png",
                        optimal_loss=self.optimal_loss)
            self.last_plot = time.perf_counter()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --- the loop ------------------------------------------------------------------------------------
# Steps between reads of the losses (and between checks of the stop flag and the time budget under
# torchrun). Reading a loss on the host waits for the device to finish the step, and the device then
# idles while the host queues the next one: on a GPU that stall is paid once per 16 steps (a small
# model's step is a few milliseconds, about what the stall costs), and the stop flag answers within
# 16 steps. On the CPU a read is free (the step has finished when its Python returns): every step.
SYNC_EVERY = {"cuda": 16}


def run_loop(state: TrainState, step: Step, *, lr: Callable[[TrainState], float],
             evaluate: Callable[[TrainState], dict[str, float]], save: Callable[[TrainState], Any], log: RunLog,
             eval_every: int, d: Dist | None = None, device: torch.device | None = None,
             sample: Callable[[TrainState], str | None] | None = None,
             adjust: Callable[[TrainState], int] | None = None) -> TrainState:
    """Optimizer steps from state.step up to state.total_steps (or where `adjust(state)` moves it: a
    time budget). Every `eval_every` steps and at the last one: `evaluate` for the row's metrics,
    `sample` for an optional sample, `save`, and the plot.

    A step's loss may stay on the device: the losses are read (one transfer for all pending) every
    SYNC_EVERY steps, before an evaluation, at the last step and when stopping; only then are the
    stop flag and `adjust` consulted (one collective under torchrun), so that every process reads at
    the same steps. Ctrl-C (SIGINT, SIGTERM) saves and raises TrainingStopped (exit code 130) at the
    next read, or between a step's micro-batches; a non-finite loss (named by its step), metric or
    weight raises TrainingStopped (exit code 1), keeping the last good checkpoint (one is only
    written after a read).
    """
    d, device = d or Dist(), device or torch.device("cpu")
    sync_every = SYNC_EVERY.get(device.type, 1)
    saved_at = state.step if (log.out_dir / CHECKPOINT_DIR).exists() else None  # the step the checkpoint holds
    pending: list[tuple[Any, float, float, int]] = []  # (loss, lr, start time, tokens) of the steps not read yet
    state.model.train()
    with StopFlag() as flag:
        def stop() -> bool:
            return flag.raised is not None

        while state.step < state.total_steps:
            rate = set_lr(state.optimizer, lr(state))
            t0 = time.perf_counter()
            taken = step(state, stop)
            if taken is None:  # interrupted between micro-batches: the step is not taken
                _read(state, pending, log)
                raise _interrupted(state, log, save, saved_at, f"during step {state.step + 1}/{state.total_steps}; "
                                   f"checkpoint of step {state.step}")
            loss, tokens = taken
            pending.append((loss, rate, t0, tokens))
            state.step, state.tokens_seen = state.step + 1, state.tokens_seen + tokens
            # The same decision on every process (one process may also stop at once: its flag is local).
            if not (state.step % sync_every == 0 or state.step % eval_every == 0 or state.step == state.total_steps
                    or (not d.active and stop())):
                continue
            stopping = _agree(state, stop, adjust, d, device)
            _read(state, pending, log)
            if stopping:
                raise _interrupted(state, log, save, saved_at,
                                   f"at step {state.step}/{state.total_steps}; checkpoint")
            if state.step % eval_every == 0 or state.step == state.total_steps:
                _evaluate_and_save(state, rate, evaluate, save, sample, log, d, device)
                saved_at = state.step
    return state


def _read(state: TrainState, pending: list, log: RunLog) -> None:
    """Read the pending steps' losses (one host transfer for those on the device), raise on the
    first that is not finite, naming its step, and log them; `pending` is emptied."""
    on_device = [loss for loss, *_ in pending if isinstance(loss, torch.Tensor)]
    values = iter(torch.stack(on_device).tolist() if on_device else [])
    losses = [next(values) if isinstance(loss, torch.Tensor) else float(loss) for loss, *_ in pending]
    first = state.step - len(pending) + 1  # the step number of pending[0]
    for i, loss in enumerate(losses):
        if not math.isfinite(loss):
            raise _diverged(f"loss is {loss} at step {first + i}", log.out_dir)
    # The steps' time is counted from the first one's start to the read (which waits for the last).
    seconds = (time.perf_counter() - pending[0][2]) / len(pending) if pending else 0.0
    for loss, (_, rate, _, tokens) in zip(losses, pending):
        log.step(loss, rate, seconds, tokens, state.total_steps)
    pending.clear()


def _agree(state: TrainState, stop: Callable[[], bool], adjust, d: Dist, device: torch.device) -> bool:
    """Whether to stop now, and the run's last step (moved by `adjust`), the same on every process:
    under torchrun both come from one collective (the stop flag summed, the main process's last
    step), so that no process trains a step the others do not."""
    total = max(state.step, adjust(state)) if adjust is not None else state.total_steps
    if not d.active:
        state.total_steps = total
        return stop()
    flags = torch.tensor([float(stop()), float(total) if d.is_main else 0.0], dtype=torch.float64, device=device)
    stopped, total = d.sum(flags).tolist()
    state.total_steps = max(state.step, int(total))
    return stopped > 0


def _evaluate_and_save(state: TrainState, lr: float, evaluate, save, sample, log: RunLog, d: Dist,
                       device: torch.device) -> None:
    """The round of an evaluation step: evaluate, check, sample, log, save, plot; its time and its
    sample's kept in `state` (see TrainState)."""
    start = time.perf_counter()
    metrics = evaluate(state)
    # The step's loss was computed before its update, which may have blown the weights up: never
    # save a checkpoint whose weights or metrics are not finite.
    bad = [k for k, v in metrics.items() if not math.isfinite(v)]
    if bad or not _finite_weights(state.core, d, device):
        raise _diverged(f"after step {state.step} the " + (f"{bad[0]} is {metrics[bad[0]]}" if bad else
                        "weights hold NaN or infinity"), log.out_dir)
    state.elapsed = log.elapsed()
    sample_start = time.perf_counter()
    text = sample(state) if sample else None
    if text is not None:
        state.sample_s = max(state.sample_s, time.perf_counter() - sample_start)
    log.evaluation(state, lr, metrics, text)
    save(state)
    log.plot(force=state.step == state.total_steps)
    state.round_times.append(time.perf_counter() - start)


def _interrupted(state: TrainState, log: RunLog, save, saved_at: int | None, when: str) -> TrainingStopped:
    """Save (unless the checkpoint holds this step already) and say where to continue from."""
    state.elapsed = log.elapsed()
    if saved_at != state.step:
        save(state)
    log.plot(force=True)
    return TrainingStopped(f"interrupted {when} saved in {log.out_dir / CHECKPOINT_DIR}; continue: the same command "
                           "with --resume", 130)


def _finite_weights(model: nn.Module, d: Dist, device: torch.device) -> bool:
    """Whether every parameter is finite, on every process (a sharded parameter checks its shard)."""
    finite = [torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all() for p in model.parameters()]
    bad = torch.stack(finite).logical_not().any().float().to(device)  # one device sync, not one per parameter
    return d.sum(bad).item() == 0


def _diverged(what: str, out_dir: Path) -> TrainingStopped:
    kept = out_dir / CHECKPOINT_DIR
    where = (f"the last good checkpoint is kept in {kept}" if kept.exists() else "no checkpoint was saved")
    return TrainingStopped(f"{what}: training diverged; {where} (try a lower --lr or --grad-clip)", 1)

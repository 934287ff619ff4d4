"""Training: AdamW, warm-up + cosine schedule, clipping, accumulation, evaluation, checkpoints, torchrun.

`train(...)` is the loop behind `build-llm train`; `train_step` is one optimizer step (keep it the
one place the step's arithmetic lives). The book's `train_model_simple` and its helpers are here too.

Determinism: the batch of step s is drawn from a generator seeded by (seed, s), and torch's generator
(dropout) is reseeded from (seed, s, rank) before every step. So a run stopped at step k and resumed
draws exactly what an uninterrupted run draws, and under torchrun every rank draws the same global
batch and takes its own slice of it: the global batch does not depend on the world size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint import (CHECKPOINT_DIR, load_trainer_state, save_checkpoint, set_rng_state, trainer_files,
                         unwrap)
from .data import Corpus, check_splits, draw_starts, random_windows, sliding_starts, step_rng
from .errors import UsageError
from .runtime import autocast

# Keys of step_rng streams: one for training batches, one for the fixed validation windows.
TRAIN_STREAM, VAL_STREAM, DROPOUT_STREAM = 0, 1, 2
LR_DECAYS = ("cosine", "constant")
SMALL_MODEL = 2_000_000  # parameters; below this, CPU training uses one thread unless OMP_NUM_THREADS says otherwise


@dataclass(frozen=True)
class TrainConfig:
    """Optimiser, schedule and loop settings, validated; stored as JSON in every checkpoint."""
    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.99)
    warmup_steps: int = 100
    lr_decay: str = "cosine"        # cosine from lr down to min_lr_ratio * lr at the last step
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0          # max global gradient norm; 0 turns clipping off
    grad_accum: int = 1             # micro-batches per optimizer step
    batch_size: int = 64            # windows per micro-batch, summed over all processes
    steps: int = 1000               # total optimizer steps (also when resuming)
    eval_every: int = 100           # evaluate, log and checkpoint every this many steps
    eval_batches: int = 20          # fixed validation batches per evaluation
    seed: int = 123
    device: str = "auto"
    dtype: str = "float32"          # bfloat16: autocast around forward and loss
    compile: bool = False
    fsdp: bool = False              # under torchrun: shard parameters, gradients and optimizer state
    val_ratio: float = 0.1

    def __post_init__(self) -> None:
        def bad(key: str, expected: str) -> ValueError:
            return UsageError(f"TrainConfig: {key}={getattr(self, key)!r} is invalid; expected {expected}")

        def number(key: str) -> float:
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise bad(key, "a finite number")
            return v

        if not number("lr") > 0:
            raise bad("lr", "a number > 0")
        if number("weight_decay") < 0:
            raise bad("weight_decay", "a number >= 0")
        if number("grad_clip") < 0:
            raise bad("grad_clip", "a number >= 0 (0: no clipping)")
        if not 0 <= number("min_lr_ratio") <= 1:
            raise bad("min_lr_ratio", "a number in [0, 1]")
        if not 0 < number("val_ratio") < 1:
            raise bad("val_ratio", "a number in (0, 1)")
        betas = self.betas
        if (not isinstance(betas, (tuple, list)) or len(betas) != 2
                or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas)):
            raise bad("betas", "two numbers in [0, 1)")
        object.__setattr__(self, "betas", tuple(float(b) for b in betas))
        for key, low in (("grad_accum", 1), ("batch_size", 1), ("steps", 1), ("eval_every", 1),
                         ("eval_batches", 1), ("warmup_steps", 0), ("seed", 0)):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise bad(key, f"an integer >= {low}")
        if self.lr_decay not in LR_DECAYS:
            raise bad("lr_decay", f"one of {LR_DECAYS}")
        if self.dtype not in ("float32", "bfloat16"):
            raise bad("dtype", "float32 or bfloat16")
        if not isinstance(self.device, str) or not self.device:
            raise bad("device", "auto, cpu, cuda or cuda:N")
        for key in ("compile", "fsdp"):
            if not isinstance(getattr(self, key), bool):
                raise bad(key, "true or false")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(valid))
        if unknown:
            raise UsageError(f"TrainConfig: unknown key(s) {unknown}; valid keys are {valid}")
        return cls(**{**d, **({"betas": tuple(d["betas"])} if "betas" in d else {})})

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


# The R notebook's ABC experiment: AdamW at lr 0.003 (torch's default betas and weight decay, as R's
# optim_adamw), batch 64, 80/20 split. The notebook keeps the lr constant for 400 steps; a short
# warm-up and a cosine decay over more steps bring the loss to within 0.01 nats of the optimum.
ABC_TRAIN = TrainConfig(lr=0.003, weight_decay=0.01, betas=(0.9, 0.999), warmup_steps=50, lr_decay="cosine",
                        min_lr_ratio=0.05, grad_clip=1.0, batch_size=64, steps=800, eval_every=100,
                        eval_batches=20, seed=1, val_ratio=0.2)


# --- the book's functions ------------------------------------------------------------------------
def calc_loss_batch(input_batch: torch.Tensor, target_batch: torch.Tensor, model: nn.Module,
                    device: torch.device | str) -> torch.Tensor:
    """Mean cross-entropy of the model's next-token logits against the targets of one batch."""
    from .runtime import to_device
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
    from .generate import generate_text_simple, text_to_token_ids, token_ids_to_text

    model.eval()
    context_size = unwrap(model).pos_emb.weight.shape[0]
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


# --- processes (torchrun) ------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.active:
            import torch.distributed as dist

            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()


def init_distributed(device_name: str) -> tuple[Dist, torch.device]:
    """Join torchrun's process group when launched by it (WORLD_SIZE > 1): gloo on CPU, nccl on CUDA."""
    from .runtime import get_device

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), get_device(device_name)
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name in ("auto", "cuda") and torch.cuda.is_available()
    if device_name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"device={device_name!r} is not available here: no CUDA device; use cpu")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(rank, world, local_rank), device


def close_distributed(d: Dist) -> None:
    if d.active:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


# --- pieces of the loop --------------------------------------------------------------------------
def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for step `step` (0-based): linear warm-up, then cosine (or constant) decay."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_decay == "constant":
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
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
               cfg: TrainConfig, d: Dist) -> torch.Tensor:
    """One optimizer step over `grad_accum` micro-batches; returns the mean loss over all processes.

    Gradients of every micro-batch are averaged (DDP also averages across processes, and only syncs
    on the last micro-batch), clipped to `grad_clip`, then AdamW steps.
    """
    optimizer.zero_grad(set_to_none=True)
    total = torch.zeros((), device=device)
    batches = list(batches)
    for i, (x, y) in enumerate(batches):
        last = i == len(batches) - 1
        sync = model.no_sync() if (d.active and not last and hasattr(model, "no_sync")) else contextlib.nullcontext()
        with sync:
            with autocast(device, cfg.dtype):
                loss = calc_loss_batch(x, y, model, device)
            (loss / len(batches)).backward()
        total += loss.detach()
    if cfg.grad_clip > 0:
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    return d.sum(total / len(batches)) / d.world


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


@dataclass
class TrainResult:
    model: nn.Module             # the plain GPTModel, on the training device, eval mode
    step: int
    val_loss: float
    history: list[dict[str, Any]] = field(default_factory=list)


def _seed_model_init(seed: int) -> None:
    from .runtime import set_seed

    set_seed(seed)


# --- the loop ------------------------------------------------------------------------------------
def train(out_dir: str | Path, model_cfg, cfg: TrainConfig, corpus: Corpus, tokenizer, *, resume: bool = False,
          optimal_loss: float | None = None, sample_prompt: str | None = None, d: Dist | None = None,
          device: torch.device | None = None, log: Callable[[str], None] | None = None) -> TrainResult:
    """Train a GPTModel(model_cfg) on `corpus`, writing metrics.jsonl, loss.png and checkpoint/ in out_dir.

    With `resume`, continue from out_dir's checkpoint up to cfg.steps in total. Raises
    TrainingStopped on Ctrl-C (after saving) and on a non-finite loss (keeping the last checkpoint).
    """
    from .gpt import GPTModel

    out_dir = Path(out_dir)
    d = d or Dist()
    device = device or torch.device("cpu")
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    T = model_cfg.context_length
    check_splits(corpus, T)
    if cfg.batch_size % d.world:
        raise UsageError(f"batch_size={cfg.batch_size} is not divisible by the {d.world} processes; "
                         f"choose a multiple of {d.world}")
    train_ids, val_ids = corpus.train, corpus.val

    _seed_model_init(cfg.seed)
    core = GPTModel(model_cfg).to(device)
    saved = load_trainer_state(out_dir) if resume else None
    if saved is not None:
        from .checkpoint import load_checkpoint

        core.load_state_dict(load_checkpoint(saved.path, device).model.state_dict())
    model: nn.Module = core
    if cfg.fsdp:
        if not d.active:
            raise UsageError("--fsdp needs several processes: launch with torchrun --nproc_per_node N")
        from torch.distributed.fsdp import fully_shard

        for block in core.trf_blocks:
            fully_shard(block)
        fully_shard(core)
    elif d.active:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(core, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        model = torch.compile(model)
    optimizer = make_optimizer(core, cfg, device)

    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict, set_optimizer_state_dict)

    full = StateDictOptions(full_state_dict=True, cpu_offload=cfg.fsdp)
    step, elapsed, tokens_per_step = 0, 0.0, cfg.batch_size * cfg.grad_accum * T
    history: list[dict[str, Any]] = []
    metrics_path = out_dir / "metrics.jsonl"
    if saved is not None:
        set_optimizer_state_dict(core, optimizer, saved.optimizer, options=full)
        set_rng_state(saved.rng, saved.state["rng"])
        step, elapsed = saved.state["step"], saved.state["elapsed_s"]
        if d.is_main and metrics_path.exists():  # drop rows logged after the checkpoint we resume from
            rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
            history = [r for r in rows if r["step"] <= step]
            metrics_path.write_text("".join(json.dumps(r) + "\n" for r in history))
    elif d.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        metrics_path.write_text("")

    def save() -> None:
        # Collective under FSDP (every rank gathers), written by rank 0 only.
        state = get_model_state_dict(core, options=full) if cfg.fsdp else None
        opt_state = get_optimizer_state_dict(core, optimizer, options=full)
        if d.is_main:
            trainer = {"format": 1, "step": step, "tokens_seen": step * tokens_per_step, "elapsed_s": elapsed,
                       "train_config": cfg.to_dict(), "data": corpus.meta, "world_size": d.world}
            save_checkpoint(out_dir / CHECKPOINT_DIR, core, tokenizer, trainer_files(opt_state, trainer), state=state)
        d.barrier()

    val_starts = eval_starts(corpus, T, cfg)
    # A sharded (FSDP) forward is collective: every rank must run the same forwards, so each
    # evaluates every window; otherwise the ranks share the windows and sum.
    eval_dist = Dist() if cfg.fsdp else d
    interval_losses, interval_time = [], 0.0
    t_start = time.perf_counter() - elapsed
    progress = None
    if d.is_main:
        from tqdm import tqdm

        progress = tqdm(total=cfg.steps, initial=step, file=sys.stderr, dynamic_ncols=True, disable=None,
                        desc="train", unit="step")
    model.train()
    val_loss, last_plot = float("nan"), time.perf_counter()
    try:
        with StopFlag() as stop:
            while step < cfg.steps:
                lr = lr_at(step, cfg)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                torch.manual_seed(int(step_rng(cfg.seed, DROPOUT_STREAM, step, d.rank).integers(2**62)))
                t0 = time.perf_counter()
                loss = train_step(model, optimizer, micro_batches(train_ids, step, cfg, T, d), device, cfg, d)
                loss_value = loss.item()
                interval_time += time.perf_counter() - t0
                if not math.isfinite(loss_value):
                    raise TrainingStopped(
                        f"loss is {loss_value} at step {step + 1}: training diverged; the last good checkpoint "
                        f"is kept in {out_dir / CHECKPOINT_DIR} (try a lower --lr or --grad-clip)", 1)
                step += 1
                interval_losses.append(loss_value)
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}",
                                         tok_s=f"{len(interval_losses) * tokens_per_step / max(interval_time, 1e-9):.0f}")
                if step % cfg.eval_every == 0 or step == cfg.steps:
                    val_loss, _ = evaluate_windows(core, val_ids, val_starts, T, cfg.batch_size, device, eval_dist, cfg.dtype)
                    elapsed = time.perf_counter() - t_start
                    row = {"step": step, "train_loss": float(np.mean(interval_losses)), "val_loss": val_loss,
                           "tokens_seen": step * tokens_per_step, "lr": lr, "elapsed_s": round(elapsed, 3),
                           "tokens_per_s": round(len(interval_losses) * tokens_per_step / max(interval_time, 1e-9), 1)}
                    if optimal_loss is not None:
                        row["optimal_loss"] = optimal_loss
                    history.append(row)
                    # A sample with the evaluation, at most every 50 steps (generation is slow next to a tiny step)
                    sample_now = bool(sample_prompt) and (step % max(cfg.eval_every, 50) == 0 or step == cfg.steps)
                    if d.is_main:
                        with open(metrics_path, "a", encoding="utf-8") as fh:
                            fh.write(json.dumps(row) + "\n")
                        msg = (f"step {step}/{cfg.steps}: train {row['train_loss']:.4f}, val {val_loss:.4f}"
                               + (f" (optimum {optimal_loss:.4f})" if optimal_loss is not None else "")
                               + f", {row['tokens_per_s']:.0f} tokens/s")
                        if sample_now:
                            msg += f"\n  sample: {sample_text(core, tokenizer, sample_prompt, 60, device)!r}"
                        (progress.write(msg, file=sys.stderr) if progress is not None else log(msg))
                    elif cfg.fsdp and sample_now:  # a sharded forward needs every rank
                        sample_text(core, tokenizer, sample_prompt, 60, device)
                    save()
                    # Redrawn at most every 30 s (matplotlib is slow next to a tiny model's step), and at the end.
                    if d.is_main and (step == cfg.steps or time.perf_counter() - last_plot > 30):
                        plot_run(out_dir, history, optimal_loss)
                        last_plot = time.perf_counter()
                    interval_losses, interval_time = [], 0.0
                stop_now = torch.tensor(float(stop.raised is not None), device=device)
                if d.sum(stop_now).item() > 0:
                    elapsed = time.perf_counter() - t_start
                    if step % cfg.eval_every and step != cfg.steps:
                        save()
                    if d.is_main and history:
                        plot_run(out_dir, history, optimal_loss)
                    raise TrainingStopped(f"interrupted at step {step}/{cfg.steps}; checkpoint saved in "
                                          f"{out_dir / CHECKPOINT_DIR}; continue with --resume", 130)
    finally:
        if progress is not None:
            progress.close()
    core.eval()
    return TrainResult(core, step, val_loss, history)


def sample_text(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int, device: torch.device,
                top_k: int | None = None, seed: int = 0) -> str:
    """Greedy continuation of `prompt` (or top-k sampling at temperature 1 with `top_k`)."""
    from .generate import generate, text_to_token_ids

    was_training = model.training
    model.eval()
    idx = text_to_token_ids(prompt, tokenizer).to(device)[:, -model.cfg.context_length:]
    generator = torch.Generator(device=device).manual_seed(seed)
    out = generate(model, idx, max_new_tokens, temperature=1.0 if top_k else 0.0, top_k=top_k, generator=generator)
    model.train(was_training)
    return tokenizer.decode(out[0].tolist())


def plot_run(out_dir: Path, history: list[dict[str, Any]], optimal_loss: float | None) -> None:
    from .plots import plot_losses

    plot_losses([r["tokens_seen"] for r in history], [r["train_loss"] for r in history],
                [r["val_loss"] for r in history], out_dir / "loss.png", optimal_loss=optimal_loss)


# --- what the command line runs ------------------------------------------------------------------
# With --data and no --preset: a character model that trains on a laptop (nanoGPT's shakespeare-char).
DATA_DEFAULT_MODEL = dict(context_length=256, emb_dim=384, n_heads=6, n_layers=6, drop_rate=0.2, qkv_bias=False)
# What --resume may change: when and how the steps run, not what they compute.
RESUMABLE = {"steps", "eval_every", "eval_batches", "device", "compile", "dtype", "fsdp"}
ABC_EVAL_WORDS, ABC_EVAL_SEED = 30_000, 2027  # a held-out ABC draw (training uses seed 1)


def _contradiction(what: str, key: str, saved: Any, given: Any) -> ValueError:
    return UsageError(f"--resume: {what} {key}={given!r} contradicts the checkpoint's {key}={saved!r}; "
                      "drop the option or start a new run with another --out")


def run_training(out: str | Path, *, data: str | None = None, tokenizer: str | None = None,
                 preset: str | None = None, model_options: dict[str, Any] | None = None,
                 train_options: dict[str, Any] | None = None, resume: bool = False) -> TrainResult:
    """`build-llm train`: resolve settings (flags > checkpoint when resuming > defaults), prepare the
    corpus in out/data, train, and print the final validation loss and samples on stdout.

    `data` None is the R notebook's ABC experiment. Options left None take their default.
    """
    from .checkpoint import PREVIOUS_DIR, resolve_checkpoint
    from .config import GPTConfig
    from .data import prepare_corpus

    model_options = {k: v for k, v in (model_options or {}).items() if v is not None}
    train_options = {k: v for k, v in (train_options or {}).items() if v is not None}
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {str(out)!r} is a file; give a directory for the run")
    has_ckpt = (out / CHECKPOINT_DIR).exists() or (out / PREVIOUS_DIR).exists()
    if resume and not has_ckpt:
        raise UsageError(f"--resume: no checkpoint in {str(out)!r}; start without --resume to begin a run there")
    if not resume and has_ckpt:
        raise UsageError(f"--out {str(out)!r} already holds a run; add --resume to continue it or give another --out")

    saved_state, saved_model = None, None
    if resume:
        ckpt_dir = resolve_checkpoint(out)
        saved_state = load_trainer_state(ckpt_dir).state
        saved_model = GPTConfig.from_dict(json.loads((ckpt_dir / "config.json").read_text(encoding="utf-8")))
        saved_cfg = TrainConfig.from_dict(saved_state["train_config"])
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
    try:
        if cfg.fsdp and not d.active:
            raise UsageError("--fsdp needs several processes: launch with torchrun --nproc_per_node N")
        if d.local_rank == 0:  # each node's first process tokenizes; the others then reuse its files
            corpus, tok = prepare_corpus(data, tokenizer, out / "data", cfg.val_ratio)
        d.barrier()
        if d.local_rank != 0:
            corpus, tok = prepare_corpus(data, tokenizer, out / "data", cfg.val_ratio)

        if saved_state is not None:
            for key in ("data_sha256", "tokenizer_sha256"):
                if corpus.meta[key] != saved_state["data"][key]:
                    what = "data" if key == "data_sha256" else "tokenizer"
                    raise UsageError(f"--resume: the {what} differs from the one the checkpoint was trained on; "
                                     f"give the same --data and --tokenizer, or start a new run with another --out")
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
            if d.is_main:
                print(f"build-llm: {e}", file=sys.stderr, flush=True)
            raise SystemExit(e.exit_code) from None
        report(result, corpus, tok, model_cfg, cfg, optimum, prompt, d, device, data is None)
        return result
    finally:
        torch.set_num_threads(threads)
        close_distributed(d)


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
           prompt: str, d: Dist, device: torch.device, is_abc: bool) -> None:
    """The end of a run on stdout: validation loss (for ABC on the whole validation split, beside the
    exact optimum on the same windows) and samples."""
    model, T = result.model, model_cfg.context_length
    if is_abc:
        from .markov import ABC, optimal_loss_on_text

        starts = sliding_starts(len(corpus.val), T)  # every non-overlapping window of the split
        val_loss, n = evaluate_windows(model, corpus.val, starts, T, 256, device, Dist() if cfg.fsdp else d, cfg.dtype)
        if not d.is_main:
            if cfg.fsdp:  # a sharded forward needs every rank: run the same samples, print nothing
                sample_text(model, tok, prompt, 700, device)
                sample_text(model, tok, prompt, 700, device, top_k=2, seed=cfg.seed)
            return
        on_windows = float(optimal_loss_on_text(ABC, tok.decode(np.asarray(corpus.val).tolist()), T).mean())
        print(f"validation loss {val_loss:.6f} on {n:,} tokens ({len(starts):,} windows of {T})")
        print(f"exact optimum   {optimum:.6f} (on these windows {on_windows:.6f}); "
              f"excess {val_loss - optimum:+.6f} nats")
        print(f"\nGreedy from {prompt!r}:\n{sample_text(model, tok, prompt, 700, device)}")
        print(f"\nTop-k 2 from {prompt!r}:\n{sample_text(model, tok, prompt, 700, device, top_k=2, seed=cfg.seed)}")
    elif d.is_main or cfg.fsdp:
        sample = sample_text(model, tok, prompt, 200, device, top_k=40, seed=cfg.seed)
        if d.is_main:
            print(f"validation loss {result.val_loss:.6f} after {result.step} steps")
            print(f"\nSample from {prompt!r}:\n{sample}")


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
        trained_on_abc = json.loads((ckpt.path / TRAINER_FILE).read_text(encoding="utf-8"))["data"].get("source") == "abc"
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
    result: dict[str, Any] = {"loss": loss, "perplexity": math.exp(loss), "tokens": n, "windows": len(starts)}
    if data is None or trained_on_abc:
        try:
            optimum = float(optimal_loss_on_text(ABC, text, T).mean())
            result.update(optimal_loss=optimum, excess=loss - optimum)
        except ValueError:
            pass  # the text is not an ABC text: no optimum to compare with
    return result

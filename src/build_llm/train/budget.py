"""`--time-budget`: durations, the fitted loss rule, the throughput probe, the sizing it drives,
and the plan every `build-llm train` states before its first step.

The rule comes from a measured sweep (examples/time_budget_sweep.py, docs/time-budget.md): on
character-level Shakespeare, validation loss after D training tokens of a model with N parameters
in matrix products fits L(N, D) = E + A / N**alpha + B / D**beta. A budget of seconds becomes
tokens only at run time, through this machine's measured throughput for each candidate shape, so
the rule itself does not depend on how fast (or how busy) the machine that swept it was.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from build_llm.config import GPTConfig
from build_llm.data.corpus import Corpus, draw_starts, random_windows
from build_llm.errors import UsageError
from build_llm.gpt import GPTModel
from build_llm.runtime import available_memory, get_device, set_cpu_threads
from build_llm.sizing import count_parameters, estimate_peak_bytes, matmul_parameters
from build_llm.train.config import BUDGET_TRAIN, TrainConfig
from build_llm.train.distributed import Dist
from build_llm.train.loop import make_optimizer, train_step

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Seconds in a duration such as 90s, 5m, 2h, 1h30m or 1.5m (a bare number is seconds)."""
    s = str(text).strip().lower()
    parts = re.fullmatch(r"((?:\d+(?:\.\d+)?[smh])+|\d+(?:\.\d+)?)", s)
    if not parts:
        raise UsageError(f"--time-budget {text!r} is not a duration; expected e.g. 90s, 5m, 2h or 1h30m")
    if s[-1].isdigit():
        seconds = float(s)
    else:
        seconds = sum(float(v) * _UNITS[u] for v, u in re.findall(r"(\d+(?:\.\d+)?)([smh])", s))
    if not seconds > 0:
        raise UsageError(f"--time-budget {text!r} is not a positive duration; expected e.g. 90s, 5m or 2h")
    return seconds


@dataclass(frozen=True)
class LossFit:
    """L(N, D) = E + A / N**alpha + B / D**beta, in nats per character."""
    E: float
    A: float
    alpha: float
    B: float
    beta: float
    rmse: float = 0.0

    def predict(self, n_params: float, tokens: float) -> float:
        return self.E + self.A / n_params ** self.alpha + self.B / max(tokens, 1.0) ** self.beta

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def fit_loss(n_params, tokens, losses) -> LossFit:
    """Least-squares fit of L(N, D): for each (alpha, beta) on a grid, E, A and B (>= 0) are linear."""
    N, D, L = (np.asarray(v, dtype=np.float64) for v in (n_params, tokens, losses))
    best = None
    for alpha, beta in itertools.product(np.arange(0.05, 1.501, 0.01), repeat=2):
        X = np.stack([np.ones_like(N), N ** -alpha, D ** -beta], axis=1)
        coef, *_ = np.linalg.lstsq(X, L, rcond=None)
        if (coef < 0).any():
            continue
        err = float(np.sqrt(np.mean((X @ coef - L) ** 2)))
        if best is None or err < best[0]:
            best = (err, coef, alpha, beta)
    if best is None:
        raise ValueError("no fit with non-negative terms: the sweep's losses do not fall with N and D")
    err, (E, A, B), alpha, beta = best
    return LossFit(float(E), float(A), round(float(alpha), 2), float(B), round(float(beta), 2), err)


def shape_for(n_layers: int, emb_dim: int, context_length: int, vocab_size: int, head_dim: int = 32):
    """The custom model family the rule sizes: heads `head_dim` wide, no dropout, every other
    option at GPTConfig's default."""
    return GPTConfig(vocab_size=vocab_size, context_length=context_length, emb_dim=emb_dim,
                     n_heads=max(1, emb_dim // head_dim), n_layers=n_layers, drop_rate=0.0, qkv_bias=False)


# --- the fitted rule, candidates, memory ----------------------------------------------------------
FIT_FILE = Path(__file__).with_name("budget_fit.json")
# The family the sweep measured (depth grows slowly with width), largest last; context and batch are
# the sweep's (its fit holds for them).
CANDIDATES = [(2, 64), (3, 96), (4, 128), (4, 192), (6, 256), (6, 384), (8, 512)]
BUDGET_CONTEXT = 64  # the batch is BUDGET_TRAIN's


def load_fit() -> LossFit:
    d = json.loads(FIT_FILE.read_text(encoding="utf-8"))["fit"]
    return LossFit(**d)


def check_memory(cfg, batch_size: int, grad_accum: int, preset: str | None = None, device="cpu") -> int:
    """The plan's peak estimate; refuses (UsageError, before anything is allocated) a plan that
    would not fit in the memory available now on `device` (a GPU's own), suggesting what would."""
    peak, have = estimate_peak_bytes(cfg, batch_size), available_memory(device)
    if have is None or peak <= have:
        return peak
    tips = []
    for b in (batch_size // 2, batch_size // 4, batch_size // 8, batch_size // 16, 1):
        if b >= 1 and estimate_peak_bytes(cfg, b) <= have * 0.8:
            tips.append(f"--batch-size {b} --grad-accum {grad_accum * batch_size // b} (the same tokens per step)")
            break
    if cfg.drop_rate > 0:
        tips.append("--drop-rate 0 (the fused attention path, no T x T weights kept)")
    if preset:
        tips.append("a smaller --preset")
    raise UsageError(f"this run needs about {peak / 2**30:.1f} GB at its peak but {have / 2**30:.1f} GB is available; "
                     f"try {' or '.join(tips) if tips else 'a smaller model or --batch-size'}")


# --- throughput probe and the plan ---------------------------------------------------------------
def probe_tokens_per_s(cfg, batch_size: int, ids, device, dtype: str = "float32", seconds: float = 1.0,
                       max_steps: int = 20) -> float:
    """Training tokens per second of `cfg` at `batch_size` on this machine now: AdamW steps on real
    windows of `ids`, after one untimed step; at least two timed steps, until `seconds` pass. The
    median step counts, so that one slow step (a page fault, another process) does not skew it."""
    model = GPTModel(cfg).to(device).train()
    tcfg = TrainConfig(batch_size=batch_size, dtype=dtype)
    optimizer = make_optimizer(model, tcfg, device)
    rng = np.random.default_rng(0)

    def step() -> None:
        x, y = random_windows(ids, draw_starts(len(ids), cfg.context_length, batch_size, rng), cfg.context_length)
        train_step(model, optimizer, [(x, y)], device, tcfg, Dist()).item()

    step()
    times, end = [], time.perf_counter() + seconds
    while len(times) < 2 or (len(times) < max_steps and time.perf_counter() < end):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return batch_size * cfg.context_length / statistics.median(times)


def global_tokens_per_s(cfg, batch_size: int, ids, device, dtype: str, d: Dist, seconds: float = 1.0) -> float:
    """Training tokens per second of all processes together: under torchrun every process measures
    its own share of the batch (batch_size / world) at once, as training will run them, and the
    rates add up (the gradients' all-reduce is not in it: the run's Deadline measures that)."""
    rate = probe_tokens_per_s(cfg, max(1, batch_size // d.world), ids, device, dtype, seconds=seconds)
    return float(d.sum(torch.tensor(rate, dtype=torch.float64, device=device)).item()) if d.active else rate


@dataclass
class Plan:
    """What a run will do, said before its first step."""
    model_cfg: Any
    batch_size: int
    grad_accum: int
    steps: int
    tokens_per_s: float
    peak_bytes: int
    budget_s: float | None = None      # the wall-time budget, if any
    train_s: float = 0.0               # the part of it left for optimizer steps
    predicted_loss: float | None = None
    considered: list[dict[str, Any]] = field(default_factory=list)
    reserve_s: float = 0.0             # kept after the last step for the final evaluation, checkpoint, report
    train_cfg: Any = None              # the TrainConfig with the planned steps
    start_step: int = 0                # the step a resumed run continues from
    processes: int = 1                 # under torchrun: the throughput is all of theirs together

    @property
    def tokens(self) -> int:
        """The tokens still to train: from start_step to the last step."""
        return max(0, self.steps - self.start_step) * self.batch_size * self.grad_accum * self.model_cfg.context_length

    @property
    def estimated_s(self) -> float:
        return self.tokens / max(self.tokens_per_s, 1e-9)

    def text(self) -> str:
        c = self.model_cfg
        lines = [f"plan: {count_parameters(c):,} parameters ({c.n_layers} layers, {c.emb_dim} wide, {c.n_heads} heads, "
                 f"context {c.context_length}), batch {self.batch_size}"
                 + (f" x {self.grad_accum} accumulated" if self.grad_accum > 1 else "")
                 + (f"; steps {self.start_step:,} to {self.steps:,} = {self.tokens:,} tokens to go" if self.start_step
                    else f"; {self.steps:,} steps = {self.tokens:,} tokens"),
                 f"plan: about {_human(self.estimated_s)} of training at {self.tokens_per_s:,.0f} tokens/s (measured "
                 f"now{f', {self.processes} processes together' if self.processes > 1 else ''}), "
                 f"peak memory about {self.peak_bytes / 2**20:,.0f} MB" + (" per process" if self.processes > 1 else "")]
        if self.budget_s is not None:
            lines.append(f"plan: time budget {_human(self.budget_s)}; the learning rate decays to its end"
                         + (f"; predicted validation loss {self.predicted_loss:.2f}" if self.predicted_loss else ""))
        return "\n".join(lines)


def _human(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def choose_shape(train_s: float, vocab_size: int, ids, device, dtype: str, fit: LossFit,
                 probe_s: float, log=None, d: Dist | None = None) -> tuple[Any, float, float, list[dict[str, Any]]]:
    """The candidate shape with the lowest predicted validation loss after `train_s` seconds:
    each candidate's throughput is measured (smallest first, stopping once a larger shape predicts
    worse or the probe time `probe_s` is spent, or memory would not fit). Under torchrun every
    process probes at once (global_tokens_per_s) and the main process makes each decision."""
    d = d or Dist()
    threads = torch.get_num_threads()
    have = available_memory(device)
    best, considered, t0 = None, [], time.perf_counter()
    for n_layers, emb_dim in CANDIDATES:
        cfg = shape_for(n_layers, emb_dim, BUDGET_CONTEXT, vocab_size)
        if not d.from_main(lambda: have is None or estimate_peak_bytes(cfg, BUDGET_TRAIN.batch_size) <= 0.8 * have):
            break
        set_cpu_threads(count_parameters(cfg), device, threads)
        rate = global_tokens_per_s(cfg, BUDGET_TRAIN.batch_size, ids, device, dtype, d, seconds=min(1.0, probe_s / 6))
        loss = fit.predict(matmul_parameters(cfg), rate * train_s)
        considered.append({"n_layers": n_layers, "emb_dim": emb_dim, "tokens_per_s": round(rate),
                           "tokens": int(rate * train_s), "predicted_loss": round(loss, 4)})
        if log:
            log(f"probe: {n_layers} layers x {emb_dim}: {rate:,.0f} tokens/s -> {rate * train_s / 1e6:.2f}M tokens, "
                f"predicted loss {loss:.3f}")
        if d.from_main(lambda: best is not None and loss > best[2]):
            break
        best = (cfg, rate, loss)
        if d.from_main(lambda: len(considered) >= 3 and time.perf_counter() - t0 > probe_s):
            break
    if best is None:
        raise UsageError("even the smallest model of the --time-budget family does not fit in the available memory")
    return (*best, considered)


class Deadline:
    """`adjust` for the loop: moves the schedule's last step so that training ends `reserve_s`
    before `end` (a time.perf_counter() value). Steps left = time left x steps per second measured
    since the loop began (evaluations and checkpoints included), once 3 steps and 2 s are measured;
    until then the plan's estimate stands."""

    def __init__(self, end: float, reserve_s: float) -> None:
        self.end, self.reserve_s = end, reserve_s
        self.t0: float | None = None
        self.step0 = 0

    def __call__(self, state) -> int:
        now = time.perf_counter()
        if self.t0 is None:
            self.t0, self.step0 = now, state.step
            return state.total_steps
        done, spent = state.step - self.step0, now - self.t0
        if done < 3 or spent < 2.0:
            return state.total_steps
        return state.step + max(0, int(done / spent * (self.end - self.reserve_s - now)))


def process_started() -> float:
    """time.perf_counter() at which this process started (Linux), so that a budget counts the
    interpreter's start and imports too; elsewhere, now."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        age = uptime - start_ticks / os.sysconf("SC_CLK_TCK")
        return time.perf_counter() - max(0.0, age)
    except (OSError, ValueError, IndexError):
        return time.perf_counter()


# --- the plan of a `build-llm train` -------------------------------------------------------------
DEFAULT_BUDGET_S = {"cpu": 300.0, "cuda": 900.0}  # `train --data FILE` with no --steps: a time-budgeted run


def budget_seconds(time_budget: str | float | None, data: str | None, resume: bool,
                   train_options: dict[str, Any]) -> float | None:
    """Seconds of the run's time budget: --time-budget, or by default (--data, no --steps, not
    resuming) DEFAULT_BUDGET_S for the device; None for a run of --steps steps."""
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


def make_plan(model_cfg: GPTConfig | None, cfg: TrainConfig, corpus: Corpus, tok, device: torch.device, d: Dist,
              started: float, budget_s: float | None, model_options: dict[str, Any], preset: str | None,
              log: Callable[[str], None], start_step: int = 0) -> Plan:
    """The run's plan, before anything big is allocated: the memory check (refusing what would not
    fit), then the measured throughput; with a budget, the shape (if `model_cfg` is None) and the steps.
    Under torchrun every process takes part in the probes, and the main process's plan is everyone's."""
    if model_cfg is None:  # the rule chooses the shape, within the time left after a 5% share for probing
        left = budget_s - (time.perf_counter() - started)
        model_cfg, rate, predicted, considered = choose_shape(
            0.9 * left, tok.vocab_size, corpus.train, device, cfg.dtype, load_fit(), probe_s=min(20.0, 0.05 * budget_s),
            log=log if d.is_main else None, d=d)
        extra = {k: v for k, v in model_options.items() if k not in ("drop_rate",)}
        model_cfg = GPTConfig.from_dict({**model_cfg.to_dict(), **extra,
                                         "drop_rate": model_options.get("drop_rate", 0.0)})
        assert model_cfg.context_length == BUDGET_CONTEXT
        peak = d.from_main(lambda: check_memory(model_cfg, cfg.batch_size, cfg.grad_accum, preset, device))
    else:
        peak = d.from_main(lambda: check_memory(model_cfg, cfg.batch_size, cfg.grad_accum, preset, device))
        predicted, considered = None, []
        rate = global_tokens_per_s(model_cfg, cfg.batch_size, corpus.train, device, cfg.dtype, d)
    plan = Plan(model_cfg, cfg.batch_size, cfg.grad_accum, cfg.steps, rate, peak, budget_s, considered=considered,
                predicted_loss=predicted, start_step=start_step, processes=d.world)
    plan.train_cfg = cfg if budget_s is None else _fit_steps(plan, cfg, started, predicted is not None)
    return d.broadcast(plan)  # the main process's measurements and steps: one model and schedule everywhere


def _fit_steps(plan: Plan, cfg: TrainConfig, started: float, predict: bool) -> TrainConfig:
    """The steps that fit in the budget's time left at the measured rate (the warm-up and evaluation
    interval shortened to suit), set in `plan`; the train config with them."""
    # What follows the last step: the final evaluation, checkpoint and report (a 200-token sample).
    plan.reserve_s = 2.0 + 0.04 * plan.budget_s
    plan.train_s = plan.budget_s - (time.perf_counter() - started) - plan.reserve_s
    tokens_per_step = cfg.batch_size * cfg.grad_accum * plan.model_cfg.context_length
    steps = max(1, int(plan.tokens_per_s * plan.train_s / tokens_per_step))
    if predict:
        plan.predicted_loss = load_fit().predict(matmul_parameters(plan.model_cfg), steps * tokens_per_step)
    changes = {"steps": steps}
    if cfg.warmup_steps >= steps // 5:
        changes["warmup_steps"] = steps // 10
    changes["eval_every"] = max(1, min(cfg.eval_every, steps // 10))
    plan.steps = steps
    return cfg.replace(**changes)

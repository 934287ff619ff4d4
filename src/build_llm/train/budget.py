"""`--time-budget`: durations, the fitted loss rule, the throughput probe, the sizing it drives,
and the plan every `build-llm train` states before its first step.

The rule comes from a measured sweep (examples/time_budget_sweep.py, docs/time-budget.md): on
character-level Shakespeare, validation loss after D training characters of a model with N
parameters in matrix products fits L(N, D) = E + A / N**alpha + B / D**beta nats per character.
It predicts bits per character, which do not depend on the tokenizer: a model of another
tokenizer sees D = tokens x characters per token (for it the rule is a guide, fitted on characters). A budget of seconds becomes
tokens only at run time, through this machine's measured throughput for each candidate shape, so
the rule itself does not depend on how fast (or how busy) the machine that swept it was.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from build_llm.config import GPTConfig
from build_llm.data.corpus import Corpus, draw_starts, random_windows
from build_llm.data.tokenizer import CharTokenizer
from build_llm.errors import UsageError
from build_llm.gpt import GPTModel
from build_llm.infer.evaluate import evaluate_windows
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
# The family the sweep measured (depth grows slowly with width), largest last; the batch is the
# sweep's (BUDGET_TRAIN's), and so is the context of a character model. A model of a subword
# tokenizer gets a context long enough for instruction records and a chat's turns.
CANDIDATES = [(2, 64), (3, 96), (4, 128), (4, 192), (6, 256), (6, 384), (8, 512)]
CHAR_CONTEXT, TOKEN_CONTEXT = 64, 256


def budget_context(tokenizer) -> int:
    """The context of the shapes the budget chooses from, for a run with this tokenizer."""
    return CHAR_CONTEXT if isinstance(tokenizer, CharTokenizer) else TOKEN_CONTEXT


def chars_per_token(corpus: Corpus) -> float:
    """Characters of the training text per training token (1 for a character model)."""
    return corpus.meta.get("n_train_chars", corpus.n_train) / max(corpus.n_train, 1)


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
@dataclass(frozen=True)
class Probe:
    """What the probe measured of one shape in one dtype."""
    dtype: str
    tokens_per_s: float          # training
    eval_tokens_per_s: float     # forward only, as the evaluations run
    losses: tuple[float, ...]    # of the first steps: the same weights and windows in every dtype
    first_s: float = 0.0         # the first step's time (building kernels and the optimizer's state)

    def matches(self, reference: Probe, tolerance: float = 0.01) -> bool:
        """Whether its first losses are within `tolerance` (relative) of `reference`'s."""
        return all(abs(a - b) <= tolerance * abs(b) for a, b in zip(self.losses[:3], reference.losses[:3]))


def probe_tokens_per_s(cfg, batch_size: int, ids, device, dtype: str = "float32", seconds: float = 1.0,
                       max_steps: int = 20, give_up_s: float | None = None) -> Probe:
    """Training and evaluation tokens per second of `cfg` at `batch_size` in `dtype` on this machine
    now, with the CPU threads set as now: AdamW steps on real windows of `ids` from seeded weights,
    after two untimed steps; at least three timed steps, until `seconds` pass; then two evaluation
    batches as the run evaluates. The median step counts, so that one slow step (a page fault,
    another process) does not skew it. A first step slower than `give_up_s` ends the probe there:
    its rate is that step's (a dtype several times slower need not be measured closely)."""
    torch.manual_seed(0)
    model = GPTModel(cfg).to(device).train()
    tcfg = TrainConfig(batch_size=batch_size, dtype=dtype)
    optimizer = make_optimizer(model, tcfg, device)
    rng, losses = np.random.default_rng(0), []

    def step() -> None:
        x, y = random_windows(ids, draw_starts(len(ids), cfg.context_length, batch_size, rng), cfg.context_length)
        losses.append(train_step(model, optimizer, [(x, y)], device, tcfg, Dist()).item())

    start = time.perf_counter()
    step()
    first_s = time.perf_counter() - start
    if give_up_s is not None and first_s > give_up_s:
        return Probe(dtype, batch_size * cfg.context_length / first_s, 0.0, tuple(losses), first_s)
    step()  # untimed too: a new shape's first steps build its kernels and the optimizer's state
    times, end = [], time.perf_counter() + seconds
    while len(times) < 3 or (len(times) < max_steps and time.perf_counter() < end):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    start = time.perf_counter()
    evaluate_windows(model, ids, draw_starts(len(ids), cfg.context_length, 2 * batch_size, rng), cfg.context_length,
                     batch_size, device, None, dtype)
    eval_rate = 2 * batch_size * cfg.context_length / (time.perf_counter() - start)
    return Probe(dtype, batch_size * cfg.context_length / statistics.median(times), eval_rate, tuple(losses),
                 first_s)


def global_probe(cfg, batch_size: int, ids, device, dtype: str, d: Dist, seconds: float = 1.0,
                 give_up_s: float | None = None) -> Probe:
    """The probe of all processes together: under torchrun every process measures its own share of
    the batch (batch_size / world) at once, as training will run them, and the rates add up (the
    gradients' all-reduce is not in it: the run's Deadline measures that)."""
    probe = probe_tokens_per_s(cfg, max(1, batch_size // d.world), ids, device, dtype, seconds=seconds,
                               give_up_s=give_up_s)
    if not d.active:
        return probe
    rates = d.sum(torch.tensor([probe.tokens_per_s, probe.eval_tokens_per_s], dtype=torch.float64, device=device))
    return replace(probe, tokens_per_s=float(rates[0]), eval_tokens_per_s=float(rates[1]))


def fastest(probes: list[Probe]) -> Probe:
    """The fastest of `probes` whose first losses match the first's (the configured dtype's)."""
    return max((p for p in probes if p is probes[0] or p.matches(probes[0])), key=lambda p: p.tokens_per_s)


def dtype_words(probes: list[Probe], chosen: Probe) -> str:
    """The plan's words for the dtype choice: what was measured beside it."""
    others = [f"{p.dtype} {p.tokens_per_s:,.0f} tokens/s{'' if p.matches(probes[0]) else ', its loss differs'}"
              for p in probes if p is not chosen]
    return chosen.dtype + (f" ({'; '.join(others)})" if others else "")


@dataclass
class Plan:
    """What a run will do, said before its first step."""
    model_cfg: Any
    batch_size: int
    grad_accum: int
    steps: int
    tokens_per_s: float
    peak_bytes: int
    eval_tokens_per_s: float = 0.0     # forward only, as the evaluations run
    threads: int = 1                   # the CPU threads of the probe and the run
    dtype: str = "float32"             # and why, when the probe chose it
    budget_s: float | None = None      # the wall-time budget, if any
    train_s: float = 0.0               # the part of it left for optimizer steps
    predicted_bits: float | None = None  # validation bits per character, by the fitted rule
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
        """The optimizer steps' time and the evaluations' (every eval_every steps and at the end)."""
        cfg, steps = self.train_cfg, max(0, self.steps - self.start_step)
        if cfg is None or not self.eval_tokens_per_s:
            return self.tokens / max(self.tokens_per_s, 1e-9)
        evals = steps // cfg.eval_every + (steps % cfg.eval_every > 0)
        eval_tokens = evals * cfg.eval_batches * cfg.batch_size * self.model_cfg.context_length
        return self.tokens / max(self.tokens_per_s, 1e-9) + eval_tokens / self.eval_tokens_per_s

    def text(self) -> str:
        c = self.model_cfg
        lines = [f"plan: {count_parameters(c):,} parameters ({c.n_layers} layers, {c.emb_dim} wide, {c.n_heads} heads, "
                 f"context {c.context_length}), batch {self.batch_size}"
                 + (f" x {self.grad_accum} accumulated" if self.grad_accum > 1 else "")
                 + (f"; steps {self.start_step:,} to {self.steps:,} = {self.tokens:,} tokens to go" if self.start_step
                    else f"; {self.steps:,} steps = {self.tokens:,} tokens"),
                 f"plan: about {_human(self.estimated_s)} of training at {self.tokens_per_s:,.0f} tokens/s (measured "
                 f"now in {self.dtype}, {self.threads} CPU thread{'s' if self.threads > 1 else ''}"
                 f"{f', {self.processes} processes together' if self.processes > 1 else ''}, evaluations included), "
                 f"peak memory about {self.peak_bytes / 2**20:,.0f} MB" + (" per process" if self.processes > 1 else "")]
        if self.budget_s is not None:
            lines.append(f"plan: time budget {_human(self.budget_s)}; the learning rate decays to its end"
                         + (f"; predicted validation {self.predicted_bits:.2f} bits per character"
                            if self.predicted_bits else ""))
        return "\n".join(lines)


def _human(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def choose_shape(train_s: float, vocab_size: int, context_length: int, ids, char_ratio: float, device,
                 dtypes: tuple[str, ...], fit: LossFit, probe_s: float, log=None, d: Dist | None = None):
    """(shape, its Probe, predicted bits, candidates considered, its dtype's words): the candidate
    shape with the lowest predicted validation bits per character after `train_s` seconds
    (`char_ratio` characters per token). Each candidate's throughput is measured in each of `dtypes`
    (the fastest whose loss matches the first's counts), smallest first, stopping once a larger
    shape predicts worse or the probe time `probe_s` is spent, or memory would not fit. Under
    torchrun every process probes at once (global_probe) and the main process makes each decision."""
    d = d or Dist()
    threads = torch.get_num_threads()
    have = available_memory(device)
    best, considered, t0 = None, [], time.perf_counter()
    for n_layers, emb_dim in CANDIDATES:
        cfg = shape_for(n_layers, emb_dim, context_length, vocab_size)
        if not d.from_main(lambda: have is None or estimate_peak_bytes(cfg, BUDGET_TRAIN.batch_size) <= 0.8 * have):
            break
        set_cpu_threads(count_parameters(cfg), device, threads)
        seconds = min(1.0, probe_s / 6)
        probes = [global_probe(cfg, BUDGET_TRAIN.batch_size, ids, device, dtypes[0], d, seconds=seconds)]
        # another dtype is measured closely only if its first step takes at most 3 times the first's
        probes += [global_probe(cfg, BUDGET_TRAIN.batch_size, ids, device, dtype, d, seconds=seconds,
                                give_up_s=3 * probes[0].first_s) for dtype in dtypes[1:]]
        chosen = probes[d.from_main(lambda: probes.index(fastest(probes)))]
        rate = chosen.tokens_per_s
        loss = fit.predict(matmul_parameters(cfg), rate * train_s * char_ratio) / math.log(2)  # bits per char
        considered.append({"n_layers": n_layers, "emb_dim": emb_dim, "dtype": chosen.dtype,
                           **{f"tokens_per_s_{p.dtype}": round(p.tokens_per_s) for p in probes},
                           "tokens": int(rate * train_s), "predicted_bits_per_char": round(loss, 4)})
        if log:
            log(f"probe: {n_layers} layers x {emb_dim}: {rate:,.0f} tokens/s in {dtype_words(probes, chosen)} -> "
                f"{rate * train_s / 1e6:.2f}M tokens, predicted {loss:.3f} bits per character")
        if d.from_main(lambda: best is not None and loss > best[2]):
            break
        best = (cfg, chosen, loss, dtype_words(probes, chosen))
        if d.from_main(lambda: len(considered) >= 3 and time.perf_counter() - t0 > probe_s):
            break
    if best is None:
        raise UsageError("even the smallest model of the --time-budget family does not fit in the available memory")
    return best[0], best[1], best[2], considered, best[3]


class Deadline:
    """`adjust` for the loop: keeps the plan's last step while the pace measured since the loop began
    ends the run on the time it has (`end`, a time.perf_counter() value, less the reserve), early by
    at most `tolerance` of it or late by at most `tolerance` of the time left; otherwise moves the
    last step to where that pace ends it on time. The pace counts once 3 steps and 2 s (and a
    twentieth of the time) are measured. With a plan that holds, the total on the progress line
    never changes.

    The steps' pace and the evaluation rounds (every `eval_every` steps) are measured apart, so that
    a last step just after a round is not chosen as if the round's time were spread over its steps.
    The reserve is what follows the last step: its round and the report. Until this run has taken a
    sample it is `reserve_s` (the plan's guess) or the longest round if longer; then the longest
    round, one more sample (that round may have had none) and `report_samples` samples' time."""

    def __init__(self, end: float, reserve_s: float, tolerance: float = 0.1, eval_every: int = 0,
                 report_samples: float = 0.0) -> None:
        self.end, self.reserve_s, self.tolerance = end, reserve_s, tolerance
        self.eval_every, self.report_samples = eval_every, report_samples
        self.t0: float | None = None
        self.step0 = 0

    def reserve(self, state) -> float:
        """Seconds to keep after the last step, from the rounds and samples of this run so far."""
        if not state.sample_s:
            return max([self.reserve_s, *state.round_times])
        return max(state.round_times) + (1 + self.report_samples) * state.sample_s

    def _rounds(self, step: int, last: int) -> int:
        """The evaluation rounds from `step` (the loop asks before its round) to before `last`'s (in
        the reserve)."""
        return max(0, (last - 1) // self.eval_every - (step - 1) // self.eval_every) if self.eval_every else 0

    def __call__(self, state) -> int:
        now = time.perf_counter()
        if self.t0 is None:
            self.t0, self.step0 = now, state.step
            return state.total_steps
        stop_at = self.end - self.reserve(state)  # when the last step should end
        done, span, rounds = state.step - self.step0, stop_at - self.t0, state.round_times
        if done < 3 or now - self.t0 < max(2.0, span / 20):
            return state.total_steps
        pace = done / max(now - self.t0 - sum(rounds), 1e-9)  # steps per second, rounds apart
        round_s = sum(rounds) / len(rounds) if rounds else 0.0

        def time_to(last: int) -> float:  # from now to the end of step `last`
            return (last - state.step) / pace + self._rounds(state.step, last) * round_s

        late = now + time_to(state.total_steps) - stop_at  # projected; < 0: early
        # Early within a tenth of the span, or late within a tenth of the time left (so that the end
        # converges on time rather than on a tenth past it): the plan holds.
        if -self.tolerance * span <= late <= self.tolerance * (stop_at - now):
            return state.total_steps
        low, high = state.step, state.step + max(0, int(pace * (stop_at - now)))  # the last step that fits
        while low < high:
            mid = (low + high + 1) // 2
            low, high = (mid, high) if time_to(mid) <= stop_at - now else (low, mid - 1)
        return low


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
              log: Callable[[str], None], start_step: int = 0, dtypes: tuple[str, ...] = ()) -> Plan:
    """The run's plan, before anything big is allocated: the memory check (refusing what would not
    fit), then the measured throughput of the step that will run (its threads, dtype and batch);
    with a budget, the shape (if `model_cfg` is None), its dtype (the fastest of cfg.dtype and
    `dtypes` whose loss matches) and the steps. Under torchrun every process takes part in the
    probes, and the main process's plan is everyone's."""
    threads, words = torch.get_num_threads(), cfg.dtype
    if model_cfg is None:  # the rule chooses the shape, within the time left after a 5% share for probing
        left = budget_s - (time.perf_counter() - started)
        model_cfg, probe, predicted, considered, words = choose_shape(
            0.9 * left, tok.vocab_size, budget_context(tok), corpus.train, chars_per_token(corpus), device,
            (cfg.dtype, *dtypes), load_fit(), probe_s=min(20.0, 0.05 * budget_s), log=log if d.is_main else None, d=d)
        extra = {k: v for k, v in model_options.items() if k not in ("drop_rate",)}
        model_cfg = GPTConfig.from_dict({**model_cfg.to_dict(), **extra,
                                         "drop_rate": model_options.get("drop_rate", 0.0)})
        peak = d.from_main(lambda: check_memory(model_cfg, cfg.batch_size, cfg.grad_accum, preset, device))
        set_cpu_threads(count_parameters(model_cfg), device, threads)  # the chosen shape's (a larger one probed last)
        cfg = cfg.replace(dtype=probe.dtype)
    else:
        peak = d.from_main(lambda: check_memory(model_cfg, cfg.batch_size, cfg.grad_accum, preset, device))
        predicted, considered = None, []
        set_cpu_threads(count_parameters(model_cfg), device, threads)
        probe = global_probe(model_cfg, cfg.batch_size, corpus.train, device, cfg.dtype, d)
    plan = Plan(model_cfg, cfg.batch_size, cfg.grad_accum, cfg.steps, probe.tokens_per_s, peak,
                probe.eval_tokens_per_s, torch.get_num_threads(), words, budget_s, considered=considered,
                predicted_bits=predicted, start_step=start_step, processes=d.world)
    plan.train_cfg = cfg if budget_s is None else _fit_steps(plan, cfg, started, predicted is not None,
                                                             chars_per_token(corpus))
    return d.broadcast(plan)  # the main process's measurements and steps: one model and schedule everywhere


def _fit_steps(plan: Plan, cfg: TrainConfig, started: float, predict: bool, char_ratio: float) -> TrainConfig:
    """The steps that fit in the budget's time left at the measured rates, evaluations included (the
    warm-up and evaluation interval shortened to suit), set in `plan`; the train config with them."""
    # What follows the last step: the final evaluation, checkpoint and report (a 200-token sample). A
    # first guess: the run's Deadline measures it as it goes.
    plan.reserve_s = 2.0 + 0.04 * plan.budget_s
    plan.train_s = plan.budget_s - (time.perf_counter() - started) - plan.reserve_s
    tokens_per_step = cfg.batch_size * cfg.grad_accum * plan.model_cfg.context_length
    step_s = tokens_per_step / max(plan.tokens_per_s, 1e-9)
    eval_s = cfg.eval_batches * cfg.batch_size * plan.model_cfg.context_length / max(plan.eval_tokens_per_s, 1e-9)
    steps = int(plan.train_s / (step_s + eval_s / cfg.eval_every))  # evaluations every eval_every steps
    if steps // 10 < cfg.eval_every:  # a short run evaluates about 10 times
        steps = int((plan.train_s - 10 * eval_s) / step_s)
    steps = max(1, steps)
    if predict:
        plan.predicted_bits = load_fit().predict(matmul_parameters(plan.model_cfg),
                                                 steps * tokens_per_step * char_ratio) / math.log(2)
    changes = {"steps": steps}
    if cfg.warmup_steps >= steps // 5:
        changes["warmup_steps"] = steps // 10
    changes["eval_every"] = max(1, min(cfg.eval_every, steps // 10))
    plan.steps = steps
    return cfg.replace(**changes)

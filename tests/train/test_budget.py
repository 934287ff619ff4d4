"""budget.py: durations, the loss fit, the memory estimate and refusal, the deadline that moves the
schedule's end, and `train --time-budget` end to end (timings are not asserted: the machine is shared)."""

from __future__ import annotations

import json
import math
import resource
import time
from types import SimpleNamespace

import numpy as np
import torch
import pytest

import build_llm.train.loop as loop_mod
from build_llm.train.budget import Deadline, LossFit, fit_loss, load_fit, parse_duration
from build_llm.sizing import estimate_peak_bytes
from build_llm.cli import main
from build_llm.config import GPTConfig


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("5m", 300), ("2h", 7200), ("1h30m", 5400), ("1.5m", 90),
                                           ("45", 45), (" 10S ", 10)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "5 minutes", "m", "-3s", "0s", "5d"])
def test_parse_duration_rejects(text):
    with pytest.raises(ValueError, match="--time-budget"):
        parse_duration(text)


def test_fit_recovers_a_known_law():
    truth = LossFit(E=1.2, A=40.0, alpha=0.4, B=300.0, beta=0.5)
    N, D = np.meshgrid([1e5, 4e5, 1.6e6, 6.4e6], [1e5, 3e5, 1e6, 3e6])
    L = [truth.predict(n, d) for n, d in zip(N.ravel(), D.ravel())]
    fit = fit_loss(N.ravel(), D.ravel(), L)
    assert (fit.alpha, fit.beta) == (0.4, 0.5) and fit.rmse < 1e-9
    assert fit.E == pytest.approx(1.2, abs=1e-6) and fit.A == pytest.approx(40, rel=1e-6)


def test_the_shipped_fit_is_the_sweeps():
    fit = load_fit()
    # loss falls with more parameters and more tokens, towards a floor below the sweep's losses
    assert fit.predict(1e6, 1e6) < fit.predict(1e5, 1e6) and fit.predict(1e6, 3e6) < fit.predict(1e6, 1e6)
    assert 0 < fit.E < 2


def at(monkeypatch, state, step: int, now: float) -> None:
    """The training state at `step` when the clock reads `now` seconds."""
    state.step = step
    monkeypatch.setattr(time, "perf_counter", lambda: now)


def test_deadline_moves_the_last_step_to_the_time_left(monkeypatch):
    deadline = Deadline(end=160.0, reserve_s=10.0)
    state = SimpleNamespace(step=1, total_steps=1000, round_times=[], sample_s=0.0)
    at(monkeypatch, state, 1, 100.0)
    assert deadline(state) == 1000  # starts measuring
    at(monkeypatch, state, 11, 110.0)  # 10 steps in 10 s: 1 step/s, 40 s left before the reserve
    assert deadline(state) == 11 + 40
    at(monkeypatch, state, 31, 120.0)  # faster: 30 steps in 20 s
    assert deadline(state) == 31 + int(1.5 * 30)


def test_deadline_keeps_a_plan_that_holds(monkeypatch):
    """On pace (within a tenth of the time): the total on the progress line stays the plan's."""
    deadline = Deadline(end=110.0, reserve_s=10.0)
    state = SimpleNamespace(step=0, total_steps=100, round_times=[], sample_s=0.0)
    at(monkeypatch, state, 0, 0.0)
    assert deadline(state) == 100
    for step, now in ((10, 10.0), (50, 52.0), (80, 78.0)):  # 1 step/s, +-4%: each end within 10 s of 100 s
        at(monkeypatch, state, step, now)
        assert deadline(state) == 100
    at(monkeypatch, state, 85, 95.0)  # fell behind: 15 steps left would end at 112 s
    assert deadline(state) == 85 + int(85 / 95 * 5)


def test_a_plan_that_does_not_fit_stops_before_allocating(tmp_path, capsys):
    """The README's old example: gpt2-small at batch 64 x context 1024 with dropout needs ~100 GB."""
    data = tmp_path / "t.txt"
    data.write_text("hello world " * 20000, encoding="utf-8")
    cfg = GPTConfig.from_preset("gpt2-small")
    assert estimate_peak_bytes(cfg, 64) > 50 * 2**30
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    code = main(["train", "--data", str(data), "--tokenizer", "gpt2", "--preset", "gpt2-small", "--steps", "5000",
                 "--batch-size", "64", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "GB" in err and "--grad-accum" in err and "--drop-rate 0" in err
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 1024 * 1024  # < 1 GB more (kB units)


@pytest.mark.parametrize("bf16", [True, False], ids=["cpu with bf16", "cpu without bf16"])
def test_time_budget_run_prints_a_plan_and_ends_its_schedule(tmp_path, capsys, monkeypatch, bf16):
    monkeypatch.setattr("build_llm.train.pretrain.cpu_has_bf16", lambda: bf16)  # what the CPU reports
    data = tmp_path / "t.txt"
    rng = np.random.default_rng(0)
    data.write_text(" ".join(rng.choice(["to", "be", "or", "not", "that", "is"], size=6000)), encoding="utf-8")
    run = tmp_path / "run"
    code = main(["train", "--data", str(data), "--time-budget", "20s", "--out", str(run)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "plan:" in captured.err and "parameters" in captured.err and "peak memory" in captured.err
    assert "probe:" in captured.err  # no shape flag: the rule chose it
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    state = json.loads((run / "checkpoint" / "trainer_state.json").read_text())
    assert rows[-1]["step"] == state["step"] == state["train_config"]["steps"]  # the schedule ended at the last step
    assert rows[-1]["lr"] == pytest.approx(2e-3 * 0.1, rel=0.05) or state["step"] < 20
    assert math.isfinite(rows[-1]["val_loss"]) and "val_bits_per_char" in rows[-1]
    assert "context 256" in captured.err and "bits per character" in captured.err  # a BPE model's budget
    # fp32 and bf16 autocast measured for each shape; the faster whose loss matches is the run's dtype
    import re

    if not bf16:  # bf16 autocast is emulated there: never measured, never chosen
        assert "dtype: float32 only: this CPU reports no bfloat16 instructions" in captured.err
        assert "bfloat16" not in captured.err.split("emulated and slower")[1]
        assert re.search(r"probe: \d+ layers x \d+: [\d,]+ tokens/s in float32 ->", captured.err)
        assert state["train_config"]["dtype"] == "float32"
        return
    probes = re.findall(r"probe: (\d+) layers x (\d+): ([\d,]+) tokens/s in (\w+) \((\w+) ([\d,]+) tokens/s"
                        r"(, its loss differs)?\)", captured.err)
    assert probes and {(p[3], p[4]) for p in probes} <= {("float32", "bfloat16"), ("bfloat16", "float32")}
    for *_, rate, dtype, other, other_rate, differs in probes:
        assert int(rate.replace(",", "")) >= int(other_rate.replace(",", "")) or differs
    config = json.loads((run / "checkpoint" / "config.json").read_text())
    chosen = next(p for p in probes if (int(p[0]), int(p[1])) == (config["n_layers"], config["emb_dim"]))
    assert state["train_config"]["dtype"] == chosen[3] and f"in {chosen[3]}" in captured.err.split("plan:")[2]


def test_time_budget_contradictions(tmp_path, capsys):
    data = tmp_path / "t.txt"
    data.write_text("abc " * 100, encoding="utf-8")
    for extra, message in ((["--steps", "10"], "--time-budget and --steps"), (["--time-budget", "soon"], "soon")):
        argv = ["train", "--data", str(data), "--out", str(tmp_path / "r"), *extra]
        if "--time-budget" not in extra:
            argv += ["--time-budget", "1m"]
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "r").exists()


def test_the_fastest_dtype_whose_loss_matches_is_chosen():
    from build_llm.train.budget import Probe, dtype_words, fastest

    fp32 = Probe("float32", 1000.0, 3000.0, (4.00, 3.90, 3.80))
    close = Probe("bfloat16", 1500.0, 4000.0, (4.01, 3.91, 3.79))  # within 1%
    off = Probe("bfloat16", 1500.0, 4000.0, (4.00, 3.90, 3.50))  # the third loss 8% lower
    slow = Probe("bfloat16", 600.0, 900.0, (4.00, 3.90, 3.80))
    assert fastest([fp32, close]) is close and fastest([fp32, off]) is fp32 and fastest([fp32, slow]) is fp32
    assert dtype_words([fp32, slow], fp32) == "float32 (bfloat16 600 tokens/s)"
    assert dtype_words([fp32, off], fp32) == "float32 (bfloat16 1,500 tokens/s, its loss differs)"


def test_the_probe_measures_both_dtypes_from_the_same_start(tmp_path):
    """The same weights and windows in each dtype: the first loss agrees to bf16's precision."""
    from build_llm.train.budget import probe_tokens_per_s, shape_for

    ids = np.random.default_rng(0).integers(0, 50, size=5000).astype(np.uint16)
    cfg = shape_for(1, 32, 16, 50)
    a, b = (probe_tokens_per_s(cfg, 4, ids, torch.device("cpu"), dtype, seconds=0.1) for dtype in ("float32", "bfloat16"))
    assert (a.dtype, b.dtype) == ("float32", "bfloat16") and len(a.losses) >= 3 and len(b.losses) >= 3
    assert a.losses[0] == pytest.approx(math.log(50), abs=0.2) and b.matches(a)
    assert a.tokens_per_s > 0 and a.eval_tokens_per_s > 0


def test_a_dtype_far_slower_at_its_first_step_is_not_measured_further():
    from build_llm.train.budget import probe_tokens_per_s, shape_for

    ids = np.random.default_rng(0).integers(0, 50, size=5000).astype(np.uint16)
    probe = probe_tokens_per_s(shape_for(1, 32, 16, 50), 4, ids, torch.device("cpu"), "bfloat16", give_up_s=1e-9)
    assert len(probe.losses) == 1 and probe.eval_tokens_per_s == 0.0
    assert probe.tokens_per_s == pytest.approx(4 * 16 / probe.first_s)


def budget_run(tmp_path, monkeypatch, save_s: float, budget_s: float = 120.0, steps: int = 200):
    """run_loop on a fake clock under a Deadline of `budget_s` with the plan's guess of the reserve:
    each step takes 1 s, an evaluation 0.5 s, its sample 0.5 s and its checkpoint `save_s`; then
    the report (a sample of 200 tokens where the rounds take 60). Returns (end time, steps trained)."""
    clock = [0.0]

    def tick(seconds: float) -> None:
        clock[0] += seconds

    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(loop_mod, "plot_losses", lambda *args, **kwargs: None)
    core = torch.nn.Linear(2, 1)
    state = loop_mod.TrainState(core, core, torch.optim.SGD(core.parameters(), lr=0.1), total_steps=steps)
    deadline = Deadline(end=budget_s, reserve_s=2.0 + 0.04 * budget_s, eval_every=10, report_samples=200 / 60)
    with loop_mod.RunLog(tmp_path, steps, state, log=lambda s: None) as log:
        loop_mod.run_loop(state, lambda state, stop: (tick(1.0), (torch.tensor(1.0), 1))[1], lr=lambda s: 0.1,
                          evaluate=lambda s: (tick(0.5), {"val_loss": 1.0})[1], sample=lambda s: (tick(0.5), "x")[1],
                          save=lambda s: tick(save_s), log=log, eval_every=10, adjust=deadline)
    tick(200 / 60 * 0.5)  # the report
    return clock[0], state.step


@pytest.mark.parametrize("save_s", [0.2, 10.0, 25.0])
def test_the_reserve_is_measured_so_slow_checkpoints_still_end_within_the_budget(tmp_path, monkeypatch, save_s):
    """The plan's guess keeps 6.8 s of a 120 s budget for the last step's round and the report; with
    checkpoints of 10 or 25 s that would overrun, but the rounds measured on the way move the last
    step earlier: the run ends within the budget, and uses most of it."""
    end, steps = budget_run(tmp_path, monkeypatch, save_s)
    assert 0.85 * 120 <= end <= 120.0, (end, steps)


def test_the_reserve_is_the_plans_guess_until_a_round_with_a_sample_is_measured():
    deadline = Deadline(end=100.0, reserve_s=6.0, report_samples=3.0)
    assert deadline.reserve(SimpleNamespace(round_times=[], sample_s=0.0)) == 6.0
    assert deadline.reserve(SimpleNamespace(round_times=[2.0, 9.0], sample_s=0.0)) == 9.0  # a round longer than it
    # the longest round, one more sample (it may have had none) and the report's three samples' worth
    assert deadline.reserve(SimpleNamespace(round_times=[2.0, 3.0], sample_s=0.5)) == 3.0 + 4 * 0.5

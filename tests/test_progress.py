"""build_llm.progress: off a terminal, a line once a phase has taken 3 s, then one every 30 s with
the rate and the time left, and one at its end; a short phase says nothing."""

import time

import torch

import build_llm.progress as progress_mod
from build_llm.progress import Progress


def test_lines_off_a_terminal(monkeypatch, capsys):
    clock = [100.0]
    monkeypatch.setattr(progress_mod.time, "perf_counter", lambda: clock[0])
    with Progress("tokenize", 1_000_000_000, "B", ticker=False) as p:
        clock[0] += 2
        p.update(20e6)
        assert capsys.readouterr().err == ""  # not yet 3 s
        clock[0] += 1
        p.update(10e6)  # 30 MB in 3 s: 10 MB/s, 970 MB left
        assert capsys.readouterr().err == "tokenize: 30.0 MB of 1.0 GB (3%), 10.0 MB/s, about 97 s left\n"
        clock[0] += 29
        p.update(290e6)
        assert capsys.readouterr().err == ""  # not yet 30 s since the last line
        clock[0] += 1
        p.update(10e6)
        assert capsys.readouterr().err == "tokenize: 330.0 MB of 1.0 GB (33%), 10.0 MB/s, about 67 s left\n"
        clock[0] += 20
        p.update(670e6)
    assert capsys.readouterr().err == "tokenize: done, 1.0 GB in 53 s\n"


def test_disabled_and_short_phases_say_nothing(monkeypatch, capsys):
    clock = [0.0]
    monkeypatch.setattr(progress_mod.time, "perf_counter", lambda: clock[0])
    with Progress("read", 10, "B", enabled=False, ticker=False) as p:
        clock[0] += 100
        p.update(10)
    with Progress("read", 10, "B", ticker=False) as p:
        clock[0] += 2.9  # done before the first line is due
        p.update(10)
    assert capsys.readouterr().err == ""


def test_the_ticker_says_how_far_while_no_update_comes(monkeypatch, capsys):
    """A consumer that reads ahead and then works (the tokenizers trainer): lines come on time."""
    monkeypatch.setattr(progress_mod, "FIRST_LINE_S", 0.05)
    with Progress("train tokenizer", 100, "B", every_s=0.05) as p:
        p.update(25)
        seen, deadline = "", time.monotonic() + 10
        while seen.count("25 B of 100 B (25%)") < 2 and time.monotonic() < deadline:
            time.sleep(0.05)  # no update meanwhile
            seen += capsys.readouterr().err
        assert seen.count("25 B of 100 B (25%)") >= 2, seen


def test_a_long_evaluation_says_how_far(monkeypatch, capsys):
    """evaluate_windows(progress=True): lines on stderr (here from the first update on), the loss unchanged."""
    import numpy as np

    from build_llm import GPTConfig, GPTModel
    from build_llm.infer.evaluate import evaluate_windows

    import functools

    import build_llm.infer.evaluate as evaluate_mod

    monkeypatch.setattr(progress_mod, "FIRST_LINE_S", 0.0)
    monkeypatch.setattr(evaluate_mod, "Progress", functools.partial(Progress, ticker=False))  # lines on updates
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=7, context_length=8, emb_dim=16, n_heads=2, n_layers=1, drop_rate=0.0))
    ids = np.random.default_rng(0).integers(0, 7, 2000)
    starts = np.arange(0, 1900, 8)
    quiet = evaluate_windows(model, ids, starts, 8, 16, torch.device("cpu"))
    capsys.readouterr()
    shown = evaluate_windows(model, ids, starts, 8, 16, torch.device("cpu"), progress=True)
    assert shown == quiet
    assert "evaluate: " in capsys.readouterr().err

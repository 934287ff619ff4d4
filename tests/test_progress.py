"""build_llm.progress: off a terminal, a line once a phase has taken 5 s, then one every 30 s with
the rate and the time left, and one at its end; a short phase says nothing."""

import time

import build_llm.progress as progress_mod
from build_llm.progress import Progress


def test_lines_off_a_terminal(monkeypatch, capsys):
    clock = [100.0]
    monkeypatch.setattr(progress_mod.time, "perf_counter", lambda: clock[0])
    with Progress("tokenize", 1_000_000_000, "B", ticker=False) as p:
        clock[0] += 4
        p.update(40e6)
        assert capsys.readouterr().err == ""  # not yet 5 s
        clock[0] += 1
        p.update(10e6)  # 50 MB in 5 s: 10 MB/s, 950 MB left
        assert capsys.readouterr().err == "tokenize: 50.0 MB of 1.0 GB (5%), 10.0 MB/s, about 95 s left\n"
        clock[0] += 29
        p.update(290e6)
        assert capsys.readouterr().err == ""  # not yet 30 s since the last line
        clock[0] += 1
        p.update(10e6)
        assert capsys.readouterr().err == "tokenize: 350.0 MB of 1.0 GB (35%), 10.0 MB/s, about 65 s left\n"
        clock[0] += 20
        p.update(650e6)
    assert capsys.readouterr().err == "tokenize: done, 1.0 GB in 55 s\n"


def test_disabled_and_short_phases_say_nothing(monkeypatch, capsys):
    clock = [0.0]
    monkeypatch.setattr(progress_mod.time, "perf_counter", lambda: clock[0])
    with Progress("read", 10, "B", enabled=False, ticker=False) as p:
        clock[0] += 100
        p.update(10)
    with Progress("read", 10, "B", ticker=False) as p:
        clock[0] += 4
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

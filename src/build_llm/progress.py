"""Progress of a long phase (reading and hashing a corpus, tokenizing it, training a tokenizer,
evaluating a large split) on stderr: a tqdm bar on a terminal; otherwise (a log file, a pipe, CI) a
line once the phase has taken FIRST_LINE_S seconds, then one every LINE_EVERY_S seconds, with the
rate and the time left, and one when it ends. A short phase says nothing."""

from __future__ import annotations

import sys
import threading
import time

from tqdm import tqdm

# The first line 3 s into a phase: with Python and torch's ~2 s start, within 5 s of the command's start.
FIRST_LINE_S, LINE_EVERY_S = 3.0, 30.0


def _size(n: float, unit: str) -> str:
    """n in `unit`, scaled: 1.2 GB, 340 k windows."""
    for factor, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= factor:
            return f"{n / factor:.1f} {prefix}{unit}"
    return f"{n:.0f} {unit}"


def _seconds(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


class Progress:
    """`update(n)` as work is done (n units of `total`); a context manager that closes the bar.
    `enabled=False` (another torchrun process, a short phase) shows nothing. Off a terminal a
    thread prints the lines on time (`ticker`), also while no update comes (a consumer that reads
    ahead, then works on what it read); without it, updates print them."""

    def __init__(self, desc: str, total: float | None, unit: str = "B", enabled: bool = True,
                 every_s: float = LINE_EVERY_S, ticker: bool = True) -> None:
        self.desc, self.total, self.unit, self.every_s = desc, total, unit, every_s
        self.done = 0.0
        self.t0 = self.last = time.perf_counter()
        self.bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=True, file=sys.stderr, dynamic_ncols=True,
                        disable=None if enabled else True)  # None: off when stderr is not a terminal
        self.lines = enabled and self.bar.disable
        self.said = False  # whether a line was printed: then the end is said too
        self.stopped, self.ticking = threading.Event(), self.lines and ticker
        if self.ticking:  # lines on time, also while the consumer holds on to what it read
            threading.Thread(target=self._tick, daemon=True).start()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: float) -> None:
        self.done += n
        if not self.bar.disable:
            self.bar.update(n)
        elif self.lines and not self.ticking and time.perf_counter() - self.last >= (self.every_s if self.said else FIRST_LINE_S):
            self._line(self.status())

    def _tick(self) -> None:
        wait = FIRST_LINE_S
        while not self.stopped.wait(max(0.05, wait - (time.perf_counter() - self.last))):
            if time.perf_counter() - self.last >= wait:
                self._line(self.status())
                wait = self.every_s

    def status(self) -> str:
        """E.g. "tokenize: 412.0 MB of 1.0 GB (40%), 25.3 MB/s, about 24 s left"."""
        spent = max(time.perf_counter() - self.t0, 1e-9)
        rate = self.done / spent
        text = f"{self.desc}: {_size(self.done, self.unit)}"
        if self.total:
            text += f" of {_size(self.total, self.unit)} ({100 * self.done / self.total:.0f}%)"
        text += f", {_size(rate, self.unit)}/s"
        if self.total and rate > 0:
            text += f", about {_seconds(max(0.0, self.total - self.done) / rate)} left"
        return text

    def _line(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)
        self.last, self.said = time.perf_counter(), True

    def close(self) -> None:
        self.stopped.set()
        self.bar.close()
        if self.lines and self.said:
            self._line(f"{self.desc}: done, {_size(self.done, self.unit)} in {_seconds(time.perf_counter() - self.t0)}")
        self.lines = False

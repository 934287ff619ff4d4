"""`make speedrun`: how fast does `build-llm train` learn Shakespeare on this machine, next to the
plain recipe measured in the same run?

On the complete works (character level, the last 10% held out), for each seed:
  - ours, `build-llm train --time-budget 150s` and `--time-budget 5m` (validation loss at the end of
    each), and the time at which either first reaches validation loss 1.88;
  - the plain recipe: the book's model and loop at nanoGPT's CPU shape (4 layers, 4 heads, 128
    wide, context 64, batch 12, AdamW lr 1e-3, no dropout, 2,000 steps): its loss at 150 s and 5 min
    read off its curve, and its time to 1.88.
Runs go two at a time, one thread each, ours beside the plain recipe, so that other work on the
machine slows both alike. Prints the table (mean and spread over the seeds) and the ratios.

    python examples/speedrun.py [--seeds 3] [--out runs/speedrun]

Skips (exit 0, with the reason) when the text is absent.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / ".." / "shared" / "data" / "shakespeare.txt"
TARGET = 1.88
BUDGETS = (150, 300)  # seconds: the two budgets the record names

# nanoGPT's CPU recipe for shakespeare_char, with the book's model (learned positions, LayerNorm,
# GELU, biases, untied head) and the package's loop.
PLAIN = ["--preset", "book-124m", "--context-length", "64", "--emb-dim", "128", "--n-layers", "4", "--n-heads", "4", "--drop-rate", "0",
         "--batch-size", "12", "--lr", "1e-3", "--steps", "2000", "--warmup-steps", "100", "--eval-every", "50",
         "--eval-batches", "20"]


def ours(budget_s: int) -> list[str]:
    """Our recipe for a budget of `budget_s` seconds: `build-llm train --time-budget`, which sizes the
    model and its steps from a measurement of this machine's speed at the start (docs/time-budget.md)."""
    return ["--time-budget", f"{budget_s}s"]


def train(args: list[str], out: Path, seed: int, data: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "build_llm.cli", "train", "--data", str(data), "--tokenizer", "char",
           "--seed", str(seed), "--out", str(out), *args]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)


def curve(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def loss_at(rows: list[dict], seconds: float) -> float | None:
    """Validation loss of the last evaluation at or before `seconds` of training."""
    before = [r["val_loss"] for r in rows if r["elapsed_s"] <= seconds]
    return before[-1] if before else None


def time_to(rows: list[dict], target: float) -> float | None:
    """Seconds until the first evaluation at or below `target`, or None if never."""
    return next((r["elapsed_s"] for r in rows if r["val_loss"] <= target), None)


def summary(values: list[float | None]) -> str:
    got = [v for v in values if v is not None]
    if not got:
        return "not reached"
    text = f"{statistics.mean(got):.3f} ± {(max(got) - min(got)) / 2:.3f}" if len(got) > 1 else f"{got[0]:.3f}"
    return text + (f" ({len(got)}/{len(values)} reached)" if len(got) < len(values) else "")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "speedrun")
    args = ap.parse_args(argv)
    if not args.data.is_file():
        print(f"speedrun skipped: {args.data} is absent (the complete works of Shakespeare, one UTF-8 file)")
        return 0
    if args.out.exists() and any(args.out.iterdir()):
        print(f"speedrun: {args.out} is not empty; remove it or give another --out", file=sys.stderr)
        return 2
    # Two at a time in this order: each plain run (about 5 min) goes beside ours at 150 s and then at
    # 5 min, so the two recipes share whatever else the machine is doing.
    queue = [(("plain", seed), PLAIN) if name == "plain" else ((name, seed), ours(int(name[5:-1])))
             for seed in range(args.seeds) for name in ("plain", *(f"ours-{b}s" for b in BUDGETS))]
    running: dict[tuple[str, int], subprocess.Popen] = {}
    started = time.perf_counter()
    while queue or running:
        while queue and len(running) < 2:
            (name, seed), flags = queue.pop(0)
            running[(name, seed)] = train(flags, args.out / f"{name}-seed{seed}", seed, args.data)
            print(f"[{time.perf_counter() - started:6.0f} s] started {name} seed {seed}", flush=True)
        time.sleep(1)
        for key, proc in list(running.items()):
            if proc.poll() is not None:
                err = proc.stderr.read()
                del running[key]
                if proc.returncode:
                    print(f"{key[0]} seed {key[1]} failed (exit {proc.returncode}):\n{err[-2000:]}", file=sys.stderr)
                    return 1
                print(f"[{time.perf_counter() - started:6.0f} s] finished {key[0]} seed {key[1]}", flush=True)

    seeds = range(args.seeds)
    plain = [curve(args.out / f"plain-seed{s}") for s in seeds]
    ours_runs = {b: [curve(args.out / f"ours-{b}s-seed{s}") for s in seeds] for b in BUDGETS}
    rows = {
        "plain recipe": ([time_to(c, TARGET) for c in plain], [loss_at(c, 150) for c in plain],
                         [loss_at(c, 300) for c in plain]),
        "ours (--time-budget)": ([min((t for t in (time_to(ours_runs[b][s], TARGET) for b in BUDGETS)
                                                if t is not None), default=None) for s in seeds],
                                          [loss_at(c, 150) for c in ours_runs[150]],
                                          [loss_at(c, 300) for c in ours_runs[300]]),
    }
    import torch

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    print(f"\nspeedrun: Shakespeare, character level, {args.seeds} seeds, one thread per run, two runs at a time")
    print(f"machine: {cpu}, {os.cpu_count()} cores; torch {torch.__version__}; commit {commit or 'unknown'}")
    print(f"\n| recipe | time to val loss {TARGET} (s) | val loss at 150 s | val loss at 5 min |")
    print("| --- | --- | --- | --- |")
    for name, (t, l150, l300) in rows.items():
        print(f"| {name} | {summary(t)} | {summary(l150)} | {summary(l300)} |")
    t_plain, t_ours = [v for v in rows["plain recipe"][0] if v], [v for v in rows["ours (--time-budget)"][0] if v]
    if t_plain and t_ours:
        print(f"\ntime to {TARGET}: plain / ours = {statistics.mean(t_plain) / statistics.mean(t_ours):.2f}x")
    for b in BUDGETS:
        print(f"ours at {b} s: the run's last evaluation at {summary([c[-1]['elapsed_s'] for c in ours_runs[b]])} s "
              f"of training (the budget also pays for start-up, the speed probe and the final save)")
    (args.out / "summary.json").write_text(json.dumps({"rows": rows, "commit": commit, "torch": torch.__version__,
                                                       "cpu": cpu, "seeds": args.seeds}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

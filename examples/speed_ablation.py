"""Ablations for docs/speed.md: validation loss of a character model of Shakespeare after a fixed
budget of CPU time, with and without each speed option, several seeds, arms interleaved.

    python examples/speed_ablation.py --budget 60 --seeds 3 --arms plain,rope,rmsnorm

Each run is its own process with one thread; `--jobs 2` runs two at a time. The clock is the
process's CPU time, not the wall clock, so that other work on a shared machine slows a run down
without shrinking its budget; the learning rate decays over that budget (cosine to a tenth after a
100-step warm-up) and the evaluation (fixed 1,000 validation windows) is outside it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "shakespeare.txt"

# nanoGPT's CPU recipe for shakespeare_char: 4 layers, 4 heads, 128 wide, context 64, batch 12,
# AdamW lr 1e-3, betas (0.9, 0.99), weight decay 0.1, no dropout, clip 1.0.
PLAIN_MODEL = dict(context_length=64, emb_dim=128, n_heads=4, n_layers=4, drop_rate=0.0, qkv_bias=False)
PLAIN_TRAIN = dict(batch_size=12, lr=1e-3, warmup=100, min_lr_ratio=0.1)

LLAMA = dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False)
ARMS: dict[str, tuple[dict, dict]] = {
    "plain": ({}, {}),
    "rope": (dict(pos_emb="rope"), {}),
    "rmsnorm": (dict(norm="rmsnorm"), {}),
    "swiglu": (dict(mlp="swiglu"), {}),
    "relu2": (dict(mlp="relu2"), {}),
    "nobias": (dict(bias=False), {}),
    "qknorm": (dict(qk_norm=True), {}),
    "tied": (dict(tie_weights=True), {}),
    "gpt2init": (dict(init_std=0.02), {}),
    "llama": (LLAMA, {}),
    "lr3e-3": ({}, dict(lr=3e-3)),
    "b32": ({}, dict(batch_size=32)),
    "b32lr3e-3": ({}, dict(batch_size=32, lr=3e-3)),
}


def parse_arm(name: str) -> tuple[dict, dict]:
    """A named arm, or `name+key=value+...` on top of a named arm (values as JSON)."""
    base, *changes = name.split("+")
    model, train = (dict(d) for d in ARMS[base])
    for change in changes:
        key, value = change.split("=", 1)
        try:
            value = json.loads(value)
        except ValueError:
            pass  # a plain string such as rope
        (train if key in PLAIN_TRAIN else model)[key] = value
    return model, train


def run_one(arm: str, seed: int, budget: float, data: Path) -> dict:
    import numpy as np
    import torch
    import torch.nn.functional as F

    from build_llm import GPTConfig, GPTModel

    torch.set_num_threads(1)
    model_over, train_over = parse_arm(arm)
    tc = {**PLAIN_TRAIN, **train_over}
    text = data.read_text(encoding="utf-8")
    chars = sorted(set(text))
    ids = torch.tensor(np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64))
    lookup = torch.zeros(int(ids.max()) + 1, dtype=torch.long)
    lookup[torch.tensor([ord(c) for c in chars])] = torch.arange(len(chars))
    ids = lookup[ids]
    split = int(0.9 * len(ids))
    train_ids, val_ids = ids[:split], ids[split:]
    cfg = GPTConfig(vocab_size=len(chars), **{**PLAIN_MODEL, **model_over})
    T, B = cfg.context_length, tc["batch_size"]

    torch.manual_seed(seed)
    model = GPTModel(cfg)
    params = list(model.parameters())
    opts = [torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.1},
                               {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                              lr=tc["lr"], betas=(0.9, 0.99))]
    base_lrs = [[g["lr"] for g in o.param_groups] for o in opts]
    gen = torch.Generator().manual_seed(seed)

    def batch(source, n, t):
        starts = torch.randint(0, len(source) - t - 1, (n,), generator=gen)
        x = torch.stack([source[s:s + t] for s in starts.tolist()])
        y = torch.stack([source[s + 1:s + t + 1] for s in starts.tolist()])
        return x, y

    step, tokens, cpu0, wall0 = 0, 0, time.process_time(), time.perf_counter()
    model.train()
    while True:
        progress = (time.process_time() - cpu0) / budget
        if progress >= 1:
            break
        decay = 0.5 * (1 + math.cos(math.pi * progress))
        factor = min(1.0, (step + 1) / tc["warmup"]) * (tc["min_lr_ratio"] + (1 - tc["min_lr_ratio"]) * decay)
        for o, lrs in zip(opts, base_lrs):
            for g, lr in zip(o.param_groups, lrs):
                g["lr"] = lr * factor
        t = T
        x, y = batch(train_ids, B, t)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        for o in opts:
            o.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for o in opts:
            o.step()
        step += 1
        tokens += B * t
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0

    model.eval()
    eval_gen = torch.Generator().manual_seed(0)
    starts = torch.randint(0, len(val_ids) - T - 1, (1000,), generator=eval_gen).tolist()
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(starts), 100):
            chunk = starts[i:i + 100]
            x = torch.stack([val_ids[s:s + T] for s in chunk])
            y = torch.stack([val_ids[s + 1:s + T + 1] for s in chunk])
            total += F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="sum").item()
    return {"arm": arm, "seed": seed, "val_loss": total / (len(starts) * T), "steps": step, "tokens": tokens,
            "cpu_s": round(cpu, 2), "wall_s": round(wall, 2),
            "params": sum(p.numel() for p in model.parameters())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arms", default="plain")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--budget", type=float, default=60.0, help="CPU seconds of training per run")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--out", type=Path, default=None, help="append each result as a JSON line")
    ap.add_argument("--one", nargs=2, metavar=("ARM", "SEED"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if not args.data.is_file():
        print(f"skipped: {args.data} is absent", file=sys.stderr)
        return 0
    if args.one:
        print(json.dumps(run_one(args.one[0], int(args.one[1]), args.budget, args.data)), flush=True)
        return 0
    arms = args.arms.split(",")
    for arm in arms:
        parse_arm(arm)  # fail before starting anything
    queue = [(arm, seed) for seed in range(args.seeds) for arm in arms]  # interleaved: arm by arm per seed
    results: list[dict] = []
    if args.out and args.out.exists():  # continue an interrupted ablation: keep the runs already done
        done = [json.loads(line) for line in args.out.read_text().splitlines() if line.strip()]
        results = [r for r in done if r["budget"] == args.budget and (r["arm"], r["seed"]) in queue]
        queue = [q for q in queue if q not in {(r["arm"], r["seed"]) for r in results}]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    running: list[subprocess.Popen] = []

    def reap(block: bool) -> None:
        for p in list(running):
            if block or p.poll() is not None:
                out, _ = p.communicate()
                running.remove(p)
                row = json.loads(out.strip().splitlines()[-1])
                results.append(row)
                print(json.dumps(row), flush=True)
                if args.out:
                    with open(args.out, "a") as fh:
                        fh.write(json.dumps({**row, "budget": args.budget}) + "\n")
                if block:
                    return

    for arm, seed in queue:
        while len(running) >= args.jobs:
            reap(False)
            time.sleep(0.2)
        running.append(subprocess.Popen([sys.executable, __file__, "--one", arm, str(seed), "--budget",
                                         str(args.budget), "--data", str(args.data)],
                                        stdout=subprocess.PIPE, text=True, env=env))
    while running:
        reap(True)
    print(f"\n{'arm':32s} {'val loss mean':>13s} {'spread':>7s} {'steps':>6s} {'tokens':>9s}")
    for arm in arms:
        rows = [r for r in results if r["arm"] == arm]
        losses = [r["val_loss"] for r in rows]
        print(f"{arm:32s} {statistics.mean(losses):13.4f} {max(losses) - min(losses):7.4f} "
              f"{statistics.mean(r['steps'] for r in rows):6.0f} {statistics.mean(r['tokens'] for r in rows):9.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

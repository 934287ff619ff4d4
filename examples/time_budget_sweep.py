"""The sweep behind `build-llm train --time-budget`: validation loss against model size and tokens.

Character-level Shakespeare (the last 10% held out), one model family (context 64, batch 16, heads
of width 32, no dropout, AdamW lr 2e-3 with warm-up and cosine decay to the end of each run). Each
run trains a shape on a fixed number of tokens and records its final validation loss, its
non-embedding parameters N and its training FLOPs. The runs are measured in tokens, not seconds,
so a busy machine only makes the sweep slower, not different. Then `--fit` fits

    L(N, D) = E + A / N**alpha + B / D**beta

(N parameters in matrix products, D training tokens) and writes the table and the fit as JSON,
which budget.py reads. Regenerate (hours of one core; several processes share the grid):

    python examples/time_budget_sweep.py --data ../shared/data/shakespeare.txt --part 0/2 --out sweep.jsonl &
    python examples/time_budget_sweep.py --data ../shared/data/shakespeare.txt --part 1/2 --out sweep.jsonl &
    wait; python examples/time_budget_sweep.py --fit sweep.jsonl --write src/build_llm/budget_fit.json
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from build_llm.train.budget import fit_loss, shape_for
from build_llm.data.corpus import prepare_corpus
from build_llm.train.pretrain import train
from build_llm.train.config import TrainConfig

SHAPES = [(2, 64), (3, 96), (4, 128), (4, 192), (6, 256)]          # (n_layers, emb_dim)
TOKENS = [100_000, 300_000, 900_000, 2_700_000]
# the slowest corner, left out on 2 shared cores
SKIP = {((4, 192), 2_700_000), ((6, 256), 900_000), ((6, 256), 2_700_000)}
CONTEXT, BATCH, LR = 64, 16, 2e-3


def grid() -> list[tuple[tuple[int, int], int]]:
    return [(s, d) for s in SHAPES for d in TOKENS if (s, d) not in SKIP]


def run_one(data: str, shape: tuple[int, int], tokens: int, seed: int = 0) -> dict:
    from build_llm.sizing import matmul_parameters, train_flops_per_token

    n_layers, emb_dim = shape
    with tempfile.TemporaryDirectory() as tmp:
        corpus, tok = prepare_corpus(data, "char", Path(tmp) / "data", 0.1)
        cfg = shape_for(n_layers, emb_dim, CONTEXT, tok.vocab_size)
        steps = max(1, tokens // (BATCH * CONTEXT))
        train_cfg = TrainConfig(lr=LR, batch_size=BATCH, steps=steps, warmup_steps=min(100, steps // 10),
                                eval_every=steps, eval_batches=40, seed=seed, val_ratio=0.1)
        t0 = time.process_time()
        result = train(Path(tmp) / "run", cfg, train_cfg, corpus, tok, log=lambda s: None)
        cpu_s = time.process_time() - t0
    return {"n_layers": n_layers, "emb_dim": emb_dim, "context_length": CONTEXT, "batch_size": BATCH,
            "n_params": matmul_parameters(cfg), "tokens": steps * BATCH * CONTEXT, "steps": steps, "seed": seed,
            "flops": train_flops_per_token(cfg) * steps * BATCH * CONTEXT, "val_loss": result.val_loss,
            "cpu_s": round(cpu_s, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help="the Shakespeare text")
    p.add_argument("--part", default="0/1", help="I/N: run every N-th grid point starting at I")
    p.add_argument("--out", help="JSON lines to append to (points already there are skipped)")
    p.add_argument("--fit", help="fit the JSON lines of a sweep")
    p.add_argument("--write", help="with --fit: write the fit and the table to this JSON file")
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.fit:
        rows = [json.loads(line) for line in Path(args.fit).read_text().splitlines() if line.strip()]
        fit = fit_loss([r["n_params"] for r in rows], [r["tokens"] for r in rows], [r["val_loss"] for r in rows])
        for r in rows:
            r["predicted"] = round(fit.predict(r["n_params"], r["tokens"]), 4)
        print(json.dumps(fit.to_dict()))
        for r in sorted(rows, key=lambda r: (r["n_params"], r["tokens"])):
            print(f"{r['n_layers']} x {r['emb_dim']:4d}  N={r['n_params']:>9,}  D={r['tokens']:>9,}  "
                  f"val {r['val_loss']:.4f}  fit {r['predicted']:.4f}  cpu {r['cpu_s']:.0f} s")
        if args.write:
            Path(args.write).write_text(json.dumps({"fit": fit.to_dict(), "rows": rows}, indent=1) + "\n")
        return
    i, n = (int(x) for x in args.part.split("/"))
    done = set()
    if args.out and Path(args.out).exists():
        done = {(r["n_layers"], r["emb_dim"], r["tokens"] // (BATCH * CONTEXT))
                for r in map(json.loads, Path(args.out).read_text().splitlines()) if r}
    for k, (shape, tokens) in enumerate(grid()):
        if k % n != i or (*shape, tokens // (BATCH * CONTEXT)) in done:
            continue
        row = run_one(args.data, shape, tokens)
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a") as fh:
                fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()

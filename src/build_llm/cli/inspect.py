"""Verbs that look inside a model: inspect (attention, next-token table, layers), surprisal (a
text coloured by -log2 p) and doctor (pass/fail checks for a GPT's silent bugs)."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from build_llm.cli.common import (SAMPLING_FLAGS, add_device, add_out, add_seed, load_source, model_source,
                                  positive_int, verb)
from build_llm.data.corpus import read_text
from build_llm.data.markov import ABC, abc_text, is_abc_tokenizer
from build_llm.errors import UsageError
from build_llm.infer.generate import check_sampling
from build_llm.inspect.doctor import run_checks
from build_llm.inspect.intermediates import inspect_model
from build_llm.inspect.surprisal import surprisal_html, surprisal_report
from build_llm.runtime import get_device
from build_llm.store.checkpoint import trained_steps
from build_llm.store.fsio import check_not_input, check_overwrite, check_writable_file, write_text


def _temperatures(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None
    if not values or any(not t > 0 for t in values):
        raise argparse.ArgumentTypeError(f"{text!r} is invalid; expected temperatures > 0, e.g. 0.5,1,2")
    return values


def run_inspect(args: argparse.Namespace) -> None:
    check_sampling(1.0, args.top_k, args.top_p)
    if not args.prompt:
        raise UsageError("--prompt is empty; give at least one character")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise UsageError(f"--out {args.out!r} is a file; give a directory")
    model, tokenizer = load_source(args, get_device(args.device))
    title = f"{args.preset or Path(args.checkpoint).name}: {model.cfg.n_layers} layers x {model.cfg.n_heads} heads"
    report = inspect_model(model, tokenizer, args.prompt, args.out, top_k=args.top_k, top_p=args.top_p,
                           temperatures=args.temperatures, max_tokens=args.max_tokens, title=title,
                           screen=tuple(shutil.get_terminal_size()))
    print(report["text"])
    print()
    for name, path in report["files"].items():
        print(f"wrote {path}")


@verb("inspect", run_inspect)
def add_inspect(p: argparse.ArgumentParser) -> None:
    """attention maps, causal mask, next-token table and layer statistics

    Run the model on a prompt and write, in --out: attention.png (a map per layer and head), mask.txt
    (positions and the causal mask), next_token.txt and next_token.png (top-k table; bars at several
    temperatures with the top-k and top-p cut-offs), layers.png (residual-stream norms and attention
    entropy) and inspect.json (all the numbers). The summary is printed too, its mask cut to the
    terminal's size (the whole mask is in mask.txt)."""
    p.set_defaults(setting_flags=SAMPLING_FLAGS)
    model_source(p)
    p.add_argument("--prompt", required=True, help="text to look at (its last --max-tokens tokens are used)")
    add_out(p, "directory for the files: new, empty, or an earlier inspect --out (replaced whole)")
    p.add_argument("--top-k", type=positive_int, default=None, help="top-k cut-off (default: half the vocabulary, at most 10)")
    p.add_argument("--top-p", type=float, default=0.9, help="top-p (nucleus) cut-off, in (0, 1] (default 0.9)")
    p.add_argument("--temperatures", type=_temperatures, default=(0.5, 1.0, 2.0), help="comma-separated, default 0.5,1,2")
    p.add_argument("--max-tokens", type=positive_int, default=48, help="use at most this many prompt tokens (default 48)")
    add_seed(p, "seed of a --preset's random weights")
    add_device(p)


def run_surprisal(args: argparse.Namespace) -> None:
    out = Path(args.out)
    if out.is_dir():
        raise UsageError(f"--out {args.out!r} is a directory; give a file name such as surprisal.html")
    check_writable_file(out)
    check_not_input(out, {"--data": args.data})
    check_overwrite(out, args.force)  # a page of ours carries fsio.HTML_GENERATOR
    model, tokenizer = load_source(args, get_device(args.device))
    is_abc = is_abc_tokenizer(tokenizer)
    if args.abc and not is_abc:
        raise UsageError(f"--abc needs a character model over the ABC alphabet {''.join(ABC.alphabet)!r}; "
                         f"this one has {tokenizer!r}")
    if args.text is not None:
        text = args.text
    elif args.data:
        text = read_text(args.data)
    elif is_abc:
        text = abc_text(args.max_tokens // 6 + 2, seed=args.seed)[:args.max_tokens]  # words: 6 to 8 characters
    else:
        raise UsageError("give the text to score: --text TEXT or --data PATH")
    if len(text) < 2:
        raise UsageError(f"the text {text!r} is too short; give at least two tokens")
    ids = tokenizer.encode(text)
    if len(ids) > args.max_tokens:
        text = tokenizer.decode(ids[:args.max_tokens])
        print(f"build-llm: scoring the first {args.max_tokens} of {len(ids)} tokens (see --max-tokens)", file=sys.stderr)
    source = ABC if (args.abc or is_abc) else None
    try:
        report = surprisal_report(model, tokenizer, text, stride=args.stride, source=source)
    except ValueError as e:
        if args.abc or source is None or "cannot occur" not in str(e):
            raise
        print(f"build-llm: no exact optimum: {' '.join(str(e).split())}", file=sys.stderr)
        report = surprisal_report(model, tokenizer, text, stride=args.stride)
    name = args.preset or str(args.checkpoint)
    page = surprisal_html(report, title=f"Surprisal of {report['tokens'] + 1} tokens under {name}")
    write_text(out, page)  # atomically, through an unpredictable temporary name
    print(f"tokens scored: {report['tokens']}  characters scored: {report['characters']}")
    print(f"bits per token: {report['bits_per_token']:.4f}  bits per character: {report['bits_per_char']:.4f}  "
          f"perplexity: {report['perplexity']:.4f}")
    if "optimal_bits" in report:
        print(f"exact optimum (ABC source): {report['optimal_bits_per_token']:.4f} bits per token; "
              f"the model's excess: {report['excess_bits_per_token']:+.4f} bits per token")
    print(f"wrote {out}")


@verb("surprisal", run_surprisal)
def add_surprisal(p: argparse.ArgumentParser) -> None:
    """colour each token of a text by its surprisal (HTML)

    Score a text with the model and write an HTML page where each token is coloured by its surprisal
    -log2 p, with bits per token, bits per character and perplexity. For the ABC source (a character
    model over its alphabet, or --abc) the page also shows the excess over the exact Bayes-optimal
    prediction. Texts longer than the context are scored in sliding windows."""
    model_source(p)
    text = p.add_mutually_exclusive_group()
    text.add_argument("--text", help="the text to score")
    text.add_argument("--data", help="a UTF-8 text file to score (its first --max-tokens tokens)")
    p.add_argument("--abc", action="store_true",
                   help="compare with the exact ABC optimum (automatic for an ABC model); with no text, sample ABC text")
    add_out(p, "the HTML file to write")
    p.add_argument("--force", action="store_true", help="replace --out even if build-llm did not write it")
    p.add_argument("--stride", type=positive_int, default=None,
                   help="window step for long texts (default half the context)")
    p.add_argument("--max-tokens", type=positive_int, default=4000, help="score at most this many tokens (default 4000)")
    add_seed(p, "seed of sampled ABC text and of a --preset")
    add_device(p)


def run_doctor(args: argparse.Namespace) -> int:
    if not args.lr > 0:
        raise UsageError(f"--lr {args.lr!r} is invalid; expected a number > 0")
    text = read_text(args.data) if args.data else None
    model, tokenizer = load_source(args, get_device(args.device), need_tokenizer=False)
    # Untrained: a preset, --untrained, or a run at step 0. A trained run's trainer state records its
    # steps; without one (a model saved or imported) the loss decides (check_untrained_loss).
    steps = None if not args.checkpoint or args.untrained else trained_steps(args.checkpoint)
    untrained = True if not args.checkpoint or args.untrained else None if steps is None else steps == 0
    results = []
    for result in run_checks(model, tokenizer, text, untrained=untrained, steps=args.steps,
                             lr=args.lr, seq_len=args.seq_len, seed=args.seed):
        print(result.line(), flush=True)
        results.append(result)
    failed = [r.name for r in results if r.failed]
    skipped = sum(r.status == "SKIP" for r in results)
    print(f"{len(results) - len(failed) - skipped} passed, " + (f"{skipped} skipped, " if skipped else "")
          + f"{len(failed)} failed" + (f": {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


@verb("doctor", run_doctor)
def add_doctor(p: argparse.ArgumentParser) -> None:
    """quick checks for the silent bugs of a GPT (pass/fail)

    Check a model: tokenizer round-trip on the data (default: a sample text the tokenizer covers),
    initial loss near ln(vocab) for an untrained model (skipped for a trained one: a run's trainer
    state records its steps; otherwise a loss far below ln(vocab) shows it), no causal leak, KV cache equal to recomputation, finite gradients,
    and one batch overfits within --steps. One PASS/FAIL line each; exit code 1 if any check fails."""
    model_source(p)
    p.add_argument("--data", help="a UTF-8 text file for the round-trip and the batch (default: ABC text for an ABC "
                                  "model, otherwise a built-in sample, cut to a character model's alphabet)")
    p.add_argument("--untrained", action="store_true",
                   help="the checkpoint is freshly initialised: require its loss near ln(vocab) (always so for --preset)")
    p.add_argument("--steps", type=positive_int, default=60, help="AdamW steps allowed to overfit one batch (default 60)")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate of the overfit check (default 1e-3)")
    p.add_argument("--seq-len", type=positive_int, default=16, help="tokens per check sequence (default 16)")
    add_seed(p)
    add_device(p)

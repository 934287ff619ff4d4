"""The `build-llm` command: a thin map from verbs to the package's functions.

stdout carries only each verb's result; progress goes to stderr. Bad input is one line on stderr
and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from typing import Callable, Sequence

from build_llm.config import MLPS, NORMS, POS_EMBS, PRESETS
from build_llm.errors import UsageError


# One default for every verb's --device: the best device there is (cuda, then mps, then cpu).
DEVICE_DEFAULT, DEVICE_HELP = "auto", "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each option's default (unless its help already says it, or there is none)."""

    def _format_action(self, action: argparse.Action) -> str:
        if action.help is None and action.option_strings and action.default is not None and action.default is not False:
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # one line, not argparse's usage block
        raise UsageError(f"{self.prog}: error: {message} (see --help)")


def int_at_least(lowest: int) -> Callable[[str], int]:
    """An argparse type: an integer >= lowest."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < lowest:
            raise argparse.ArgumentTypeError(f"{value} is invalid; expected an integer >= {lowest}")
        return value
    return parse


positive_int, non_negative_int = int_at_least(1), int_at_least(0)


def model_source(p: argparse.ArgumentParser, required: bool = True) -> None:
    group = p.add_mutually_exclusive_group(required=required)
    group.add_argument("--preset", choices=sorted(PRESETS), help="a model preset (random weights)")
    group.add_argument("--checkpoint", help="a run directory (its newest checkpoint) or a checkpoint directory")


def load_source(args: argparse.Namespace, device: str = "cpu", need_tokenizer: bool = True):
    """(model, tokenizer) from --checkpoint, or a seeded random model from --preset. A preset gets
    the tokenizer its vocabulary implies (GPT-2's, or the ABC characters for r-abc); without one,
    the tokenizer is None unless `need_tokenizer`."""
    import torch

    from build_llm.store.checkpoint import load_checkpoint
    from build_llm.config import GPTConfig
    from build_llm.gpt import GPTModel
    from build_llm.data.markov import ABC
    from build_llm.runtime import check_fits, set_seed
    from build_llm.sizing import model_memory
    from build_llm.data.tokenizer import GPT2_VOCAB_SIZE, PAD, CharTokenizer, get_tokenizer

    if args.checkpoint:
        ckpt = load_checkpoint(args.checkpoint, device)
        if ckpt.tokenizer is None and need_tokenizer:
            raise UsageError(f"checkpoint {str(ckpt.path)!r} has no tokenizer.json; it cannot encode text")
        return ckpt.model, ckpt.tokenizer
    cfg = GPTConfig.from_preset(args.preset)
    if cfg.vocab_size == GPT2_VOCAB_SIZE:
        tokenizer = get_tokenizer("gpt2")
    elif cfg.vocab_size == len(ABC.alphabet) + 1:
        tokenizer = CharTokenizer([PAD, *ABC.alphabet])
    elif need_tokenizer:
        raise UsageError(f"preset {args.preset!r} has a {cfg.vocab_size}-token vocabulary with no tokenizer; "
                         "use --checkpoint of a trained model")
    else:
        tokenizer = None
    set_seed(getattr(args, "seed", None) or 0)
    check_fits(model_memory(cfg), f"--preset {args.preset}", device)
    with torch.device(device):
        model = GPTModel(cfg).eval()
    return model, tokenizer


# --- info ----------------------------------------------------------------------------------------
def add_info(sub) -> None:
    p = sub.add_parser("info", help="parameter table, total and size of a model",
                       description="Print the parameter table (name, shape, count), the total and the size "
                                   "in MB at fp32 and bf16 of a preset or a checkpoint.")
    model_source(p, required=False)
    p.set_defaults(run=run_info)


def run_info(args: argparse.Namespace) -> None:
    import torch

    from build_llm.store.checkpoint import load_model
    from build_llm.config import GPTConfig
    from build_llm.gpt import GPTModel
    from build_llm.sizing import count_parameters, format_parameter_table, model_size_mb

    if args.checkpoint:
        model = load_model(args.checkpoint)
    else:
        with torch.device("meta"):  # shapes only: no memory, no initialisation
            model = GPTModel(GPTConfig.from_preset(args.preset or "book-124m"))
    print(format_parameter_table(model))
    print(f"Total parameters: {count_parameters(model):,}")
    print(f"Size: {model_size_mb(model, torch.float32):.2f} MB (fp32), {model_size_mb(model, torch.bfloat16):.2f} MB (bf16)")


# --- generate ------------------------------------------------------------------------------------
def add_generate(sub) -> None:
    p = sub.add_parser("generate", help="continue a prompt",
                       description="Print the prompt and its continuation (only that, on stdout), each token as "
                                   "soon as it is generated.")
    model_source(p)
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=non_negative_int, default=50)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    p.add_argument("--top-k", type=positive_int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--device", default=DEVICE_DEFAULT, help=DEVICE_HELP)
    p.add_argument("--no-cache", action="store_true", help="recompute the context every step")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "int8"), default="float32",
                   help="decoding weights: float32 (default), bfloat16, or int8 (per-channel, CPU)")
    p.set_defaults(run=run_generate)


def run_generate(args: argparse.Namespace) -> None:
    import torch

    from build_llm.infer.generate import check_sampling, decode_stream, stream, text_to_token_ids
    from build_llm.infer.quant import prepare_for_decoding
    from build_llm.runtime import get_device

    check_sampling(args.temperature, args.top_k, args.top_p)
    device = get_device(args.device)
    model, tokenizer = load_source(args, device)
    prepare_for_decoding(model, args.dtype)
    if not args.prompt:
        raise UsageError("--prompt is empty; give at least one character")
    idx = text_to_token_ids(args.prompt, tokenizer).to(device)
    ctx = model.cfg.context_length
    generator = torch.Generator(device=device).manual_seed(args.seed)
    tokens = stream(model, idx[:, -ctx:], args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, eos_id=getattr(tokenizer, "eos_id", None), generator=generator,
                    use_cache=not args.no_cache)
    # The prompt, then each token's text as soon as it is generated (stdout is exactly the text).
    for piece in decode_stream(tokenizer, (int(t) for t in tokens), prefix=idx[0].tolist()):
        sys.stdout.write(piece)
        sys.stdout.flush()
    print(flush=True)


# --- import-hf / export-hf -----------------------------------------------------------------------
def add_import_hf(sub) -> None:
    p = sub.add_parser("import-hf", help="Hugging Face GPT-2 directory -> checkpoint",
                       description="Read a local Hugging Face GPT-2 directory (config.json plus model.safetensors "
                                   "or pytorch_model.bin; gpt2 to gpt2-xl) and write a checkpoint of this package. "
                                   "Nothing is downloaded: fetch the directory yourself (see the README).")
    p.add_argument("dir", metavar="DIR", help="the Hugging Face model directory")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--tokenizer", default="gpt2",
                   help="tokenizer stored with the model: gpt2 (default), a tokenizer JSON file, or none")
    p.set_defaults(run=run_import_hf)


def run_import_hf(args: argparse.Namespace) -> None:
    from pathlib import Path

    from build_llm.store.checkpoint import TRAINER_FILE, save_checkpoint
    from build_llm.store.fsio import check_writable_dir
    from build_llm.interop.hf import from_hf
    from build_llm.sizing import count_parameters
    from build_llm.data.tokenizer import get_tokenizer

    out = Path(args.out)
    if out.exists() and out.resolve() == Path(args.dir).resolve():
        raise UsageError(f"--out {args.out!r} is the Hugging Face directory itself; give another directory")
    check_writable_dir(out, "checkpoint", whole=True)  # before the (slow) conversion; save_checkpoint checks again
    if (out / TRAINER_FILE).exists():
        raise UsageError(f"--out {args.out!r} is a training run's checkpoint; replacing it would lose the optimizer "
                         "state and break --resume; give another directory")
    if args.tokenizer in ("gpt2", "none") or Path(args.tokenizer).is_file():
        tokenizer = None if args.tokenizer == "none" else get_tokenizer(args.tokenizer)
    else:
        raise UsageError(f"--tokenizer {args.tokenizer!r} is invalid; expected gpt2, none or a tokenizer JSON file")
    model = from_hf(args.dir)
    if tokenizer is not None and tokenizer.vocab_size > model.cfg.vocab_size:
        raise UsageError(f"--tokenizer {args.tokenizer} has {tokenizer.vocab_size} ids but the model's vocabulary "
                         f"has {model.cfg.vocab_size}; pass --tokenizer with a matching JSON file, or none")
    save_checkpoint(out, model, tokenizer)
    print(f"{out}: {count_parameters(model):,} parameters from {args.dir}")


def add_export_hf(sub) -> None:
    p = sub.add_parser("export-hf", help="checkpoint -> Hugging Face GPT-2 (or Llama) directory",
                       description="Write a checkpoint as a directory that transformers.GPT2LMHeadModel."
                                   "from_pretrained loads (config.json, model.safetensors) with the same logits, "
                                   "plus its tokenizer (GPT-2 or a trained BPE) for AutoTokenizer. A model with "
                                   "Llama's options (--pos-emb rope --norm rmsnorm --mlp swiglu --no-bias "
                                   "--no-qkv-bias) is written for LlamaForCausalLM instead.")
    p.add_argument("--checkpoint", required=True, help="a run directory (its newest checkpoint) or a checkpoint directory")
    p.add_argument("--out", required=True, help="directory to write (a new, empty or earlier export directory)")
    p.add_argument("--no-tokenizer", action="store_true", help="write the model only")
    p.set_defaults(run=run_export_hf)


def run_export_hf(args: argparse.Namespace) -> None:
    from build_llm.store.checkpoint import load_checkpoint
    from build_llm.interop.hf import save_hf
    from build_llm.data.tokenizer import BPETokenizer, GPT2Tokenizer

    ckpt = load_checkpoint(args.checkpoint)
    tokenizer = None if args.no_tokenizer else ckpt.tokenizer
    if tokenizer is not None and not isinstance(tokenizer, (GPT2Tokenizer, BPETokenizer)):
        print(f"build-llm: note: the {type(tokenizer).__name__} has no Hugging Face form; exporting the model only",
              file=sys.stderr)
    written = save_hf(ckpt.model, args.out, tokenizer)
    print(f"{args.out}: {', '.join(written)}")


# --- tokenizer -----------------------------------------------------------------------------------
def add_tokenizer(sub) -> None:
    p = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer, or compare tokenizers on a text",
                       description="Train a byte-level BPE tokenizer (Hugging Face tokenizers) or report how "
                                   "finely tokenizers cut a text.")
    verbs = p.add_subparsers(dest="tokenizer_verb", metavar="{train,stats}", parser_class=Parser)
    verbs.required = True
    t = verbs.add_parser("train", help="train a byte-level BPE on text files",
                         description="Train a byte-level BPE (special token <|endoftext|>) and save it as a "
                                     "Hugging Face tokenizer.json, usable as `train --tokenizer FILE`.")
    t.add_argument("--data", required=True, nargs="+", metavar="PATH",
                   help="UTF-8 text file(s) or folder(s) of them (every non-hidden file, as train --data)")
    t.add_argument("--vocab-size", required=True, type=positive_int, help="number of ids (at least 257)")
    t.add_argument("--min-frequency", type=positive_int, default=2, help="least count of a pair to merge")
    t.add_argument("--out", required=True, metavar="FILE", help="tokenizer JSON file to write")
    t.set_defaults(run=run_tokenizer_train)
    s = verbs.add_parser("stats", help="tokens per character and bytes per token of tokenizers on a text",
                         description="Print, for gpt2, char (the text's own characters) and each --tokenizer, the "
                                     "vocabulary size, tokens, tokens per character and bytes per token on a text.")
    s.add_argument("--data", required=True, metavar="PATH", help="a UTF-8 text file")
    s.add_argument("--tokenizer", action="append", default=[], metavar="FILE",
                   help="a trained tokenizer JSON or checkpoint directory (repeatable)")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    s.set_defaults(run=run_tokenizer_stats)


def run_tokenizer_train(args: argparse.Namespace) -> None:
    from pathlib import Path

    from build_llm.data.corpus import read_pieces, text_files
    from build_llm.store.fsio import atomic_path, check_writable_file
    from build_llm.data.tokenizer import ENDOFTEXT, BPETokenizer

    if args.vocab_size < 257:
        raise UsageError(f"--vocab-size {args.vocab_size} is too small; a byte-level BPE needs at least 257 "
                         f"(256 bytes + {ENDOFTEXT})")
    out = Path(args.out)
    if out.is_dir():
        raise UsageError(f"--out {args.out!r} is a directory; give a file path such as {args.out}/tokenizer.json")
    check_writable_file(out)
    files = [f for path in args.data for f in text_files(path)]
    # One pass over the text first: every file must be UTF-8 text, and not all of them empty.
    if not sum(bool(piece.strip()) for piece in read_pieces(files)):
        raise UsageError("--data is empty; give text to train on")
    try:
        tok = BPETokenizer.train(files, args.vocab_size, min_frequency=args.min_frequency)
    except (ValueError, TypeError, OSError):
        raise
    except Exception as e:  # the tokenizers library raises its own exception type
        raise UsageError(f"training failed on --data: {e}") from e
    with atomic_path(out) as tmp:
        tok.save(tmp)
    print(f"{out}: byte-level BPE, {tok.vocab_size} ids (eos {ENDOFTEXT} = {tok.eos_id})")


def run_tokenizer_stats(args: argparse.Namespace) -> None:
    import json
    from pathlib import Path

    from build_llm.data.corpus import read_text
    from build_llm.data.tokenizer import CharTokenizer, GPT2Tokenizer, load_tokenizer, tokenizer_stats

    text = read_text(args.data)
    tokenizers = [("gpt2", GPT2Tokenizer()), ("char", CharTokenizer.from_text(text))]
    for name in args.tokenizer:
        if not Path(name).exists():
            raise UsageError(f"--tokenizer {name!r} does not exist; give a tokenizer JSON file or a checkpoint directory")
        tokenizers.append((name, load_tokenizer(name)))
    rows = [{"tokenizer": name, "vocab_size": tok.vocab_size, **tokenizer_stats(text, tok)} for name, tok in tokenizers]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    width = max(len(r["tokenizer"]) for r in rows)
    print(f"{'tokenizer':<{width}}  {'vocab':>7}  {'tokens':>10}  {'tokens/char':>11}  {'bytes/token':>11}")
    for r in rows:
        print(f"{r['tokenizer']:<{width}}  {r['vocab_size']:>7}  {r['tokens']:>10}  "
              f"{r['tokens_per_char']:>11.4f}  {r['bytes_per_token']:>11.4f}")


# --- inspect / surprisal / doctor ----------------------------------------------------------------
def _temperatures(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None
    if not values or any(not t > 0 for t in values):
        raise argparse.ArgumentTypeError(f"{text!r} is invalid; expected temperatures > 0, e.g. 0.5,1,2")
    return values


def add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="attention maps, causal mask, next-token table and layer statistics",
                       description="Run the model on a prompt and write, in --out: attention.png (a map per layer and "
                                   "head), mask.txt (positions and the causal mask), next_token.txt and next_token.png "
                                   "(top-k table; bars at several temperatures with the top-k and top-p cut-offs), "
                                   "layers.png (residual-stream norms and attention entropy) and inspect.json (all "
                                   "the numbers). The summary is printed too.")
    model_source(p)
    p.add_argument("--prompt", required=True, help="text to look at (its last --max-tokens tokens are used)")
    p.add_argument("--out", required=True, help="directory for the files: new, empty, or an earlier inspect --out "
                                                "(replaced whole)")
    p.add_argument("--top-k", type=positive_int, default=None, help="top-k cut-off (default: half the vocabulary, at most 10)")
    p.add_argument("--top-p", type=float, default=0.9, help="top-p (nucleus) cut-off, in (0, 1] (default 0.9)")
    p.add_argument("--temperatures", type=_temperatures, default=(0.5, 1.0, 2.0), help="comma-separated, default 0.5,1,2")
    p.add_argument("--max-tokens", type=positive_int, default=48, help="use at most this many prompt tokens (default 48)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of a --preset's random weights")
    p.add_argument("--device", default=DEVICE_DEFAULT, help=DEVICE_HELP)
    p.set_defaults(run=run_inspect)


def run_inspect(args: argparse.Namespace) -> None:
    from pathlib import Path

    from build_llm.infer.generate import check_sampling
    from build_llm.inspect.probe import inspect_model
    from build_llm.runtime import get_device

    check_sampling(1.0, args.top_k, args.top_p)
    if not args.prompt:
        raise UsageError("--prompt is empty; give at least one character")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise UsageError(f"--out {args.out!r} is a file; give a directory")
    model, tokenizer = load_source(args, get_device(args.device))
    title = f"{args.preset or Path(args.checkpoint).name}: {model.cfg.n_layers} layers x {model.cfg.n_heads} heads"
    report = inspect_model(model, tokenizer, args.prompt, args.out, top_k=args.top_k, top_p=args.top_p,
                           temperatures=args.temperatures, max_tokens=args.max_tokens, title=title)
    print(report["text"])
    print()
    for name, path in report["files"].items():
        print(f"wrote {path}")


def add_surprisal(sub) -> None:
    p = sub.add_parser("surprisal", help="colour each token of a text by its surprisal (HTML)",
                       description="Score a text with the model and write an HTML page where each token is coloured by "
                                   "its surprisal -log2 p, with bits per token, bits per character and perplexity. For "
                                   "the ABC source (a character model over its alphabet, or --abc) the page also shows "
                                   "the excess over the exact Bayes-optimal prediction. Texts longer than the context "
                                   "are scored in sliding windows.")
    model_source(p)
    text = p.add_mutually_exclusive_group()
    text.add_argument("--text", help="the text to score")
    text.add_argument("--data", help="a UTF-8 text file to score (its first --max-tokens tokens)")
    p.add_argument("--abc", action="store_true",
                   help="compare with the exact ABC optimum (automatic for an ABC model); with no text, sample ABC text")
    p.add_argument("--out", required=True, help="the HTML file to write")
    p.add_argument("--stride", type=positive_int, default=None,
                   help="window step for long texts (default half the context)")
    p.add_argument("--max-tokens", type=positive_int, default=4000, help="score at most this many tokens (default 4000)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of sampled ABC text and of a --preset")
    p.add_argument("--device", default=DEVICE_DEFAULT, help=DEVICE_HELP)
    p.set_defaults(run=run_surprisal)


def run_surprisal(args: argparse.Namespace) -> None:
    from pathlib import Path

    from build_llm.data.corpus import read_text
    from build_llm.store.fsio import check_writable_file, write_text
    from build_llm.data.markov import ABC, abc_text
    from build_llm.inspect.probe import is_abc_tokenizer, surprisal_html, surprisal_report
    from build_llm.runtime import get_device

    out = Path(args.out)
    if out.is_dir():
        raise UsageError(f"--out {args.out!r} is a directory; give a file name such as surprisal.html")
    check_writable_file(out)
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


def add_doctor(sub) -> None:
    p = sub.add_parser("doctor", help="quick checks for the silent bugs of a GPT (pass/fail)",
                       description="Check a model: tokenizer round-trip on the data, initial loss near ln(vocab) for "
                                   "an untrained model (below it for a trained one), no causal leak, KV cache equal to "
                                   "recomputation, finite gradients, and one batch overfits within --steps. One "
                                   "PASS/FAIL line each; exit code 1 if any check fails.")
    model_source(p)
    p.add_argument("--data", help="a UTF-8 text file for the round-trip and the batch (default: ABC text for an ABC "
                                  "model, otherwise a built-in sample)")
    p.add_argument("--untrained", action="store_true",
                   help="the checkpoint is freshly initialised: require its loss near ln(vocab) (always so for --preset)")
    p.add_argument("--steps", type=positive_int, default=60, help="AdamW steps allowed to overfit one batch (default 60)")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate of the overfit check (default 1e-3)")
    p.add_argument("--seq-len", type=positive_int, default=16, help="tokens per check sequence (default 16)")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--device", default=DEVICE_DEFAULT, help=DEVICE_HELP)
    p.set_defaults(run=run_doctor)


def run_doctor(args: argparse.Namespace) -> int:
    from build_llm.data.corpus import read_text
    from build_llm.inspect.doctor import run_checks
    from build_llm.runtime import get_device

    if not args.lr > 0:
        raise UsageError(f"--lr {args.lr!r} is invalid; expected a number > 0")
    text = read_text(args.data) if args.data else None
    model, tokenizer = load_source(args, get_device(args.device), need_tokenizer=False)
    untrained = not args.checkpoint
    results = []
    for result in run_checks(model, tokenizer, text, untrained=untrained or args.untrained, steps=args.steps,
                             lr=args.lr, seq_len=args.seq_len, seed=args.seed):
        print(result.line(), flush=True)
        results.append(result)
    failed = [r.name for r in results if r.failed]
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed" + (f": {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


# --- train / eval --------------------------------------------------------------------------------
def _float_pair(text: str) -> tuple[float, float]:
    try:
        a, b = (float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not two comma-separated numbers (e.g. 0.9,0.95)") from None
    return a, b


def add_train(sub) -> None:
    p = sub.add_parser("train", help="train a model (no data option: the R notebook's ABC experiment)",
                       description="Train a GPT. With no --data it runs the R notebook's ABC experiment and "
                                   "compares the validation loss with the exact optimum. Writes OUT/metrics.jsonl, "
                                   "OUT/loss.png and OUT/checkpoint/. Works unchanged under torchrun.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data", help="a UTF-8 text file or a folder of them")
    src.add_argument("--abc", action="store_true", help="the ABC Markov text of the R notebook (the default)")
    p.add_argument("--tokenizer", help="char (default), gpt2 or a tokenizer JSON path")
    p.add_argument("--preset", choices=sorted(PRESETS), help="model shape (default: r-abc for ABC, a 6-layer "
                   "384-wide char model with context 256 for --data)")
    m = p.add_argument_group("model (override the preset)")
    m.add_argument("--context-length", type=positive_int)
    m.add_argument("--emb-dim", type=positive_int)
    m.add_argument("--n-layers", type=positive_int)
    m.add_argument("--n-heads", type=positive_int)
    m.add_argument("--drop-rate", type=float)
    m.add_argument("--qkv-bias", action=argparse.BooleanOptionalAction, default=None)
    m.add_argument("--pos-emb", choices=POS_EMBS, help="learned position table or rotary positions (rope)")
    m.add_argument("--norm", choices=NORMS, help="LayerNorm or RMSNorm")
    m.add_argument("--mlp", choices=MLPS, help="feed-forward: gelu (the book), relu2 or swiglu")
    m.add_argument("--ff-dim", type=positive_int, help="feed-forward hidden width (default 4 x emb-dim; swiglu 8/3)")
    m.add_argument("--bias", action=argparse.BooleanOptionalAction, default=None,
                   help="biases in the output projections, feed-forward and LayerNorm")
    m.add_argument("--qk-norm", action=argparse.BooleanOptionalAction, default=None,
                   help="RMS-normalise each head's queries and keys")
    m.add_argument("--tie-weights", action=argparse.BooleanOptionalAction, default=None,
                   help="output head shares the token-embedding matrix")
    o = p.add_argument_group("optimisation")
    o.add_argument("--batch-size", type=positive_int, help="windows per micro-batch, over all processes")
    o.add_argument("--lr", type=float, help="peak learning rate")
    o.add_argument("--weight-decay", type=float)
    o.add_argument("--betas", type=_float_pair, help="AdamW betas, e.g. 0.9,0.95")
    o.add_argument("--warmup-steps", type=non_negative_int)
    o.add_argument("--lr-decay", choices=("cosine", "constant"))
    o.add_argument("--grad-clip", type=float, help="max gradient norm (0: off)")
    o.add_argument("--grad-accum", type=positive_int, help="micro-batches per optimizer step")
    o.add_argument("--steps", type=positive_int, help="total optimizer steps, also when resuming (with --data the "
                   "default is a 5-minute --time-budget on a CPU)")
    o.add_argument("--time-budget", metavar="DURATION", help="train for this long (90s, 5m, 2h), final evaluation, "
                   "checkpoint and samples included: measures this machine's speed, then sizes the model (unless a "
                   "shape flag or --preset is given) and the steps for the lowest validation loss in that time")
    o.add_argument("--eval-every", type=positive_int, help="evaluate, log and checkpoint every N steps")
    o.add_argument("--eval-batches", type=positive_int, help="fixed validation batches per evaluation")
    o.add_argument("--val-ratio", type=float, help="share of the tokens held out for validation")
    o.add_argument("--seed", type=non_negative_int)
    r = p.add_argument_group("runtime")
    r.add_argument("--device", default=DEVICE_DEFAULT, help=DEVICE_HELP + " (under torchrun: each process's local GPU)")
    r.add_argument("--dtype", choices=("float32", "bfloat16"), help="bfloat16: autocast forward and loss")
    r.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    r.add_argument("--fsdp", action="store_true", default=None, help="under torchrun: shard the model (FSDP2)")
    p.add_argument("--init-from", metavar="DIR", help="start from this model's weights, shape and tokenizer (a "
                   "checkpoint, run directory or Hugging Face GPT-2 directory), with a fresh optimizer")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--out", required=True, help="run directory")
    p.set_defaults(run=run_train)


def run_train(args: argparse.Namespace) -> int:
    from build_llm.train.run import run_training
    from build_llm.train.loop import TrainingStopped

    model_keys = ("context_length", "emb_dim", "n_layers", "n_heads", "drop_rate", "qkv_bias", "pos_emb", "norm", "mlp",
                  "ff_dim", "bias", "qk_norm", "tie_weights")
    train_keys = ("batch_size", "lr", "weight_decay", "betas", "warmup_steps", "lr_decay", "grad_clip", "grad_accum",
                  "steps", "eval_every", "eval_batches", "val_ratio", "seed", "device", "dtype", "compile", "fsdp")
    try:
        run = run_training(args.out, data=args.data, tokenizer=args.tokenizer, preset=args.preset,
                           model_options={k: getattr(args, k) for k in model_keys},
                           train_options={k: getattr(args, k) for k in train_keys}, resume=args.resume,
                           init_from=args.init_from, time_budget=args.time_budget,
                           log=lambda line: print(line, file=sys.stderr, flush=True))
    except TrainingStopped as e:
        if e.main_process:
            print(f"build-llm: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    if run.report:
        print(run.report)
    return 0


def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="loss and perplexity of a checkpoint on a text",
                       description="Print JSON with loss, perplexity and tokens of a checkpoint on the "
                                   "non-overlapping windows of a text; for the ABC source (no --data, or a model "
                                   "trained on ABC) also the exact optimum on the same windows and the excess.")
    p.add_argument("--checkpoint", required=True, help="a run directory (its newest checkpoint) or a checkpoint directory")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data", help="a UTF-8 text file or folder (default: a held-out ABC draw)")
    src.add_argument("--abc", action="store_true", help="a held-out draw of the ABC source (the default)")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--device", default=DEVICE_DEFAULT, help=DEVICE_HELP)
    p.set_defaults(run=run_eval)


def run_eval(args: argparse.Namespace) -> None:
    import json

    from build_llm.train.run import evaluate_checkpoint

    print(json.dumps(evaluate_checkpoint(args.checkpoint, args.data, args.batch_size, args.device), indent=2))


# --- bench ---------------------------------------------------------------------------------------
def add_bench(sub) -> None:
    p = sub.add_parser("bench", help="speed against Hugging Face transformers, side by side",
                       description="Measure decoding and training speed of this package against Hugging Face "
                                   "GPT2LMHeadModel of the same shape and the seed's generate_text_simple, in one "
                                   "process, in alternating rounds; report medians, ratios, the machine's bandwidth "
                                   "and matmul ceilings, and peak memory. The full run takes a few minutes.")
    p.add_argument("--quick", action="store_true", help="tiny shapes, a few seconds (a smoke test, not a measurement)")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of the table")
    p.add_argument("--out", help="directory for bench.json, bench.txt and bench.png")
    p.add_argument("--png", help="write the bar chart to this PNG file")
    p.add_argument("--text", help="also time `build-llm train` on this text file (character tokenizer), "
                                  "e.g. Shakespeare; its shape is nanoGPT's shakespeare-char")
    p.add_argument("--checkpoint", help="a trained model: compare its held-out perplexity with float32, bfloat16 "
                                        "and int8 decoding weights (on the last 10%% of --text, or an ABC draw)")
    p.set_defaults(run=run_bench_cli)


def run_bench_cli(args: argparse.Namespace) -> None:
    from pathlib import Path

    from build_llm.bench.run import format_report, plot_report, run_bench, to_json
    from build_llm.data.corpus import read_text
    from build_llm.store.fsio import check_writable_dir, check_writable_file, claim_dir, write_text

    if args.png and not args.png.lower().endswith(".png"):
        raise UsageError(f"--png {args.png!r}: expected a file name ending in .png")
    if args.out:  # every output checked before the bench's minutes of work
        check_writable_dir(args.out, "bench")
    if args.png:
        check_writable_file(args.png, "--png")
    if args.text:  # the whole bench runs before the text is used: check it first
        try:
            read_text(args.text)
        except UsageError as e:
            raise UsageError(f"--text: {e}") from None
    if args.checkpoint:
        from build_llm.store.checkpoint import resolve_checkpoint
        resolve_checkpoint(args.checkpoint)  # a bad path is reported before minutes of timing
    results = run_bench(quick=args.quick, text=args.text, checkpoint=args.checkpoint)
    text, table = to_json(results), format_report(results)
    if args.out:
        out = claim_dir(args.out, "bench")
        write_text(out / "bench.json", text + "\n")
        write_text(out / "bench.txt", table + "\n")
        plot_report(results, out / "bench.png")
    if args.png:
        plot_report(results, args.png)
    print(text if args.json else table)


# --- serve ---------------------------------------------------------------------------------------
def add_serve(sub) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server with a playground page",
                       description="Serve a model over HTTP: /v1/completions, /v1/chat/completions (models with a "
                                   "chat template), /v1/models, /health, and a playground page at /. Requests are "
                                   "decoded together (continuous batching). SIGTERM lets the requests in flight "
                                   "finish, then exits 0.")
    model_source(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int_at_least(1), default=8000)
    p.add_argument("--dtype", choices=("float32", "bfloat16", "int8"), default="float32",
                   help="decoding weights: float32 (default), bfloat16, or int8 (per-channel)")
    p.add_argument("--max-batch", type=positive_int, default=16, help="sequences decoded together (default 16)")
    p.add_argument("--max-queue", type=positive_int, default=64, help="waiting sequences before 503 (default 64)")
    p.add_argument("--max-tokens", type=positive_int, default=None,
                   help="the largest max_tokens a request may ask (default: the model's context length)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/ requests")
    p.add_argument("--name", default=None, help="the model id clients send (default: the preset or directory name)")
    p.add_argument("--shutdown-timeout", type=positive_int, default=30,
                   help="seconds that requests in flight may take to finish after SIGTERM (default 30)")
    p.set_defaults(run=run_serve)


def run_serve(args: argparse.Namespace) -> None:
    from pathlib import Path

    from build_llm.infer.quant import prepare_for_decoding
    from build_llm.serve import Settings, run_server

    if args.port > 65535:
        raise UsageError(f"--port {args.port} is invalid; expected 1 .. 65535")
    if args.api_key is not None and not args.api_key.strip():
        raise UsageError("--api-key is empty; give a key or leave the option out")
    chat_template = None
    if args.checkpoint:  # an instruction fine-tune also answers /v1/chat/completions, in its own template
        from build_llm.infer.chat import load_chat_model
        from build_llm.infer.chat import require_eos
        from build_llm.data.instruct import encode_conversation

        model, tokenizer, note = load_chat_model(args.checkpoint)
        if note is None:
            eos = require_eos(tokenizer)
            chat_template = lambda messages: encode_conversation(  # noqa: E731
                messages, tokenizer, eos, add_generation_prompt=True)[0]
    else:
        model, tokenizer = load_source(args)
    prepare_for_decoding(model, args.dtype)
    name = args.name or args.preset or Path(args.checkpoint).resolve().name
    settings = Settings(model_name=name, dtype=args.dtype, api_key=args.api_key, max_tokens=args.max_tokens,
                        chat_template=chat_template)
    run_server(model, tokenizer, settings, host=args.host, port=args.port, max_batch=args.max_batch,
               max_queue=args.max_queue, shutdown_timeout=args.shutdown_timeout)


# --- fine-tuning ---------------------------------------------------------------------------------
def _lora_targets(text: str) -> tuple[str, ...]:
    from build_llm.lora import TARGETS

    targets = tuple(t.strip() for t in text.split(",") if t.strip())
    bad = [t for t in targets if t not in TARGETS]
    if not targets or bad:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid; expected a comma-separated list of {sorted(TARGETS)}")
    return targets


def add_finetune(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune a checkpoint: classify (a CSV) or instruct (instructions)",
                       description="Fine-tune a checkpoint as the book's chapters 6 and 7 do, fully or with LoRA. "
                                   "Writes OUT/metrics.jsonl and OUT/checkpoint/ (the adapter alone for LoRA); "
                                   "Ctrl-C saves, --resume continues exactly.")
    tasks = p.add_subparsers(dest="task", metavar="TASK", parser_class=Parser)
    tasks.required = True
    c = tasks.add_parser("classify", help="text classification from a CSV file (any number of classes)",
                         description="A new head with one output per label; the last block, final norm and head "
                                     "train (or LoRA adapters and the head); the last token's logits classify. "
                                     "metrics.jsonl holds the held-out accuracy.")
    c.add_argument("--data", required=True, help="CSV file with a header row")
    c.add_argument("--text-column", default="text", help="column holding the text (default: text)")
    c.add_argument("--label-column", default="label", help="column holding the label (default: label)")
    c.add_argument("--trainable", choices=["last-block", "all"],
                   help="what trains besides the new head without LoRA: last-block (the book's: the last block "
                        "and final norm; default) or all (every weight)")
    i = tasks.add_parser("instruct", help="instruction fine-tuning (Alpaca JSON or chat JSONL)",
                         description="The book's Alpaca prompt format (a chat template for messages); the loss "
                                     "covers response tokens and the end token only.")
    i.add_argument("--data", required=True, help="JSON array or JSONL of Alpaca records (instruction, input, "
                   "output) or chat records ({\"messages\": [{\"role\", \"content\"}, ...]})")
    for q in (c, i):
        q.add_argument("--init-from", required=True, help="checkpoint to start from (a run directory or checkpoint)")
        q.add_argument("--val-data", help="held-out file in the same format (default: --val-fraction of --data)")
        q.add_argument("--out", required=True, help="run directory")
        o = q.add_argument_group("optimisation")
        o.add_argument("--epochs", type=positive_int, help="passes over the training data (default 3)")
        o.add_argument("--steps", type=positive_int, help="total optimizer steps (instead of --epochs)")
        o.add_argument("--batch-size", type=positive_int, help="examples per optimizer step (default 8)")
        o.add_argument("--micro-batch-size", type=positive_int, help="examples per forward pass (gradient accumulation)")
        o.add_argument("--lr", type=float, help="learning rate (default 5e-5, the book's)")
        o.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 0.1)")
        o.add_argument("--grad-clip", type=float, help="max gradient norm (default 0: off)")
        o.add_argument("--eval-every", type=positive_int, help="evaluate and checkpoint every N steps (default: each epoch)")
        o.add_argument("--val-fraction", type=float, help="share of --data held out without --val-data (default 0.1)")
        o.add_argument("--max-length", type=positive_int, help="tokens per example (default: the context length)")
        o.add_argument("--seed", type=non_negative_int, help="default 123")
        o.add_argument("--device", help="cpu (default), cuda, mps or auto")
        lo = q.add_argument_group("LoRA (appendix E)")
        lo.add_argument("--lora-rank", type=positive_int, help="train rank-R adapters instead of the weights")
        lo.add_argument("--lora-alpha", type=float, help="adapter scale; the update is multiplied by alpha / rank")
        lo.add_argument("--lora-targets", type=_lora_targets, help="comma-separated: attn, ff, head (default attn,ff)")
        q.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
        q.set_defaults(run=run_finetune)


FINETUNE_KEYS = ("epochs", "steps", "batch_size", "micro_batch_size", "lr", "weight_decay", "grad_clip", "eval_every",
                 "val_fraction", "max_length", "seed", "device", "lora_rank", "lora_alpha", "lora_targets", "trainable")


def run_finetune(args: argparse.Namespace) -> int:
    import json

    from build_llm.train.run import run_finetune as run
    from build_llm.train.loop import TrainingStopped

    try:
        result = run(args.out, args.init_from, args.task, data=args.data, val_data=args.val_data,
                     text_column=getattr(args, "text_column", "text"),
                     label_column=getattr(args, "label_column", "label"),
                     options={k: getattr(args, k, None) for k in FINETUNE_KEYS}, resume=args.resume)
    except TrainingStopped as e:
        print(f"build-llm: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    print(json.dumps(result))
    return 0


def add_classify(sub) -> None:
    p = sub.add_parser("classify", help="label texts with a classification fine-tune",
                       description="Print one JSON object per text: the text, its most probable label and every "
                                   "label's probability.")
    p.add_argument("--checkpoint", required=True, help="the --out of `build-llm finetune classify` (or its merge)")
    p.add_argument("--text", action="append", required=True, help="a text to classify (repeat for several)")
    p.set_defaults(run=run_classify)


def run_classify(args: argparse.Namespace) -> None:
    import json

    from build_llm.infer.classify import classify_texts
    from build_llm.store.finetuned import load_finetuned

    ft = load_finetuned(args.checkpoint)
    if ft.meta["task"] != "classify":
        raise UsageError(f"build-llm classify: --checkpoint {args.checkpoint!r} is an instruction fine-tune, not a "
                         "classifier; use `build-llm chat`")
    for text, result in zip(args.text, classify_texts(ft.model, ft.tokenizer, ft.meta["labels"], args.text,
                                                       ft.meta.get("max_length"))):
        print(json.dumps({"text": text, **result}))


def add_merge_lora(sub) -> None:
    p = sub.add_parser("merge-lora", help="merge a LoRA run's adapter into its base weights",
                       description="Write a plain checkpoint (model.safetensors) whose weights are the base's plus "
                                   "the adapter's update: the same logits, no adapter, readable by generate, chat, "
                                   "classify and export-hf.")
    p.add_argument("--checkpoint", required=True, help="the --out of a `build-llm finetune ... --lora-rank` run")
    p.add_argument("--out", required=True, help="directory to write (new, empty or an earlier merge)")
    p.set_defaults(run=run_merge_lora)


def run_merge_lora(args: argparse.Namespace) -> None:
    from build_llm.store.finetuned import merge_checkpoint

    print(merge_checkpoint(args.checkpoint, args.out))


def add_chat(sub) -> None:
    p = sub.add_parser("chat", help="chat in the terminal with an instruction-tuned checkpoint",
                       description="Interactive chat: replies stream as they are generated; the conversation is "
                                   "kept within the context window (the oldest turns are dropped, with a note). "
                                   "Commands: /reset, /temperature T, /top-k K|off, /help, /quit. With --prompt, "
                                   "print one reply and exit.")
    p.add_argument("--checkpoint", required=True, help="an instruction fine-tune (or any checkpoint with a tokenizer)")
    p.add_argument("--prompt", help="answer this one message on stdout and exit (no interaction)")
    p.add_argument("--system", help="a system message (replaces the Alpaca preamble)")
    p.add_argument("--max-new-tokens", type=positive_int, help="longest reply (default: 256 or half the context)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    p.add_argument("--top-k", type=positive_int, help="sample among the K most likely tokens")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.set_defaults(run=run_chat)


def run_chat(args: argparse.Namespace) -> None:
    from build_llm.infer.chat import run_chat as run

    run(args.checkpoint, prompt=args.prompt, system=args.system, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, top_k=args.top_k, seed=args.seed)


# --- the command ---------------------------------------------------------------------------------
VERBS: list[Callable] = [add_info, add_generate, add_import_hf, add_export_hf, add_tokenizer, add_inspect, add_surprisal, add_doctor, add_train, add_eval, add_bench, add_serve, add_finetune, add_classify, add_merge_lora, add_chat]


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("build-llm")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="build-llm", description="Build, train, inspect and sample GPT models from scratch.")
    parser.add_argument("--version", action="version", version=f"build-llm {package_version()}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=Parser)
    sub.required = True
    for add in VERBS:
        add(sub)
    return parser


def os_error_text(e: OSError) -> str:
    """An OSError as its own reason and the path(s) it concerns, e.g. "permission denied: 'x/y'"."""
    reason = e.strerror or str(e)
    names = [os.fsdecode(n) for n in (e.filename, e.filename2) if n is not None]
    if not names:
        return reason
    return f"{reason[:1].lower()}{reason[1:]}: {' -> '.join(repr(n) for n in names)}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; bad input is one line on stderr and exit code 2.

    Set BUILD_LLM_DEBUG=1 to see the traceback of an error instead.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:  # bare `build-llm`: the help, and success (nothing was asked that failed)
        build_parser().print_help()
        return 0
    try:
        args = build_parser().parse_args(argv)
        status = args.run(args)  # a verb may return an exit code (doctor: 1 when a check fails)
    except (UsageError, OSError) as e:  # anything else is a bug: its traceback shows
        if os.environ.get("BUILD_LLM_DEBUG"):
            raise
        message = " ".join((os_error_text(e) if isinstance(e, OSError) else str(e)).split())  # one line
        print(message if message.startswith("build-llm") else f"build-llm: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("build-llm: interrupted", file=sys.stderr)
        return 130
    return status if type(status) is int else 0  # not a bool or a result object


if __name__ == "__main__":
    sys.exit(main())

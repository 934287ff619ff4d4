"""The `build-llm` command: a thin map from verbs to the package's functions.

stdout carries only each verb's result; progress goes to stderr. Bad input is one line on stderr
and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence

from .config import PRESETS


class UsageError(Exception):
    """Bad input from the command line: reported as one line, exit code 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not argparse's usage block
        raise UsageError(f"{self.prog}: error: {message} (see --help)")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is invalid; expected an integer >= 1")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is invalid; expected an integer >= 0")
    return value


def model_source(p: argparse.ArgumentParser, required: bool = True) -> None:
    group = p.add_mutually_exclusive_group(required=required)
    group.add_argument("--preset", choices=sorted(PRESETS), help="a model preset (random weights)")
    group.add_argument("--checkpoint", help="a run directory (its newest checkpoint) or a checkpoint directory")


def load_source(args: argparse.Namespace, device: str = "cpu"):
    """(model, tokenizer) from --checkpoint, or a seeded random model from --preset."""
    import torch

    from .checkpoint import load_checkpoint
    from .config import GPTConfig
    from .gpt import GPTModel
    from .runtime import set_seed
    from .tokenizer import get_tokenizer

    if args.checkpoint:
        ckpt = load_checkpoint(args.checkpoint, device)
        if ckpt.tokenizer is None:
            raise UsageError(f"checkpoint {str(ckpt.path)!r} has no tokenizer.json; it cannot encode a prompt")
        return ckpt.model, ckpt.tokenizer
    set_seed(getattr(args, "seed", None) or 0)
    cfg = GPTConfig.from_preset(args.preset)
    with torch.device(device):
        model = GPTModel(cfg).eval()
    tokenizer = get_tokenizer("gpt2") if cfg.vocab_size == 50257 else None
    if tokenizer is None:
        raise UsageError(f"preset {args.preset!r} has a {cfg.vocab_size}-token vocabulary with no tokenizer; "
                         "use --checkpoint of a trained model")
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

    from .checkpoint import load_model
    from .config import GPTConfig
    from .gpt import GPTModel
    from .probe import count_parameters, format_parameter_table, model_size_mb

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
                       description="Print the prompt and its continuation (only that, on stdout).")
    model_source(p)
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=non_negative_int, default=50)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    p.add_argument("--top-k", type=positive_int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--device", default="cpu", help="cpu, cuda, mps or auto")
    p.add_argument("--no-cache", action="store_true", help="recompute the context every step")
    p.set_defaults(run=run_generate)


def run_generate(args: argparse.Namespace) -> None:
    import torch

    from .generate import check_sampling, stream, text_to_token_ids
    from .runtime import get_device

    check_sampling(args.temperature, args.top_k, args.top_p)
    device = get_device(args.device)
    model, tokenizer = load_source(args, device)
    if not args.prompt:
        raise UsageError("--prompt is empty; give at least one character")
    idx = text_to_token_ids(args.prompt, tokenizer).to(device)
    ctx = model.cfg.context_length
    generator = torch.Generator(device=device).manual_seed(args.seed)
    # Stream the continuation as it comes; decoding the whole text at the end avoids splitting a
    # multi-byte character across tokens.
    ids = idx[0].tolist()
    for next_id in stream(model, idx[:, -ctx:], args.max_new_tokens, temperature=args.temperature,
                          top_k=args.top_k, top_p=args.top_p, eos_id=getattr(tokenizer, "eos_id", None),
                          generator=generator, use_cache=not args.no_cache):
        ids.append(int(next_id))
    print(tokenizer.decode(ids))


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
    import json
    from pathlib import Path

    from .checkpoint import save_checkpoint
    from .config import GPTConfig
    from .hf import from_hf
    from .probe import count_parameters
    from .tokenizer import get_tokenizer

    out = Path(args.out)
    if out.exists() and out.resolve() == Path(args.dir).resolve():
        raise UsageError(f"--out {args.out!r} is the Hugging Face directory itself; give another directory")
    if out.is_dir() and any(out.iterdir()):  # only a checkpoint of ours may be replaced
        try:
            GPTConfig.from_dict(json.loads((out / "config.json").read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError):
            raise UsageError(f"--out {args.out!r} is a non-empty directory that is not a build-llm checkpoint "
                             "(it would be replaced); give a new or empty directory") from None
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
    p = sub.add_parser("export-hf", help="checkpoint -> Hugging Face GPT-2 directory",
                       description="Write a checkpoint as a directory that transformers.GPT2LMHeadModel."
                                   "from_pretrained loads (config.json, model.safetensors) with the same logits, "
                                   "plus its tokenizer (GPT-2 or a trained BPE) for AutoTokenizer.")
    p.add_argument("--checkpoint", required=True, help="a run directory (its newest checkpoint) or a checkpoint directory")
    p.add_argument("--out", required=True, help="directory to write (a new, empty or earlier export directory)")
    p.add_argument("--no-tokenizer", action="store_true", help="write the model only")
    p.set_defaults(run=run_export_hf)


def run_export_hf(args: argparse.Namespace) -> None:
    from .checkpoint import load_checkpoint
    from .hf import save_hf
    from .tokenizer import BPETokenizer, GPT2Tokenizer

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
                   help="UTF-8 text file(s), or a directory of .txt files")
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


def _text_files(paths: Sequence[str]) -> list[str]:
    from pathlib import Path

    files: list[str] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(str(f) for f in path.rglob("*.txt") if f.is_file())
            if not found:
                raise UsageError(f"--data {str(path)!r} is a directory with no .txt files")
            files += found
        elif path.is_file():
            files.append(str(path))
        else:
            raise UsageError(f"--data {str(path)!r} does not exist; give UTF-8 text files or a directory of .txt files")
    for f in files:
        with open(f, "rb") as handle:
            head = handle.read(1 << 20)
        try:
            head.decode("utf-8")
        except UnicodeDecodeError as e:
            if e.start < len(head) - 4:  # not merely a character cut at the 1 MiB boundary
                raise UsageError(f"--data {f!r} is not UTF-8 text (byte {e.start}); convert it to UTF-8") from None
    if not any(os.path.getsize(f) for f in files):
        raise UsageError("--data is empty; give text to train on")
    return files


def run_tokenizer_train(args: argparse.Namespace) -> None:
    import tempfile
    from pathlib import Path

    from .tokenizer import ENDOFTEXT, BPETokenizer

    if args.vocab_size < 257:
        raise UsageError(f"--vocab-size {args.vocab_size} is too small; a byte-level BPE needs at least 257 "
                         f"(256 bytes + {ENDOFTEXT})")
    out = Path(args.out)
    if out.is_dir():
        raise UsageError(f"--out {args.out!r} is a directory; give a file path such as {args.out}/tokenizer.json")
    files = _text_files(args.data)
    try:
        tok = BPETokenizer.train(files, args.vocab_size, min_frequency=args.min_frequency)
    except (ValueError, TypeError, OSError):
        raise
    except Exception as e:  # the tokenizers library raises its own exception type
        raise ValueError(f"training failed on --data: {e}") from e
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    os.close(fd)
    try:
        tok.save(tmp)
        os.replace(tmp, out)
    except BaseException:
        os.unlink(tmp)
        raise
    print(f"{out}: byte-level BPE, {tok.vocab_size} ids (eos {ENDOFTEXT} = {tok.eos_id})")


def run_tokenizer_stats(args: argparse.Namespace) -> None:
    import json
    from pathlib import Path

    from .tokenizer import CharTokenizer, GPT2Tokenizer, load_tokenizer, tokenizer_stats

    path = Path(args.data)
    if not path.is_file():
        raise UsageError(f"--data {args.data!r} is not a file; give a UTF-8 text file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"--data {args.data!r} is not UTF-8 text (byte {e.start}); convert it to UTF-8") from None
    if not text:
        raise UsageError(f"--data {args.data!r} is empty")
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


# --- the command ---------------------------------------------------------------------------------
VERBS: list[Callable] = [add_info, add_generate, add_import_hf, add_export_hf, add_tokenizer]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="build-llm", description="Build, train, inspect and sample GPT models from scratch.")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=Parser)
    sub.required = True
    for add in VERBS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; bad input is one line on stderr and exit code 2.

    Set BUILD_LLM_DEBUG=1 to see the traceback of an error instead.
    """
    try:
        args = build_parser().parse_args(argv)
        args.run(args)
    except (UsageError, ValueError, TypeError, OSError) as e:
        if os.environ.get("BUILD_LLM_DEBUG"):
            raise
        message = " ".join(str(e).split())  # one line, whatever the exception's text
        print(message if message.startswith("build-llm") else f"build-llm: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("build-llm: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

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


# --- the command ---------------------------------------------------------------------------------
VERBS: list[Callable] = [add_info, add_generate]


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

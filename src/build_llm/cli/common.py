"""What the verbs share: the parser (one-line errors, defaults in --help), how a verb is declared
(`verb`), integer types, the flags several verbs take (--checkpoint, --out, --device, --seed), the
--preset/--checkpoint pair and its loader, and the flags made from a config dataclass."""

from __future__ import annotations

import argparse
import copy
import functools
import inspect
from typing import Any, Callable, Mapping

import torch

from build_llm.config import PRESETS, GPTConfig
from build_llm.data.markov import ABC
from build_llm.data.tokenizer import GPT2_VOCAB_SIZE, PAD, CharTokenizer, get_tokenizer
from build_llm.errors import UsageError
from build_llm.gpt import GPTModel
from build_llm.infer.load import load_decoder
from build_llm.infer.quant import INT4_GROUP, check_decode_dtype, prepare_for_decoding
from build_llm.runtime import check_fits, set_seed
from build_llm.settings import DEVICE_HELP, add_arguments, flags
from build_llm.sizing import decoding_memory, model_memory

# One default for every verb's --device: the best device there is (cuda, then mps, then cpu).
DEVICE_DEFAULT = "auto"
CHECKPOINT_HELP = "a run directory (its newest checkpoint) or a checkpoint directory"


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


# --- declaring a verb ----------------------------------------------------------------------------
def verb(name: str, run: Callable[[argparse.Namespace], int | None] | None = None) -> Callable:
    """Declare the verb `name` on the function that adds its own arguments to its parser:

        @verb("eval", run_eval)
        def add_eval(p): ...    # add_eval(sub) adds `build-llm eval` to the verbs sub (add_verbs)

    The function's docstring says what the verb does: its first paragraph is the one-line help in
    the list of verbs, the rest the description its --help shows. run(args) runs the verb; a verb
    with verbs of its own (tokenizer, finetune) has none: its function adds them."""
    def declare(own_arguments: Callable[[argparse.ArgumentParser], None]) -> Callable:
        help, _, description = inspect.cleandoc(own_arguments.__doc__).partition("\n\n")

        @functools.wraps(own_arguments)
        def add(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
            p = sub.add_parser(name, help=help, description=description)
            own_arguments(p)
            if run is not None:
                p.set_defaults(run=run)
            return p
        return add
    return declare


def add_verbs(p: argparse.ArgumentParser, dest: str, metavar: str) -> argparse._SubParsersAction:
    """The place for p's verbs, one of which must be given; args.<dest> names it."""
    sub = p.add_subparsers(dest=dest, metavar=metavar, parser_class=Parser)
    sub.required = True
    return sub


# --- arguments -----------------------------------------------------------------------------------
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


def add_checkpoint(p: argparse.ArgumentParser, help: str = CHECKPOINT_HELP) -> None:
    p.add_argument("--checkpoint", required=True, help=help)


def add_out(p: argparse.ArgumentParser, help: str, **kwargs: Any) -> None:
    p.add_argument("--out", required=True, help=help, **kwargs)


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=DEVICE_DEFAULT, help=DEVICE_HELP)


def add_seed(p: argparse.ArgumentParser, help: str | None = None) -> None:
    p.add_argument("--seed", type=non_negative_int, default=0, help=help)


# The sampling checks (infer/generate) name their arguments ("top_p=2.0 is invalid"); a verb with these flags
# names the flags instead (cli.error_text).
SAMPLING_FLAGS = {"temperature": "--temperature", "top_k": "--top-k", "top_p": "--top-p"}


def add_settings(p: argparse.ArgumentParser, cls: type, title: str, *, skip: tuple[str, ...] = (),
                 variants: Mapping[str, Any] | None = None, default_text: str | None = None) -> dict[str, Any]:
    """A flag for each field of a config dataclass (settings.add_arguments), --device defaulting to
    DEVICE_DEFAULT as on every verb. The verb remembers field -> flag, so that an error naming a
    field names the flag instead (see main). Returns the argument groups by title."""
    groups = add_arguments(p, cls, title, skip=skip, variants=variants, default_text=default_text,
                           defaults={"device": DEVICE_DEFAULT})
    p.set_defaults(setting_flags={**(p.get_default("setting_flags") or {}), **flags(cls, skip)})
    return groups


def model_source(p: argparse.ArgumentParser, required: bool = True) -> None:
    group = p.add_mutually_exclusive_group(required=required)
    group.add_argument("--preset", choices=sorted(PRESETS), help="a model preset (random weights)")
    group.add_argument("--checkpoint", help=CHECKPOINT_HELP)


def load_source(args: argparse.Namespace, device: str = "cpu", need_tokenizer: bool = True, dtype: str | None = None):
    """(model, tokenizer) from --checkpoint (a LoRA run's adapter merged in memory), or a seeded random model
    from --preset. A preset gets the tokenizer its vocabulary implies (GPT-2's, or the ABC characters for
    r-abc); without one, the tokenizer is None unless `need_tokenizer`. With `dtype` (a decoding dtype) the
    model is ready for decoding in it; a checkpoint is read part by part, each converted before the next."""
    if args.checkpoint:
        model, tokenizer = load_decoder(args.checkpoint, device, dtype)
        if tokenizer is None and need_tokenizer:
            raise UsageError(f"checkpoint {str(args.checkpoint)!r} has no tokenizer.json; it cannot encode text")
        return model, tokenizer
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
    # Random weights are drawn in float32 for the whole model (the seed's draws, in order), then converted.
    converted = 0 if dtype in (None, "float32") else decoding_memory(cfg, check_decode_dtype(dtype), INT4_GROUP)
    check_fits(model_memory(cfg) + converted, f"--preset {args.preset}", device)
    with torch.device(device):
        model = GPTModel(cfg).eval()
    return (model if dtype is None else prepare_for_decoding(model, dtype)), tokenizer

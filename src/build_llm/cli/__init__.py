"""The `build-llm` command: a thin map from verbs to the package's functions.

stdout carries only each verb's result; progress goes to stderr. Bad input is one line on stderr
and exit code 2, never a traceback. The verbs live by area: model (info, generate, import-hf,
export-hf, tokenizer), inspect (inspect, surprisal, doctor), train (train, eval, finetune,
merge-lora), serve (serve, chat, classify) and bench; common holds what they share, `verb` among
it: a verb is declared by its name, its docstring (help and description) and its own arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from importlib.metadata import PackageNotFoundError, version
from typing import Callable, Sequence

from build_llm.cli.bench import add_bench
from build_llm.cli.common import DEVICE_DEFAULT, Parser, add_verbs
from build_llm.cli.inspect import add_doctor, add_inspect, add_surprisal
from build_llm.cli.model import add_export_hf, add_generate, add_import_hf, add_info, add_tokenizer
from build_llm.cli.serve import add_chat, add_classify, add_serve
from build_llm.cli.train import add_eval, add_finetune, add_merge_lora, add_train
from build_llm.errors import UsageError
from build_llm.settings import DEVICE_HELP, SettingError

__all__ = ["main", "build_parser", "DEVICE_DEFAULT", "DEVICE_HELP"]

# --- the command ---------------------------------------------------------------------------------
# The verbs in the order --help lists them; each is declared in its area's module with `verb`.
VERBS: list[Callable] = [add_info, add_generate, add_import_hf, add_export_hf, add_tokenizer, add_inspect,
                         add_surprisal, add_doctor, add_train, add_eval, add_bench, add_serve, add_finetune,
                         add_classify, add_merge_lora, add_chat]


def package_version() -> str:
    try:
        return version("build-llm")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="build-llm", description="Build, train, inspect and sample GPT models from scratch.")
    parser.add_argument("--version", action="version", version=f"build-llm {package_version()}")
    sub = add_verbs(parser, "verb", "VERB")
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


def error_text(e: UsageError | OSError, flags: dict[str, str]) -> str:
    """What went wrong, for the user: a config field named as this verb's flag (lr= -> --lr=)."""
    if isinstance(e, OSError):
        return os_error_text(e)
    if isinstance(e, SettingError):
        return e.with_flags(flags)
    name = str(e).split("=", 1)[0]  # a library check's "top_p=2.0 is invalid ..." (infer/generate's sampling rules)
    return flags[name] + str(e)[len(name):] if name in flags else str(e)


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM raises KeyboardInterrupt while a verb runs: it unwinds as Ctrl-C does (temporary
    files removed, exit code 130) instead of killing the process where it stands."""
    def terminated(signum, frame) -> None:
        raise KeyboardInterrupt

    install = threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    old = signal.signal(signal.SIGTERM, terminated) if install else None
    try:
        yield
    finally:
        if install:
            signal.signal(signal.SIGTERM, old)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; bad input is one line on stderr and exit code 2.

    SIGTERM stops a verb as Ctrl-C does (training installs its own handler: it saves first).
    Set BUILD_LLM_DEBUG=1 to see the traceback of an error instead.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:  # bare `build-llm`: the help, and success (nothing was asked that failed)
        build_parser().print_help()
        return 0
    args = None
    try:
        args = build_parser().parse_args(argv)
        with _sigterm_as_interrupt():
            status = args.run(args)  # a verb may return an exit code (doctor: 1 when a check fails)
            sys.stdout.flush()  # a reader that stopped shows here, not at the interpreter's exit
    except (UsageError, OSError) as e:  # anything else is a bug: its traceback shows
        if isinstance(e, BrokenPipeError):  # stdout's reader stopped reading (`build-llm generate | head`)
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's flush cannot fail again
            return 141  # 128 + SIGPIPE, as a program the signal ends; the reader wanted no more: no error line
        if os.environ.get("BUILD_LLM_DEBUG"):
            raise
        message = " ".join(error_text(e, getattr(args, "setting_flags", {})).split())  # one line
        print(message if message.startswith("build-llm") else f"build-llm: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("build-llm: interrupted", file=sys.stderr)
        return 130
    return status if type(status) is int else 0  # not a bool or a result object


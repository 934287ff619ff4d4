"""Verbs that answer with a trained model: serve (an OpenAI-compatible HTTP server), chat (in the
terminal) and classify (labels from a classification fine-tune)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from build_llm.cli.common import (SAMPLING_FLAGS, add_checkpoint, add_seed, int_at_least, load_source, model_source,
                                  positive_int, verb)
from build_llm.data.chat_template import chat_format
from build_llm.errors import UsageError
from build_llm.infer.chat import load_chat_model
from build_llm.infer.chat import run_chat as chat
from build_llm.infer.classify import classify_texts
from build_llm.infer.quant import DECODE_DTYPES
from build_llm.runtime import available_memory
from build_llm.serve import Settings, run_server
from build_llm.sizing import kv_cache_bytes
from build_llm.store.finetuned import load_finetuned

API_KEY_ENV = "BUILD_LLM_API_KEY"
MAX_BATCH = 1024  # rows decoded together; past this a step is far too slow to serve anyone


def batch_size(text: str) -> int:
    """An argparse type for --max-batch: an integer in 1 .. MAX_BATCH."""
    value = int_at_least(1)(text)
    if value > MAX_BATCH:
        raise argparse.ArgumentTypeError(f"{value} is invalid; expected an integer in 1 .. {MAX_BATCH}")
    return value


def host_name_arg(text: str) -> str:
    """An argparse type for --allow-host: a host name or address, with no scheme, path or spaces."""
    if not text.strip() or any(c in text for c in "/ \t\n@"):
        raise argparse.ArgumentTypeError(f"{text!r} is invalid; expected a host name such as my.box or 192.168.1.5")
    return text.strip()


def check_cache_fits(model, max_batch: int) -> None:
    """Refuse a --max-batch whose KV cache (allocated whole when the server starts) the memory cannot hold."""
    cfg = model.cfg
    need, free = kv_cache_bytes(cfg, max_batch, model.cache_dtype()), available_memory()
    if free is not None and need > free:
        raise UsageError(f"--max-batch {max_batch} needs {need / 2**30:,.1f} GiB for its KV cache ({max_batch} rows of "
                         f"{cfg.context_length} positions) but {free / 2**30:,.1f} GiB of memory is available; "
                         f"choose --max-batch {max(1, max_batch * free // need // 2)} or less")


def api_key(flag: str | None) -> str | None:
    """The key clients must send: --api-key, else $BUILD_LLM_API_KEY (which, unlike a command line, other users
    of the machine cannot read in the process list), else none. A key no client can send is refused: an HTTP
    header carries printable ASCII, and its ends are trimmed."""
    given, where = (flag, "--api-key") if flag is not None else (os.environ.get(API_KEY_ENV), f"${API_KEY_ENV}")
    if given is None:
        return None
    if not given.strip():
        raise UsageError(f"{where} is empty; give a key or leave it unset")
    bad = next((c for c in given if not " " <= c <= "~"), None)
    if bad is not None or given != given.strip():
        what = f"the character {bad!r}" if bad is not None else "a space at an end"
        raise UsageError(f"{where} holds {what}, which an 'Authorization' header cannot carry; give a key of "
                         "printable ASCII (letters, digits, punctuation) with no spaces at its ends")
    return given


def run_serve(args: argparse.Namespace) -> None:
    if args.port > 65535:
        raise UsageError(f"--port {args.port} is invalid; expected 1 .. 65535")
    key = api_key(args.api_key)
    chat_template, stop_ids = None, ()
    if args.checkpoint:  # an instruction fine-tune or a chat model also answers /v1/chat/completions
        model, tokenizer, note = load_chat_model(args.checkpoint, args.dtype)
        if note is None:
            fmt = chat_format(tokenizer)  # its chat template, or the package's own format: messages -> prompt ids
            chat_template = fmt.prompt
            stop_ids = fmt.stop_ids
    else:
        model, tokenizer = load_source(args, dtype=args.dtype)
    check_cache_fits(model, args.max_batch)
    name = args.name or args.preset or Path(args.checkpoint).resolve().name
    settings = Settings(model_name=name, dtype=args.dtype, api_key=key, max_tokens=args.max_tokens,
                        chat_template=chat_template, chat_stop_ids=stop_ids)
    run_server(model, tokenizer, settings, host=args.host, port=args.port, max_batch=args.max_batch,
               max_queue=args.max_queue, shutdown_timeout=args.shutdown_timeout, allow_hosts=args.allow_host or ())


@verb("serve", run_serve)
def add_serve(p: argparse.ArgumentParser) -> None:
    """an OpenAI-compatible HTTP server with a playground page

    Serve a model over HTTP: /v1/completions, /v1/chat/completions (models with a chat template),
    /v1/models, /health, and a playground page at /. Requests are decoded together (continuous
    batching). SIGTERM lets the requests in flight finish, then exits 0."""
    model_source(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int_at_least(1), default=8000)
    p.add_argument("--dtype", choices=DECODE_DTYPES, default="float32",
                   help="decoding weights: float32 (default), bfloat16, int8 (per-channel) or int4 (a scale per group "
                        "of 64 weights)")
    p.add_argument("--allow-host", action="append", type=host_name_arg, metavar="NAME",
                   help="also answer requests sent to this host name (repeatable). Bound to a loopback address the "
                        "server answers only localhost, 127.0.0.1 and [::1] (a web page cannot reach it under a name "
                        "of its own: DNS rebinding); bound elsewhere it answers any name unless this is given")
    p.add_argument("--max-batch", type=batch_size, default=16,
                   help=f"sequences decoded together (default 16, at most {MAX_BATCH})")
    p.add_argument("--max-queue", type=positive_int, default=64, help="waiting sequences before 503 (default 64)")
    p.add_argument("--max-tokens", type=positive_int, default=None,
                   help="the largest max_tokens a request may ask (default: the model's context length). A "
                        "request without max_tokens gets what the context leaves after its prompt, at most this")
    p.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on /v1/ requests. A command line is visible to every "
                        f"user of the machine (ps): ${API_KEY_ENV} gives the key without showing it, and is used "
                        f"when this is not given")
    p.add_argument("--name", default=None, help="the model id clients send (default: the preset or directory name)")
    p.add_argument("--shutdown-timeout", type=positive_int, default=30,
                   help="seconds that requests in flight may take to finish after SIGTERM (default 30)")


def run_chat(args: argparse.Namespace) -> None:
    chat(args.checkpoint, prompt=args.prompt, system=args.system, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, top_k=args.top_k, seed=args.seed)


@verb("chat", run_chat)
def add_chat(p: argparse.ArgumentParser) -> None:
    """chat in the terminal with an instruction-tuned checkpoint

    Interactive chat: replies stream as they are generated; the conversation is kept within the context
    window (the oldest turns are dropped, with a note). Commands: /reset, /temperature T, /top-k K|off,
    /help, /quit. With --prompt, print one reply and exit."""
    p.set_defaults(setting_flags=SAMPLING_FLAGS)
    add_checkpoint(p, "an instruction fine-tune (or any checkpoint with a tokenizer)")
    p.add_argument("--prompt", help="answer this one message on stdout and exit (no interaction)")
    p.add_argument("--system", help="a system message (in the package's own format it replaces the Alpaca preamble)")
    p.add_argument("--max-new-tokens", type=positive_int,
                   help="longest reply (default: what the context window leaves after the conversation; old turns "
                        "are dropped to keep 256 tokens or half the context for it)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    p.add_argument("--top-k", type=positive_int, help="sample among the K most likely tokens")
    add_seed(p)


def run_classify(args: argparse.Namespace) -> None:
    ft = load_finetuned(args.checkpoint)
    if ft.meta["task"] != "classify":
        raise UsageError(f"--checkpoint {args.checkpoint!r} is an instruction fine-tune, not a "
                         "classifier; use `build-llm chat`")
    for text, result in zip(args.text, classify_texts(ft.model, ft.tokenizer, ft.meta["labels"], args.text,
                                                       ft.meta.get("max_length"))):
        print(json.dumps({"text": text, **result}))


@verb("classify", run_classify)
def add_classify(p: argparse.ArgumentParser) -> None:
    """label texts with a classification fine-tune

    Print one JSON object per text: the text, its most probable label and every label's probability."""
    add_checkpoint(p, "the --out of `build-llm finetune classify` (or its merge)")
    p.add_argument("--text", action="append", required=True, help="a text to classify (repeat for several)")

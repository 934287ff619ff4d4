"""Verbs about a model itself: info, generate, import-hf, export-hf, and tokenizer train/stats."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from build_llm.cli.common import (SAMPLING_FLAGS, add_checkpoint, add_device, add_out, add_seed, add_verbs,
                                  load_source, model_source, non_negative_int, positive_int, verb)
from build_llm.config import GPTConfig
from build_llm.data.corpus import read_showing_progress, read_text, small_pieces, text_files
from build_llm.data.chat_template import template_source
from build_llm.data.instruct import ALPACA_CHAT_TEMPLATE
from build_llm.data.tokenizer import (ENDOFTEXT, MAX_BPE_VOCAB, BPETokenizer, CharTokenizer, GPT2Tokenizer, bpe_training_estimate,
                                      get_tokenizer, load_tokenizer, tokenizer_stats)
from build_llm.errors import UsageError
from build_llm.gpt import GPTModel
from build_llm.infer.generate import check_sampling, decodable_ids, decode_stream, stream, text_to_token_ids
from build_llm.infer.quant import DECODE_DTYPES
from build_llm.interop.hf import from_hf, save_hf
from build_llm.runtime import get_device
from build_llm.sizing import active_parameters, count_parameters, format_parameter_table, model_size_mb
from build_llm.store.checkpoint import TOKENIZER_FILE, TRAINER_FILE, load_checkpoint, load_model, save_checkpoint
from build_llm.store.finetuned import load_finetuned, load_language_model, read_finetune_meta, resolve_finetuned
from build_llm.store.fsio import check_not_input, check_overwrite, check_writable_dir, check_writable_file, read_json


def info_model(checkpoint: str) -> torch.nn.Module:
    """The model `info` tabulates: a fine-tune's as it was trained (a classifier's head, a LoRA run's
    adapters beside its base weights), or a plain checkpoint's."""
    try:
        path = resolve_finetuned(checkpoint)
    except UsageError:  # no finetune.json: a plain checkpoint
        return load_model(checkpoint)
    return load_finetuned(path).model


def run_info(args: argparse.Namespace) -> None:
    if args.checkpoint:
        model = info_model(args.checkpoint)
    else:
        with torch.device("meta"):  # shapes only: no memory, no initialisation
            model = GPTModel(GPTConfig.from_preset(args.preset or "book-124m"))
    print(format_parameter_table(model))
    print(f"Total parameters: {count_parameters(model):,}")
    if model.cfg.n_experts:
        print(f"Active parameters per token: {active_parameters(model.cfg):,} ({model.cfg.n_experts_per_token} of "
              f"{model.cfg.n_experts} experts per layer)")
    print(f"Size: {model_size_mb(model, torch.float32):.2f} MB (fp32), {model_size_mb(model, torch.bfloat16):.2f} MB (bf16)")


@verb("info", run_info)
def add_info(p: argparse.ArgumentParser) -> None:
    """parameter table, total and size of a model

    Print the parameter table (name, shape, count), the total and the size in MB at fp32 and bf16 of
    a preset or a checkpoint."""
    model_source(p, required=False)


# nanoGPT's sample.py samples at temperature 0.8 from the 200 most likely tokens: a little sharper than
# the model's own distribution, with the long tail of unlikely tokens cut. Greedy decoding instead
# repeats itself ("the street the street ...") on small models.
SAMPLE_TEMPERATURE, SAMPLE_TOP_K = 0.8, 200


def start_ids(tokenizer: Any, prompt: str | None) -> tuple[list[int], list[int]]:
    """The ids generation starts from, and those of them to print: the prompt's (printed without the
    start token a tokenizer puts first), or with no prompt (nothing printed) that start token (bos,
    as transformers' generate starts), else the end-of-text token (what a new document follows), else a
    newline (nanoGPT's start), else id 0."""
    if prompt:
        ids = text_to_token_ids(prompt, tokenizer)[0].tolist()
        return ids, ids[len(ids) - len(tokenizer.encode(prompt)):]
    start = tokenizer.encode_prompt("") if hasattr(tokenizer, "encode_prompt") else []
    eos = getattr(tokenizer, "eos_id", None)
    if start or eos is not None:
        return start or [eos], []
    try:
        newline = tokenizer.encode("\n")
    except ValueError:  # a character tokenizer without it
        newline = []
    return (newline if len(newline) == 1 else [0]), []


def run_generate(args: argparse.Namespace) -> None:
    temperature = 0.0 if args.greedy else args.temperature
    check_sampling(temperature, args.top_k, args.top_p)
    if args.prompt == "":
        raise UsageError("--prompt is empty; give at least one character, or leave --prompt out to start a new text")
    device = get_device(args.device)
    model, tokenizer = load_source(args, device, dtype=args.dtype)
    ids, shown = start_ids(tokenizer, args.prompt)
    idx = torch.tensor([ids[-model.cfg.context_length:]], device=device)
    generator = torch.Generator(device=device).manual_seed(args.seed)  # once: the samples follow one another
    for n in range(args.num_samples):
        if args.num_samples > 1:
            print(f"--- sample {n + 1} of {args.num_samples} ---", flush=True)
        tokens = stream(model, idx, args.max_new_tokens, temperature=temperature, top_k=args.top_k,
                        top_p=args.top_p, eos_id=getattr(tokenizer, "eos_id", None), generator=generator,
                        use_cache=not args.no_cache, vocab_size=decodable_ids(model, tokenizer))
        # The prompt, then each token's text as soon as it is generated (stdout is exactly the text).
        for piece in decode_stream(tokenizer, (int(t) for t in tokens), prefix=shown):
            sys.stdout.write(piece)
            sys.stdout.flush()
        print(flush=True)  # the text ends with a newline, so the shell prompt starts on a line of its own


@verb("generate", run_generate)
def add_generate(p: argparse.ArgumentParser) -> None:
    """sample text, or continue a prompt

    Print the prompt and its continuation (only that, on stdout), each token as soon as it is generated,
    then a newline. Sampling by default, as nanoGPT's sample.py: temperature 0.8 from the 200 most likely
    tokens, seeded (the same --seed gives the same text); --greedy (or --temperature 0) takes the most
    likely token each step. Without --prompt a new text starts after the end-of-text token (a newline for
    a tokenizer without one). With --num-samples N, each sample follows a line "--- sample i of N ---"."""
    p.set_defaults(setting_flags=SAMPLING_FLAGS)
    model_source(p)
    p.add_argument("--prompt", default=None, help="text to continue (default: none, start a new text)")
    p.add_argument("--num-samples", type=positive_int, default=1, help="how many texts to sample")
    p.add_argument("--max-new-tokens", type=non_negative_int, default=50)
    how = p.add_mutually_exclusive_group()
    how.add_argument("--temperature", type=float, default=SAMPLE_TEMPERATURE,
                     help=f"sampling temperature; 0 is greedy (default {SAMPLE_TEMPERATURE}, as nanoGPT's sample.py)")
    how.add_argument("--greedy", action="store_true", help="the most likely token each step (--temperature 0)")
    p.add_argument("--top-k", type=positive_int, default=SAMPLE_TOP_K,
                   help=f"sample from the k most likely tokens (default {SAMPLE_TOP_K}, as nanoGPT's sample.py; "
                        "a k at least the vocabulary size cuts nothing)")
    p.add_argument("--top-p", type=float, default=None)
    add_seed(p)
    add_device(p)
    p.add_argument("--no-cache", action="store_true", help="recompute the context every step")
    p.add_argument("--dtype", choices=DECODE_DTYPES, default="float32",
                   help="decoding weights: float32 (default), bfloat16, int8 (per-channel, CPU) or int4 (a scale per "
                        "group of 64 weights, CPU)")


def own_tokenizer(directory: Path) -> Any:
    """The tokenizer of a Hugging Face model directory: its tokenizer.json with the special tokens and
    chat template beside it; without one, GPT-2's for a GPT-2 and none (with a note) for another model."""
    if (directory / TOKENIZER_FILE).is_file():
        return load_tokenizer(directory / TOKENIZER_FILE)
    config = read_json(directory / "config.json") if (directory / "config.json").is_file() else {}
    if not isinstance(config, dict) or config.get("model_type", "gpt2") == "gpt2":
        return get_tokenizer("gpt2")
    print(f"build-llm: note: {directory} has no {TOKENIZER_FILE}; the checkpoint has no tokenizer (pass --tokenizer "
          "FILE to add one)", file=sys.stderr)
    return None


def run_import_hf(args: argparse.Namespace) -> None:
    out = Path(args.out)
    check_not_input(out, {"DIR": args.dir, "--tokenizer": args.tokenizer if Path(args.tokenizer).is_file() else None})
    check_writable_dir(out, "checkpoint", whole=True)  # before the (slow) conversion; save_checkpoint checks again
    if (out / TRAINER_FILE).exists():
        raise UsageError(f"--out {args.out!r} is a training run's checkpoint; replacing it would lose the optimizer "
                         "state and break --resume; give another directory")
    if args.tokenizer == "auto":
        tokenizer = own_tokenizer(Path(args.dir))
    elif args.tokenizer in ("gpt2", "none") or Path(args.tokenizer).is_file():
        tokenizer = None if args.tokenizer == "none" else get_tokenizer(args.tokenizer)
    else:
        raise UsageError(f"--tokenizer {args.tokenizer!r} is invalid; expected gpt2, none or a tokenizer JSON file "
                         "(or auto, the default: the directory's own tokenizer.json)")
    model = from_hf(args.dir)
    if tokenizer is not None and tokenizer.vocab_size > model.cfg.vocab_size:
        raise UsageError(f"--tokenizer {args.tokenizer} has {tokenizer.vocab_size} ids but the model's vocabulary "
                         f"has {model.cfg.vocab_size}; pass --tokenizer with a matching JSON file, or none")
    save_checkpoint(out, model, tokenizer)
    print(f"{out}: {count_parameters(model):,} parameters from {args.dir}")


@verb("import-hf", run_import_hf)
def add_import_hf(p: argparse.ArgumentParser) -> None:
    """Hugging Face model directory -> checkpoint

    Read a local Hugging Face directory of a GPT-2, Llama, Mistral, Qwen2, Qwen3 or Gemma 3 (text)
    model (config.json plus model.safetensors, sharded safetensors or pytorch_model.bin; float32 or
    bfloat16) and write a checkpoint of this package, with the directory's tokenizer.json, its special
    tokens and chat template (which chat, serve and finetune instruct then use); a config setting the
    model cannot compute is refused by name. Nothing is downloaded: fetch the directory yourself (see
    the README)."""
    p.add_argument("dir", metavar="DIR", help="the Hugging Face model directory")
    add_out(p, "checkpoint directory to write")
    p.add_argument("--tokenizer", default="auto",
                   help="tokenizer stored with the model: auto (default: the directory's tokenizer.json with its "
                        "special tokens and chat template, else gpt2), gpt2, a tokenizer JSON file, or none")


def run_export_hf(args: argparse.Namespace) -> None:
    model, tokenizer = load_language_model(args.checkpoint)  # a LoRA run is merged on the way out
    tokenizer = None if args.no_tokenizer else tokenizer
    if tokenizer is not None and not isinstance(tokenizer, (GPT2Tokenizer, BPETokenizer)):
        print(f"build-llm: note: the {type(tokenizer).__name__} has no Hugging Face form; exporting the model only",
              file=sys.stderr)
    written = save_hf(model, args.out, tokenizer, export_chat_template(args.checkpoint, tokenizer))
    print(f"{args.out}: {', '.join(written)}")


def export_chat_template(checkpoint: str, tokenizer: Any) -> str | None:
    """The chat template an export carries for an instruction fine-tune whose tokenizer has none of its
    own: the package's format, so that transformers' apply_chat_template prompts it as it was tuned."""
    try:
        path = resolve_finetuned(checkpoint)
    except UsageError:  # no finetune.json: not instruction-tuned here
        return None
    tuned = read_finetune_meta(path)["task"] == "instruct"
    return ALPACA_CHAT_TEMPLATE if tuned and tokenizer is not None and template_source(tokenizer) is None else None


@verb("export-hf", run_export_hf)
def add_export_hf(p: argparse.ArgumentParser) -> None:
    """checkpoint -> Hugging Face directory (GPT-2 or the Llama family)

    Write a checkpoint as a directory that transformers.AutoModelForCausalLM.from_pretrained loads
    (config.json, model.safetensors) with the same logits, plus its tokenizer (GPT-2 or a trained BPE)
    for AutoTokenizer. A GPT-2-shaped model is written as GPT-2; one with rotary positions, RMSNorm or
    a gated feed-forward as the first of llama, mistral, qwen2, qwen3 and gemma3_text that holds all
    its options (e.g. --pos-emb rope --norm rmsnorm --mlp swiglu --no-bias --no-qkv-bias: llama;
    qwen3_moe for a mixture of experts). A LoRA run (`finetune ... --lora-rank`) is written with its
    adapter merged, as `merge-lora` would; a classifier (its head scores labels) is refused. An instruction
    fine-tune's tokenizer carries the prompt format it was tuned in as its chat_template (apply_chat_template)."""
    add_checkpoint(p)
    add_out(p, "directory to write (a new, empty or earlier export directory)")
    p.add_argument("--no-tokenizer", action="store_true", help="write the model only")


def run_tokenizer_train(args: argparse.Namespace) -> None:
    # Both bounds before the text is read, so the refusal is the only line.
    if not 257 <= args.vocab_size <= MAX_BPE_VOCAB:
        size = "too small" if args.vocab_size < 257 else "too large"
        raise UsageError(f"--vocab-size {args.vocab_size} is {size}; a byte-level BPE needs between 257 "
                         f"(256 bytes + {ENDOFTEXT}) and {MAX_BPE_VOCAB:,} ids")
    out = Path(args.out)
    if out.is_dir():
        raise UsageError(f"--out {args.out!r} is a directory; give a file path such as {args.out}/tokenizer.json")
    check_writable_file(out)
    files = [f for path in args.data for f in text_files(path)]
    # The text's first words: not all of it empty, and the sample of the trainer's memory estimate
    # (the rest is checked as the trainer reads it).
    reading = read_showing_progress(files, "check text")
    sample = next((piece for piece in reading if piece.strip()), None)
    reading.close()
    if sample is None:
        raise UsageError("--data is empty; give text to train on")
    check_not_input(out, {"--data": files})
    check_overwrite(out, args.force, ours=_is_tokenizer_file)
    total = sum(f.stat().st_size for f in files)
    words, peak = bpe_training_estimate(sample, total)
    print(f"tokenizer train: {total / 2**20:,.0f} MB of text, about {words:,} distinct words (from its first "
          f"{len(sample) / 2**20:,.1f} M characters): the trainer needs about {peak / 2**20:,.0f} MB", file=sys.stderr)
    try:
        pieces = small_pieces(read_showing_progress(files, "train tokenizer"))  # bounded, whatever the lines
        tok = BPETokenizer.train_from_texts(pieces, args.vocab_size, min_frequency=args.min_frequency)
    except (ValueError, TypeError, OSError):
        raise
    except Exception as e:  # the tokenizers library raises its own exception type
        raise UsageError(f"training failed on --data: {e}") from e
    tok.save(out)  # atomically, never through a link at the name
    print(f"{out}: byte-level BPE, {tok.vocab_size} ids (eos {ENDOFTEXT} = {tok.eos_id})")


def _is_tokenizer_file(path: Path) -> bool:
    """A tokenizer JSON (the kind of file this verb writes; its format admits no marker of ours)."""
    try:
        load_tokenizer(path)
        return True
    except (UsageError, ValueError, TypeError, OSError):
        return False


@verb("train", run_tokenizer_train)
def add_tokenizer_train(p: argparse.ArgumentParser) -> None:
    """train a byte-level BPE on text files

    Train a byte-level BPE (special token <|endoftext|>) and save it as a Hugging Face tokenizer.json,
    usable as `train --tokenizer FILE`."""
    p.add_argument("--data", required=True, nargs="+", metavar="PATH",
                   help="UTF-8 text file(s) or folder(s) of them (every non-hidden file, as train --data)")
    p.add_argument("--vocab-size", required=True, type=positive_int, help="number of ids (at least 257)")
    p.add_argument("--min-frequency", type=positive_int, default=2, help="least count of a pair to merge")
    add_out(p, "tokenizer JSON file to write", metavar="FILE")
    p.add_argument("--force", action="store_true", help="replace --out even if it is not a tokenizer JSON")


def run_tokenizer_stats(args: argparse.Namespace) -> None:
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


@verb("stats", run_tokenizer_stats)
def add_tokenizer_stats(p: argparse.ArgumentParser) -> None:
    """tokens per character and bytes per token of tokenizers on a text

    Print, for gpt2, char (the text's own characters) and each --tokenizer, the vocabulary size, tokens,
    tokens per character and bytes per token on a text."""
    p.add_argument("--data", required=True, metavar="PATH", help="a UTF-8 text file")
    p.add_argument("--tokenizer", action="append", default=[], metavar="FILE",
                   help="a trained tokenizer JSON or checkpoint directory (repeatable)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


@verb("tokenizer")
def add_tokenizer(p: argparse.ArgumentParser) -> None:
    """train a byte-level BPE tokenizer, or compare tokenizers on a text

    Train a byte-level BPE tokenizer (Hugging Face tokenizers) or report how finely tokenizers cut a text."""
    verbs = add_verbs(p, "tokenizer_verb", "{train,stats}")
    add_tokenizer_train(verbs)
    add_tokenizer_stats(verbs)

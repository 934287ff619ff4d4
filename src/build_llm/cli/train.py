"""Verbs that train: train (pretraining, or the R notebook's ABC experiment), eval, finetune
(classify or instruct, fully or with LoRA) and merge-lora. The config flags of train and finetune
are made from GPTConfig, TrainConfig and FinetuneConfig (settings.setting): a field added there
is a flag here with no other edit."""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from typing import Any, Callable

from build_llm.cli.common import add_checkpoint, add_device, add_out, add_settings, add_verbs, positive_int, verb
from build_llm.config import PRESETS, GPTConfig
from build_llm.infer.evaluate import evaluate_checkpoint
from build_llm.settings import given
from build_llm.store.finetuned import merge_checkpoint
from build_llm.train.config import ABC_TRAIN, BUDGET_TRAIN, FinetuneConfig, TrainConfig
from build_llm.train.finetune import run_finetune as finetune
from build_llm.train.loop import TrainingStopped
from build_llm.train.pretrain import run_training

# The training settings' other defaults, shown in --help where they differ from TrainConfig's.
TRAIN_VARIANTS = {"ABC": ABC_TRAIN, "time budget": BUDGET_TRAIN}
RESUME_HELP = "continue the run in --out from its checkpoint"


def report_training(train: Callable[[], Any], result: Callable[[Any], str], resume_note: str = "") -> int:
    """Run `train` (a training call of the library) and print `result` of what it returns, unless
    that is empty: exit code 0. A run that stops early (TrainingStopped: interrupted, 130, or
    diverged, 1) is one line on stderr, told by the main process only, and its exit code; an
    interrupted one's ends with `resume_note` (what the resuming command must leave out)."""
    try:
        value = train()
    except TrainingStopped as e:
        if e.main_process:
            print(f"build-llm: {e}{resume_note if e.exit_code == 130 else ''}", file=sys.stderr, flush=True)
        return e.exit_code
    text = result(value)
    if text:
        print(text)
    return 0


def run_train(args: argparse.Namespace) -> int:
    train = partial(run_training, args.out, data=args.data, tokenizer=args.tokenizer, preset=args.preset,
                    model_options=given(args, GPTConfig), train_options=given(args, TrainConfig),
                    resume=args.resume, init_from=args.init_from, time_budget=args.time_budget,
                    log=lambda line: print(line, file=sys.stderr, flush=True))
    # --resume refuses a budget: the run keeps the plan it made
    return report_training(train, lambda run: run.report, " and without --time-budget" if args.time_budget else "")


@verb("train", run_train)
def add_train(p: argparse.ArgumentParser) -> None:
    """train a model (no data option: the R notebook's ABC experiment)

    Train a GPT. With no --data it runs the R notebook's ABC experiment and compares the validation
    loss with the exact optimum. Writes OUT/metrics.jsonl, OUT/loss.png and OUT/checkpoint/. Works
    unchanged under torchrun. The optimisation defaults are a --data run's with --steps; 'ABC:' and
    'time budget:' give the ABC experiment's and a --time-budget run's where they differ."""
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data", help="a UTF-8 text file or a folder of them")
    src.add_argument("--abc", action="store_true", help="the ABC Markov text of the R notebook (the default)")
    p.add_argument("--tokenizer", help="bpe (the default for --data: a byte-level BPE trained on the training text, "
                   "sized to it, with an end token), char (the default for ABC: one token per character), gpt2 or a "
                   "tokenizer JSON path")
    p.add_argument("--preset", choices=sorted(PRESETS), help="model shape (default: r-abc for ABC; for --data the "
                   "time budget's choice, context 256 (64 for --tokenizer char), said in the plan; with --steps, "
                   "4 layers x 128 wide on a CPU, 6 x 384 with context 256 on a GPU)")
    add_settings(p, GPTConfig, "model (override the preset)", default_text="the preset's")
    groups = add_settings(p, TrainConfig, "optimisation", variants=TRAIN_VARIANTS)
    groups["optimisation"].add_argument(
        "--time-budget", metavar="DURATION", help="train for this long (90s, 5m, 2h), final evaluation, checkpoint "
        "and samples included: measures this machine's speed, then sizes the model (unless a shape flag or --preset "
        "is given) and the steps for the lowest validation loss in that time (with --data and no --steps: 5 minutes "
        "on a CPU)")
    p.add_argument("--init-from", metavar="DIR", help="start from this model's weights, shape and tokenizer (a "
                   "checkpoint, run directory or Hugging Face GPT-2 directory), with a fresh optimizer")
    p.add_argument("--resume", action="store_true", help=RESUME_HELP)
    add_out(p, "run directory")


def run_eval(args: argparse.Namespace) -> None:
    print(json.dumps(evaluate_checkpoint(args.checkpoint, args.data, args.batch_size, args.device, args.abc), indent=2))


@verb("eval", run_eval)
def add_eval(p: argparse.ArgumentParser) -> None:
    """loss and perplexity of a checkpoint on a text

    Print JSON with loss, perplexity and tokens of a checkpoint on the non-overlapping windows of a
    text; for the ABC source (a model trained on it without --data, or --abc) also the exact optimum on
    the same windows and the excess."""
    add_checkpoint(p)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data", help="a UTF-8 text file or folder (default: for a model trained on the ABC "
                                    "source, a held-out ABC draw)")
    src.add_argument("--abc", action="store_true", help="a held-out draw of the ABC source (the default for a "
                                                        "model trained on it)")
    p.add_argument("--batch-size", type=positive_int, default=64)
    add_device(p)


def run_finetune(args: argparse.Namespace) -> int:
    train = partial(finetune, args.out, args.init_from, args.task, data=args.data, val_data=args.val_data,
                    text_column=getattr(args, "text_column", "text"),
                    label_column=getattr(args, "label_column", "label"),
                    options=given(args, FinetuneConfig), resume=args.resume)
    return report_training(train, json.dumps)


def add_finetune_flags(p: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """The flags of both fine-tuning tasks: where to start, hold out and write, and the settings."""
    p.add_argument("--init-from", required=True, help="checkpoint to start from (a run directory or checkpoint)")
    p.add_argument("--val-data", help="held-out file in the same format (default: --val-fraction of --data)")
    add_out(p, "run directory")
    add_settings(p, FinetuneConfig, "optimisation", skip=skip)
    p.add_argument("--resume", action="store_true", help=RESUME_HELP)


@verb("classify", run_finetune)
def add_finetune_classify(p: argparse.ArgumentParser) -> None:
    """text classification from a CSV file (any number of classes)

    A new head with one output per label; the last block, final norm and head train (or LoRA adapters
    and the head); the last token's logits classify. metrics.jsonl holds the held-out accuracy."""
    p.add_argument("--data", required=True, help="CSV file with a header row")
    p.add_argument("--text-column", default="text", help="column holding the text (default: text)")
    p.add_argument("--label-column", default="label", help="column holding the label (default: label)")
    add_finetune_flags(p)


@verb("instruct", run_finetune)
def add_finetune_instruct(p: argparse.ArgumentParser) -> None:
    """instruction fine-tuning (Alpaca JSON or chat JSONL)

    The book's Alpaca prompt format (a chat template for messages); the loss covers response tokens and
    the end token only."""
    p.add_argument("--data", required=True, help="JSON array or JSONL of Alpaca records (instruction, input, "
                   "output) or chat records ({\"messages\": [{\"role\", \"content\"}, ...]})")
    add_finetune_flags(p, skip=("trainable",))  # --trainable: classification only


@verb("finetune")
def add_finetune(p: argparse.ArgumentParser) -> None:
    """fine-tune a checkpoint: classify (a CSV) or instruct (instructions)

    Fine-tune a checkpoint as the book's chapters 6 and 7 do, fully or with LoRA. Writes
    OUT/metrics.jsonl and OUT/checkpoint/ (the adapter alone for LoRA); Ctrl-C saves, --resume
    continues exactly."""
    tasks = add_verbs(p, "task", "TASK")
    add_finetune_classify(tasks)
    add_finetune_instruct(tasks)


def run_merge_lora(args: argparse.Namespace) -> None:
    print(merge_checkpoint(args.checkpoint, args.out))


@verb("merge-lora", run_merge_lora)
def add_merge_lora(p: argparse.ArgumentParser) -> None:
    """merge a LoRA run's adapter into its base weights

    Write a plain checkpoint (model.safetensors) whose weights are the base's plus the adapter's
    update: the same logits, no adapter, readable by generate, chat, classify and export-hf."""
    add_checkpoint(p, "the --out of a `build-llm finetune ... --lora-rank` run")
    add_out(p, "directory to write (new, empty or an earlier merge)")

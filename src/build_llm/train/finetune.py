"""Fine-tuning (the book's chapters 6 and 7): training a checkpoint for text classification or
instruction following. This module holds the training side only: the run's data (records read,
split and encoded to Examples, with what identifies them for --resume) and the objectives.

The pieces live with their concept: the prompt format, chat template and instruction records in
data/instruct.py, the classification records in data/classify.py, the classifier head and the
fine-tuned checkpoints (load, save, merge) in store/finetuned.py, inference in infer/classify.py and
infer/chat.py.

Classification: the logits of each text's last real token are the class scores (cross-entropy per
example). Instruction: the end token is appended to every response and learned; the loss covers
response tokens only (prompt and padding targets are IGNORE_INDEX) and is a mean over target tokens,
also under gradient accumulation, where each micro-batch's summed loss is divided by the token count
of the whole step.

With LoRA (lora.py) only the adapters (and a classifier's new head, or the end token's rows) train,
and the checkpoint holds the adapter alone, plus the identity of the base checkpoint it applies to.

`finetune(...)` runs `Finetuning` (the objective) through the one training loop (loop.run_loop),
which owns Ctrl-C, divergence and when to evaluate and save; `run_finetune` is `build-llm finetune
classify|instruct` around it. The batch of step s is a slice of a permutation drawn from (seed,
epoch), and dropout is reseeded from (seed, s), so a run stopped and resumed takes exactly the steps
an uninterrupted run takes.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from build_llm import lora as lora_mod
from build_llm.data.chat_template import chat_format
from build_llm.data.classify import collate_classification, encode_text, read_labeled_csv
from build_llm.data.corpus import fingerprint, step_rng
from build_llm.data.instruct import IGNORE_INDEX, Example, collate_instruction, read_instruction_data
from build_llm.data.tokenizer import CharTokenizer
from build_llm.errors import UsageError
from build_llm.infer.classify import last_token_logits
from build_llm.runtime import get_device, set_cpu_threads
from build_llm.sizing import count_parameters
from build_llm.store.checkpoint import (CHECKPOINT_DIR, TRAINER_FILE, load_checkpoint, load_trainer_state,
                                        resolve_checkpoint, save_checkpoint, set_rng_state, trainer_files)
from build_llm.store.finetuned import (base_identity, count_trainable, finetuned_files,
                                       load_finetuned, prepare_classifier, resolve_finetuned)
from build_llm.train.config import FinetuneConfig
from build_llm.train.loop import RunLog, TrainState, make_optimizer, run_loop
from build_llm.train.rundir import FINETUNE_KIND, check_resume, check_run_dir, owned

# Keys of the step_rng streams of a fine-tune: each epoch's example order, each step's dropout.
ORDER_STREAM, DROPOUT_STREAM = 1, 2
# A base this large (GPT-2 small has 124M parameters) keeps the book's recipe (base_recipe); these
# settings, left unset, are chosen by the base.
LARGE_BASE, BY_BASE = 100_000_000, ("lr", "trainable")


def token_loss_sum(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(summed cross-entropy over the non-ignored targets, their number)."""
    logits = model(inputs)  # (B, T, V)
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, int((targets != IGNORE_INDEX).sum())


# --- the training data ---------------------------------------------------------------------------
class FinetuneData:
    """Encoded train and validation examples of one task, with what identifies them."""

    def __init__(self, task: str, train: list[Example], val: list[Example], meta: dict[str, Any]) -> None:
        self.task, self.train, self.val, self.meta = task, train, val, meta


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    n_val = max(1, round(n * val_fraction))
    if n - n_val < 1:
        raise UsageError(f"--data has {n} example(s): too few to hold out a validation split; give more data "
                         "or --val-data")
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def prepare_classification(data: str | Path, val_data: str | Path | None, text_column: str, label_column: str,
                           tokenizer: Any, max_length: int, cfg: FinetuneConfig) -> FinetuneData:
    texts, labels = read_labeled_csv(data, text_column, label_column)
    if val_data is not None:
        val_texts, val_labels = read_labeled_csv(val_data, text_column, label_column)
        train_idx, val_idx = np.arange(len(texts)), None
    else:
        train_idx, val_idx = split_indices(len(texts), cfg.val_fraction, cfg.seed)
        val_texts, val_labels = [texts[i] for i in val_idx], [labels[i] for i in val_idx]
        texts, labels = [texts[i] for i in train_idx], [labels[i] for i in train_idx]
    names = sorted(set(labels))
    if len(names) < 2:
        raise UsageError(f"--label-column {label_column!r} has {len(names)} distinct label(s) {names}; "
                         "classification needs at least 2")
    unknown = sorted(set(val_labels) - set(names))
    if unknown:
        raise UsageError(f"the validation split has label(s) {unknown[:5]} that the training split lacks; "
                         f"the model can only predict {names}")
    index = {name: i for i, name in enumerate(names)}
    encode = lambda ts, ls: [Example(encode_text(tokenizer, t, max_length), index[lab])  # noqa: E731
                             for t, lab in zip(ts, ls)]
    meta = {"data": str(data), "data_sha256": fingerprint(data),
            "val_data": None if val_data is None else str(val_data),
            "val_data_sha256": None if val_data is None else fingerprint(val_data),
            "text_column": text_column, "label_column": label_column, "labels": names,
            "n_train": len(texts), "n_val": len(val_texts)}
    return FinetuneData("classify", encode(texts, labels), encode(val_texts, val_labels), meta)


def prepare_instruction(data: str | Path, val_data: str | Path | None, tokenizer: Any, max_length: int,
                        cfg: FinetuneConfig) -> FinetuneData:
    chat = chat_format(tokenizer)  # the tokenizer's chat template, or the package's own format
    conversations, fmt = read_instruction_data(data)
    if val_data is not None:
        val, fmt_val = read_instruction_data(val_data)
        fmt = fmt if fmt == fmt_val else "chat"
    else:
        train_idx, val_idx = split_indices(len(conversations), cfg.val_fraction, cfg.seed)
        val = [conversations[i] for i in val_idx]
        conversations = [conversations[i] for i in train_idx]

    train, dropped = fitting([Example(*chat.encode(m)) for m in conversations], max_length, cfg, "training")
    val_examples, val_dropped = fitting([Example(*chat.encode(m)) for m in val], max_length, cfg, "validation")
    meta = {"data": str(data), "data_sha256": fingerprint(data),
            "val_data": None if val_data is None else str(val_data),
            "val_data_sha256": None if val_data is None else fingerprint(val_data),
            "format": fmt, "n_train": len(train), "n_val": len(val_examples), "n_dropped": dropped,
            "n_val_dropped": val_dropped}
    return FinetuneData("instruct", train, val_examples, meta)


def fitting(examples: list[Example], max_length: int, cfg: FinetuneConfig, split: str) -> tuple[list[Example], int]:
    """The examples that fit in `max_length` tokens (inputs; the last target is the end token) and
    how many did not: a cut example would lose its end token and teach a response that never ends.
    None fitting is a UsageError naming the context, the longest example and what to change."""
    kept = [e for e in examples if len(e.ids) <= max_length + 1]
    if examples and not kept:
        lengths = sorted(len(e.ids) - 1 for e in examples)
        longer = ("--max-length (up to the model's context)" if cfg.max_length is not None else
                  "a base with a longer context (build-llm train --context-length N)")
        raise UsageError(f"no {split} example fits in {max_length} tokens, the fine-tune's length: they are "
                         f"{lengths[0]} to {lengths[-1]} tokens long; give shorter examples or {longer}")
    return kept, len(examples) - len(kept)



def steps_per_epoch(n: int, batch_size: int) -> int:
    return math.ceil(n / batch_size)


def batch_at(step: int, n: int, cfg: FinetuneConfig) -> np.ndarray:
    """Indices of the training examples of `step`: a slice of epoch's permutation from (seed, epoch)."""
    spe = steps_per_epoch(n, cfg.batch_size)
    epoch, i = divmod(step, spe)
    order = step_rng(cfg.seed, ORDER_STREAM, epoch).permutation(n)
    return order[i * cfg.batch_size:(i + 1) * cfg.batch_size]


def step_loss(model: nn.Module, examples: Sequence[Example], task: str, pad_id: int, max_length: int,
              micro_batch_size: int | None, device: torch.device, backward: bool = True) -> tuple[float, int]:
    """Forward (and backward) one step's examples in micro-batches, the loss weighted as one batch:
    per target token for instruct (each micro-batch's summed loss over the step's token count), per
    example for classify. Returns (mean loss, tokens or examples counted)."""
    size = micro_batch_size or len(examples)
    chunks = [examples[i:i + size] for i in range(0, len(examples), size)]
    if task == "instruct":
        batches = [collate_instruction(c, pad_id, max_length=max_length) for c in chunks]
        total = sum(int((y != IGNORE_INDEX).sum()) for _, y in batches)
        if total == 0:
            return 0.0, 0
    else:
        batches = [collate_classification(c, pad_id) for c in chunks]
        total = len(examples)
    loss_sum = 0.0
    for batch in batches:
        batch = [t.to(device) for t in batch]
        if task == "instruct":
            loss, _ = token_loss_sum(model, batch[0], batch[1])
        else:
            logits = last_token_logits(model, batch[0], batch[1])
            loss = F.cross_entropy(logits, batch[2], reduction="sum")
        if backward:
            (loss / total).backward()
        loss_sum += loss.item()
    return loss_sum / total, total


@torch.no_grad()
def evaluate(model: nn.Module, data: FinetuneData, pad_id: int, max_length: int, device: torch.device,
             batch_size: int = 16) -> dict[str, float]:
    """Validation loss (mean per target token or per example) and, for classify, accuracy."""
    was_training = model.training
    model.eval()
    loss_sum, count, correct = 0.0, 0, 0
    for i in range(0, len(data.val), batch_size):
        chunk = data.val[i:i + batch_size]
        if data.task == "instruct":
            x, y = collate_instruction(chunk, pad_id, max_length=max_length)
            loss, n = token_loss_sum(model, x.to(device), y.to(device))
        else:
            x, lengths, y = collate_classification(chunk, pad_id)
            logits = last_token_logits(model, x.to(device), lengths)
            loss, n = F.cross_entropy(logits, y.to(device), reduction="sum"), len(chunk)
            correct += int((logits.argmax(-1).cpu() == y).sum())
        loss_sum, count = loss_sum + loss.item(), count + n
    model.train(was_training)
    out = {"val_loss": loss_sum / max(count, 1)}
    if data.task == "classify":
        out["val_accuracy"] = correct / max(count, 1)
    return out


# --- the objective and the run -------------------------------------------------------------------
class Finetuning:
    """What `run_loop` calls for a fine-tune: the step (its examples, dropout reseeded from (seed,
    step), micro-batches weighted as one batch, clipping), the learning rate (constant: cfg.lr),
    the evaluation (with the epoch) and the checkpoint (the adapter alone for LoRA)."""

    def __init__(self, out_dir: Path, cfg: FinetuneConfig, data: FinetuneData, model: nn.Module, tokenizer: Any,
                 meta: dict[str, Any], device: torch.device) -> None:
        self.out_dir, self.cfg, self.data, self.model, self.tokenizer = out_dir, cfg, data, model, tokenizer
        self.meta, self.device, self.max_length = meta, device, meta["max_length"]  # meta: finetune.json
        self.pad_id = getattr(tokenizer, "eos_id", None) or 0
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.steps_per_epoch = steps_per_epoch(len(data.train), cfg.batch_size)
        self.total_steps = cfg.steps or cfg.epochs * self.steps_per_epoch
        self.eval_every = cfg.eval_every or self.steps_per_epoch

    def step(self, state: TrainState, stop: Callable[[], bool]) -> tuple[float, int]:
        cfg = self.cfg
        torch.manual_seed(int(step_rng(cfg.seed, DROPOUT_STREAM, state.step).integers(2**62)))
        examples = [self.data.train[i] for i in batch_at(state.step, len(self.data.train), cfg)]
        state.optimizer.zero_grad(set_to_none=True)
        loss, _ = step_loss(state.model, examples, cfg.task, self.pad_id, self.max_length, cfg.micro_batch_size,
                            self.device)
        if cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.trainable, cfg.grad_clip)
        state.optimizer.step()
        return loss, sum(len(e.ids) for e in examples)

    def lr(self, state: TrainState) -> float:
        return self.cfg.lr

    def evaluate(self, state: TrainState) -> dict[str, float]:
        metrics = evaluate(state.model, self.data, self.pad_id, self.max_length, self.device)
        return {**metrics, "epoch": round(state.step / self.steps_per_epoch, 3)}

    def save(self, state: TrainState) -> Path:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict  # heavy: seconds to import

        trainer = {"format": 1, "step": state.step, "elapsed_s": state.elapsed, "tokens_seen": state.tokens_seen,
                   "finetune_config": self.cfg.to_dict(), "data": self.data.meta,
                   "init_from_sha256": self.meta["base"]["sha256"]}
        optimizer_state = get_optimizer_state_dict(self.model, state.optimizer)
        files = {**finetuned_files(self.meta, self.model), **trainer_files(optimizer_state, trainer)}
        path = self.out_dir / CHECKPOINT_DIR
        # A LoRA run saves the adapter alone (in `files`), no copy of the base weights.
        return save_checkpoint(path, self.model, self.tokenizer, files, weights=self.meta["lora"] is None)


def finetune(out_dir: str | Path, init_from: str | Path, cfg: FinetuneConfig, *, data: str | Path,
             val_data: str | Path | None = None, text_column: str = "text", label_column: str = "label",
             resume: bool = False, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Fine-tune the checkpoint `init_from` on `data`, writing metrics.jsonl and checkpoint/ in out_dir.
    Returns the last evaluation row. Raises loop.TrainingStopped on Ctrl-C (after saving) and when
    the loss, a metric or a weight stops being finite (keeping the last good checkpoint)."""
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    out_dir, device = Path(out_dir), get_device(cfg.device)
    saved = load_trainer_state(resolve_finetuned(out_dir)) if resume else None
    if saved is not None:  # what the base chose stays the run's
        saved_cfg = FinetuneConfig.from_dict(saved.state["finetune_config"])
        check_resume(saved_cfg, {k: v for k, v in cfg.to_dict().items() if not (k in BY_BASE and v is None)})
        cfg = cfg.replace(**{k: getattr(saved_cfg, k) for k in BY_BASE if getattr(cfg, k) is None})
    run = prepare_finetuning(out_dir, init_from, cfg, saved, device, data=data, val_data=val_data,
                             text_column=text_column, label_column=label_column)
    if saved is not None and saved.state["step"] >= run.total_steps:  # as train's --resume: nothing would run
        step = saved.state["step"]
        raise UsageError(f"--resume: the run in {str(out_dir)!r} is already at step {step}; give --steps above "
                         f"{step} (or more --epochs) to train further")
    state = start_state(run, saved, log)
    threads = torch.get_num_threads()  # restored at the end: the setting is process-wide
    set_cpu_threads(count_parameters(run.model.cfg), device)
    try:
        with RunLog(out_dir, run.total_steps, state, resume=saved is not None, log=log) as run_log:
            run_loop(state, run.step, lr=run.lr, evaluate=run.evaluate, save=run.save, log=run_log,
                     eval_every=run.eval_every, device=device)
    finally:
        torch.set_num_threads(threads)
    run.model.eval()
    row = run_log.history[-1] if run_log.history else {}
    return {**row, "trainable_parameters": run.meta["trainable_parameters"], "parameters": run.meta["parameters"]}


def prepare_finetuning(out_dir: Path, init_from: str | Path, cfg: FinetuneConfig, saved: Any, device: torch.device,
                       *, data: str | Path, val_data: str | Path | None, text_column: str,
                       label_column: str) -> Finetuning:
    """The run's base checkpoint (the one a resumed run started from), its encoded data (the same
    files when resuming) and the model made ready: the head, LoRA, the saved weights when resuming."""
    base_dir = resolve_checkpoint(init_from)
    base = base_identity(base_dir)
    ckpt = load_checkpoint(base_dir, device)
    model, tokenizer = ckpt.model, ckpt.tokenizer
    if tokenizer is None:
        raise UsageError(f"--init-from {str(base_dir)!r} has no tokenizer.json; fine-tuning needs to encode text")
    if cfg.task == "instruct" and isinstance(tokenizer, CharTokenizer):
        raise UsageError(f"--init-from {str(base_dir)!r} has a character tokenizer, which cannot instruction-tune: it "
                         "has no end token to end a response and encodes only its corpus's characters; train the base "
                         "with the default BPE tokenizer (build-llm train --data ... without --tokenizer char)")
    cfg, recipe = base_recipe(cfg, base_dir, count_parameters(model.cfg))
    if saved is not None and saved.state["init_from_sha256"] != base["sha256"]:
        raise UsageError("--resume: --init-from is not the checkpoint the run started from; give the same one")
    max_length = min(cfg.max_length or model.cfg.context_length, model.cfg.context_length)

    if cfg.task == "classify":
        ft_data = prepare_classification(data, val_data, text_column, label_column, tokenizer, max_length, cfg)
    else:
        ft_data = prepare_instruction(data, val_data, tokenizer, max_length, cfg)
    if saved is not None:
        for key in ("data_sha256", "val_data_sha256"):
            if saved.state["data"].get(key) != ft_data.meta.get(key):
                raise UsageError("--resume: --data or --val-data differs from what the run was trained on; "
                                 "give the same files, or start a new run with another --out")
    meta = {**adapt_model(model, cfg, ft_data, tokenizer, base, max_length), "recipe": recipe}
    if saved is not None:
        try:
            model.load_state_dict(load_finetuned(saved.path, device).model.state_dict(), strict=True)
        except RuntimeError as e:  # the weights are not those of the settings in trainer_state.json
            raise UsageError(f"--resume: checkpoint {str(saved.path)!r}: the model does not match the settings in "
                             f"{TRAINER_FILE} ({' '.join(str(e).split())[:200]})") from None
    model.to(device)
    return Finetuning(out_dir, cfg, ft_data, model, tokenizer, meta, device)


def base_recipe(cfg: FinetuneConfig, base_dir: Path, n_params: int) -> tuple[FinetuneConfig, str]:
    """The settings left unset (learning rate, what a classifier trains), chosen by the base; and
    the plan's words for them. The book's recipe (the last block at 5e-5) suits a large pretrained
    GPT-2; a small base trained here from scratch learns nothing with it (chance accuracy), so every
    weight trains, at half the peak rate of its pretraining (LoRA's adapters at 1.5 times it).
    Measured on Shakespeare's genres with a default base: 3e-4 stayed at the majority class, half
    the base's 2e-3 beat it (0.455 against 0.400)."""
    trained = _training_record(base_dir)  # an imported GPT-2 has none
    small = trained is not None and n_params < LARGE_BASE
    base_lr = float(trained.get("train_config", {}).get("lr", 2e-3)) if small else 0.0
    lr = (1.5 * base_lr if cfg.lora_rank else base_lr / 2) if small else 5e-5
    trainable = "all" if small and cfg.task == "classify" and cfg.lora_rank is None else "last-block"
    new = cfg.replace(lr=cfg.lr if cfg.lr is not None else float(f"{lr:.3g}"),
                      trainable=cfg.trainable if cfg.trainable is not None else trainable)
    what = f"lr {new.lr:g}" + (f", trains {'every weight' if new.trainable == 'all' else 'the last block'} and the head"
                               if cfg.task == "classify" and cfg.lora_rank is None else "")
    base = (f"a small base trained here at lr {base_lr:g}, {n_params:,} parameters" if small else
            "a large or imported pretrained base: the book's recipe")
    given = [f"--{k}" for k in ("lr", "trainable") if getattr(cfg, k) is not None]
    return new, f"{what} ({'given by ' + ' and '.join(given) if len(given) == 2 else 'chosen for ' + base})"


def _training_record(base_dir: Path) -> dict[str, Any] | None:
    """The base's trainer_state.json (how `build-llm train` trained it), or None."""
    try:
        record = json.loads((base_dir / TRAINER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def adapt_model(model: nn.Module, cfg: FinetuneConfig, ft_data: FinetuneData, tokenizer: Any,
                base: dict[str, Any], max_length: int) -> dict[str, Any]:
    """Make `model` what the run trains, in place: a classifier head, LoRA adapters (and the end
    token's rows for instruct), what is frozen; returns finetune.json's content."""
    torch.manual_seed(cfg.seed)  # the new head's initialisation
    if cfg.task == "classify":
        prepare_classifier(model, len(ft_data.meta["labels"]), train_last_block=cfg.lora_rank is None,
                           trainable=cfg.trainable)
    lora_meta = None
    if cfg.lora_rank is not None:
        lora_mod.apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
        if cfg.task == "instruct":  # the end token the base never predicted (lora.py: token rows)
            lora_mod.train_token_rows(model, list(chat_format(tokenizer).stop_ids))
        lora_mod.freeze_for_lora(model, ["out_head"] if cfg.task == "classify" else [])
        lora_meta = lora_mod.adapter_meta(model, cfg.lora_targets, base)
    elif cfg.task == "instruct":
        for p in model.parameters():
            p.requires_grad = True
    trainable, total_params = count_trainable(model)
    return {"task": cfg.task, "labels": ft_data.meta.get("labels"), "format": ft_data.meta.get("format"),
            "base": base, "lora": lora_meta, "finetune_config": cfg.to_dict(),
            "max_length": max_length, "trainable_parameters": trainable, "parameters": total_params}


def start_state(run: Finetuning, saved: Any, log: Callable[[str], None]) -> TrainState:
    """The loop's state: a new AdamW (fused on CUDA), or for a resumed run the saved optimizer, RNG
    states, step, clock and tokens; a new run says what it trains."""
    model, cfg, meta = run.model, run.cfg, run.meta
    state = TrainState(core=model, model=model, optimizer=make_optimizer(model, cfg, run.device),
                       total_steps=run.total_steps)
    if saved is not None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict  # heavy: seconds to import

        set_optimizer_state_dict(model, state.optimizer, saved.optimizer)
        set_rng_state(saved.rng, saved.state["rng"])
        state.step, state.elapsed, state.tokens_seen = (saved.state["step"], saved.state["elapsed_s"],
                                                        saved.state["tokens_seen"])
        return state
    trainable, total = meta["trainable_parameters"], meta["parameters"]
    log(f"fine-tuning ({cfg.task}{', LoRA rank %d' % cfg.lora_rank if meta['lora'] else ''}): "
        f"{trainable:,} of {total:,} parameters trainable ({100 * trainable / total:.2f}%), "
        f"{len(run.data.train)} training and {len(run.data.val)} validation examples, {run.total_steps} steps")
    log(f"fine-tuning recipe: {meta['recipe']}")
    dropped, val_dropped = run.data.meta.get("n_dropped", 0), run.data.meta.get("n_val_dropped", 0)
    if dropped or val_dropped:
        log(f"note: {dropped} training and {val_dropped} validation example(s) longer than {run.max_length} tokens "
            "are left out (cut, they would lose their end token); give shorter ones, or a base with a longer "
            "context, to use them")
    return state


def run_finetune(out: str | Path, init_from: str | Path, task: str, *, data: str | Path,
                 val_data: str | Path | None = None, text_column: str = "text", label_column: str = "label",
                 options: dict[str, Any] | None = None, resume: bool = False) -> dict[str, Any]:
    """`build-llm finetune classify|instruct`: check the run directory (a new or empty one, or our
    fine-tuning run; locked while writing), resolve the settings (given options > the checkpoint's
    when resuming > defaults), fine-tune; returns the last evaluation row. Raises UsageError for bad
    settings and TrainingStopped when interrupted or diverged."""
    options = {k: v for k, v in (options or {}).items() if v is not None}
    for flag, path in (("--data", data), ("--val-data", val_data)):  # a device would be read without end
        if path is not None and Path(path).exists() and not Path(path).is_file():
            raise UsageError(f"{flag} {str(path)!r} is not a regular file (a device, a pipe or a folder?); give a "
                             f"{'CSV' if task == 'classify' else 'JSON or JSONL'} file")
    out = check_run_dir(out, resume)
    if resume:
        try:
            ckpt = resolve_finetuned(out)
        except UsageError:  # it names --checkpoint, which this verb does not have
            raise UsageError(f"--resume: --out {str(out)!r} holds no fine-tuning run; give the --out of an earlier "
                             "build-llm finetune, or leave out --resume to start one") from None
        saved = load_trainer_state(ckpt).state["finetune_config"]
        try:
            FinetuneConfig.from_dict(saved)
        except UsageError as e:
            raise UsageError(f"--resume: checkpoint {str(ckpt)!r}: {TRAINER_FILE} holds an invalid finetune_config "
                             f"({e})") from None
        if saved["task"] != task:
            raise UsageError(f"--resume: the run in {str(out)!r} is a {saved['task']} fine-tune, not {task}")
        cfg = FinetuneConfig.from_dict({**saved, **options})
    else:
        cfg = FinetuneConfig(task=task, **options)
    with owned(out, FINETUNE_KIND):  # a new or empty directory, or one of our fine-tuning runs
        return finetune(out, init_from, cfg, data=data, val_data=val_data, text_column=text_column,
                        label_column=label_column, resume=resume)


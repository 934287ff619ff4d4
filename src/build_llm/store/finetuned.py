"""Fine-tuned checkpoints: the classifier head surgery that shapes them, and building, loading,
saving and merging them.

A fine-tuned checkpoint is a checkpoint directory with FINETUNE_FILE (finetune.json: task, labels,
format, the base's identity, the LoRA settings, the run's config) beside its config and tokenizer.
A full fine-tune holds its own weights; a LoRA run holds the adapter alone (lora.py) and the identity
(path and SHA-256) of the base checkpoint it applies to, which loading checks. `merge_checkpoint`
(`build-llm merge-lora`) folds an adapter into its base's weights as a plain checkpoint.

Classification (the book's chapter 6): the output head is replaced by a new Linear(emb_dim,
num_classes); the book's recipe trains the head, the last transformer block and the final norm and
freezes the rest.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from build_llm import lora as lora_mod
from build_llm.config import GPTConfig
from build_llm.data.tokenizer import load_tokenizer
from build_llm.errors import UsageError
from build_llm.gpt import GPTModel
from build_llm.runtime import check_fits
from build_llm.sizing import count_parameters, model_memory
from build_llm.store.checkpoint import (ADAPTER_FILE, CHECKPOINT_DIR, CONFIG_FILE, FINETUNE_FILE, MODEL_FILE,
                                        PREVIOUS_DIR, TOKENIZER_FILE, load_checkpoint, save_checkpoint)
from build_llm.store.fsio import check_not_input, read_json, write_json

ADAPTER_META_FILE = "adapter.json"  # beside ADAPTER_FILE in a LoRA run's checkpoint
CLASSIFY_TRAINABLE = ("last-block", "all")  # what a classification fine-tune trains besides the new head
TASKS = ("classify", "instruct")


# --- the classifier head -------------------------------------------------------------------------
def prepare_classifier(model: nn.Module, num_classes: int, *, train_last_block: bool = True,
                       trainable: str = "last-block") -> nn.Module:
    """The book's chapter 6 recipe, in place: freeze everything, put a new Linear(emb_dim, num_classes)
    head (trainable) in `out_head`, and (with `train_last_block`) unfreeze the last transformer block
    and the final norm. `trainable="all"` unfreezes every weight instead (a small base model's last
    block alone may not carry what the labels need). The head is the model's own afterwards (no
    longer tied to the embedding)."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise UsageError(f"num_classes={num_classes!r} is invalid; expected an integer >= 2")
    if trainable not in CLASSIFY_TRAINABLE:
        raise UsageError(f"trainable={trainable!r} is invalid; expected one of {CLASSIFY_TRAINABLE}")
    for p in model.parameters():
        p.requires_grad = train_last_block and trainable == "all"
    ref = model.tok_emb.weight
    model.out_head = nn.Linear(model.cfg.emb_dim, num_classes, device=ref.device, dtype=ref.dtype)
    model.cfg = model.cfg.replace(tie_weights=False)
    if train_last_block:
        for p in [*model.trf_blocks[-1].parameters(), *model.final_norm.parameters()]:
            p.requires_grad = True
    return model


def count_trainable(model: nn.Module) -> tuple[int, int]:
    """(trainable parameters, all parameters)."""
    return count_parameters(model, trainable_only=True), count_parameters(model)


# --- building and loading ------------------------------------------------------------------------
def build_model(base_cfg, meta: dict[str, Any], device: str | torch.device = "cpu") -> nn.Module:
    """An empty model shaped as `meta` (finetune.json) says: the base model, a classifier head for
    classify, LoRA layers for an adapter run."""
    model = GPTModel(GPTConfig.coerce(base_cfg)).to(device)
    if meta["task"] == "classify":
        prepare_classifier(model, len(meta["labels"]))
    return model


def base_identity(base_dir: Path) -> dict[str, Any]:
    return {"path": str(base_dir.resolve()), "sha256": file_sha256(base_dir / MODEL_FILE)}


@dataclass
class Finetuned:
    model: nn.Module
    tokenizer: Any
    meta: dict[str, Any]   # finetune.json: task, labels, format, base, lora, config
    path: Path


def resolve_finetuned(path: str | Path) -> Path:
    path = Path(path)
    for candidate in (path, path / CHECKPOINT_DIR, path / PREVIOUS_DIR):
        if (candidate / FINETUNE_FILE).is_file():
            return candidate
    raise UsageError(f"--checkpoint {str(path)!r} holds no fine-tuned checkpoint (no {FINETUNE_FILE}); give the "
                     "--out of `build-llm finetune` or of `build-llm merge-lora`")


def load_finetuned(path: str | Path, device: str | torch.device = "cpu") -> Finetuned:
    """A fine-tuned model (eval mode) from a run directory or checkpoint directory of `finetune`
    (full or LoRA: the adapter is applied to its base checkpoint, whose identity is checked)."""
    path = resolve_finetuned(path)
    meta = read_finetune_meta(path)
    config = _read_json(path, CONFIG_FILE)
    try:
        cfg = GPTConfig.from_dict(config)
    except UsageError as e:
        raise UsageError(f"checkpoint {str(path)!r}: {CONFIG_FILE} is not a valid model config: {e}") from None
    tokenizer = load_tokenizer(path / TOKENIZER_FILE)
    if meta.get("lora"):
        model = _load_adapted(path, cfg, meta, device)
    else:
        model = _load_full(path, cfg, meta, device)
    return Finetuned(model.eval(), tokenizer, meta, path)


def _read_json(path: Path, name: str) -> Any:
    try:
        return read_json(path / name, f"checkpoint {str(path)!r}: {name}")
    except OSError as e:
        raise UsageError(f"checkpoint {str(path)!r}: {name} is missing or unreadable ({e.strerror})") from None


def _invalid(path: Path, name: str, key: str, value: Any, valid: str) -> UsageError:
    shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
    return UsageError(f"checkpoint {str(path)!r}: {name} {f'has {key}=' if key else 'holds '}{shown}; expected "
                      f"{valid} (it was not written by build-llm, or was damaged)")


def read_finetune_meta(path: Path) -> dict[str, Any]:
    """finetune.json of the checkpoint directory `path`, checked to hold what loading reads."""
    meta = _read_json(path, FINETUNE_FILE)
    if not isinstance(meta, dict):
        raise _invalid(path, FINETUNE_FILE, "", meta, "a JSON object")
    task, labels, base, max_length, lora = (meta.get(k) for k in ("task", "labels", "base", "max_length", "lora"))
    checks = {
        "task": (task in TASKS, f"one of {list(TASKS)}"),
        "labels": (task != "classify" or (isinstance(labels, list) and all(isinstance(x, str) for x in labels)
                                          and len(set(labels)) == len(labels) >= 2),
                   "a list of two or more distinct label strings"),
        "base": (isinstance(base, dict) and all(isinstance(base.get(k), str) for k in ("path", "sha256")),
                 'an object with "path" and "sha256" strings'),
        "max_length": (max_length is None or (type(max_length) is int and max_length >= 1), "a positive integer or null"),
        "lora": (lora is None or isinstance(lora, dict), "an object (the adapter's settings) or null"),
    }
    for key, (ok, valid) in checks.items():
        if not ok:
            raise _invalid(path, FINETUNE_FILE, key, meta.get(key), valid)
    return meta


def _check_head(path: Path, name: str, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """A classifier's head has one output per label in finetune.json."""
    head = tensors.get("out_head.weight")
    if meta["task"] == "classify" and head is not None and head.shape[0] != len(meta["labels"]):
        raise UsageError(f"checkpoint {str(path)!r}: {FINETUNE_FILE} lists {len(meta['labels'])} labels but the "
                         f"classifier head in {name} has {head.shape[0]} outputs; the files do not belong together")


def _load_adapted(path: Path, cfg: GPTConfig, meta: dict[str, Any], device: str | torch.device) -> nn.Module:
    """The base checkpoint named in `meta`, checked to be the one trained on, with the adapter applied."""
    base = Path(meta["base"]["path"])
    if not (base / MODEL_FILE).is_file():
        raise UsageError(f"checkpoint {str(path)!r} is a LoRA adapter for the base checkpoint {str(base)!r}, "
                         "which is no longer there; put the base back or use a merged checkpoint")
    if file_sha256(base / MODEL_FILE) != meta["base"]["sha256"]:
        raise UsageError(f"the base checkpoint {str(base)!r} has changed since the adapter in {str(path)!r} "
                         "was trained on it; the adapter does not apply to these weights")
    model = load_checkpoint(base, device).model
    # config.json is the base's (a classifier's head untied): another one means files of other runs
    differ = {k: v for k, v in cfg.replace(tie_weights=False).to_dict().items()
              if model.cfg.replace(tie_weights=False).to_dict()[k] != v}
    if differ:
        key = next(iter(differ))
        raise UsageError(f"checkpoint {str(path)!r}: {CONFIG_FILE} has {key}={differ[key]!r} but the base checkpoint "
                         f"{str(base)!r} the adapter applies to has {key}={model.cfg.to_dict()[key]!r}")
    if meta["task"] == "classify":
        prepare_classifier(model, len(meta["labels"]))
    tensors, lora_meta = load_adapter(path)
    _check_head(path, ADAPTER_FILE, meta, tensors)
    lora_mod.apply_adapter(model, {k: v.to(device) for k, v in tensors.items()}, lora_meta)
    return model


def _load_full(path: Path, cfg: GPTConfig, meta: dict[str, Any], device: str | torch.device) -> nn.Module:
    """A full fine-tune's own weights (a tied head shares the embedding's matrix again)."""
    check_fits(model_memory(cfg), f"the model of checkpoint {str(path)!r}", device)
    try:
        state = load_file(path / MODEL_FILE, device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise UsageError(f"checkpoint {str(path)!r}: {MODEL_FILE} is missing or unreadable ({e})") from e
    _check_head(path, MODEL_FILE, meta, state)
    model = build_model(cfg if meta["task"] == "instruct" else cfg.replace(tie_weights=False), meta, device)
    if cfg.tie_weights and "out_head.weight" not in state and "tok_emb.weight" in state:
        state["out_head.weight"] = state["tok_emb.weight"]
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # names missing, unexpected and misshapen tensors
        raise UsageError(f"checkpoint {str(path)!r}: {MODEL_FILE} does not hold the model {CONFIG_FILE} and "
                         f"{FINETUNE_FILE} describe ({' '.join(str(e).split())[:240]})") from None
    if cfg.tie_weights:
        model.out_head.weight = model.tok_emb.weight
    return model


# --- saving and merging --------------------------------------------------------------------------
def finetuned_files(meta: dict[str, Any], model: nn.Module | None = None) -> dict[str, Callable[[Path], Any]]:
    """`extra_files` for save_checkpoint: finetune.json (and the adapter files of a LoRA model)."""
    files: dict[str, Callable[[Path], Any]] = {FINETUNE_FILE: lambda p: write_json(p, meta)}
    if meta.get("lora"):
        files[ADAPTER_FILE] = lambda p: save_adapter(p.parent, model, meta["lora"])
    return files


def merge_checkpoint(checkpoint: str | Path, out: str | Path) -> Path:
    """`build-llm merge-lora`: the LoRA run at `checkpoint` as a plain checkpoint at `out` (the adapter
    merged into the base weights), which `generate`, `chat`, `classify` and `export-hf` read."""
    path = resolve_finetuned(checkpoint)
    meta = read_finetune_meta(path)  # checked before the base is hashed and loaded
    if not meta.get("lora"):
        raise UsageError(f"--checkpoint {str(path)!r} is not a LoRA run; there is nothing to merge")
    # Writing over the adapter or its base would leave an adapter that can no longer load or resume.
    check_not_input(out, {"--checkpoint": [checkpoint, path], "--init-from (the adapter's base)": meta["base"]["path"]})
    ft = load_finetuned(path)
    lora_mod.merge_lora(ft.model)
    # Finite parts can still overflow (a huge scaling), and the base may already be damaged.
    bad = [n for n, p in ft.model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise UsageError(f"merging {str(ft.path)!r} into its base gives weights that are NaN or infinity "
                         f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}); nothing was written")
    meta = {k: v for k, v in ft.meta.items() if k != "lora"}
    meta["merged_from"] = {"adapter": str(ft.path.resolve()), "lora": ft.meta["lora"]}
    return save_checkpoint(Path(out), ft.model, ft.tokenizer, finetuned_files(meta))


def load_language_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, Any]:
    """(model, tokenizer) of a checkpoint whose head predicts the next token: a plain checkpoint, an
    instruction fine-tune, or a LoRA run (its adapter merged into the base, in memory). A classifier's
    head scores labels, not the vocabulary: refused."""
    try:
        path = resolve_finetuned(path)
    except UsageError:  # no finetune.json: a plain checkpoint
        ckpt = load_checkpoint(path, device)
        return ckpt.model, ckpt.tokenizer
    ft = load_finetuned(path, device)
    if ft.meta["task"] == "classify":
        raise UsageError(f"--checkpoint {str(path)!r} is a classification fine-tune: its head scores "
                         f"{len(ft.meta['labels'])} labels, not the next token; it is no language model (use it "
                         "with `build-llm classify`)")
    return lora_mod.merge_lora(ft.model), ft.tokenizer


# --- adapter files (a LoRA run's checkpoint holds these instead of model.safetensors) ---------------
def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_adapter(directory: str | Path, model: nn.Module, meta: dict[str, Any]) -> list[str]:
    """Write ADAPTER_FILE (the trainable tensors) and ADAPTER_META_FILE into `directory` (which the
    caller writes atomically, e.g. as save_checkpoint's extra files)."""
    directory = Path(directory)
    save_file(lora_mod.adapter_state(model), directory / ADAPTER_FILE, metadata={"format": "pt", "lora": json.dumps(meta)})
    (directory / ADAPTER_META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return [ADAPTER_FILE, ADAPTER_META_FILE]


def load_adapter(directory: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, metadata) of an adapter written by save_adapter."""
    directory = Path(directory)
    meta = _read_json(directory, ADAPTER_META_FILE)
    _check_adapter_meta(directory, meta)
    try:
        tensors = load_file(directory / ADAPTER_FILE)
    except (OSError, ValueError, SafetensorError) as e:
        raise UsageError(f"adapter in {str(directory)!r} is missing or unreadable ({e})") from e
    _check_adapter_tensors(directory, tensors)
    return tensors, meta


def _check_adapter_meta(directory: Path, meta: Any) -> None:
    """adapter.json holds the settings apply_adapter reads, each of its type (the tensors' shapes are
    checked against the rank by apply_adapter, before anything is allocated)."""
    if not isinstance(meta, dict):
        raise _invalid(directory, ADAPTER_META_FILE, "", meta, "a JSON object")
    rank, alpha, scaling, targets, rows = (meta.get(k) for k in ("rank", "alpha", "scaling", "targets", "token_rows"))
    checks = {
        "rank": (type(rank) is int and rank >= 1, "an integer >= 1"),
        "alpha": (type(alpha) in (int, float) and math.isfinite(alpha) and alpha > 0, "a number > 0"),
        "scaling": (type(scaling) in (int, float) and math.isfinite(scaling), "a finite number"),
        "targets": (isinstance(targets, list) and targets and all(isinstance(t, str) and t in lora_mod.TARGETS
                                                                  for t in targets),
                    f"a list of one or more of {sorted(lora_mod.TARGETS)}"),
        "token_rows": (rows is None or (isinstance(rows, list) and all(type(i) is int and i >= 0 for i in rows)),
                       "a list of token ids"),
    }
    for key, (ok, valid) in checks.items():
        if not ok:
            raise _invalid(directory, ADAPTER_META_FILE, key, meta.get(key), valid)


def _check_adapter_tensors(directory: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Refuse tensors that would load without complaint but merge into NaN, infinity or rounded garbage."""
    where = f"adapter in {str(directory)!r}"
    for name, t in tensors.items():
        # load_state_dict would convert an int8, bool or complex tensor to the model's dtype silently
        if not t.is_floating_point():
            raise UsageError(f"{where}: {name} is {t.dtype}; an adapter's tensors are floating point "
                             "(as build-llm finetune writes them)")
        if not torch.isfinite(t).all():
            raise UsageError(f"{where}: {name} holds NaN or infinity (a damaged file or a diverged run); "
                             "use another checkpoint of the run")

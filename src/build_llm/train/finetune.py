"""Fine-tuning (the book's chapters 6 and 7): text classification and instruction following.

Classification: the output head is replaced by a new Linear(emb_dim, num_classes); the logits of
each text's last token (its last real token, not padding) are the class scores; the book's recipe
trains the head, the last transformer block and the final norm and freezes the rest.

Instruction: each example is a conversation rendered with the book's Alpaca prompt format (an
Alpaca record {instruction, input, output} is one user turn and one assistant turn, and renders
exactly as the book's `format_input(entry) + "\\n\\n### Response:\\n" + output`); the end token is
appended to every response and learned. The loss covers response tokens only: prompt and padding
targets are IGNORE_INDEX. It is a mean over target tokens, also under gradient accumulation, where
each micro-batch's summed loss is divided by the token count of the whole step.

With LoRA (lora.py) only the adapters (and a classifier's new head, or the end token's rows) train,
and the checkpoint holds the adapter alone, plus the identity of the base checkpoint it applies to.

`finetune(...)` is the loop behind `build-llm finetune classify|instruct`; the batch of step s is a
slice of a permutation drawn from (seed, epoch), and dropout is reseeded from (seed, s), so a run
stopped and resumed takes exactly the steps an uninterrupted run takes.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from build_llm import lora as lora_mod
from build_llm.errors import UsageError
from build_llm.train.config import CLASSIFY_TRAINABLE, RESUMABLE, FinetuneConfig

IGNORE_INDEX = -100
FINETUNE_FILE = "finetune.json"
ALPACA_PREAMBLE = ("Below is an instruction that describes a task. "
                   "Write a response that appropriately completes the request.")
INSTRUCTION_HEADER, INPUT_HEADER, RESPONSE_HEADER = "\n\n### Instruction:\n", "\n\n### Input:\n", "\n\n### Response:\n"
ROLES = ("system", "user", "assistant")


# --- prompt format -------------------------------------------------------------------------------
def format_input(entry: dict[str, str]) -> str:
    """The book's Alpaca prompt for an {instruction, input} record (the input section only when non-empty)."""
    text = ALPACA_PREAMBLE + INSTRUCTION_HEADER + entry["instruction"]
    return text + (INPUT_HEADER + entry["input"] if entry.get("input") else "")


def entry_to_messages(entry: dict[str, str]) -> list[dict[str, str]]:
    """An Alpaca record as a conversation: one user turn (instruction and input), one assistant turn."""
    user = entry["instruction"] + (INPUT_HEADER + entry["input"] if entry.get("input") else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": entry["output"]}]


def render_pieces(messages: Sequence[dict[str, str]], add_generation_prompt: bool = False) -> list[tuple[str, bool]]:
    """The conversation as (text, is_response) pieces: the chat template.

    An optional first system message replaces the Alpaca preamble; each user turn is an
    "### Instruction:" section followed by the "### Response:" header; each assistant turn is the
    response (followed, when encoded, by the end token). With `add_generation_prompt` the last user
    turn's response header ends the text, where the model is to continue.
    """
    system = ALPACA_PREAMBLE
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    pieces: list[tuple[str, bool]] = []
    pending = system
    for m in messages:
        if m["role"] == "user":
            pending += INSTRUCTION_HEADER + m["content"] + RESPONSE_HEADER
        else:
            pieces += [(pending, False), (m["content"], True)]
            pending = ""
    if pending and (add_generation_prompt or not pieces):
        pieces.append((pending, False))
    return pieces


def encode_conversation(messages: Sequence[dict[str, str]], tokenizer: Any, eos_id: int,
                        add_generation_prompt: bool = False) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation and, per token, whether it is response (trained on).

    Pieces are encoded separately so that a response's tokens never merge with the header before it;
    an end token follows every response.
    """
    ids: list[int] = []
    is_response: list[bool] = []
    for text, response in render_pieces(messages, add_generation_prompt):
        piece = tokenizer.encode(text)
        if response:
            piece = piece + [eos_id]
        ids += piece
        is_response += [response] * len(piece)
    return ids, is_response


# --- reading data --------------------------------------------------------------------------------
def _check_messages(messages: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise UsageError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    roles = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
            raise UsageError(f"{where}: each message needs 'role' (one of {list(ROLES)}) and a string 'content'; "
                             f"got {str(m)[:80]}")
        roles.append(m["role"])
    turns = roles[1:] if roles[0] == "system" else roles
    expected = ["user", "assistant"] * (len(turns) // 2 + 1)
    if not turns or turns != expected[:len(turns)] or turns[-1] != "assistant":
        raise UsageError(f"{where}: roles {roles} are invalid; expected an optional system message, then user "
                         "and assistant turns alternating, ending with assistant")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _record_to_messages(record: Any, where: str) -> tuple[list[dict[str, str]], str]:
    if isinstance(record, dict) and "messages" in record:
        return _check_messages(record["messages"], where), "chat"
    if isinstance(record, dict) and "instruction" in record and "output" in record:
        for key in ("instruction", "input", "output"):
            if key in record and not isinstance(record[key], str):
                raise UsageError(f"{where}: {key!r} must be a string, got {type(record[key]).__name__}")
        return entry_to_messages(record), "alpaca"
    raise UsageError(f"{where}: expected an Alpaca record (instruction, input, output) or a chat record "
                     f"({{\"messages\": [...]}}), got {str(record)[:80]}")


def read_instruction_data(path: str | Path) -> tuple[list[list[dict[str, str]]], str]:
    """Conversations from a JSON array or JSONL file of Alpaca records or chat records; and the format
    ("alpaca" or "chat")."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--data {str(path)!r} cannot be read as UTF-8 text ({e})") from e
    records: list[tuple[Any, str]] = []
    try:
        parsed = json.loads(text)
        if not isinstance(parsed, list):
            parsed = [parsed]
        records = [(r, f"{path} record {i + 1}") for i, r in enumerate(parsed)]
    except json.JSONDecodeError:
        for i, line in enumerate(text.splitlines()):
            if line.strip():
                try:
                    records.append((json.loads(line), f"{path} line {i + 1}"))
                except json.JSONDecodeError as e:
                    raise UsageError(f"{path} line {i + 1} is not JSON ({e.msg}); expected a JSON array or one "
                                     "JSON object per line") from None
    if not records:
        raise UsageError(f"--data {str(path)!r} holds no records; expected Alpaca records or chat records")
    conversations, formats = [], set()
    for record, where in records:
        messages, fmt = _record_to_messages(record, where)
        conversations.append(messages)
        formats.add(fmt)
    return conversations, "alpaca" if formats == {"alpaca"} else "chat"


def read_labeled_csv(path: str | Path, text_column: str, label_column: str) -> tuple[list[str], list[str]]:
    """(texts, labels) from a CSV file with a header row."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            for col, flag in ((text_column, "--text-column"), (label_column, "--label-column")):
                if col not in columns:
                    raise UsageError(f"{flag} {col!r} is not a column of {str(path)!r}; its columns are {columns}")
            texts, labels = [], []
            for i, row in enumerate(reader):
                text, label = row[text_column], row[label_column]
                if not text or not text.strip() or label is None or not label.strip():
                    raise UsageError(f"{path} row {i + 2}: empty text or label; every row needs both")
                texts.append(text)
                labels.append(label.strip())
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UsageError(f"--data {str(path)!r} cannot be read as a UTF-8 CSV file ({e})") from e
    if not texts:
        raise UsageError(f"--data {str(path)!r} has no rows; expected a header and one row per example")
    return texts, labels


# --- batches -------------------------------------------------------------------------------------
@dataclass
class Example:
    ids: list[int]
    target: int | list[bool]  # a class id, or per-token "is response" flags


def collate_classification(examples: Sequence[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """inputs (B, T) padded on the right with pad_id, lengths (B,), labels (B,)."""
    T = max(len(e.ids) for e in examples)
    inputs = torch.full((len(examples), T), pad_id, dtype=torch.long)
    for i, e in enumerate(examples):
        inputs[i, :len(e.ids)] = torch.tensor(e.ids)
    lengths = torch.tensor([len(e.ids) for e in examples])
    return inputs, lengths, torch.tensor([e.target for e in examples])


def collate_instruction(examples: Sequence[Example], pad_id: int, ignore_index: int = IGNORE_INDEX,
                        max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """inputs (B, T) and next-token targets (B, T); targets that are not response tokens (the prompt)
    or are padding are `ignore_index`. Sequences are cut to `max_length` inputs."""
    rows = []
    for e in examples:
        ids = e.ids if max_length is None else e.ids[:max_length + 1]
        targets = [t if r else ignore_index for t, r in zip(ids[1:], e.target[1:])]
        rows.append((ids[:-1], targets))
    T = max(len(x) for x, _ in rows)
    inputs = torch.full((len(rows), T), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), T), ignore_index, dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        inputs[i, :len(x)] = torch.tensor(x, dtype=torch.long)
        targets[i, :len(y)] = torch.tensor(y, dtype=torch.long)
    return inputs, targets


def last_token_logits(model: nn.Module, inputs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Logits (B, C) at each row's last real token."""
    logits = model(inputs)  # (B, T, C)
    return logits[torch.arange(inputs.shape[0], device=inputs.device), lengths.to(inputs.device) - 1]


def token_loss_sum(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(summed cross-entropy over the non-ignored targets, their number)."""
    logits = model(inputs)  # (B, T, V)
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, int((targets != IGNORE_INDEX).sum())


# --- models --------------------------------------------------------------------------------------
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
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


# --- building and loading fine-tuned models ------------------------------------------------------
def build_model(base_cfg, meta: dict[str, Any], device: str | torch.device = "cpu") -> nn.Module:
    """An empty model shaped as `meta` (finetune.json) says: the base model, a classifier head for
    classify, LoRA layers for an adapter run."""
    from build_llm.config import GPTConfig
    from build_llm.gpt import GPTModel

    model = GPTModel(GPTConfig.coerce(base_cfg)).to(device)
    if meta["task"] == "classify":
        prepare_classifier(model, len(meta["labels"]))
    return model


def _base_identity(base_dir: Path) -> dict[str, Any]:
    from build_llm.store.checkpoint import MODEL_FILE

    return {"path": str(base_dir.resolve()), "sha256": lora_mod.file_sha256(base_dir / MODEL_FILE)}


@dataclass
class Finetuned:
    model: nn.Module
    tokenizer: Any
    meta: dict[str, Any]   # finetune.json: task, labels, format, base, lora, config
    path: Path


def resolve_finetuned(path: str | Path) -> Path:
    from build_llm.store.checkpoint import CHECKPOINT_DIR, PREVIOUS_DIR

    path = Path(path)
    for candidate in (path, path / CHECKPOINT_DIR, path / PREVIOUS_DIR):
        if (candidate / FINETUNE_FILE).is_file():
            return candidate
    raise UsageError(f"--checkpoint {str(path)!r} holds no fine-tuned checkpoint (no {FINETUNE_FILE}); give the "
                     "--out of `build-llm finetune` or of `build-llm merge-lora`")


def load_finetuned(path: str | Path, device: str | torch.device = "cpu") -> Finetuned:
    """A fine-tuned model (eval mode) from a run directory or checkpoint directory of `finetune`
    (full or LoRA: the adapter is applied to its base checkpoint, whose identity is checked)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from build_llm.store.checkpoint import CONFIG_FILE, MODEL_FILE, TOKENIZER_FILE, load_checkpoint
    from build_llm.config import GPTConfig
    from build_llm.data.tokenizer import load_tokenizer

    path = resolve_finetuned(path)
    try:
        meta = json.loads((path / FINETUNE_FILE).read_text(encoding="utf-8"))
        cfg = GPTConfig.from_dict(json.loads((path / CONFIG_FILE).read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError) as e:
        raise UsageError(f"checkpoint {str(path)!r}: {FINETUNE_FILE} or {CONFIG_FILE} is unreadable ({e})") from e
    tokenizer = load_tokenizer(path / TOKENIZER_FILE)
    if meta.get("lora"):
        base = Path(meta["base"]["path"])
        if not (base / MODEL_FILE).is_file():
            raise UsageError(f"checkpoint {str(path)!r} is a LoRA adapter for the base checkpoint {str(base)!r}, "
                             "which is no longer there; put the base back or use a merged checkpoint")
        if lora_mod.file_sha256(base / MODEL_FILE) != meta["base"]["sha256"]:
            raise UsageError(f"the base checkpoint {str(base)!r} has changed since the adapter in {str(path)!r} "
                             "was trained on it; the adapter does not apply to these weights")
        model = load_checkpoint(base, device).model
        if meta["task"] == "classify":
            prepare_classifier(model, len(meta["labels"]))
        tensors, lora_meta = lora_mod.load_adapter(path)
        lora_mod.apply_adapter(model, {k: v.to(device) for k, v in tensors.items()}, lora_meta)
    else:
        model = build_model(cfg if meta["task"] == "instruct" else cfg.replace(tie_weights=False), meta, device)
        try:
            state = load_file(path / MODEL_FILE, device=str(device))
        except (SafetensorError, OSError) as e:
            raise UsageError(f"checkpoint {str(path)!r}: {MODEL_FILE} is missing or unreadable ({e})") from e
        if cfg.tie_weights and "out_head.weight" not in state:
            state["out_head.weight"] = state["tok_emb.weight"]
        model.load_state_dict(state, strict=True)
        if cfg.tie_weights:
            model.out_head.weight = model.tok_emb.weight
    return Finetuned(model.eval(), tokenizer, meta, path)


def finetuned_files(meta: dict[str, Any], model: nn.Module | None = None) -> dict[str, Callable[[Path], Any]]:
    """`extra_files` for save_checkpoint: finetune.json (and the adapter files of a LoRA model)."""
    from build_llm.store.checkpoint import write_json

    files: dict[str, Callable[[Path], Any]] = {FINETUNE_FILE: lambda p: write_json(p, meta)}
    if meta.get("lora"):
        files[lora_mod.ADAPTER_FILE] = lambda p: lora_mod.save_adapter(p.parent, model, meta["lora"])
    return files


def merge_checkpoint(checkpoint: str | Path, out: str | Path) -> Path:
    """`build-llm merge-lora`: the LoRA run at `checkpoint` as a plain checkpoint at `out` (the adapter
    merged into the base weights), which `generate`, `chat`, `classify` and `export-hf` read."""
    from build_llm.store.checkpoint import save_checkpoint

    ft = load_finetuned(checkpoint)
    if not ft.meta.get("lora"):
        raise UsageError(f"--checkpoint {str(ft.path)!r} is not a LoRA run; there is nothing to merge")
    lora_mod.merge_lora(ft.model)
    meta = {k: v for k, v in ft.meta.items() if k != "lora"}
    meta["merged_from"] = {"adapter": str(ft.path.resolve()), "lora": ft.meta["lora"]}
    return save_checkpoint(Path(out), ft.model, ft.tokenizer, finetuned_files(meta))


# --- prediction and generation -------------------------------------------------------------------
@torch.no_grad()
def classify_texts(model: nn.Module, tokenizer: Any, labels: Sequence[str], texts: Sequence[str],
                   max_length: int | None = None, batch_size: int = 16) -> list[dict[str, Any]]:
    """For each text: {"label": most probable label, "probabilities": {label: p}}."""
    limit = min(max_length or model.cfg.context_length, model.cfg.context_length)
    device = next(model.parameters()).device
    pad = getattr(tokenizer, "eos_id", None) or 0
    results = []
    for i in range(0, len(texts), batch_size):
        examples = [Example(_nonempty(tokenizer.encode(t), t)[:limit], 0) for t in texts[i:i + batch_size]]
        inputs, lengths, _ = collate_classification(examples, pad)
        probas = torch.softmax(last_token_logits(model, inputs.to(device), lengths).float(), dim=-1)
        for row in probas.tolist():
            best = max(range(len(row)), key=row.__getitem__)
            results.append({"label": labels[best], "probabilities": dict(zip(labels, row))})
    return results


def _nonempty(ids: list[int], text: str) -> list[int]:
    if not ids:
        raise UsageError(f"text {text[:40]!r} encodes to no tokens; give a non-empty text")
    return ids


def fit_conversation(messages: list[dict[str, str]], tokenizer: Any, eos_id: int, budget: int
                     ) -> tuple[list[int], int]:
    """Prompt ids for the conversation (ending with the response header) in at most `budget` tokens,
    dropping the oldest user/assistant turns as needed; returns (ids, turns dropped)."""
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = messages[len(system):]
    dropped = 0
    while True:
        ids, _ = encode_conversation(system + turns, tokenizer, eos_id, add_generation_prompt=True)
        if len(ids) <= budget:
            return ids, dropped
        if len(turns) <= 1:
            raise UsageError(f"the message is {len(ids)} tokens with its prompt, more than the {budget} the "
                             "context window leaves; send a shorter message")
        turns, dropped = turns[2:], dropped + 1


def stream_response(model: nn.Module, tokenizer: Any, prompt_ids: list[int], eos_id: int, max_new_tokens: int,
                    *, temperature: float = 0.0, top_k: int | None = None,
                    generator: torch.Generator | None = None) -> Iterator[str]:
    """Yield the response text piece by piece as tokens are generated, up to the end token (not
    included). Text is yielded only up to whole characters (a byte-level BPE can split a character)."""
    from build_llm.infer.generate import decode_stream, stream

    device = next(model.parameters()).device
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=device)

    def new_ids() -> Iterator[int]:
        for token in stream(model, idx, max_new_tokens, temperature=temperature, top_k=top_k, eos_id=eos_id,
                            generator=generator):
            if int(token[0, 0]) == eos_id:
                return
            yield int(token[0, 0])

    yield from decode_stream(tokenizer, new_ids())


def respond(model: nn.Module, tokenizer: Any, messages: list[dict[str, str]], max_new_tokens: int = 64,
            **sampling: Any) -> str:
    """The model's whole (greedy by default) reply to a conversation ending with a user message."""
    eos = require_eos(tokenizer)
    budget = model.cfg.context_length - max_new_tokens
    ids, _ = fit_conversation(messages, tokenizer, eos, max(budget, 1))
    return "".join(stream_response(model, tokenizer, ids, eos, max_new_tokens, **sampling))


def require_eos(tokenizer: Any) -> int:
    eos = getattr(tokenizer, "eos_id", None)
    if eos is None:
        raise UsageError(f"the tokenizer ({type(tokenizer).__name__}) has no end token (<|endoftext|>), which "
                         "instruction fine-tuning appends to every response; use a GPT-2 or trained BPE tokenizer")
    return eos


# --- the training loop ---------------------------------------------------------------------------
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
    from build_llm.data.corpus import fingerprint

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
    encode = lambda ts, ls: [Example(_nonempty(tokenizer.encode(t), t)[:max_length], index[lab])  # noqa: E731
                             for t, lab in zip(ts, ls)]
    meta = {"data": str(data), "data_sha256": fingerprint(data),
            "val_data": None if val_data is None else str(val_data),
            "val_data_sha256": None if val_data is None else fingerprint(val_data),
            "text_column": text_column, "label_column": label_column, "labels": names,
            "n_train": len(texts), "n_val": len(val_texts)}
    return FinetuneData("classify", encode(texts, labels), encode(val_texts, val_labels), meta)


def prepare_instruction(data: str | Path, val_data: str | Path | None, tokenizer: Any, max_length: int,
                        cfg: FinetuneConfig) -> FinetuneData:
    from build_llm.data.corpus import fingerprint

    eos = require_eos(tokenizer)
    conversations, fmt = read_instruction_data(data)
    if val_data is not None:
        val, fmt_val = read_instruction_data(val_data)
        fmt = fmt if fmt == fmt_val else "chat"
    else:
        train_idx, val_idx = split_indices(len(conversations), cfg.val_fraction, cfg.seed)
        val = [conversations[i] for i in val_idx]
        conversations = [conversations[i] for i in train_idx]

    def encode(convs):
        out = []
        for messages in convs:
            ids, is_response = encode_conversation(messages, tokenizer, eos)
            out.append(Example(ids[:max_length + 1], is_response[:max_length + 1]))
        return out

    train, val_examples = encode(conversations), encode(val)
    n_cut = sum(len(e.ids) == max_length + 1 for e in train)
    meta = {"data": str(data), "data_sha256": fingerprint(data),
            "val_data": None if val_data is None else str(val_data),
            "val_data_sha256": None if val_data is None else fingerprint(val_data),
            "format": fmt, "n_train": len(train), "n_val": len(val_examples), "n_truncated": n_cut}
    return FinetuneData("instruct", train, val_examples, meta)


def steps_per_epoch(n: int, batch_size: int) -> int:
    return math.ceil(n / batch_size)


def batch_at(step: int, n: int, cfg: FinetuneConfig) -> np.ndarray:
    """Indices of the training examples of `step`: a slice of epoch's permutation from (seed, epoch)."""
    spe = steps_per_epoch(n, cfg.batch_size)
    epoch, i = divmod(step, spe)
    order = np.random.default_rng([cfg.seed, 1, epoch]).permutation(n)
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


def finetune(out_dir: str | Path, init_from: str | Path, cfg: FinetuneConfig, *, data: str | Path,
             val_data: str | Path | None = None, text_column: str = "text", label_column: str = "label",
             resume: bool = False, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Fine-tune the checkpoint `init_from` on `data`, writing metrics.jsonl and checkpoint/ in out_dir.
    Returns the last evaluation row. Raises train.TrainingStopped on Ctrl-C (after saving) and when
    the loss stops being finite."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    from build_llm.store.checkpoint import (CHECKPOINT_DIR, load_checkpoint, load_trainer_state, resolve_checkpoint,
                             save_checkpoint, set_rng_state, trainer_files)
    from build_llm.runtime import get_device
    from build_llm.train.run import cpu_threads_for
    from build_llm.train.loop import RunLog, StopFlag, TrainingStopped, TrainState

    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    out_dir = Path(out_dir)
    device = get_device(cfg.device)
    saved = load_trainer_state(resolve_finetuned(out_dir)) if resume else None
    if saved is not None:
        prev = saved.state
        before = FinetuneConfig.from_dict(prev["finetune_config"])
        for key in (f.name for f in dataclasses.fields(FinetuneConfig)):
            if key not in RESUMABLE and getattr(before, key) != getattr(cfg, key):
                raise UsageError(f"--resume: the run was started with {key}={getattr(before, key)!r}, not "
                                 f"{getattr(cfg, key)!r}; drop the option or start a new run with another --out")
    base_dir = resolve_checkpoint(init_from)
    base_identity = _base_identity(base_dir)
    ckpt = load_checkpoint(base_dir, device)
    model, tokenizer = ckpt.model, ckpt.tokenizer
    if tokenizer is None:
        raise UsageError(f"--init-from {str(base_dir)!r} has no tokenizer.json; fine-tuning needs to encode text")
    if saved is not None and saved.state["init_from_sha256"] != base_identity["sha256"]:
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
    pad_id = getattr(tokenizer, "eos_id", None) or 0

    torch.manual_seed(cfg.seed)  # the new head's initialisation
    if cfg.task == "classify":
        prepare_classifier(model, len(ft_data.meta["labels"]), train_last_block=cfg.lora_rank is None,
                           trainable=cfg.trainable)
    lora_meta = None
    if cfg.lora_rank is not None:
        lora_mod.apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
        if cfg.task == "instruct":  # the end token the base never predicted (lora.py: token rows)
            lora_mod.train_token_rows(model, [require_eos(tokenizer)])
        lora_mod.freeze_for_lora(model, ["out_head"] if cfg.task == "classify" else [])
        lora_meta = lora_mod.adapter_meta(model, cfg.lora_targets, base_identity)
    elif cfg.task == "instruct":
        for p in model.parameters():
            p.requires_grad = True
    trainable, total_params = count_trainable(model)
    meta = {"task": cfg.task, "labels": ft_data.meta.get("labels"), "format": ft_data.meta.get("format"),
            "base": base_identity, "lora": lora_meta, "finetune_config": cfg.to_dict(),
            "max_length": max_length, "trainable_parameters": trainable, "parameters": total_params}
    if saved is not None:
        weights = load_finetuned(saved.path, device).model.state_dict()
        model.load_state_dict(weights, strict=True)
    model.to(device)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                                   {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}], lr=cfg.lr)
    n_train = len(ft_data.train)
    spe = steps_per_epoch(n_train, cfg.batch_size)
    total_steps = cfg.steps or cfg.epochs * spe
    eval_every = cfg.eval_every or spe
    state = TrainState(core=model, model=model, optimizer=optimizer)
    if saved is not None:
        set_optimizer_state_dict(model, optimizer, saved.optimizer)
        set_rng_state(saved.rng, saved.state["rng"])
        state.step, state.elapsed, state.tokens_seen = (saved.state["step"], saved.state["elapsed_s"],
                                                        saved.state["tokens_seen"])
    else:
        log(f"fine-tuning ({cfg.task}{', LoRA rank %d' % cfg.lora_rank if lora_meta else ''}): "
            f"{trainable:,} of {total_params:,} parameters trainable ({100 * trainable / total_params:.2f}%), "
            f"{n_train} training and {len(ft_data.val)} validation examples, {total_steps} steps")
        if ft_data.meta.get("n_truncated"):
            log(f"note: {ft_data.meta['n_truncated']} training example(s) are longer than {max_length} tokens and "
                "were cut (their end token is lost)")

    def save() -> None:
        trainer = {"format": 1, "step": state.step, "elapsed_s": state.elapsed, "tokens_seen": state.tokens_seen,
                   "finetune_config": cfg.to_dict(), "data": ft_data.meta, "init_from_sha256": meta["base"]["sha256"]}
        files = {**finetuned_files(meta, model), **trainer_files(get_optimizer_state_dict(model, optimizer), trainer)}
        if lora_meta is not None:  # the adapter alone, no copy of the base weights
            _save_without_weights(out_dir / CHECKPOINT_DIR, model, tokenizer, files)
        else:
            save_checkpoint(out_dir / CHECKPOINT_DIR, model, tokenizer, files)

    # The run's record (metrics.jsonl, progress bar, loss.png) is the trainer's; the step differs from
    # train.train_step in weighting micro-batches by their target tokens instead of equally.
    run_log = RunLog(out_dir, total_steps, state, resume=saved is not None, log=log)
    threads = torch.get_num_threads()  # restored at the end: the setting is process-wide
    cpu_threads_for(model.cfg, device)
    try:
        model.train()
        with StopFlag() as stop:
            while state.step < total_steps:
                torch.manual_seed(int(np.random.default_rng([cfg.seed, 2, state.step]).integers(2**62)))  # dropout
                examples = [ft_data.train[i] for i in batch_at(state.step, n_train, cfg)]
                t0 = time.perf_counter()
                optimizer.zero_grad(set_to_none=True)
                loss, n_targets = step_loss(model, examples, cfg.task, pad_id, max_length, cfg.micro_batch_size,
                                            device)
                if not math.isfinite(loss):
                    raise TrainingStopped(f"loss is {loss} at step {state.step + 1}: fine-tuning diverged; the last "
                                          f"good checkpoint is kept in {out_dir / CHECKPOINT_DIR} (try a lower --lr)", 1)
                if cfg.grad_clip > 0:
                    nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                optimizer.step()
                tokens = sum(len(e.ids) for e in examples)
                state.step, state.tokens_seen = state.step + 1, state.tokens_seen + tokens
                run_log.step(loss, cfg.lr, time.perf_counter() - t0, tokens)
                evaluated = state.step % eval_every == 0 or state.step == total_steps
                if evaluated:
                    metrics = evaluate(model, ft_data, pad_id, max_length, device)
                    state.elapsed = run_log.elapsed()
                    run_log.evaluation(state, cfg.lr, {**metrics, "epoch": round(state.step / spe, 3)})
                    save()
                    run_log.plot(force=state.step == total_steps)
                if stop.raised is not None:
                    state.elapsed = run_log.elapsed()
                    if not evaluated:
                        save()
                    raise TrainingStopped(f"interrupted at step {state.step}/{total_steps}; checkpoint saved in "
                                          f"{out_dir / CHECKPOINT_DIR}; continue with --resume", 130)
    finally:
        run_log.close()
        torch.set_num_threads(threads)
    row = run_log.history[-1] if run_log.history else {}
    model.eval()
    return {**row, "trainable_parameters": trainable, "parameters": total_params}


def _save_without_weights(path: Path, model: nn.Module, tokenizer: Any, files: dict[str, Callable[[Path], Any]]) -> None:
    """A checkpoint directory (replaced atomically, as save_checkpoint does) with config, tokenizer and
    `files` but no model.safetensors: a LoRA run's checkpoint, whose weights are its base's."""
    from safetensors import SafetensorError

    from build_llm.store.checkpoint import CONFIG_FILE, TOKENIZER_FILE, unwrap, write_failed, write_json
    from build_llm.store.fsio import replace_dir

    try:
        with replace_dir(path, "checkpoint") as tmp:
            write_json(tmp / CONFIG_FILE, unwrap(model).cfg.to_dict())
            tokenizer.save(tmp / TOKENIZER_FILE)
            for name, write in files.items():
                write(tmp / name)
    except (OSError, SafetensorError) as e:
        raise write_failed(path, e) from e


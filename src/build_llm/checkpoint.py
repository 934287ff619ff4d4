"""Checkpoints: a directory with model.safetensors, config.json, tokenizer.json (and the trainer's
state when training), written atomically, loaded without pickle.

A run directory keeps its newest checkpoint in `RUN/checkpoint/`. A new one is written in full to a
temporary sibling, then swapped in by renames; if the process dies between the two renames, the
previous checkpoint is still complete under `RUN/checkpoint.old/`, and loading falls back to it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import GPTConfig
from .gpt import GPTModel

MODEL_FILE, CONFIG_FILE, TOKENIZER_FILE = "model.safetensors", "config.json", "tokenizer.json"
CHECKPOINT_DIR, PREVIOUS_DIR = "checkpoint", "checkpoint.old"


def unwrap(model: nn.Module) -> nn.Module:
    """The plain GPTModel under torch.compile / DDP / FSDP wrappers (no `_orig_mod.` in names)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        else:
            return model


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Weights to save: a tied head is stored once (as the token embedding)."""
    model = unwrap(model)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.cfg.tie_weights:
        state.pop("out_head.weight", None)
    return state


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def save_checkpoint(path: str | Path, model: nn.Module, tokenizer: Any = None,
                    extra_files: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint directory at `path`, atomically replacing any checkpoint already there.

    `extra_files` maps file names to callables that write them given a Path (the trainer's state).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"checkpoint path {str(path)!r} is a file; give a directory path")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        save_file(model_state(model), tmp / MODEL_FILE, metadata={"format": "pt"})
        write_json(tmp / CONFIG_FILE, unwrap(model).cfg.to_dict())
        if tokenizer is not None:
            tokenizer.save(tmp / TOKENIZER_FILE)
        for name, write in (extra_files or {}).items():
            write(tmp / name)
        _fsync_dir(tmp)
        old = path.with_name(path.name + ".old")
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _fsync_dir(path: Path) -> None:
    for f in [*path.iterdir(), path] if path.is_dir() else [path]:
        try:
            fd = os.open(f, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, given either it or a run directory that holds one."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"checkpoint {str(path)!r} does not exist; give a run directory or a checkpoint directory")
    if not path.is_dir():
        raise ValueError(f"checkpoint {str(path)!r} is not a directory; give a run directory or a checkpoint directory")
    if (path / CONFIG_FILE).exists() or (path / MODEL_FILE).exists():
        return path
    for name in (CHECKPOINT_DIR, path.name + ".old", PREVIOUS_DIR):
        if (path / name / MODEL_FILE).exists():
            return path / name
    # `path` may itself be a run's checkpoint dir that was mid-swap: fall back to its `.old` sibling.
    sibling = path.with_name(path.name + ".old")
    if (sibling / MODEL_FILE).exists():
        return sibling
    raise ValueError(f"no checkpoint in {str(path)!r}: expected {MODEL_FILE} and {CONFIG_FILE} there or in "
                     f"{CHECKPOINT_DIR}/")


@dataclass
class Checkpoint:
    model: GPTModel
    tokenizer: Any
    path: Path


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """Model (eval mode), tokenizer (or None) and the resolved directory of a checkpoint."""
    from .tokenizer import load_tokenizer

    path = resolve_checkpoint(path)
    for name in (CONFIG_FILE, MODEL_FILE):
        if not (path / name).is_file():
            raise ValueError(f"checkpoint {str(path)!r} is incomplete: {name} is missing")
    try:
        cfg = GPTConfig.from_dict(json.loads((path / CONFIG_FILE).read_text(encoding="utf-8")))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"checkpoint {str(path)!r}: {CONFIG_FILE} does not parse as JSON ({e})") from e
    except (TypeError, ValueError) as e:
        raise ValueError(f"checkpoint {str(path)!r}: {CONFIG_FILE} is not a valid model config: {e}") from e
    try:
        state = load_file(path / MODEL_FILE, device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"checkpoint {str(path)!r}: {MODEL_FILE} is unreadable or truncated ({e})") from e

    with torch.device("meta"):
        model = GPTModel(cfg)
    model = model.to_empty(device=device)
    model.load_state_dict(_complete(state, model, path), strict=True, assign=False)
    if cfg.tie_weights:
        model.out_head.weight = model.tok_emb.weight
    for block in model.trf_blocks:  # buffers are not saved; rebuild the causal mask on the device
        n = cfg.context_length
        block.att.mask = torch.triu(torch.ones(n, n, dtype=torch.bool, device=device), diagonal=1)
    tokenizer = load_tokenizer(path / TOKENIZER_FILE) if (path / TOKENIZER_FILE).exists() else None
    return Checkpoint(model.eval(), tokenizer, path)


def _complete(state: dict[str, torch.Tensor], model: GPTModel, path: Path) -> dict[str, torch.Tensor]:
    expected = model.state_dict()
    if model.cfg.tie_weights and "out_head.weight" not in state and "tok_emb.weight" in state:
        state["out_head.weight"] = state["tok_emb.weight"]
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"checkpoint {str(path)!r}: weights do not match config.json "
                         f"(missing {missing[:4]}, unexpected {unexpected[:4]})")
    for k, v in state.items():
        if v.shape != expected[k].shape:
            raise ValueError(f"checkpoint {str(path)!r}: {k} has shape {tuple(v.shape)} but config.json "
                             f"implies {tuple(expected[k].shape)}")
    return state


def load_model(path: str | Path, device: str | torch.device = "cpu") -> GPTModel:
    """The model of a checkpoint (or a run directory's newest), in eval mode, ready for generation."""
    return load_checkpoint(path, device).model

"""Checkpoints: a directory with model.safetensors, config.json, tokenizer.json (and the trainer's
state when training), written atomically, loaded without pickle.

A run directory keeps its newest checkpoint in `RUN/checkpoint/`. A new one is written in full to a
temporary sibling and exchanged with the old one in one step (fsio.replace_dir: there is no moment
with neither); on a file system that cannot exchange, the previous checkpoint stays complete under
`RUN/checkpoint.old/` until the new one is in place, and loading falls back to it.
"""

from __future__ import annotations

import errno
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from build_llm.attention import MultiHeadAttention
from build_llm.config import GPTConfig
from build_llm.data.tokenizer import load_tokenizer
from build_llm.errors import UsageError
from build_llm.gpt import GPTModel, use_decoding_layout
from build_llm.runtime import check_fits, release_freed_memory
from build_llm.sizing import model_memory
from build_llm.store.fsio import read_json, replace_dir, write_json

MODEL_FILE, CONFIG_FILE, TOKENIZER_FILE = "model.safetensors", "config.json", "tokenizer.json"
CHECKPOINT_DIR, PREVIOUS_DIR = "checkpoint", "checkpoint.old"
FINETUNE_FILE, ADAPTER_FILE = "finetune.json", "adapter.safetensors"  # a fine-tune's (store/finetuned.py reads them)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain GPTModel under torch.compile / DDP / FSDP wrappers (no `_orig_mod.` in names)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        else:
            return model


def mask_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the causal masks: in `state_dict()` for the book's sake (see attention.py),
    but rebuilt from the config, so never written to a checkpoint."""
    return {f"{name}.mask" for name, m in unwrap(model).named_modules() if isinstance(m, MultiHeadAttention)}


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Weights to save: a tied head is stored once (as the token embedding)."""
    model = unwrap(model)
    masks = mask_keys(model)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k not in masks}
    if model.cfg.tie_weights:
        state.pop("out_head.weight", None)
    return state


def save_checkpoint(path: str | Path, model: nn.Module, tokenizer: Any = None,
                    extra_files: dict[str, Any] | None = None, state: dict[str, torch.Tensor] | None = None,
                    weights: bool = True) -> Path:
    """Write a checkpoint directory at `path`, atomically replacing a checkpoint this package wrote
    there before (see fsio.replace_dir); any other non-empty directory is refused, and so is a training
    run's checkpoint when `extra_files` carries no trainer state (its optimizer state would be lost).

    `extra_files` maps file names to callables that write them given a Path (the trainer's state).
    `state` is the weights when they are not `model`'s own (a sharded model's gathered full state).
    `weights=False` leaves model.safetensors out: a LoRA run's checkpoint, whose weights are its base's.
    """
    path = Path(path)
    if (path / TRAINER_FILE).exists() and TRAINER_FILE not in (extra_files or {}):
        raise UsageError(f"{str(path)!r} is a training run's checkpoint (it holds {TRAINER_FILE}); replacing it "
                         "would lose the optimizer state and break --resume; give another directory")
    try:
        with replace_dir(path, "checkpoint") as tmp:
            if weights and state is not None:
                unsaved = mask_keys(model) | ({"out_head.weight"} if unwrap(model).cfg.tie_weights else set())
                state = {k: v for k, v in state.items() if k not in unsaved}
            if weights:
                save_file(model_state(model) if state is None else {k: v.contiguous() for k, v in state.items()},
                          tmp / MODEL_FILE, metadata={"format": "pt"})
            write_json(tmp / CONFIG_FILE, unwrap(model).cfg.to_dict())
            if tokenizer is not None:
                tokenizer.save_to(tmp)  # tokenizer.json, and a Hugging Face tokenizer's side files
            for name, write in (extra_files or {}).items():
                write(tmp / name)
    except (OSError, SafetensorError) as e:
        raise write_failed(path, e) from e
    return path


def write_failed(path: Path, e: BaseException) -> OSError:
    """An OSError for a failed save that says what was kept (the previous directory, untouched)."""
    err = getattr(e, "errno", None)
    text = str(e)
    if err is None and "No space left" in text:  # safetensors reports the OS error as text
        err = errno.ENOSPC
    kept = "; the previous one there is kept unchanged" if path.exists() else "; nothing was written"
    reason = os.strerror(err) if err else text
    return OSError(err or errno.EIO, f"could not write {str(path)!r}: {reason}{kept}")


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, given either it or a run directory that holds one."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"checkpoint {str(path)!r} does not exist; give a run directory or a checkpoint directory")
    if not path.is_dir():
        raise UsageError(f"checkpoint {str(path)!r} is not a directory; give a run directory or a checkpoint directory")
    if (path / CONFIG_FILE).exists() or (path / MODEL_FILE).exists():
        return path
    for name in (CHECKPOINT_DIR, path.name + ".old", PREVIOUS_DIR):
        if (path / name / MODEL_FILE).exists():
            return path / name
    # `path` may itself be a run's checkpoint dir that was mid-swap: fall back to its `.old` sibling.
    sibling = path.with_name(path.name + ".old")
    if (sibling / MODEL_FILE).exists():
        return sibling
    check_whole_model(path / CHECKPOINT_DIR, path)
    raise UsageError(f"no checkpoint in {str(path)!r}: expected {MODEL_FILE} and {CONFIG_FILE} there or in "
                     f"{CHECKPOINT_DIR}/")


def check_whole_model(path: Path, given: str | Path) -> None:
    """Refuse, by name, a fine-tune in the checkpoint directory `path` that is not a whole language
    model (store/finetuned.py reads those): a LoRA run keeps only its adapter, a classifier's head
    scores labels. Without this a newcomer reads "no checkpoint" or "weights do not match"."""
    if (path / ADAPTER_FILE).is_file():
        raise UsageError(f"{str(given)!r} is a LoRA run: it holds an adapter, not a whole model; merge it into its "
                         f"base first (build-llm merge-lora --checkpoint {given} --out DIR) and give DIR")
    meta = read_json(path / FINETUNE_FILE, f"checkpoint {str(path)!r}") if (path / FINETUNE_FILE).is_file() else {}
    if isinstance(meta, dict) and meta.get("task") == "classify":
        raise UsageError(f"{str(given)!r} is a classification fine-tune: its head scores labels, not the next token, "
                         "so it is no language model; use it with build-llm classify")


@dataclass
class Checkpoint:
    model: GPTModel
    tokenizer: Any
    path: Path


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu",
                    convert: Callable[[nn.Module], Any] | None = None,
                    memory: Callable[[GPTConfig], int] = model_memory) -> Checkpoint:
    """Model (eval mode), tokenizer (or None) and the resolved directory of a checkpoint.

    The weights are read one part at a time (a block, then the embeddings, final norm and head), each
    straight into its place: the process holds the model and one part in flight, never a second copy.
    `convert(part)`, if given, turns each part into its final form (e.g. decoding weights) before the
    next is read; `memory(cfg)` is then the peak that refuses a model too large for the machine."""
    given, path = path, resolve_checkpoint(path)
    check_whole_model(path, given)
    for name in (CONFIG_FILE, MODEL_FILE):
        if not (path / name).is_file():
            raise UsageError(f"checkpoint {str(path)!r} is incomplete: {name} is missing")
    config = read_json(path / CONFIG_FILE, f"checkpoint {str(path)!r}: {CONFIG_FILE}")
    try:
        cfg = GPTConfig.from_dict(config)
    except (TypeError, ValueError) as e:
        raise UsageError(f"checkpoint {str(path)!r}: {CONFIG_FILE} is not a valid model config: {e}") from e
    check_fits(memory(cfg), f"the model of checkpoint {str(path)!r}", device)
    check_weights_file(path, cfg)  # names and shapes, from the header: before any allocation
    with torch.device("meta"):
        model = GPTModel(cfg)
    load_parts(model, path / MODEL_FILE, device, convert)
    tokenizer = load_tokenizer(path / TOKENIZER_FILE) if (path / TOKENIZER_FILE).exists() else None
    if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
        raise UsageError(f"checkpoint {str(path)!r}: {TOKENIZER_FILE} has {tokenizer.vocab_size} ids but the model's "
                         f"vocabulary has {cfg.vocab_size}; the files do not belong together")
    return Checkpoint(model.eval(), tokenizer, path)


@torch.no_grad()
def load_parts(model: GPTModel, file: Path, device: str | torch.device,
               convert: Callable[[nn.Module], Any] | None = None) -> None:
    """Fill a meta-device `model` from the safetensors `file` (checked by check_weights_file), one part at a
    time: each block, then the rest (a tied head shares the token table again). The file is opened anew
    for each part because a mapped file's pages count as the process's memory while it stays open."""
    parts = [(f"trf_blocks.{i}.", block) for i, block in enumerate(model.trf_blocks)] + [("", model)]
    for prefix, part in parts:
        dtypes = {n: p.dtype for n, p in part.named_parameters() if p.is_meta}  # the parts not yet read
        try:
            with safe_open(str(file), framework="pt", device=str(device)) as f:
                state = {n: f.get_tensor(prefix + n) for n in dtypes if prefix + n in f.keys()}
        except (SafetensorError, OSError, ValueError) as e:
            raise UsageError(f"checkpoint {str(file.parent)!r}: {MODEL_FILE} is unreadable or truncated ({e})") from e
        # Converted as copying into the parameters would. A CPU tensor of safe_open is a view of the mapped file,
        # which stays mapped, its pages resident, while any view lives: each is copied out.
        state = {n: t.to(dtypes[n], copy=t.device.type == "cpu") for n, t in state.items()}
        part.load_state_dict(state, strict=bool(prefix), assign=True)
        if not prefix and model.cfg.tie_weights:
            model.out_head.weight = model.tok_emb.weight
        del state  # the part's own tensors now: one part's are in flight at a time
        if convert is not None:
            convert(part)
        release_freed_memory()


def _complete(state: dict[str, torch.Tensor], model: GPTModel, path: Path) -> dict[str, torch.Tensor]:
    masks = mask_keys(model)
    expected = {k: v for k, v in model.state_dict().items() if k not in masks}
    state = {k: v for k, v in state.items() if k not in masks}
    if model.cfg.tie_weights and "out_head.weight" not in state and "tok_emb.weight" in state:
        state["out_head.weight"] = state["tok_emb.weight"]
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise UsageError(f"checkpoint {str(path)!r}: weights do not match config.json "
                         f"(missing {missing[:4]}, unexpected {unexpected[:4]})")
    for k, v in state.items():
        if v.shape != expected[k].shape:
            raise UsageError(f"checkpoint {str(path)!r}: {k} has shape {tuple(v.shape)} but config.json "
                             f"implies {tuple(expected[k].shape)}")
    return state


def check_weights_file(ckpt_dir: str | Path, cfg: GPTConfig) -> None:
    """Refuse (UsageError) a checkpoint whose model.safetensors is unreadable or does not hold the
    weights of `cfg`, from the file's header alone (nothing is loaded)."""
    path = Path(ckpt_dir) / MODEL_FILE
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise UsageError(f"checkpoint {str(path.parent)!r}: {MODEL_FILE} is unreadable or truncated "
                         f"({' '.join(str(e).split())[:200]})") from e
    with torch.device("meta"):
        _complete({k: torch.empty(shape) for k, shape in shapes.items()}, GPTModel(cfg), path.parent)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> GPTModel:
    """The model of a checkpoint (or a run directory's newest), in eval mode, ready for generation
    (its weights in the layout decoding reads fastest)."""
    model = load_checkpoint(path, device).model
    use_decoding_layout(model)
    return model


# --- the trainer's state -------------------------------------------------------------------------
# Beside the model: optimizer.safetensors (the optimizer's tensors, keyed "<parameter name>/<key>"),
# rng.safetensors (torch generator states as uint8 tensors) and trainer_state.json (step, train
# config, data identity, NumPy and Python RNG states, optimizer param groups, and with float16 the
# gradient scaler's state). No pickle anywhere.
OPTIMIZER_FILE, RNG_FILE, TRAINER_FILE = "optimizer.safetensors", "rng.safetensors", "trainer_state.json"
SCALER_KEYS = {"scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker"}


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every random generator's state: torch's as tensors, NumPy's and Python's as JSON."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_{i}"] = s
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return tensors, {"numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
                     "python": [version, list(internal), gauss_next]}


def set_rng_state(tensors: dict[str, torch.Tensor], states: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda_")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))


def trainer_files(optimizer_state: dict[str, Any], trainer_state: dict[str, Any]) -> dict[str, Any]:
    """`extra_files` for save_checkpoint: the optimizer state (parameter-name keyed, as
    torch.distributed.checkpoint's get_optimizer_state_dict gives it), RNG states and `trainer_state`."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for name, entry in optimizer_state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}/{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(name, {})[key] = value
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()}
              for g in optimizer_state["param_groups"]]
    rng_tensors, rng_json = rng_state()
    state = {**trainer_state, "rng": rng_json, "optimizer": {"param_groups": groups, "scalars": scalars}}
    return {
        OPTIMIZER_FILE: lambda p: save_file(tensors, p),
        RNG_FILE: lambda p: save_file(rng_tensors, p),
        TRAINER_FILE: lambda p: write_json(p, state),
    }


def trained_steps(path: str | Path) -> int | None:
    """The optimizer steps a checkpoint's trainer state records (None: it has none, e.g. a model saved
    or imported without training, or the record is unreadable)."""
    try:
        state_file = resolve_checkpoint(path) / TRAINER_FILE
    except UsageError:  # a LoRA run's checkpoint has a trainer state but no model.safetensors
        state_file = Path(path) / CHECKPOINT_DIR / TRAINER_FILE
    if not state_file.is_file():
        return None
    try:
        step = read_json(state_file).get("step")
    except (UsageError, OSError, AttributeError):
        return None
    return step if type(step) is int and step >= 0 else None


@dataclass
class TrainerState:
    state: dict[str, Any]        # trainer_state.json (step, train_config, data, rng, ...)
    optimizer: dict[str, Any]    # {"state": {name: {key: value}}, "param_groups": [...]}
    rng: dict[str, torch.Tensor]
    path: Path


def load_trainer_state(path: str | Path) -> TrainerState:
    """The trainer state saved beside a checkpoint's model (for --resume)."""
    path = resolve_checkpoint(path)
    for name in (TRAINER_FILE, OPTIMIZER_FILE, RNG_FILE):
        if not (path / name).is_file():
            raise UsageError(f"checkpoint {str(path)!r} has no {name}: it holds a model but no trainer state "
                             "to resume from")
    state = read_json(path / TRAINER_FILE, f"checkpoint {str(path)!r}: {TRAINER_FILE}")
    try:
        tensors = load_file(path / OPTIMIZER_FILE)
        rng = load_file(path / RNG_FILE)
    except (SafetensorError, OSError, ValueError) as e:
        raise UsageError(f"checkpoint {str(path)!r}: trainer state is unreadable or truncated ({e})") from e
    try:
        _check_trainer_state(state, rng)
        entries: dict[str, dict[str, Any]] = {k: dict(v) for k, v in state["optimizer"]["scalars"].items()}
        for key, value in tensors.items():
            name, _, field = key.rpartition("/")
            entries.setdefault(name, {})[field] = value
        groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()}
                  for g in state["optimizer"]["param_groups"]]
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError, OverflowError) as e:
        raise UsageError(f"checkpoint {str(path)!r}: {TRAINER_FILE} or its tensors are malformed ({type(e).__name__}: "
                         f"{e}); it was not written by this tool, or was damaged") from None
    return TrainerState(state, {"state": entries, "param_groups": groups}, rng, path)


def _check_trainer_state(state: Any, rng: dict[str, torch.Tensor]) -> None:
    """Raise (KeyError, TypeError, ValueError, ...) unless every field --resume reads is well formed;
    the random generators' states are tried on throwaway generators."""
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise ValueError(what)

    need(isinstance(state, dict), "not a JSON object")
    step, elapsed = state["step"], state["elapsed_s"]
    need(type(step) is int and step >= 0, f"step={step!r}")
    need(type(elapsed) in (int, float) and math.isfinite(elapsed) and elapsed >= 0, f"elapsed_s={elapsed!r}")
    config = state["train_config"] if "finetune_config" not in state else state["finetune_config"]  # train or finetune
    need(isinstance(config, dict), "train_config/finetune_config is not an object")
    data = state["data"]
    need(isinstance(data, dict), "data is not an object")
    if "train_config" in state:  # a pretraining run pins its text and tokenizer by hash
        need(all(isinstance(data.get(k), str) for k in ("data_sha256", "tokenizer_sha256")), "data lacks its sha256 fields")
    need(isinstance(state["optimizer"]["scalars"], dict), "optimizer.scalars is not an object")
    need(all(isinstance(v, dict) for v in state["optimizer"]["scalars"].values()), "optimizer.scalars")
    groups = state["optimizer"]["param_groups"]
    need(isinstance(groups, list) and all(isinstance(g, dict) for g in groups), "optimizer.param_groups")
    scaler = state.get("grad_scaler")  # float16 training's GradScaler.state_dict(), as GradScaler accepts it
    need(scaler is None or (isinstance(scaler, dict) and set(scaler) == SCALER_KEYS
                            and all(type(v) in (int, float) and math.isfinite(v) for v in scaler.values())
                            and scaler["scale"] > 0 and scaler["growth_factor"] > 1 and 0 < scaler["backoff_factor"] < 1
                            and scaler["growth_interval"] >= 1 and scaler["_growth_tracker"] >= 0), "grad_scaler")
    torch.Generator().set_state(rng["torch_cpu"])
    kind, keys, pos, has_gauss, gauss = state["rng"]["numpy"]
    np.random.RandomState().set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["rng"]["python"]
    random.Random().setstate((version, tuple(internal), gauss_next))

"""LoRA (low-rank adaptation, the book's appendix E): a frozen Linear plus a trainable x @ A @ B.

A is (in_dim, rank), initialised as the book does (Kaiming-uniform, a=sqrt(5)); B is (rank, out_dim),
zeros, so an adapted model starts out computing exactly what the base model computes.

Scaling convention. The book multiplies the update by `alpha`. Here the update is multiplied by
`alpha / rank` (as in the LoRA paper, Hugging Face PEFT and litgpt), so that changing the rank does
not change the size of the update at a fixed alpha; `build_llm.book.appendix_e` keeps the book's
`alpha` under the book's names. Both are the same layer with a different `scaling`.

An adapter file holds only the adapter tensors (and any other trainable weights, such as a new
classification head) as safetensors, with its rank, alpha, scaling, targets and the identity of the
base weights in the safetensors metadata and a JSON file beside it.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
import torch.nn as nn

from .errors import UsageError

ADAPTER_FILE, ADAPTER_META_FILE = "adapter.safetensors", "adapter.json"

# Which Linear layers each target names, by their position in GPTModel.
TARGETS: dict[str, tuple[str, ...]] = {
    "attn": ("att.W_query", "att.W_key", "att.W_value", "att.W_qkv", "att.out_proj"),
    "ff": ("ff.layers.0", "ff.layers.2", "ff.gate", "ff.up", "ff.down"),  # GELU MLP or SwiGLU
    "head": ("out_head",),
}
DEFAULT_TARGETS = ("attn", "ff")


class LoRALayer(nn.Module):
    """scaling * (x @ A @ B); `scaling` defaults to alpha / rank (the book's layer uses alpha)."""

    def __init__(self, in_dim: int, out_dim: int, rank: int, alpha: float, *, scaling: float | None = None) -> None:
        super().__init__()
        check_rank_alpha(rank, alpha)
        self.A = nn.Parameter(torch.empty(in_dim, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # the book's (and nn.Linear's) initialisation
        self.B = nn.Parameter(torch.zeros(rank, out_dim))
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank if scaling is None else scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scaling * (x @ self.A @ self.B)

    def delta_weight(self) -> torch.Tensor:
        """The update in nn.Linear's (out_dim, in_dim) layout: x @ delta.T == forward(x)."""
        return self.scaling * (self.A @ self.B).t()


class LinearWithLoRA(nn.Module):
    """A Linear layer (kept as `linear`, frozen by the caller) plus a LoRALayer (`lora`)."""

    def __init__(self, linear: nn.Linear, rank: int, alpha: float, *, scaling: float | None = None) -> None:
        super().__init__()
        self.linear = linear
        self.lora = LoRALayer(linear.in_features, linear.out_features, rank, alpha, scaling=scaling)
        self.lora.to(device=linear.weight.device, dtype=linear.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + self.lora(x)


def check_rank_alpha(rank: Any, alpha: Any) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise UsageError(f"LoRA rank={rank!r} is invalid; expected an integer >= 1")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise UsageError(f"LoRA alpha={alpha!r} is invalid; expected a number > 0")


def check_targets(targets: Iterable[str]) -> tuple[str, ...]:
    targets = tuple(targets)
    bad = [t for t in targets if t not in TARGETS]
    if not targets or bad:
        raise UsageError(f"LoRA targets={list(targets)!r} are invalid; expected one or more of {sorted(TARGETS)}")
    return targets


def _is_target(name: str, targets: Sequence[str]) -> bool:
    suffixes = [s for t in targets for s in TARGETS[t]]
    return any(name == s or name.endswith("." + s) for s in suffixes)


def apply_lora(model: nn.Module, rank: int, alpha: float, targets: Iterable[str] = DEFAULT_TARGETS, *,
               scaling: float | None = None) -> list[str]:
    """Wrap the targeted Linear layers of a GPTModel in LinearWithLoRA, in place; returns their names.

    Nothing is frozen here: see `freeze_for_lora`. A head tied to the token embedding cannot take an
    adapter (merging it would change the embedding too).
    """
    check_rank_alpha(rank, alpha)
    targets = check_targets(targets)
    if "head" in targets and getattr(getattr(model, "cfg", None), "tie_weights", False) \
            and model.out_head.weight is model.tok_emb.weight:
        raise UsageError("LoRA target 'head' is invalid for a model whose head is tied to the token embedding; "
                         f"choose from {sorted(set(TARGETS) - {'head'})}")
    names = [name for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and _is_target(name, targets)]
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, LinearWithLoRA(getattr(owner, child), rank, alpha, scaling=scaling))
    return names


def freeze_for_lora(model: nn.Module, trainable: Iterable[str] = ()) -> None:
    """Freeze every parameter except the LoRA matrices and those whose name starts with a prefix in
    `trainable` (for example "out_head" for a new classification head)."""
    prefixes = tuple(trainable)
    for name, p in model.named_parameters():
        p.requires_grad = ".lora." in f".{name}" or name.startswith(prefixes)


def lora_layers(model: nn.Module) -> list[tuple[str, LinearWithLoRA]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LinearWithLoRA)]


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LinearWithLoRA by a plain Linear whose weight is W + scaling * (A @ B).T, in
    place; the model then computes the adapted function with no adapter left. Returns the model."""
    for name, module in lora_layers(model):
        linear = module.linear
        merged = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                           device=linear.weight.device, dtype=linear.weight.dtype)
        merged.weight.copy_(linear.weight + module.lora.delta_weight().to(linear.weight.dtype))
        if linear.bias is not None:
            merged.bias.copy_(linear.bias)
        merged.weight.requires_grad = linear.weight.requires_grad
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, merged)
    return model


def base_state_name(name: str) -> str:
    """The name a weight of an adapted model has in the plain model ("x.linear.weight" -> "x.weight")."""
    return name.replace(".linear.", ".")


# --- adapter files -------------------------------------------------------------------------------
def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors of an adapted model: LoRA matrices and anything else left trainable."""
    return {name: p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def adapter_meta(model: nn.Module, targets: Sequence[str], base: dict[str, Any]) -> dict[str, Any]:
    layers = lora_layers(model)
    if not layers:
        raise UsageError("model has no LoRA layers; call apply_lora first")
    lora = layers[0][1].lora
    return {"rank": lora.rank, "alpha": lora.alpha, "scaling": lora.scaling, "targets": list(targets),
            "layers": [n for n, _ in layers], "base": base}


def save_adapter(directory: str | Path, model: nn.Module, meta: dict[str, Any]) -> list[str]:
    """Write ADAPTER_FILE (the trainable tensors) and ADAPTER_META_FILE into `directory` (which the
    caller writes atomically, e.g. as save_checkpoint's extra files)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    save_file(adapter_state(model), directory / ADAPTER_FILE, metadata={"format": "pt", "lora": json.dumps(meta)})
    (directory / ADAPTER_META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return [ADAPTER_FILE, ADAPTER_META_FILE]


def load_adapter(directory: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, metadata) of an adapter written by save_adapter."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    try:
        meta = json.loads((directory / ADAPTER_META_FILE).read_text(encoding="utf-8"))
        tensors = load_file(directory / ADAPTER_FILE)
    except (OSError, ValueError, SafetensorError) as e:
        raise UsageError(f"adapter in {str(directory)!r} is missing or unreadable ({e})") from e
    for key in ("rank", "alpha", "scaling", "targets"):
        if key not in meta:
            raise UsageError(f"adapter in {str(directory)!r}: {ADAPTER_META_FILE} has no {key!r}")
    return tensors, meta


def apply_adapter(model: nn.Module, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> nn.Module:
    """Wrap `model` as the adapter's metadata says and load its tensors (strictly), in place."""
    apply_lora(model, meta["rank"], meta["alpha"], meta["targets"], scaling=meta["scaling"])
    params = dict(model.named_parameters())
    unknown = sorted(set(tensors) - set(params))
    if unknown:
        raise UsageError(f"adapter does not fit this model: unexpected tensors {unknown[:4]}")
    missing = sorted(n for n in params if ".lora." in f".{n}" and n not in tensors)
    if missing:
        raise UsageError(f"adapter does not fit this model: missing tensors {missing[:4]}")
    with torch.no_grad():
        for name, t in tensors.items():
            if params[name].shape != t.shape:
                raise UsageError(f"adapter does not fit this model: {name} has shape {tuple(t.shape)}, "
                                 f"the model expects {tuple(params[name].shape)}")
            params[name].copy_(t)
    freeze_for_lora(model, [n for n in tensors if ".lora." not in f".{n}"])
    return model

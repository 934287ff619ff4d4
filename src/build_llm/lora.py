"""LoRA (low-rank adaptation, the book's appendix E): a frozen Linear plus a trainable x @ A @ B.

A is (in_dim, rank), initialised as the book does (Kaiming-uniform, a=sqrt(5)); B is (rank, out_dim),
zeros, so an adapted model starts out computing exactly what the base model computes.

Scaling convention. The book multiplies the update by `alpha`. Here the update is multiplied by
`alpha / rank` (as in the LoRA paper, Hugging Face PEFT and litgpt), so that changing the rank does
not change the size of the update at a fixed alpha; `build_llm.book.appendix_e` keeps the book's
`alpha` under the book's names. Both are the same layer with a different `scaling`.

Token rows. A base pretrained on plain text has never predicted its end token: that token's row of the
output head was only ever pushed down, and a low-rank change of the blocks cannot make the model emit
a token whose row points nowhere. Instruction fine-tuning with LoRA therefore also trains the end
token's rows of the embedding and the head (`train_token_rows`; one row when they are tied), emb_dim
numbers each, as PEFT's "trainable tokens" do for a new special token.

Targets. `attn` and `ff` adapt every projection of attention and of the feed-forward; the names
Hugging Face PEFT uses for Llama-family models pick single projections: `q_proj`, `k_proj`, `v_proj`,
`o_proj` (the book's W_query, W_key, W_value, out_proj) and `gate_proj`, `up_proj`, `down_proj` (a
GELU MLP has up and down only). A mixture of experts keeps its experts' matrices stacked, one
(n_experts, out, in) tensor per projection (moe.py), so it gets stacked adapters: each expert its
own A and B (ExpertsLoRA), added inside that expert's computation; the router stays frozen (adapting
it would change which experts a token reaches).

An adapter holds only the adapter tensors (and any other trainable weights, such as a new
classification head or token rows: `adapter_state`) with its rank, alpha, scaling, targets, token
rows and the identity of the base weights (`adapter_meta`); store/finetuned.py writes and reads
its files. This module does no I/O: it is part of the model.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from build_llm.errors import UsageError
from build_llm.moe import MoEFeedForward


# Which projections each target names, by their position in GPTModel: a Linear layer, or (fc1, fc2,
# fc3) a mixture's stacked experts' gate, up and down projections.
_GATE, _UP, _DOWN = ("ff.gate", "ff.fc1"), ("ff.up", "ff.layers.0", "ff.fc2"), ("ff.down", "ff.layers.2", "ff.fc3")
TARGETS: dict[str, tuple[str, ...]] = {
    "attn": ("att.W_query", "att.W_key", "att.W_value", "att.W_qkv", "att.out_proj"),
    "ff": _GATE + _UP + _DOWN,  # GELU MLP, SwiGLU/GeGLU or the experts of a mixture
    "head": ("out_head",),
    "q_proj": ("att.W_query",), "k_proj": ("att.W_key",), "v_proj": ("att.W_value",), "o_proj": ("att.out_proj",),
    "gate_proj": _GATE, "up_proj": _UP, "down_proj": _DOWN,
}
EXPERT_TENSORS = ("fc1", "fc2", "fc3")
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


class ExpertsLoRA(nn.Module):
    """LoRA for one stacked projection of a mixture's experts, weight (E, out_dim, in_dim): expert e
    adds scaling * (x @ A[e] @ B[e]), A (E, in_dim, rank) and B (E, rank, out_dim, zeros)."""

    def __init__(self, weight: torch.Tensor, rank: int, alpha: float, *, scaling: float | None = None) -> None:
        super().__init__()
        n, out_dim, in_dim = weight.shape
        self.A = nn.Parameter(torch.empty(n, in_dim, rank, device=weight.device, dtype=weight.dtype))
        for a in self.A.data:  # each expert's A as LoRALayer draws its own
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.B = nn.Parameter(torch.zeros(n, rank, out_dim, device=weight.device, dtype=weight.dtype))
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank if scaling is None else scaling

    def forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return self.scaling * (x @ self.A[e] @ self.B[e])  # (n, in) -> (n, out)

    def delta_weight(self) -> torch.Tensor:
        """The update in the stacked (E, out_dim, in_dim) layout."""
        return self.scaling * (self.A @ self.B).transpose(1, 2)


class MoEWithLoRA(nn.Module):
    """A mixture (`moe`, frozen by the caller) whose experts' projections named in `lora` (fc1, fc2,
    fc3) carry stacked adapters; the routing is the mixture's own."""

    def __init__(self, moe: MoEFeedForward, projections: Sequence[str], rank: int, alpha: float, *,
                 scaling: float | None = None) -> None:
        super().__init__()
        self.moe = moe
        self.lora = nn.ModuleDict({p: ExpertsLoRA(getattr(moe, p), rank, alpha, scaling=scaling) for p in projections})

    def project(self, name: str, e: int, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, getattr(self.moe, name)[e])
        return out + self.lora[name](e, x) if name in self.lora else out

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e's SwiGLU on its tokens x (n, C) -> (n, C), adapters included."""
        return self.project("fc3", e, F.silu(self.project("fc1", e, x)) * self.project("fc2", e, x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.moe(x, expert=self.expert)


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


def projections(model: nn.Module) -> list[str]:
    """Every projection a target can name: the Linear layers (a mixture's router excepted) and the
    stacked experts' tensors (`trf_blocks.0.ff.fc1`)."""
    names, routers = [], set()
    for name, module in model.named_modules():  # a module comes before its children
        if isinstance(module, MoEFeedForward):
            names += [f"{name}.{p}" for p in EXPERT_TENSORS]
            routers.add(f"{name}.gate")
        elif isinstance(module, nn.Linear) and name not in routers:
            names.append(name)
    return names


def targeted(model: nn.Module, targets: Sequence[str]) -> list[str]:
    """The projections of `model` that `targets` name, each target checked to name at least one."""
    every = projections(model)
    chosen = [n for n in every if _is_target(n, targets)]
    for t in targets:
        if not any(_is_target(n, [t]) for n in chosen):
            present = sorted(t for t in TARGETS if any(_is_target(n, [t]) for n in every))
            raise UsageError(f"LoRA target {t!r} names no layer of this model (q_proj, k_proj and v_proj need "
                             f"separate projections, gate_proj a gated feed-forward); choose from {present}")
    return chosen


def apply_lora(model: nn.Module, rank: int, alpha: float, targets: Iterable[str] = DEFAULT_TARGETS, *,
               scaling: float | None = None) -> list[str]:
    """Wrap the targeted Linear layers of a GPTModel in LinearWithLoRA and its targeted mixtures in
    MoEWithLoRA, in place; returns the projections' names (`trf_blocks.0.ff.fc1` for experts).

    Nothing is frozen here: see `freeze_for_lora`. A head tied to the token embedding cannot take an
    adapter (merging it would change the embedding too).
    """
    check_rank_alpha(rank, alpha)
    targets = check_targets(targets)
    if "head" in targets and getattr(getattr(model, "cfg", None), "tie_weights", False) \
            and model.out_head.weight is model.tok_emb.weight:
        raise UsageError("LoRA target 'head' is invalid for a model whose head is tied to the token embedding; "
                         f"choose from {sorted(set(TARGETS) - {'head'})}")
    names = targeted(model, targets)
    experts: dict[str, list[str]] = {}
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        if isinstance(owner, MoEFeedForward):
            experts.setdefault(parent, []).append(child)
        else:
            setattr(owner, child, LinearWithLoRA(getattr(owner, child), rank, alpha, scaling=scaling))
    for name, tensors in experts.items():  # a mixture wrapped once, with the projections it adapts
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child,
                MoEWithLoRA(model.get_submodule(name), tensors, rank, alpha, scaling=scaling))
    return names


def freeze_for_lora(model: nn.Module, trainable: Iterable[str] = ()) -> None:
    """Freeze every parameter except the LoRA matrices and those whose name starts with a prefix in
    `trainable` (for example "out_head" for a new classification head)."""
    prefixes = tuple(trainable)
    for name, p in model.named_parameters():
        p.requires_grad = is_adapter_tensor(name) or name.startswith(prefixes)


def is_adapter_tensor(name: str) -> bool:
    """A LoRA matrix or a token row (what apply_adapter recreates), by its parameter name."""
    return ".lora." in f".{name}" or ".token_rows." in f".{name}"


def lora_layers(model: nn.Module) -> list[tuple[str, LinearWithLoRA | MoEWithLoRA]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (LinearWithLoRA, MoEWithLoRA))]


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LinearWithLoRA by a plain Linear whose weight is W + scaling * (A @ B).T (and every
    MoEWithLoRA by its mixture, each expert's matrices updated so), and
    write token rows into the tables they stand for, in place; the model then computes the adapted
    function with no adapter left. Returns the model."""
    for name, module in lora_layers(model):
        parent, _, child = name.rpartition(".")
        if isinstance(module, MoEWithLoRA):  # the experts' stacked weights take their stacked updates
            for tensor, lora in module.lora.items():
                weight = getattr(module.moe, tensor)
                weight.add_(lora.delta_weight().to(weight.dtype))
            setattr(model.get_submodule(parent) if parent else model, child, module.moe)
            continue
        linear = module.linear
        merged = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                           device=linear.weight.device, dtype=linear.weight.dtype)
        merged.weight.copy_(linear.weight + module.lora.delta_weight().to(linear.weight.dtype))
        if linear.bias is not None:
            merged.bias.copy_(linear.bias)
        merged.weight.requires_grad = linear.weight.requires_grad
        setattr(model.get_submodule(parent) if parent else model, child, merged)
    for name in ("tok_emb", "out_head"):  # after LoRA: a head's token rows replace its adapted rows
        module = getattr(model, name)
        if isinstance(module, WithTokenRows):
            module.inner.weight[module.token_rows.ids] = module.token_rows.rows.to(module.inner.weight.dtype)
            setattr(model, name, module.inner)
    return model


# --- token rows ----------------------------------------------------------------------------------
class TokenRows(nn.Module):
    """Trainable rows (k, emb_dim) for the token ids `ids` of a frozen table, starting as its rows."""

    def __init__(self, weight: torch.Tensor, ids: Sequence[int]) -> None:
        super().__init__()
        self.register_buffer("ids", torch.tensor(list(ids), dtype=torch.long, device=weight.device), persistent=False)
        self.rows = nn.Parameter(weight.detach()[self.ids].clone())


class WithTokenRows(nn.Module):
    """The token embedding or output head (`inner`, frozen) with the rows of a few tokens replaced."""

    def __init__(self, inner: nn.Module, token_rows: TokenRows) -> None:
        super().__init__()
        self.inner, self.token_rows = inner, token_rows

    @property
    def weight(self) -> torch.Tensor:
        """The frozen table (for its device and dtype; the replaced rows live in token_rows)."""
        return self.inner.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, rows = self.token_rows.ids, self.token_rows.rows
        out = self.inner(x)
        if isinstance(self.inner, nn.Embedding):  # x: token ids (B, T) -> (B, T, emb_dim)
            hit = x.unsqueeze(-1) == ids  # (B, T, k)
            return torch.where(hit.any(-1, keepdim=True), (hit.to(rows.dtype) @ rows).to(out.dtype), out)
        bias = self.inner.bias[ids] if getattr(self.inner, "bias", None) is not None else 0
        return out.index_copy(-1, ids, (x @ rows.t() + bias).to(out.dtype))  # those tokens' logits, (B, T, vocab)


def _table(module: nn.Module) -> torch.Tensor:
    return (module.linear if isinstance(module, LinearWithLoRA) else module).weight


def train_token_rows(model: nn.Module, ids: Sequence[int]) -> None:
    """Give the tokens `ids` trainable rows in the embedding and the output head of a GPTModel (one
    shared TokenRows when the head is tied to the embedding), in place; call after apply_lora."""
    head = _table(model.out_head)
    head_rows, tied = TokenRows(head, ids), head is model.tok_emb.weight
    model.tok_emb = WithTokenRows(model.tok_emb, head_rows if tied else TokenRows(model.tok_emb.weight, ids))
    model.out_head = WithTokenRows(model.out_head, head_rows)


def token_row_ids(model: nn.Module) -> list[int]:
    return model.tok_emb.token_rows.ids.tolist() if isinstance(model.tok_emb, WithTokenRows) else []


# --- adapters -------------------------------------------------------------------------------
def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors of an adapted model: LoRA matrices and anything else left trainable."""
    return {name: p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def adapter_meta(model: nn.Module, targets: Sequence[str], base: dict[str, Any]) -> dict[str, Any]:
    layers = lora_layers(model)
    if not layers:
        raise UsageError("model has no LoRA layers; call apply_lora first")
    lora = next(m for m in model.modules() if isinstance(m, (LoRALayer, ExpertsLoRA)))
    names = [n for name, m in layers
             for n in ([name] if isinstance(m, LinearWithLoRA) else [f"{name}.{t}" for t in m.lora])]
    return {"rank": lora.rank, "alpha": lora.alpha, "scaling": lora.scaling, "targets": list(targets),
            "layers": names, "token_rows": token_row_ids(model), "base": base}


def _check_lora_shapes(model: nn.Module, tensors: dict[str, torch.Tensor], rank: int, targets: Sequence[str]) -> None:
    """Each targeted projection's A (in, rank) and B (rank, out) (an expert's stacked: (E, in, rank),
    (E, rank, out)) are in `tensors` with those shapes: checked before any is allocated, as a rank
    beyond the model's width would ask for terabytes."""
    for name in targeted(model, targets):
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent)  # the model itself for out_head
        weight = getattr(owner, child) if isinstance(owner, MoEFeedForward) else getattr(owner, child).weight
        *experts, out_dim, in_dim = weight.shape
        prefix = f"{parent}.lora.{child}" if experts else f"{name}.lora"
        for part, shape in (("A", (*experts, in_dim, rank)), ("B", (*experts, rank, out_dim))):
            t = tensors.get(f"{prefix}.{part}")
            if t is None:
                raise UsageError(f"adapter does not fit this model: missing tensors ['{prefix}.{part}']")
            if tuple(t.shape) != shape:
                raise UsageError(f"adapter does not fit this model: {prefix}.{part} has shape "
                                 f"{tuple(t.shape)}; rank={rank} on this model makes it {shape}")


def apply_adapter(model: nn.Module, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> nn.Module:
    """Wrap `model` as the adapter's metadata says and load its tensors (strictly), in place."""
    check_rank_alpha(meta["rank"], meta["alpha"])
    _check_lora_shapes(model, tensors, meta["rank"], check_targets(meta["targets"]))
    apply_lora(model, meta["rank"], meta["alpha"], meta["targets"], scaling=meta["scaling"])
    rows = meta.get("token_rows") or []
    vocab_size = model.cfg.vocab_size
    if not isinstance(rows, list) or not all(type(i) is int and 0 <= i < vocab_size for i in rows):
        raise UsageError(f"adapter does not fit this model: token_rows={rows!r}; "
                         f"expected a list of token ids in [0, {vocab_size})")
    if rows:
        train_token_rows(model, rows)
    params = dict(model.named_parameters())
    unknown = sorted(set(tensors) - set(params))
    if unknown:
        raise UsageError(f"adapter does not fit this model: unexpected tensors {unknown[:4]}")
    missing = sorted(n for n in params if is_adapter_tensor(n) and n not in tensors)
    if missing:
        raise UsageError(f"adapter does not fit this model: missing tensors {missing[:4]}")
    with torch.no_grad():
        for name, t in tensors.items():
            if params[name].shape != t.shape:
                raise UsageError(f"adapter does not fit this model: {name} has shape {tuple(t.shape)}, "
                                 f"the model expects {tuple(params[name].shape)}")
            params[name].copy_(t)
    freeze_for_lora(model, [n for n in tensors if not is_adapter_tensor(n)])
    return model

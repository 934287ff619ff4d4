"""Looking inside a model: parameter tables, sizes, intermediate tensors, next-token tables."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from .runtime import get_dtype


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters; a tied matrix counts once (as `model.parameters()` yields it once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def parameter_table(model: nn.Module) -> list[tuple[str, tuple[int, ...], int]]:
    """(name, shape, count) for each parameter, like the R notebook's listing."""
    return [(name, tuple(p.shape), p.numel()) for name, p in model.named_parameters()]


def format_parameter_table(model: nn.Module) -> str:
    rows = parameter_table(model)
    width = max(len(name) for name, _, _ in rows)
    lines = [f"{name:<{width}}  {' x '.join(map(str, shape)):>14}  {count:>13,}" for name, shape, count in rows]
    return "\n".join(lines)


def model_size_mb(model: nn.Module, dtype: torch.dtype | str = torch.float32) -> float:
    """Size of the parameters in MiB (1024 * 1024 bytes, as the seed computes it) at `dtype`."""
    if isinstance(dtype, str):
        dtype = get_dtype(dtype)
    return count_parameters(model) * torch.empty((), dtype=dtype).element_size() / (1024 * 1024)


def return_intermediates(model: nn.Module, in_idx: torch.Tensor) -> dict[str, Any]:
    """The R notebook's `return_intermediates`, extended. Keys: `positions` (T,), `mask` (T, T) with
    1 where attention is forbidden, `hidden` (n_layers + 1 residual-stream states, each (B, T, C):
    the input of every block and the output of the last), `attention` (one (B, nh, T, T) per layer),
    `logits` (B, T, V). Runs in eval mode without gradients and restores the model's mode.
    """
    hidden: list[torch.Tensor] = []
    attention: list[torch.Tensor] = []

    def keep_block_input(block: nn.Module, args: tuple) -> None:
        hidden.append(args[0])
        attention.append(block.att.attention_weights(block.norm1(args[0])))

    def keep_final_input(_: nn.Module, args: tuple) -> None:
        hidden.append(args[0])

    handles = [b.register_forward_pre_hook(keep_block_input) for b in model.trf_blocks]
    handles.append(model.final_norm.register_forward_pre_hook(keep_final_input))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            logits = model(in_idx)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    T = in_idx.shape[1]
    return {"positions": torch.arange(T), "mask": model.trf_blocks[0].att.mask[:T, :T].int(),
            "hidden": hidden, "attention": attention, "logits": logits}


def next_token_distribution(model: nn.Module, tokenizer: Any, prompt: str, k: int = 10) -> list[tuple[str, int, float]]:
    """Top-k (token string, id, probability) of the next token after `prompt` (eval mode)."""
    from .generate import text_to_token_ids

    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k={k!r} is invalid; expected an integer >= 1")
    idx = text_to_token_ids(prompt, tokenizer)
    ctx = model.cfg.context_length
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(idx[:, -ctx:].to(model.pos_emb.weight.device))[0, -1]
    finally:
        model.train(was_training)
    probas = torch.softmax(logits.float(), dim=-1)
    top = torch.topk(probas, min(k, probas.numel()))
    return [(tokenizer.decode([i]), i, p) for p, i in zip(top.values.tolist(), top.indices.tolist())]

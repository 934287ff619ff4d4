"""Chapter 5, pretraining on unlabeled data: the book's training loop, its `generate`, and loading
OpenAI's GPT-2 weights into the book's model.

The book's loss and training functions live here (`calc_loss_batch`, `calc_loss_loader`,
`evaluate_model`, `generate_and_print_sample`, `train_model_simple`); `calc_loss_batch` is the
package's next-token loss (`build_llm.train.loop.next_token_loss`) in the book's argument order, and
the package trains through its own loop (`build_llm.train.loop.run_loop`). Two names differ from
the package on purpose and live here in the book's form:

- `generate(model, idx, max_new_tokens, context_size, temperature=0.0, top_k=None, eos_id=None)`
  takes its arguments positionally and stops *before* appending `eos_id`, as the book's loop does;
  `build_llm.generate` is keyword-only and keeps the end token of each row of a batch.
- `plot_losses(epochs_seen, tokens_seen, train_losses, val_losses)` draws the book's figure (loss
  against epochs, tokens seen on a second axis); `build_llm.train.loop.plot_losses` draws a run's
  loss.png.

`load_weights_into_gpt(gpt, params)` takes the `params` dictionary the book's `download_and_load_gpt2`
builds from OpenAI's TensorFlow checkpoint (NumPy arrays in OpenAI's layout). Without TensorFlow or a
network, a local Hugging Face GPT-2 directory gives the same model through `build_llm.interop.hf.from_hf`.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn

from build_llm.config import GPTConfig
from build_llm.errors import UsageError
from build_llm.infer.generate import generate_text_simple, stream, text_to_token_ids, token_ids_to_text
from build_llm.store.checkpoint import unwrap
from build_llm.store.fsio import save_figure
from build_llm.train.loop import next_token_loss

__all__ = ["generate", "text_to_token_ids", "token_ids_to_text", "calc_loss_batch", "calc_loss_loader",
           "evaluate_model", "generate_and_print_sample", "train_model_simple", "plot_losses", "assign",
           "load_weights_into_gpt", "model_configs"]

# The book's GPT-2 sizes (the keys its weight-loading code uses), from the package's presets.
model_configs = {
    f"{name} ({size})": {key: GPTConfig.from_preset(name).to_dict()[key] for key in ("emb_dim", "n_layers", "n_heads")}
    for name, size in (("gpt2-small", "124M"), ("gpt2-medium", "355M"), ("gpt2-large", "774M"), ("gpt2-xl", "1558M"))
}


# --- the book's training functions ----------------------------------------------------------------
def calc_loss_batch(input_batch: torch.Tensor, target_batch: torch.Tensor, model: nn.Module,
                    device: torch.device | str) -> torch.Tensor:
    """Mean cross-entropy of the model's next-token logits against the targets of one batch (the
    package's next_token_loss, in the book's argument order)."""
    return next_token_loss(model, input_batch, target_batch, device)


def calc_loss_loader(data_loader, model: nn.Module, device: torch.device | str, num_batches: int | None = None) -> float:
    """Mean batch loss over the first `num_batches` batches of a loader (all of them by default)."""
    total_loss = 0.0
    if len(data_loader) == 0:
        return float("nan")
    num_batches = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))
    for i, (input_batch, target_batch) in enumerate(data_loader):
        if i >= num_batches:
            break
        total_loss += calc_loss_batch(input_batch, target_batch, model, device).item()
    return total_loss / num_batches


def evaluate_model(model: nn.Module, train_loader, val_loader, device, eval_iter: int) -> tuple[float, float]:
    """(train loss, validation loss) on `eval_iter` batches each, in eval mode."""
    model.eval()
    with torch.no_grad():
        train_loss = calc_loss_loader(train_loader, model, device, num_batches=eval_iter)
        val_loss = calc_loss_loader(val_loader, model, device, num_batches=eval_iter)
    model.train()
    return train_loss, val_loss


def generate_and_print_sample(model: nn.Module, tokenizer, device, start_context: str) -> None:
    """Print a 50-token greedy continuation of `start_context` on one line."""
    model.eval()
    context_size = unwrap(model).cfg.context_length
    encoded = text_to_token_ids(start_context, tokenizer).to(device)
    with torch.no_grad():
        token_ids = generate_text_simple(model=model, idx=encoded, max_new_tokens=50, context_size=context_size)
    print(token_ids_to_text(token_ids, tokenizer).replace("\n", " "))
    model.train()


def train_model_simple(model: nn.Module, train_loader, val_loader, optimizer, device, num_epochs: int,
                       eval_freq: int, eval_iter: int, start_context: str, tokenizer):
    """The book's loop: epochs over the loader, evaluation every `eval_freq` steps, a sample per epoch.

    Returns (train_losses, val_losses, track_tokens_seen), one entry per evaluation.
    """
    train_losses, val_losses, track_tokens_seen = [], [], []
    tokens_seen, global_step = 0, -1
    for epoch in range(num_epochs):
        model.train()
        for input_batch, target_batch in train_loader:
            optimizer.zero_grad()
            loss = calc_loss_batch(input_batch, target_batch, model, device)
            loss.backward()
            optimizer.step()
            tokens_seen += input_batch.numel()
            global_step += 1
            if global_step % eval_freq == 0:
                train_loss, val_loss = evaluate_model(model, train_loader, val_loader, device, eval_iter)
                train_losses.append(train_loss)
                val_losses.append(val_loss)
                track_tokens_seen.append(tokens_seen)
                print(f"Ep {epoch+1} (Step {global_step:06d}): Train loss {train_loss:.3f}, Val loss {val_loss:.3f}")
        generate_and_print_sample(model, tokenizer, device, start_context)
    return train_losses, val_losses, track_tokens_seen


# --- generating and plotting, in the book's form ---------------------------------------------------
def generate(model: nn.Module, idx: torch.Tensor, max_new_tokens: int, context_size: int,
             temperature: float = 0.0, top_k: int | None = None, eos_id: int | None = None) -> torch.Tensor:
    """The book's `generate`: extend `idx` (B, T) by up to `max_new_tokens` tokens.

    Each step keeps the `top_k` largest logits (if given), then samples from softmax(logits /
    temperature) with torch's global generator, or takes the argmax when temperature is 0. When
    the next token is `eos_id`, generation stops without appending it. As in the book, `eos_id`
    needs a batch of one sequence (the whole batch stops at once); `build_llm.generate` handles
    batches row by row. The package's KV cache is used in eval mode: the same tokens, faster.
    """
    if eos_id is not None and isinstance(idx, torch.Tensor) and idx.ndim == 2 and idx.shape[0] != 1:
        raise UsageError(f"eos_id: the book's generate stops the whole batch at the end token, so it needs a batch "
                         f"of 1 sequence, got {idx.shape[0]}; use build_llm.generate(..., eos_id=...) for batches")
    pieces = [idx.long() if isinstance(idx, torch.Tensor) else idx]
    for idx_next in stream(model, idx, max_new_tokens, context_size=context_size, temperature=temperature,
                           top_k=top_k):  # stream checks every argument
        if eos_id is not None and int(idx_next) == eos_id:
            break  # stop before appending the end token
        pieces.append(idx_next)
    return torch.cat(pieces, dim=1)


def plot_losses(epochs_seen: Sequence[float], tokens_seen: Sequence[float], train_losses: Sequence[float],
                val_losses: Sequence[float], path: str | None = None):
    """The book's loss figure: training and validation loss against epochs, with tokens seen on a
    second x axis. Returns the matplotlib Figure; written to `path` only when one is given."""
    import matplotlib.pyplot as plt  # deferred: slow to import, only this figure needs it
    from matplotlib.ticker import MaxNLocator  # deferred with pyplot

    fig, ax1 = plt.subplots(figsize=(5, 3))
    ax1.plot(epochs_seen, train_losses, label="Training loss")
    ax1.plot(epochs_seen, val_losses, linestyle="-.", label="Validation loss")
    ax1.set_xlabel("Epochs")
    ax1.set_ylabel("Loss")
    ax1.legend(loc="upper right")
    ax1.xaxis.set_major_locator(MaxNLocator(integer=True))  # whole epochs only
    ax2 = ax1.twiny()  # a second x axis sharing the y axis
    ax2.plot(tokens_seen, train_losses, alpha=0)  # invisible: it only sets the axis range
    ax2.set_xlabel("Tokens seen")
    fig.tight_layout()
    if path is not None:
        save_figure(fig, path)  # whole or not at all, never through a symbolic link at the name
    return fig


def assign(left: torch.Tensor, right: Any) -> nn.Parameter:
    """A new Parameter holding `right` (a NumPy array or tensor) with `left`'s shape, dtype and
    device; a shape mismatch is a ValueError (UsageError)."""
    right = torch.as_tensor(np.asarray(right) if not isinstance(right, torch.Tensor) else right)
    if tuple(left.shape) != tuple(right.shape):
        raise UsageError(f"Shape mismatch. Left: {tuple(left.shape)}, Right: {tuple(right.shape)}")
    return nn.Parameter(right.detach().to(device=left.device, dtype=left.dtype).clone())


def _set(name: str, target: torch.Tensor | None, value: Any) -> None:
    if target is None:
        option = "qkv_bias=True (as the book does before loading)" if ".W_" in name else "bias=True"
        raise UsageError(f"load_weights_into_gpt: the model has no {name}, but GPT-2 has one; build it with {option}")
    try:
        new = assign(target, value)
    except ValueError as e:
        raise UsageError(f"load_weights_into_gpt: {name}: {e}; the params are of another GPT-2 size than the "
                         "model's config (see model_configs)") from None
    with torch.no_grad():
        target.copy_(new)  # in place: tied weights stay tied, optimizers keep their parameters


def load_weights_into_gpt(gpt: nn.Module, params: Mapping[str, Any]) -> None:
    """Copy OpenAI's GPT-2 weights (the book's `params`: wte, wpe, blocks[i] with attn c_attn /
    c_proj, mlp c_fc / c_proj, ln_1, ln_2 as {"w", "b"} or {"g", "b"}, and the final g, b) into
    `gpt`, a GPTModel whose config matches (the book's: context_length 1024, qkv_bias True).

    OpenAI's dense layers store (in, out) matrices, PyTorch's Linear (out, in): each is transposed,
    and c_attn is split into the query, key and value projections (or kept whole for a model with
    fused_qkv). The output head gets the token embedding, as GPT-2 ties them.
    """
    blocks = params["blocks"]
    if len(blocks) != len(gpt.trf_blocks):
        raise UsageError(f"load_weights_into_gpt: params has {len(blocks)} blocks but the model has "
                         f"{len(gpt.trf_blocks)} layers; build the model with n_layers={len(blocks)}")
    _set("pos_emb.weight", gpt.pos_emb.weight, params["wpe"])
    _set("tok_emb.weight", gpt.tok_emb.weight, params["wte"])
    for b, (block, p) in enumerate(zip(gpt.trf_blocks, blocks)):
        name = f"trf_blocks.{b}"
        att, c_attn = block.att, p["attn"]["c_attn"]
        if att.fused_qkv:
            _set(f"{name}.att.W_qkv.weight", att.W_qkv.weight, np.asarray(c_attn["w"]).T)
            _set(f"{name}.att.W_qkv.bias", att.W_qkv.bias, c_attn["b"])
        else:
            q_w, k_w, v_w = np.split(np.asarray(c_attn["w"]), 3, axis=-1)  # (C, 3C) -> 3 x (C, C)
            q_b, k_b, v_b = np.split(np.asarray(c_attn["b"]), 3, axis=-1)
            for part, w, bias in (("W_query", q_w, q_b), ("W_key", k_w, k_b), ("W_value", v_w, v_b)):
                linear = getattr(att, part)
                _set(f"{name}.att.{part}.weight", linear.weight, w.T)
                _set(f"{name}.att.{part}.bias", linear.bias, bias)
        for part, linear, theirs in (("att.out_proj", att.out_proj, p["attn"]["c_proj"]),
                                     ("ff.layers.0", block.ff.layers[0], p["mlp"]["c_fc"]),
                                     ("ff.layers.2", block.ff.layers[2], p["mlp"]["c_proj"])):
            _set(f"{name}.{part}.weight", linear.weight, np.asarray(theirs["w"]).T)
            _set(f"{name}.{part}.bias", linear.bias, theirs["b"])
        for part, norm, ln in (("norm1", block.norm1, p["ln_1"]), ("norm2", block.norm2, p["ln_2"])):
            _set(f"{name}.{part}.scale", norm.scale, ln["g"])
            _set(f"{name}.{part}.shift", norm.shift, ln["b"])
    _set("final_norm.scale", gpt.final_norm.scale, params["g"])
    _set("final_norm.shift", gpt.final_norm.shift, params["b"])
    _set("out_head.weight", gpt.out_head.weight, params["wte"])

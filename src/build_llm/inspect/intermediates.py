"""Inside a forward pass: the tensors between the layers, their per-layer summaries, and the
`inspect` verb's report (pictures, tables and one JSON of every number) on a prompt."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from build_llm.data.markov import ABC, is_abc_tokenizer, next_char_distribution
from build_llm.errors import UsageError
from build_llm.infer.generate import decodable_ids
from build_llm.inspect import plots
from build_llm.inspect.tables import next_token_table, tempered_distributions, token_label, token_labels
from build_llm.store.fsio import check_writable_dir, replace_dir


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
    return {"positions": torch.arange(T), "mask": model.trf_blocks[0].att.causal_mask(0, T, in_idx.device).int(),
            "hidden": hidden, "attention": attention, "logits": logits}


# --- per-layer summaries -------------------------------------------------------------------------
def attention_entropy(attention: list[torch.Tensor]) -> torch.Tensor:
    """(n_layers, n_heads) mean entropy in bits of the attention rows of batch item 0.

    Row t spreads over the t + 1 positions it may see: 0 bits is attending to one position,
    log2(t + 1) is attending uniformly. The mean runs over every query position.
    """
    a = torch.stack([w[0].float() for w in attention])  # (L, nh, T, T)
    terms = torch.where(a > 0, -a * torch.log2(a), torch.zeros_like(a))
    return terms.sum(-1).mean(-1)  # (L, nh)


def uniform_attention_entropy(num_tokens: int) -> float:
    """The mean entropy in bits of causal attention rows that spread uniformly (the maximum)."""
    return sum(math.log2(t + 1) for t in range(num_tokens)) / num_tokens


def residual_norms(hidden: list[torch.Tensor]) -> torch.Tensor:
    """(n_layers + 1, T) L2 norm of the residual stream of batch item 0 at each token.

    Row 0 is the embeddings (the input of block 1), row i the output of block i.
    """
    return torch.stack([h[0].float().norm(dim=-1) for h in hidden])


# --- the `inspect` report ------------------------------------------------------------------------
def format_mask(labels: list[str], mask: torch.Tensor, columns: int | None = None, lines: int | None = None) -> str:
    """The positions and the causal mask as the R notebook prints them (`x1`, `wei`), labelled.

    With `columns` and `lines` (a terminal's size), a mask too large to show is cut to its top-left
    corner, with a note; the whole mask goes to mask.txt."""
    T = len(labels)
    width = max(len(s) for s in labels)
    n = T if columns is None else max(1, min(T, (columns - width - 2) // 3))  # each column: " %2d"
    n = n if lines is None else max(1, min(n, lines - 4))  # room for the heading lines around it
    out = ["tokens and positions (x1; the R notebook counts from 1, PyTorch from 0):"]
    out += [f"  {t:>3}  {label}" for t, label in enumerate(labels)]
    out.append("causal mask (wei): row = query, column = key; 1 = may not look at that position")
    if n < T:
        out.append(f"(the top-left {n} x {n} of the {T} x {T} mask; all of it is in mask.txt)")
    out.append(" " * (width + 2) + " ".join(f"{t:>2}" for t in range(n)))
    for t in range(n):
        out.append(f"{labels[t]:>{width}}  " + " ".join(f"{int(v):>2}" for v in mask[t, :n].tolist()))
    return "\n".join(out)


def prompt_window(model: nn.Module, tokenizer: Any, prompt: str, max_tokens: int) -> tuple[list[int], int]:
    """The ids of the last `max_tokens` tokens of `prompt` (at most the context length), and how many
    tokens were dropped before them."""
    if not isinstance(prompt, str) or not prompt:
        raise UsageError("prompt is empty; give at least one character")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise UsageError(f"max_tokens={max_tokens!r} is invalid; expected an integer >= 1")
    ids = tokenizer.encode(prompt)
    cut = len(ids) - min(len(ids), max_tokens, model.cfg.context_length)
    ids = ids[cut:]
    if not ids:
        raise UsageError(f"prompt {prompt!r} encodes to no tokens")
    return ids, cut


def true_next_token(tokenizer: Any, ids: list[int], vocab_size: int) -> dict[int, float] | None:
    """For a model of ABC text: id -> the exact probability that the source's next character is that
    token, after the text of `ids`; None for any other model, or a prompt the source cannot produce."""
    if not is_abc_tokenizer(tokenizer):
        return None
    try:
        exact = next_char_distribution(ABC, tokenizer.decode(ids))
    except ValueError:  # a prompt the source cannot produce has no true distribution
        return None
    return {i: exact.get(tokenizer.decode([i]), 0.0) for i in range(vocab_size)}


def next_token_report(last: torch.Tensor, tokenizer: Any, ids: list[int], top_k: int, top_p: float | None,
                      temperatures: list[float]) -> dict[str, Any]:
    """The next token after the prompt, from last-position logits (V,): `table` (top-k, see
    `next_token_table`), `dists` (the tempered distributions with the sampler's cuts), `truth` (see
    `true_next_token`), `bar_ids` (the ids charted, most likely first) and `lines` (the printed table)."""
    table = next_token_table(last, tokenizer, top_k)
    dists = tempered_distributions(last, temperatures, top_k, top_p)
    truth = true_next_token(tokenizer, ids, last.numel())
    lines = [f"next token after the prompt (top {top_k}, temperature 1"
             f"{'; true = the exact probability under the ABC source' if truth else ''}):",
             f"{'rank':>4}  {'token':<14} {'id':>6}  {'probability':>11}  {'cumulative':>10}"
             + (f"  {'true':>8}" if truth else "")]
    lines += [f"{r:>4}  {label:<14} {i:>6}  {p:>11.4f}  {c:>10.4f}" + (f"  {truth[i]:>8.4f}" if truth else "")
              for r, (label, i, p, c) in enumerate(table, 1)]
    for d in dists:
        kept = int(d["keep"].sum())
        lines.append(f"temperature {d['temperature']:g}: the top-k={top_k}"
                     f"{f', top-p={top_p}' if top_p is not None else ''} cuts leave {kept} token(s), "
                     f"holding {float(d['probs'][d['keep']].sum()):.4f} of the probability")
    n_bars = min(last.numel(), max(2 * top_k, 10))
    return {"table": table, "dists": dists, "truth": truth, "bar_ids": torch.topk(last, n_bars).indices.tolist(),
            "lines": lines}


def layer_report(inter: dict[str, Any], n_tokens: int) -> dict[str, Any]:
    """Per layer: `norms` (residual_norms), `entropy` (attention_entropy), `uniform` (its maximum,
    uniform_attention_entropy) and `lines` (the printed table)."""
    norms = residual_norms(inter["hidden"]).cpu()
    entropy = attention_entropy(inter["attention"]).cpu()
    uniform = uniform_attention_entropy(n_tokens)
    lines = ["per layer: residual-stream L2 norm (mean over tokens) and attention entropy in bits "
             f"(mean over query positions; uniform attention = {uniform:.3f} bits)",
             f"{'depth':>5}  {'norm':>9}  entropy per head"]
    for d in range(norms.shape[0]):
        heads = "" if d == 0 else "  ".join(f"{e:.3f}" for e in entropy[d - 1].tolist())
        lines.append(f"{'emb' if d == 0 else d:>5}  {norms[d].mean().item():>9.3f}  {heads}")
    return {"norms": norms, "entropy": entropy, "uniform": uniform, "lines": lines}


def _inspect_json(tokenizer: Any, ids: list[int], cut: int, labels: list[str], inter: dict[str, Any],
                  attention: list[torch.Tensor], nxt: dict[str, Any], layers: dict[str, Any], top_k: int,
                  top_p: float | None) -> str:
    """inspect.json: every number of the report, attention weights included."""
    truth = nxt["truth"]
    return json.dumps({
        "prompt_tokens_dropped": cut, "ids": ids, "tokens": [tokenizer.decode([i]) for i in ids], "labels": labels,
        "positions": inter["positions"].tolist(), "mask": inter["mask"].tolist(),
        "next_token": [{"token": tokenizer.decode([i]), "id": i, "probability": p}
                       | ({"true_probability": truth[i]} if truth else {}) for _, i, p, _ in nxt["table"]],
        "temperatures": [{"temperature": d["temperature"], "kept_ids": torch.nonzero(d["keep"])[:, 0].tolist()}
                         for d in nxt["dists"]],
        "top_k": top_k, "top_p": top_p,
        "residual_norms": layers["norms"].tolist(), "attention_entropy_bits": layers["entropy"].tolist(),
        "uniform_attention_entropy_bits": layers["uniform"],
        "attention": [[[[round(v, 7) for v in row] for row in head] for head in layer.tolist()] for layer in attention],
    }, ensure_ascii=False, allow_nan=False) + "\n"


def inspect_model(model: nn.Module, tokenizer: Any, prompt: str, out_dir: str | Path, *,
                  top_k: int | None = None, top_p: float | None = 0.9,
                  temperatures: tuple[float, ...] = (0.5, 1.0, 2.0), max_tokens: int = 48,
                  title: str = "", screen: tuple[int, int] | None = None) -> dict[str, Any]:
    """Look inside `model` on `prompt` and write to `out_dir`:

    attention.png (layers x heads maps), mask.txt (positions and causal mask), next_token.txt and
    next_token.png (top-k table; bars at each temperature with the top-k and top-p cut-offs),
    layers.png (residual-stream norms, attention entropy) and inspect.json (all the numbers,
    attention weights included). Only the last `max_tokens` tokens of the prompt are used, so the
    pictures stay readable. `top_k` defaults to half the vocabulary, at most 10. Returns a dict
    with `text` (the printed summary: its mask cut to fit `screen`, a terminal's (columns, lines))
    and `files` (the paths written).
    """
    ids, cut = prompt_window(model, tokenizer, prompt, max_tokens)
    top_k = max(1, min(10, model.cfg.vocab_size // 2)) if top_k is None else top_k
    labels = token_labels(tokenizer, ids)
    inter = return_intermediates(model, torch.tensor([ids], device=model.tok_emb.weight.device))
    final = Path(out_dir)
    check_writable_dir(final, "inspect", whole=True)  # before any work
    if not torch.isfinite(inter["logits"]).all():
        raise UsageError("the model's logits are not finite: its weights hold NaN or infinity (a damaged "
                         "checkpoint or a diverged run); load another checkpoint")
    title = title or f"{sum(1 for _ in model.trf_blocks)} layers x {model.cfg.n_heads} heads"
    attention = [a[0].float().cpu() for a in inter["attention"]]  # each (nh, T, T)
    mask_text = format_mask(labels, inter["mask"])
    last = inter["logits"][0, -1, :decodable_ids(model, tokenizer)].float().cpu()  # (V,): the ids generation draws from
    nxt = next_token_report(last, tokenizer, ids, top_k, top_p, list(temperatures))
    layers = layer_report(inter, len(ids))
    shown = f"{'…' if len(ids) > 12 else ''}{token_label(tokenizer.decode(ids[-12:]))}"
    # Everything is written to a temporary folder that then takes the place of out_dir whole: a failure
    # half-way leaves no partial out_dir.
    with replace_dir(final, "inspect") as out:
        plots.plot_attention_grid(attention, labels, out / "attention.png", title=f"Attention weights ({title})")
        (out / "mask.txt").write_text(mask_text + "\n", encoding="utf-8")
        plots.plot_next_token(
            nxt["dists"], token_labels(tokenizer, nxt["bar_ids"]), nxt["bar_ids"], out / "next_token.png",
            top_k=top_k, top_p=top_p, title=f"P(next token | {shown}) at several temperatures",
            true_probs=None if nxt["truth"] is None else [nxt["truth"][i] for i in nxt["bar_ids"]])
        (out / "next_token.txt").write_text("\n".join(nxt["lines"]) + "\n", encoding="utf-8")
        plots.plot_layer_stats(layers["norms"].numpy(), layers["entropy"].numpy(), layers["uniform"],
                               out / "layers.png", labels=labels,
                               title=f"Inside the layers ({title}), prompt of {len(ids)} tokens")
        (out / "inspect.json").write_text(
            _inspect_json(tokenizer, ids, cut, labels, inter, attention, nxt, layers, top_k, top_p), encoding="utf-8")
    files = {name: final / f for name, f in (("attention", "attention.png"), ("mask", "mask.txt"),
                                             ("next_token_chart", "next_token.png"), ("next_token", "next_token.txt"),
                                             ("layers", "layers.png"), ("json", "inspect.json"))}
    head = f"prompt: {len(ids)} tokens" + (f" (the first {cut} dropped: showing the last {len(ids)})" if cut else "")
    shown_mask = mask_text if screen is None else format_mask(labels, inter["mask"], *screen)
    text = "\n\n".join([head, shown_mask, "\n".join(nxt["lines"]), "\n".join(layers["lines"])])
    return {"text": text, "files": files, "intermediates": inter, "ids": ids, "labels": labels}

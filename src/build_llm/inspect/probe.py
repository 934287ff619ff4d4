"""Looking inside a model: parameter tables, sizes, intermediate tensors, next-token tables."""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from build_llm.errors import UsageError
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
    return {"positions": torch.arange(T), "mask": model.trf_blocks[0].att.mask[:T, :T].int(),
            "hidden": hidden, "attention": attention, "logits": logits}


def next_token_distribution(model: nn.Module, tokenizer: Any, prompt: str, k: int = 10) -> list[tuple[str, int, float]]:
    """Top-k (token string, id, probability) of the next token after `prompt` (eval mode)."""
    from build_llm.infer.generate import text_to_token_ids

    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise UsageError(f"k={k!r} is invalid; expected an integer >= 1")
    idx = text_to_token_ids(prompt, tokenizer)
    ctx = model.cfg.context_length
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(idx[:, -ctx:].to(model.tok_emb.weight.device))[0, -1]
    finally:
        model.train(was_training)
    probas = torch.softmax(logits.float(), dim=-1)
    top = torch.topk(probas, min(k, probas.numel()))
    return [(tokenizer.decode([i]), i, p) for p, i in zip(top.values.tolist(), top.indices.tolist())]


# --- readable tokens -----------------------------------------------------------------------------
_VISIBLE = {" ": "␣", "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def token_label(text: str) -> str:
    """A token's text made visible for plots and tables: spaces as ␣, newlines as \\n, other
    control characters as escapes; an empty string (a pad id, a partial UTF-8 byte) as ∅."""
    if text == "":
        return "∅"
    return "".join(_VISIBLE.get(c) or (repr(c)[1:-1] if not c.isprintable() else c) for c in text)


def token_labels(tokenizer: Any, ids: list[int]) -> list[str]:
    """`token_label` of each id decoded on its own (a pad id shows its vocabulary entry, "<PAD>")."""
    labels = []
    for i in ids:
        text = tokenizer.decode([i])
        if text == "" and hasattr(tokenizer, "vocab"):
            text = tokenizer.vocab[i]
        labels.append(token_label(text))
    return labels


def token_pieces(tokenizer: Any, ids: list[int]) -> list[str]:
    """The text each token adds, so that the pieces join to `decode(ids)` exactly.

    Decoding ids one by one splits a character whose UTF-8 bytes span two GPT-2 tokens into two
    replacement characters; then the character is given to the token that completes it.
    """
    pieces = [tokenizer.decode([i]) for i in ids]
    whole = tokenizer.decode(ids)
    if "".join(pieces) == whole:
        return pieces
    pieces, done = [], 0
    for j in range(len(ids)):
        text = tokenizer.decode(ids[: j + 1])
        stable = text if j == len(ids) - 1 else text.rstrip("\ufffd")
        pieces.append(stable[done:])
        done = max(done, len(stable))
    return pieces


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


# --- next-token distribution at several temperatures ---------------------------------------------
def next_token_table(logits: torch.Tensor, tokenizer: Any, k: int = 10) -> list[tuple[str, int, float, float]]:
    """Top-k (label, id, probability, cumulative probability) of last-position logits (V,)."""
    probas = torch.softmax(logits.float(), dim=-1)
    top = torch.topk(probas, min(k, probas.numel()))
    ids, ps = top.indices.tolist(), top.values.tolist()
    cum = torch.tensor(ps).cumsum(0).tolist()
    return [(label, i, p, c) for label, i, p, c in zip(token_labels(tokenizer, ids), ids, ps, cum)]


def tempered_distributions(logits: torch.Tensor, temperatures: list[float], top_k: int | None = None,
                           top_p: float | None = None) -> list[dict[str, Any]]:
    """For each temperature T > 0: the softmax of logits / T over the whole vocabulary (`probs`), and
    which tokens the sampler keeps after the top-k and top-p cuts (`keep`, as `generate` does it)."""
    from build_llm.infer.generate import check_sampling, filter_logits

    out = []
    for t in temperatures:
        check_sampling(t, top_k, top_p)
        if t == 0:
            raise UsageError("temperature=0 is greedy (the argmax); give temperatures > 0 to plot")
        scaled = logits.float() / t
        kept = filter_logits(scaled[None], top_k, top_p)[0]
        out.append({"temperature": t, "probs": torch.softmax(scaled, dim=-1), "keep": torch.isfinite(kept)})
    return out


# --- surprisal -----------------------------------------------------------------------------------
def token_losses(model: nn.Module, ids: list[int], stride: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Loss -ln p(x_j | context) of every token after the first, and where its context starts.

    Texts longer than the model's context are cut into windows of `context_length` tokens that
    start `stride` tokens apart (default half the context); each token is scored in the first
    window that predicts it after the first, so every token but the early ones sees at least
    `context_length - stride + 1` tokens. Returns `losses` (n - 1,) in nats and `starts` (n - 1,):
    token j (1-based index into ids, j >= 1) was predicted from ids[starts[j - 1]:j].
    """
    n, ctx = len(ids), model.cfg.context_length
    if n < 2:
        raise UsageError(f"the text has {n} token(s); surprisal needs at least 2")
    stride = max(1, ctx // 2) if stride is None else stride
    if isinstance(stride, bool) or not isinstance(stride, int) or not 1 <= stride <= ctx:
        raise UsageError(f"stride={stride!r} is invalid; expected an integer in [1, {ctx}]")
    device = model.tok_emb.weight.device
    all_ids = torch.tensor(ids, dtype=torch.long, device=device)
    losses, starts = np.empty(n - 1), np.empty(n - 1, dtype=np.int64)
    done, was_training = 1, model.training  # done: the next target to score
    model.eval()
    try:
        with torch.no_grad():
            while done < n:
                end = min(n, done + (ctx if done == 1 else stride))  # targets done..end-1
                start = max(0, end - 1 - ctx)  # inputs ids[start:end-1], at most ctx of them
                logits = model(all_ids[None, start:end - 1])[0].float()  # (T, V)
                logp = torch.log_softmax(logits[done - 1 - start:], dim=-1)  # rows predicting done..end-1
                targets = all_ids[done:end]
                losses[done - 1:end - 1] = (-logp.gather(1, targets[:, None])[:, 0]).cpu().numpy()
                starts[done - 1:end - 1] = start
                done = end
    finally:
        model.train(was_training)
    return losses, starts


LN2 = math.log(2)


def is_abc_tokenizer(tokenizer: Any) -> bool:
    """True for a character tokenizer over exactly the ABC source's alphabet (plus <PAD>)."""
    from build_llm.data.markov import ABC
    from build_llm.data.tokenizer import CharTokenizer

    return isinstance(tokenizer, CharTokenizer) and tokenizer.vocab[1:] == list(ABC.alphabet)


def surprisal_report(model: nn.Module, tokenizer: Any, text: str, *, stride: int | None = None,
                     source: Any = None) -> dict[str, Any]:
    """Surprisal -log2 p of every token of `text` after the first, with totals.

    Keys: `pieces` (the text of each token; they join to the text), `bits` (n - 1,), `starts`
    (where each token's context starts, see `token_losses`), `tokens` and `characters` scored,
    `bits_per_token`, `bits_per_char`, `perplexity` (e to the mean loss in nats). With a
    `markov.WordSource` as `source` (the text must be character-level and possible under it), also
    `optimal_bits` and `excess_bits` per token: the Bayes-optimal surprisal given the very context
    the model saw, and the model's excess over it.
    """
    if not isinstance(text, str) or not text:
        raise UsageError("text is empty; give at least two tokens of text")
    ids = tokenizer.encode(text)
    losses, starts = token_losses(model, ids, stride)
    pieces = token_pieces(tokenizer, ids)
    scored_chars = sum(len(p) for p in pieces[1:])
    report: dict[str, Any] = {
        "pieces": pieces, "bits": losses / LN2, "starts": starts, "tokens": len(losses),
        "characters": scored_chars, "bits_per_token": float(losses.mean() / LN2),
        "bits_per_char": float(losses.sum() / LN2 / max(scored_chars, 1)),
        "perplexity": float(math.exp(losses.mean())),
    }
    if source is not None:
        from build_llm.data.markov import optimal_window_losses

        if any(len(p) != 1 for p in pieces):
            raise UsageError("the exact optimum needs a character-level tokenizer (one character per token)")
        optimal = np.empty_like(losses)
        # One window per distinct context start: the optimum conditions on exactly what the model saw.
        for start in np.unique(starts):
            rows = np.flatnonzero(starts == start)
            last = int(rows[-1]) + 1  # index into text of the last target of this window
            window_losses = optimal_window_losses(source, text[start:last + 1])
            optimal[rows] = window_losses[rows - start]  # target rows + 1 is window entry rows - start
        report["optimal_bits"] = optimal / LN2
        report["excess_bits"] = (losses - optimal) / LN2
        report["optimal_bits_per_token"] = float(optimal.mean() / LN2)
        report["excess_bits_per_token"] = float((losses - optimal).mean() / LN2)
    return report


def _colour(value: float, vmax: float, cmap_name: str, vmin: float = 0.0) -> tuple[str, str]:
    """(background, text colour) hex for `value` on a matplotlib colormap over [vmin, vmax]."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    x = 0.5 if vmax <= vmin else min(max((value - vmin) / (vmax - vmin), 0.0), 1.0)
    r, g, b, _ = colormaps[cmap_name](x)
    return to_hex((r, g, b)), ("#000000" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "#ffffff")


def _legend(vmin: float, vmax: float, cmap_name: str, caption: str) -> str:
    stops = ", ".join(_colour(vmin + (vmax - vmin) * i / 10, vmax, cmap_name, vmin)[0] for i in range(11))
    ticks = "".join(f"<span>{vmin + (vmax - vmin) * i / 4:.2f}</span>" for i in range(5))
    return (f'<div class="legend"><div class="bar" style="background: linear-gradient(to right, {stops})"></div>'
            f'<div class="ticks">{ticks}</div><div class="caption">{_escape(caption)}</div></div>')


# Bidirectional-text controls would reorder the page around them (U+202E shows the rest reversed):
# shown as visible code points instead.
_BIDI = {c: f"⟨U+{ord(c):04X}⟩" for c in "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"}


def _escape(text: str) -> str:
    """HTML-escaped text with bidirectional controls made visible."""
    return html.escape("".join(_BIDI.get(c, c) for c in text))


def _spans(pieces: list[str], values: np.ndarray | None, vmin: float, vmax: float, cmap_name: str,
           titles: list[str]) -> str:
    out = []
    for j, piece in enumerate(pieces):
        cls = "tok nl" if piece.endswith("\n") else "tok"
        if j == 0 or values is None:  # the first token has no prediction
            out.append(f'<span class="{cls} first" title="{_escape(titles[j])}">{_escape(piece)}</span>')
            continue
        bg, fg = _colour(float(values[j - 1]), vmax, cmap_name, vmin)
        out.append(f'<span class="{cls}" style="background:{bg};color:{fg}" data-bits="{values[j - 1]:.6f}" '
                   f'title="{_escape(titles[j])}">{_escape(piece)}</span>')
    return "".join(out)


_CSS = """
body { font-family: sans-serif; margin: 2em; max-width: 70em; }
.text { font-family: monospace; font-size: 15px; line-height: 1.9; white-space: pre-wrap;
        word-break: break-all; border: 1px solid #ccc; padding: 0.8em; }
.tok { border-radius: 2px; }
.tok.nl::before { content: "\\21B5"; opacity: 0.6; }
.tok.first { background: #ddd; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
td, th { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: right; }
.legend { margin: 0.5em 0 1em; width: 28em; }
.legend .bar { height: 14px; border: 1px solid #999; }
.legend .ticks { display: flex; justify-content: space-between; font-size: 12px; }
.legend .caption { font-size: 12px; color: #444; }
"""


def context_groups(context: np.ndarray) -> list[list[int]]:
    """The rows of the by-context table: each context length alone, except that consecutive lengths
    occurring once each (the start of a text longer than one window) share one row. A text within one
    window (every length once) keeps a row per length."""
    values, counts = np.unique(context, return_counts=True)
    if (counts == 1).all():
        return [[int(v)] for v in values]
    count = dict(zip(values.tolist(), counts.tolist()))
    groups: list[list[int]] = []
    for v in count:
        if count[v] == 1 and groups and groups[-1][-1] == v - 1 and count[groups[-1][-1]] == 1:
            groups[-1].append(v)
        else:
            groups.append([v])
    return groups


def surprisal_html(report: dict[str, Any], title: str = "Surprisal") -> str:
    """A self-contained HTML page: every token coloured by its surprisal -log2 p, with a legend and
    the totals; with the optimum (see `surprisal_report`), the text again coloured by the excess
    over it and a table of the excess by context length. Hover a token for its numbers."""
    pieces, bits = report["pieces"], report["bits"]
    vmax = max(1.0, float(np.ceil(np.quantile(bits, 0.99))))
    has_opt = "optimal_bits" in report
    titles = ["first token: no prediction"]
    for j in range(1, len(pieces)):
        t = (f"{token_label(pieces[j])}: {bits[j - 1]:.3f} bits (p = {2 ** -bits[j - 1]:.4f}), "
             f"context {j - int(report['starts'][j - 1])} tokens")
        if has_opt:
            t += f"; optimum {report['optimal_bits'][j - 1]:.3f} bits, excess {report['excess_bits'][j - 1]:+.3f}"
        titles.append(t)
    rows = [("tokens scored", f"{report['tokens']:,}"), ("characters scored", f"{report['characters']:,}"),
            ("bits per token", f"{report['bits_per_token']:.4f}"), ("bits per character", f"{report['bits_per_char']:.4f}"),
            ("perplexity", f"{report['perplexity']:.4f}")]
    if has_opt:
        rows += [("optimum, bits per token", f"{report['optimal_bits_per_token']:.4f}"),
                 ("excess over the optimum, bits per token", f"{report['excess_bits_per_token']:+.4f}")]
    totals = "".join(f'<tr><th style="text-align:left">{k}</th><td class="total" data-key="{k}">{v}</td></tr>'
                     for k, v in rows)
    parts = [f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{_escape(title)}</title>"
             f"<style>{_CSS}</style></head><body>",
             f"<h1>{_escape(title)}</h1>",
             "<p>Each token is coloured by its surprisal −log<sub>2</sub> p(token | the tokens before it): pale is "
             "expected, dark is surprising. The first token (grey) has no prediction. Hover a token for its "
             "numbers.</p>",
             f"<table>{totals}</table>",
             _legend(0.0, vmax, "YlOrRd", "surprisal, bits (−log2 p)"),
             f'<div class="text" id="surprisal">{_spans(pieces, bits, 0.0, vmax, "YlOrRd", titles)}</div>']
    if has_opt:
        excess = report["excess_bits"]
        emax = max(0.5, float(np.ceil(np.quantile(np.abs(excess), 0.99) * 4) / 4))
        parts += ["<h2>Excess over the exact optimum</h2>",
                  "<p>The source is known, so the best possible prediction given the same context is known too. "
                  "Red: the model is more surprised than the optimum; blue: less (luck, on this token).</p>",
                  _legend(-emax, emax, "RdBu_r", "excess surprisal, bits (model − optimum)"),
                  f'<div class="text" id="excess">{_spans(pieces, excess, -emax, emax, "RdBu_r", titles)}</div>',
                  "<h3>By context length</h3>"]
        context = np.arange(1, len(bits) + 1) - report["starts"]
        groups = context_groups(context)
        if len(groups) < len(np.unique(context)):
            merged = [f"{g[0]}–{g[-1]}" for g in groups if len(g) > 1]
            parts.append(f"<p>Context lengths {', '.join(merged)} occur once each: only at the start of the text, in "
                         "the first window, before it slides. Their tokens share one row. Every later token is "
                         "scored with a longer context, so the other rows hold many tokens each.</p>")
        elif len(groups) == len(bits):
            parts.append("<p>The text fits in one window, so each context length occurs once (one token per row).</p>")
        parts.append("<table><tr><th>context (tokens)</th><th>count</th><th>model, bits</th><th>optimum, bits</th>"
                     "<th>excess, bits</th></tr>")
        for g in groups:
            sel = np.isin(context, g)
            name = f"{g[0]}–{g[-1]}" if len(g) > 1 else f"{g[0]}"
            parts.append(f"<tr><td>{name}</td><td>{sel.sum()}</td><td>{bits[sel].mean():.4f}</td>"
                         f"<td>{report['optimal_bits'][sel].mean():.4f}</td><td>{excess[sel].mean():+.4f}</td></tr>")
        parts.append("</table>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


# --- the `inspect` report ------------------------------------------------------------------------
def format_mask(labels: list[str], mask: torch.Tensor) -> str:
    """The positions and the causal mask as the R notebook prints them (`x1`, `wei`), labelled."""
    T = len(labels)
    width = max(len(s) for s in labels)
    lines = ["tokens and positions (x1; the R notebook counts from 1, PyTorch from 0):"]
    lines += [f"  {t:>3}  {label}" for t, label in enumerate(labels)]
    lines.append("causal mask (wei): row = query, column = key; 1 = may not look at that position")
    lines.append(" " * (width + 2) + " ".join(f"{t:>2}" for t in range(T)))
    for t in range(T):
        lines.append(f"{labels[t]:>{width}}  " + " ".join(f"{int(v):>2}" for v in mask[t].tolist()))
    return "\n".join(lines)


def inspect_model(model: nn.Module, tokenizer: Any, prompt: str, out_dir: str | Path, *,
                  top_k: int | None = None, top_p: float | None = 0.9,
                  temperatures: tuple[float, ...] = (0.5, 1.0, 2.0), max_tokens: int = 48,
                  title: str = "") -> dict[str, Any]:
    """Look inside `model` on `prompt` and write to `out_dir`:

    attention.png (layers x heads maps), mask.txt (positions and causal mask), next_token.txt and
    next_token.png (top-k table; bars at each temperature with the top-k and top-p cut-offs),
    layers.png (residual-stream norms, attention entropy) and inspect.json (all the numbers,
    attention weights included). Only the last `max_tokens` tokens of the prompt are used, so the
    pictures stay readable. `top_k` defaults to half the vocabulary, at most 10. Returns a dict
    with `text` (the printed summary) and `files` (the paths written).
    """
    from build_llm.inspect.plots import plot_attention_grid, plot_layer_stats, plot_next_token

    if not isinstance(prompt, str) or not prompt:
        raise UsageError("prompt is empty; give at least one character")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise UsageError(f"max_tokens={max_tokens!r} is invalid; expected an integer >= 1")
    V, ctx = model.cfg.vocab_size, model.cfg.context_length
    top_k = max(1, min(10, V // 2)) if top_k is None else top_k
    ids = tokenizer.encode(prompt)
    cut = len(ids) - min(len(ids), max_tokens, ctx)
    ids = ids[cut:]
    if not ids:
        raise UsageError(f"prompt {prompt!r} encodes to no tokens")
    labels = token_labels(tokenizer, ids)
    device = model.tok_emb.weight.device
    inter = return_intermediates(model, torch.tensor([ids], device=device))
    final = Path(out_dir)
    check_writable_dir(final, "inspect", whole=True)  # before any work
    if not torch.isfinite(inter["logits"]).all():
        raise UsageError("the model's logits are not finite: its weights hold NaN or infinity (a damaged "
                         "checkpoint or a diverged run); load another checkpoint")
    # Everything is written to a temporary folder that then takes the place of --out whole: a failure
    # half-way leaves no partial --out.
    with replace_dir(final, "inspect") as out:
        title = title or f"{sum(1 for _ in model.trf_blocks)} layers x {model.cfg.n_heads} heads"

        files = {}
        attention = [a[0].float().cpu() for a in inter["attention"]]  # each (nh, T, T)
        files["attention"] = plot_attention_grid(attention, labels, out / "attention.png",
                                                 title=f"Attention weights ({title})")
        mask_text = format_mask(labels, inter["mask"])
        files["mask"] = out / "mask.txt"
        files["mask"].write_text(mask_text + "\n", encoding="utf-8")

        last = inter["logits"][0, -1].float().cpu()
        table = next_token_table(last, tokenizer, top_k)
        n_bars = min(V, max(2 * top_k, 10))
        dists = tempered_distributions(last, list(temperatures), top_k, top_p)
        bar_ids = torch.topk(last, n_bars).indices.tolist()
        truth = None
        if is_abc_tokenizer(tokenizer):  # the source is known: show what the model should predict
            from build_llm.data.markov import ABC, next_char_distribution

            try:
                exact = next_char_distribution(ABC, tokenizer.decode(ids))
                truth = {i: exact.get(tokenizer.decode([i]), 0.0) for i in range(V)}
            except ValueError:  # a prompt the source cannot produce has no true distribution
                truth = None
        files["next_token_chart"] = plot_next_token(
            dists, token_labels(tokenizer, bar_ids), bar_ids, out / "next_token.png", top_k=top_k, top_p=top_p,
            title=f"P(next token | {'…' if len(ids) > 12 else ''}{token_label(tokenizer.decode(ids[-12:]))}) "
                  "at several temperatures",
            true_probs=None if truth is None else [truth[i] for i in bar_ids])
        table_lines = [f"next token after the prompt (top {top_k}, temperature 1"
                       f"{'; true = the exact probability under the ABC source' if truth else ''}):",
                       f"{'rank':>4}  {'token':<14} {'id':>6}  {'probability':>11}  {'cumulative':>10}"
                       + (f"  {'true':>8}" if truth else "")]
        table_lines += [f"{r:>4}  {label:<14} {i:>6}  {p:>11.4f}  {c:>10.4f}" + (f"  {truth[i]:>8.4f}" if truth else "")
                        for r, (label, i, p, c) in enumerate(table, 1)]
        for d in dists:
            kept = int(d["keep"].sum())
            table_lines.append(f"temperature {d['temperature']:g}: the top-k={top_k}"
                               f"{f', top-p={top_p}' if top_p is not None else ''} cuts leave {kept} token(s), "
                               f"holding {float(d['probs'][d['keep']].sum()):.4f} of the probability")
        files["next_token"] = out / "next_token.txt"
        files["next_token"].write_text("\n".join(table_lines) + "\n", encoding="utf-8")

        norms = residual_norms(inter["hidden"]).cpu()
        entropy = attention_entropy(inter["attention"]).cpu()
        uniform = uniform_attention_entropy(len(ids))
        files["layers"] = plot_layer_stats(norms.numpy(), entropy.numpy(), uniform, out / "layers.png", labels=labels,
                                           title=f"Inside the layers ({title}), prompt of {len(ids)} tokens")
        layer_lines = ["per layer: residual-stream L2 norm (mean over tokens) and attention entropy in bits "
                       f"(mean over query positions; uniform attention = {uniform:.3f} bits)",
                       f"{'depth':>5}  {'norm':>9}  entropy per head"]
        for d in range(norms.shape[0]):
            heads = "" if d == 0 else "  ".join(f"{e:.3f}" for e in entropy[d - 1].tolist())
            layer_lines.append(f"{'emb' if d == 0 else d:>5}  {norms[d].mean().item():>9.3f}  {heads}")

        files["json"] = out / "inspect.json"
        files["json"].write_text(json.dumps({
            "prompt_tokens_dropped": cut, "ids": ids, "tokens": [tokenizer.decode([i]) for i in ids], "labels": labels,
            "positions": inter["positions"].tolist(), "mask": inter["mask"].tolist(),
            "next_token": [{"token": tokenizer.decode([i]), "id": i, "probability": p}
                           | ({"true_probability": truth[i]} if truth else {}) for _, i, p, _ in table],
            "temperatures": [{"temperature": d["temperature"], "kept_ids": torch.nonzero(d["keep"])[:, 0].tolist()}
                             for d in dists],
            "top_k": top_k, "top_p": top_p,
            "residual_norms": norms.tolist(), "attention_entropy_bits": entropy.tolist(),
            "uniform_attention_entropy_bits": uniform,
            "attention": [[[[round(v, 7) for v in row] for row in head] for head in layer.tolist()] for layer in attention],
        }, ensure_ascii=False, allow_nan=False) + "\n", encoding="utf-8")
    files = {name: final / Path(path).name for name, path in files.items()}

    head = [f"prompt: {len(ids)} tokens" + (f" (the first {cut} dropped: showing the last {len(ids)})" if cut else "")]
    text = "\n\n".join(["\n".join(head), mask_text, "\n".join(table_lines), "\n".join(layer_lines)])
    return {"text": text, "files": files, "intermediates": inter, "ids": ids, "labels": labels}

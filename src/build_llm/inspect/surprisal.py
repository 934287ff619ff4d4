"""Surprisal: how surprised a model is by each token of a text, -log2 p(token | the tokens before it),
with totals, the exact optimum when the source is known, and a self-contained HTML page."""

from __future__ import annotations

import html
import math
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from build_llm.data.markov import optimal_window_losses
from build_llm.errors import UsageError
from build_llm.inspect.plots import map_colour
from build_llm.inspect.tables import token_label, token_pieces
from build_llm.store.fsio import HTML_GENERATOR


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


# --- the HTML page ---------------------------------------------------------------------------------
def _legend(vmin: float, vmax: float, cmap_name: str, caption: str) -> str:
    stops = ", ".join(map_colour(vmin + (vmax - vmin) * i / 10, vmin, vmax, cmap_name)[0] for i in range(11))
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
        bg, fg = map_colour(float(values[j - 1]), vmin, vmax, cmap_name)
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
    parts = [f"<!doctype html>\n<html><head><meta charset=\"utf-8\">{HTML_GENERATOR}<title>{_escape(title)}</title>"
             f"<style>{_CSS}</style></head><body>",
             f"<h1>{_escape(title)}</h1>",
             "<p>Each token is coloured by its surprisal −log<sub>2</sub> p(token | the tokens before it): pale is "
             "expected, dark is surprising. The first token (grey) has no prediction. Hover a token for its "
             "numbers.</p>",
             f"<table>{totals}</table>",
             _legend(0.0, vmax, "YlOrRd", "surprisal, bits (−log2 p)"),
             f'<div class="text" id="surprisal">{_spans(pieces, bits, 0.0, vmax, "YlOrRd", titles)}</div>']
    if has_opt:
        parts += _excess_section(report, titles)
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _excess_section(report: dict[str, Any], titles: list[str]) -> list[str]:
    """The page's part on the optimum: the text coloured by the excess surprisal over it, and the
    excess by context length."""
    pieces, bits, excess = report["pieces"], report["bits"], report["excess_bits"]
    emax = max(0.5, float(np.ceil(np.quantile(np.abs(excess), 0.99) * 4) / 4))
    parts = ["<h2>Excess over the exact optimum</h2>",
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
    return parts

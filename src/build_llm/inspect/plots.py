"""matplotlib figures: attention maps, next-token distributions, per-layer statistics (a run's loss
curve is train.loop.plot_losses).

Every function writes one PNG and returns its path. The Agg backend is used, so no display is
needed. matplotlib is imported on the first drawing, not with this module: it takes about half a
second to import (with pyplot), and this module is imported with `import build_llm`, most of
which never draws.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from build_llm.store.fsio import save_figure


def _matplotlib():
    """matplotlib, with its colors and colormaps (no pyplot, no backend chosen)."""
    import matplotlib.colors  # deferred: slow to import, only drawing needs it (see the module docstring)

    return matplotlib


def _pyplot():
    _matplotlib().use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt  # deferred: slow to import, only drawing needs it (see the module docstring)

    return plt


def map_colour(value: float, vmin: float, vmax: float, cmap_name: str) -> tuple[str, str]:
    """(background, text colour) hex for `value` on a matplotlib colormap over [vmin, vmax]; the text
    is black on a light background and white on a dark one."""
    mpl = _matplotlib()
    x = 0.5 if vmax <= vmin else min(max((value - vmin) / (vmax - vmin), 0.0), 1.0)
    r, g, b, _ = mpl.colormaps[cmap_name](x)
    return mpl.colors.to_hex((r, g, b)), ("#000000" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "#ffffff")


def _plain_text(plot):
    """Run a plotting function with mathtext off: a prompt's "$x^2$" is drawn as typed, and an odd
    "$" cannot make matplotlib fail half-way through a figure."""
    @functools.wraps(plot)
    def wrapper(*args, **kwargs):
        with _matplotlib().rc_context({"text.parse_math": False}):
            return plot(*args, **kwargs)
    return wrapper


def _save(fig, path: str | Path) -> Path:
    try:
        return save_figure(fig, path, bbox_inches="tight")
    finally:
        _pyplot().close(fig)


# --- attention maps --------------------------------------------------------------------------------
@_plain_text
def plot_attention_grid(attention: np.ndarray | Sequence[Any], labels: Sequence[str], path: str | Path,
                        title: str = "Attention weights") -> Path:
    """One heatmap per layer (rows) and head (columns): row = query token, column = key token.

    `attention` is (n_layers, n_heads, T, T) or a list of (1, n_heads, T, T) tensors (as
    `intermediates.return_intermediates` gives them). The forbidden future (above the diagonal) is grey,
    so a leak would show as colour there. Token labels are drawn on the left column and bottom row.
    """
    plt = _pyplot()
    att = np.stack([np.asarray(a.detach().cpu() if hasattr(a, "detach") else a, dtype=float).reshape(a.shape[-3:])
                    for a in attention])  # (L, nh, T, T)
    n_layers, n_heads, T, _ = att.shape
    # Square maps sized for T labels, smaller when there are many of them (12 x 12 for GPT-2).
    cell = float(np.clip(0.13 * T + 0.4, 1.3, 1.8 if n_layers * n_heads > 16 else 3.2))
    fontsize = float(np.clip(0.8 * cell * 72 / T, 4.5, 9))  # one label per row must fit
    fig = plt.figure(figsize=(cell * n_heads + 2.2, cell * n_layers + 2.0), dpi=100)
    grid = fig.add_gridspec(n_layers, n_heads + 1, width_ratios=[1] * n_heads + [0.06],
                            left=1.2 / (cell * n_heads + 2.2), right=0.97, bottom=1.0 / (cell * n_layers + 2.0),
                            top=1 - 1.0 / (cell * n_layers + 2.0), wspace=0.08, hspace=0.08)
    upper = np.triu(np.ones((T, T), dtype=bool), k=1)
    cmap = plt.get_cmap("viridis").with_extremes(bad="#d9d9d9")
    image = None
    for i in range(n_layers):
        for h in range(n_heads):
            ax = fig.add_subplot(grid[i, h])
            shown = np.ma.masked_where(upper & (att[i, h] == 0), att[i, h])  # grey: masked, and truly 0
            image = ax.imshow(shown, cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_xticks(range(T))
            ax.set_yticks(range(T))
            if i == n_layers - 1:
                ax.set_xticklabels(labels, rotation=90, fontsize=fontsize)
                ax.set_xlabel("key", fontsize=8)
            else:
                ax.set_xticklabels([])
            if h == 0:
                ax.set_yticklabels(labels, fontsize=fontsize)
                ax.set_ylabel(f"layer {i + 1}\nquery", fontsize=9)
            else:
                ax.set_yticklabels([])
            ax.tick_params(length=0)
            if i == 0:
                ax.set_title(f"head {h + 1}", fontsize=9)
    fig.suptitle(f"{title}\nrow = query position, column = key position; grey = masked future", fontsize=10)
    fig.colorbar(image, cax=fig.add_subplot(grid[max(0, n_layers // 2 - 1):max(1, n_layers // 2 + 1), n_heads]),
                 label="attention weight")
    return _save(fig, path)


# --- next-token distribution -----------------------------------------------------------------------
@_plain_text
def plot_next_token(distributions: Sequence[dict[str, Any]], labels: Sequence[str], ids: Sequence[int],
                    path: str | Path, top_k: int | None = None, top_p: float | None = None,
                    title: str = "Next-token distribution", true_probs: Sequence[float] | None = None) -> Path:
    """Bars of P(next token) for the tokens `ids` (most likely first), one panel per temperature.

    `distributions` come from `tables.tempered_distributions`. Blue bars are the tokens the sampler
    keeps (top-k first, then top-p on what is left, as `generate` does), grey bars the ones it
    drops; the dashed line marks where top-k alone cuts, the dotted one where top-p alone would.
    `true_probs` (one per id), when the source is known, are drawn as black ticks on the
    temperature-1 panel.
    """
    return _save(next_token_figure(distributions, labels, ids, top_k, top_p, title, true_probs), path)


def next_token_figure(distributions: Sequence[dict[str, Any]], labels: Sequence[str], ids: Sequence[int],
                      top_k: int | None = None, top_p: float | None = None, title: str = "Next-token distribution",
                      true_probs: Sequence[float] | None = None):
    """The figure of `plot_next_token`, unsaved (tests measure where its labels are drawn)."""
    plt = _pyplot()
    n = len(ids)
    fig, axes = plt.subplots(len(distributions), 1, figsize=(max(6.0, 0.45 * n + 2.5), 2.3 * len(distributions) + 0.8),
                             squeeze=False, sharex=True, dpi=100)
    x = np.arange(n)
    for ax, d in zip(axes[:, 0], distributions):
        probs = d["probs"][list(ids)].float().cpu().numpy()
        keep = d["keep"][list(ids)].cpu().numpy()
        kept_total = int(d["keep"].sum())
        ax.bar(x, probs, color=np.where(keep, "#1f77b4", "#b0b0b0"), edgecolor="black", linewidth=0.4)
        top = probs.max()
        show_truth = true_probs is not None and d["temperature"] == 1
        if show_truth:
            ax.scatter(x, true_probs, marker="_", s=900, linewidths=2.5, color="black", zorder=3)
            top = max(top, float(np.max(true_probs)))
        for i, (xi, p) in enumerate(zip(x, probs)):
            if p > 0.02 * probs.max():  # above the bar, and above its black tick when that is higher
                y = max(p, float(true_probs[i])) if show_truth else p
                ax.annotate(f"{p:.2f}" if p >= 0.01 else f"{p:.1e}", (xi, y), xytext=(0, 3.5 if show_truth else 1.5),
                            textcoords="offset points", ha="center", va="bottom", fontsize=7 if n <= 12 else 5.5,
                            rotation=0 if n <= 12 else 90)
        if top_k is not None and top_k < n:
            ax.axvline(top_k - 0.5, color="#d62728", linestyle="--", linewidth=1.2)
            ax.text(top_k - 0.45, 0.97, f" top-k = {top_k}", color="#d62728", fontsize=8, va="top",
                    transform=ax.get_xaxis_transform())
        note = ""
        if top_p is not None:
            n_p = _top_p_count(d["probs"], top_p)
            if n_p >= n:
                note = f"; top-p {top_p} alone would keep {n_p:,} tokens (beyond the chart)"
            else:
                ax.axvline(n_p - 0.5, color="#2ca02c", linestyle=":", linewidth=1.6)
                right_half = n_p - 0.5 > n / 2
                ax.text(n_p - 0.5 + (-0.05 if right_half else 0.05), 0.80, f" top-p = {top_p} alone: {n_p} tokens ",
                        color="#2ca02c", fontsize=8, va="top", ha="right" if right_half else "left",
                        transform=ax.get_xaxis_transform())
        ax.set_ylim(0, min(1.05, top * 1.3) if top > 0 else 1.0)
        ax.set_ylabel("probability")
        ax.set_title(f"temperature {d['temperature']:g}: the sampler draws from {kept_total} token(s)" + note
                     + ("; black ticks: the true probability" if show_truth else ""), fontsize=9)
    axes[-1, 0].set_xticks(x)
    axes[-1, 0].set_xticklabels(labels, rotation=60 if n > 8 else 0, ha="right" if n > 8 else "center", fontsize=9)
    axes[-1, 0].set_xlabel("next token (most likely first); blue = kept by the sampler's top-k and top-p cuts, grey = cut")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def _top_p_count(probs: Any, top_p: float) -> int:
    """How many of the most likely tokens the top-p cut keeps: the smallest set with mass >= top_p."""
    p = np.sort(np.asarray(probs.float().cpu() if hasattr(probs, "cpu") else probs, dtype=float))[::-1]
    before = np.cumsum(p) - p
    return int((before < top_p).sum())


# --- per-layer statistics --------------------------------------------------------------------------
@_plain_text
def plot_layer_stats(norms: np.ndarray, entropy: np.ndarray, uniform: float, path: str | Path,
                     labels: Sequence[str] | None = None, title: str = "Inside the layers") -> Path:
    """Left: the residual-stream norm at each depth (one thin line per token, bold mean).
    Right: each head's mean attention entropy per layer, against uniform attention (the maximum).

    `norms` is (n_layers + 1, T) (`intermediates.residual_norms`), `entropy` (n_layers, n_heads) in bits
    (`intermediates.attention_entropy`), `uniform` from
    `intermediates.uniform_attention_entropy`.
    """
    return _save(layer_stats_figure(norms, entropy, uniform, labels, title), path)


HEAD_MARKERS = "osD^vP*X"  # a shape per head (when they are few), so that equal values stay distinguishable


def layer_stats_figure(norms: np.ndarray, entropy: np.ndarray, uniform: float, labels: Sequence[str] | None = None,
                       title: str = "Inside the layers"):
    """The figure of `plot_layer_stats`, unsaved (tests measure where its dots are drawn)."""
    plt = _pyplot()
    norms, entropy = np.asarray(norms, dtype=float), np.asarray(entropy, dtype=float)
    n_layers, n_heads = entropy.shape
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=100)
    depth = np.arange(norms.shape[0])
    for t in range(norms.shape[1]):
        left.plot(depth, norms[:, t], color="#999999", linewidth=0.7, alpha=0.7)
    left.plot(depth, norms.mean(axis=1), color="#1f77b4", linewidth=2.2, marker="o", label="mean over tokens")
    if labels is not None and norms.shape[1] > 0:
        first = labels[0]
        left.plot(depth, norms[:, 0], color="#ff7f0e", linewidth=1.2, linestyle="--", label=f"first token ({first})")
    left.set_xticks(depth)
    left.set_xticklabels(["emb"] + [str(i) for i in range(1, norms.shape[0])])
    left.set_xlabel("depth (emb = embeddings, i = after block i)")
    left.set_ylabel("L2 norm of the residual stream")
    left.set_title("Residual-stream norm (grey: one line per token)", fontsize=10)
    left.legend(fontsize=8)
    layers = np.arange(1, n_layers + 1)
    # Each head a little to the side of its layer, so that heads with the same entropy (e.g. two heads
    # that each look at one token, 0 bits) are all seen rather than drawn on top of one another.
    few = n_heads <= len(HEAD_MARKERS)
    step = min(0.12, 0.7 / max(n_heads, 1))
    for h in range(n_heads):  # a colour and shape per head when few; grey dots when many (a legend of 12 says nothing)
        right.scatter(layers + (h - (n_heads - 1) / 2) * step, entropy[:, h], s=22, alpha=0.85,
                      color=None if few else "#888888", marker=HEAD_MARKERS[h] if few else "o",
                      edgecolors="white" if few else "none", linewidths=0.4,
                      label=f"head {h + 1}" if few else ("one dot per head" if h == 0 else None))
    right.plot(layers, entropy.mean(axis=1), color="black", linewidth=1.8, label="mean over heads")
    right.axhline(uniform, color="#d62728", linestyle="--", linewidth=1.2, label=f"uniform ({uniform:.2f} bits)")
    right.set_ylim(0, uniform * 1.15 + 0.05)
    right.set_xticks(layers)
    right.set_xlim(0.5, n_layers + 0.5)
    right.set_xlabel("layer")
    right.set_ylabel("mean attention entropy, bits")
    right.set_title("Attention entropy: 0 = one token, red = spread evenly", fontsize=10)
    right.legend(fontsize=7)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig

"""plots: the figures are written as real PNGs of a sensible size, and the cut-off markers are right."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from build_llm.inspect.plots import _top_p_count, plot_attention_grid, plot_layer_stats, plot_next_token
from build_llm.inspect.tables import tempered_distributions

image = pytest.importorskip("matplotlib.image")


def _png(path):
    img = image.imread(path)
    assert img.ndim == 3 and img.shape[2] in (3, 4)
    assert img[..., :3].std() > 0.05  # not a blank canvas
    return img


def test_attention_grid_is_one_map_per_layer_and_head(tmp_path):
    T = 7
    att = np.tril(np.random.default_rng(0).random((2, 3, T, T)))
    att /= att.sum(-1, keepdims=True)
    small = _png(plot_attention_grid(att[:1, :1], list("abcdefg"), tmp_path / "one.png"))
    grid = _png(plot_attention_grid(att, ["␣the", "\\n", "B", "C", "a", "b", "c"], tmp_path / "grid.png"))
    # three heads side by side and two layers stacked: wider, and about twice as tall as one map
    assert grid.shape[1] > 1.2 * small.shape[1] and grid.shape[0] > 1.5 * small.shape[0]


def test_next_token_chart_and_layer_stats(tmp_path):
    logits = torch.tensor([3.0, 2.5, 1.0, 0.5, 0.0, -1.0, -2.0, -3.0])
    dists = tempered_distributions(logits, [0.5, 1.0, 2.0], top_k=4, top_p=0.8)
    ids = list(range(8))
    _png(plot_next_token(dists, [f"t{i}" for i in ids], ids, tmp_path / "next.png", top_k=4, top_p=0.8,
                         true_probs=[0.5, 0.3, 0.2, 0, 0, 0, 0, 0]))
    norms = np.abs(np.random.default_rng(1).normal(size=(4, 5))) + 1
    entropy = np.random.default_rng(2).random((3, 2))
    _png(plot_layer_stats(norms, entropy, 1.5, tmp_path / "layers.png", labels=list("abcde")))


def test_top_p_count_is_the_smallest_head_reaching_top_p():
    probs = torch.tensor([0.1, 0.5, 0.25, 0.15])  # sorted: 0.5, 0.25, 0.15, 0.1
    assert _top_p_count(probs, 0.5) == 1  # 0.5 already reaches 0.5
    assert _top_p_count(probs, 0.6) == 2
    assert _top_p_count(probs, 0.9) == 3
    assert _top_p_count(probs, 0.95) == 4
    assert _top_p_count(probs, 1.0) == 4


def _pixels(fig, points: float) -> float:
    return points * fig.dpi / 72


def test_next_token_labels_clear_the_true_probability_ticks():
    """A bar's label is drawn above its black tick (the true probability), not under it: the README's
    ABC case, the model at 0.41, 0.40, 0.19 against the truth 0.4, 0.4, 0.2."""
    from matplotlib.transforms import Bbox

    from build_llm.inspect.plots import next_token_figure

    logits = torch.tensor([0.41, 0.40, 0.19, 1e-6, 1e-6]).log()
    dists = tempered_distributions(logits, [1.0], top_k=2, top_p=0.9)
    truth = [0.4, 0.4, 0.2, 0.0, 0.0]
    fig = next_token_figure(dists, ["A", "B", "C", "\\n", "<PAD>"], list(range(5)), top_k=2, top_p=0.9, true_probs=truth)
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    labels = [t for t in ax.texts if t.get_text()[:1].isdigit()]
    assert sorted(t.get_text() for t in labels) == ["0.19", "0.40", "0.41"]
    half_w, half_h = _pixels(fig, 30) / 2, _pixels(fig, 2.5) / 2  # the tick: marker "_" of s=900, linewidth 2.5
    for x, p in enumerate(truth):
        cx, cy = ax.transData.transform((x, p))
        tick = Bbox.from_extents(cx - half_w, cy - half_h, cx + half_w, cy + half_h)
        for label in labels:
            box = label.get_window_extent(renderer)
            assert not box.overlaps(tick), (label.get_text(), p)
    import matplotlib.pyplot as plt
    plt.close(fig)


def test_layer_stats_heads_with_equal_entropy_are_all_visible():
    """Two heads with the same entropy in a layer (both 0 bits: each looks at one token) are drawn side
    by side, at least a dot's width apart, not one on top of the other."""
    from build_llm.inspect.plots import layer_stats_figure

    entropy = np.array([[0.0, 0.0, 0.0], [0.72, 0.72, 0.5]])  # (layers, heads)
    fig = layer_stats_figure(np.ones((3, 4)), entropy, 2.68, labels=list("abcd"))
    fig.canvas.draw()
    ax = fig.axes[1]
    dots = [c for c in ax.collections if len(c.get_offsets())]
    assert len(dots) == 3  # one scatter per head
    centres = np.stack([ax.transData.transform(c.get_offsets()) for c in dots])  # (heads, layers, 2) pixels
    diameter = _pixels(fig, np.sqrt(dots[0].get_sizes()[0]))
    for layer in range(2):
        for a in range(3):
            for b in range(a + 1, 3):
                assert np.linalg.norm(centres[a, layer] - centres[b, layer]) >= diameter, (layer, a, b)
    import matplotlib.pyplot as plt
    plt.close(fig)

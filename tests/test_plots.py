"""plots: the figures are written as real PNGs of a sensible size, and the cut-off markers are right."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from build_llm.plots import _top_p_count, plot_attention_grid, plot_layer_stats, plot_next_token
from build_llm.probe import tempered_distributions

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

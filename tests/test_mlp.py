import torch
import torch.nn.functional as F

from build_llm import GPTConfig
from build_llm.mlp import FeedForward

CFG = GPTConfig(vocab_size=11, context_length=8, emb_dim=12, n_heads=2, n_layers=1)


def test_swiglu_is_down_of_silu_gate_times_up():
    torch.manual_seed(0)
    ff = FeedForward(CFG.replace(mlp="swiglu", bias=False))
    x = torch.randn(2, 3, 12)
    g, u, d = ff.gate.weight, ff.up.weight, ff.down.weight  # (H, C), (H, C), (C, H)
    expected = ((x @ g.T) * torch.sigmoid(x @ g.T) * (x @ u.T)) @ d.T
    torch.testing.assert_close(ff(x), expected)
    assert g.shape == (CFG.replace(mlp="swiglu").ff_hidden, 12) and ff.out_proj is ff.down


def test_relu2_squares_the_positive_part():
    torch.manual_seed(0)
    ff = FeedForward(CFG.replace(mlp="relu2", ff_dim=20))
    x = torch.randn(2, 3, 12)
    first, last = ff.layers[0], ff.layers[2]
    expected = F.linear(torch.clamp(F.linear(x, first.weight, first.bias), min=0) ** 2, last.weight, last.bias)
    torch.testing.assert_close(ff(x), expected)
    assert first.weight.shape == (20, 12) and ff.out_proj is last


def test_the_books_feed_forward_keeps_its_names():
    ff = FeedForward(CFG)
    assert [n for n, _ in ff.named_parameters()] == ["layers.0.weight", "layers.0.bias", "layers.2.weight", "layers.2.bias"]

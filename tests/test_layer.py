import pytest
import torch

from build_llm.layer import LayerNorm, RMSNorm, make_norm


def test_rmsnorm_is_x_over_root_mean_square_times_scale():
    torch.manual_seed(0)
    norm = RMSNorm(6, eps=1e-6)
    with torch.no_grad():
        norm.scale.copy_(torch.arange(1.0, 7.0))
    x = torch.randn(3, 6)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * torch.arange(1.0, 7.0)
    torch.testing.assert_close(norm(x), expected)
    assert norm.shift is None and [n for n, _ in norm.named_parameters()] == ["scale"]


def test_layernorm_is_the_books_formula():
    torch.manual_seed(0)
    x = torch.randn(3, 6)
    mean, var = x.mean(-1, keepdim=True), x.var(-1, keepdim=True, unbiased=False)
    torch.testing.assert_close(LayerNorm(6)(x), (x - mean) / torch.sqrt(var + 1e-5))


def test_make_norm():
    assert isinstance(make_norm("rmsnorm", 4), RMSNorm)
    assert make_norm("layernorm", 4, bias=False).shift is None
    with pytest.raises(ValueError, match="norm='batch'"):
        make_norm("batch", 4)

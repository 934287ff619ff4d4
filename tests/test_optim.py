import pytest
import torch

from build_llm import GPTConfig, GPTModel
from build_llm.optim import Muon, muon_params, orthogonalize


@pytest.mark.parametrize("shape", [(16, 16), (48, 12), (12, 48)])
def test_orthogonalize_approximates_u_v_transposed(shape):
    """Against the SVD: the result is close to U V^T, its singular values near 1 (the quintic's
    coefficients trade exactness for speed: they land in about [0.7, 1.2])."""
    g = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    u, s, vt = torch.linalg.svd(g, full_matrices=False)
    out = orthogonalize(g)
    assert out.shape == g.shape
    sv = torch.linalg.svdvals(out)
    assert sv.min() > 0.6 and sv.max() < 1.25
    # the same singular vectors: U^T out V is diagonal (up to the approximation)
    inner = u.T @ out @ vt.T
    off = inner - torch.diag(torch.diagonal(inner))
    assert off.abs().max() < 1e-3
    assert (torch.diagonal(inner) > 0.6).all()


def test_muon_step_is_the_orthogonalised_nesterov_momentum():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(8, 4))
    w0 = w.detach().clone()
    opt = Muon([w], lr=0.1, momentum=0.9)
    grad = torch.randn(8, 4)
    w.grad = grad.clone()
    opt.step()
    # first step: buffer = g, Nesterov update g + 0.9 g; tall matrix: scale sqrt(8 / 4)
    expected = w0 - 0.1 * 2 ** 0.5 * orthogonalize(grad * 1.9)
    torch.testing.assert_close(w.detach(), expected)


def test_muon_refuses_vectors_and_bad_settings():
    with pytest.raises(ValueError, match="matrices"):
        Muon([torch.nn.Parameter(torch.zeros(3))])
    with pytest.raises(ValueError, match="lr=0"):
        Muon([torch.nn.Parameter(torch.zeros(3, 3))], lr=0)


def test_muon_params_takes_the_block_matrices_only():
    model = GPTModel(GPTConfig(vocab_size=11, context_length=8, emb_dim=16, n_heads=2, n_layers=2))
    matrices, rest = muon_params(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in matrices) == sorted(
        n for n, p in model.named_parameters() if n.startswith("trf_blocks") and p.ndim == 2)
    assert {names[id(p)] for p in rest} >= {"tok_emb.weight", "pos_emb.weight", "out_head.weight"}
    assert len(matrices) + len(rest) == len(list(model.parameters()))


def test_muon_trains_a_small_model():
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=5, context_length=8, emb_dim=16, n_heads=2, n_layers=1, drop_rate=0.0))
    matrices, rest = muon_params(model)
    opts = [Muon(matrices, lr=0.02), torch.optim.AdamW(rest, lr=3e-3)]
    x = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2]] * 4)  # a cycle: the next token is determined
    losses = []
    for _ in range(60):
        loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        for o in opts:
            o.zero_grad()
        loss.backward()
        for o in opts:
            o.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]

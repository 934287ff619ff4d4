"""intermediates: the tensors of a forward pass (attention rows, residual norms) and their entropy.

Expected values come from direct computations, not from the functions under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from build_llm.inspect.intermediates import attention_entropy, residual_norms, return_intermediates, uniform_attention_entropy


def test_attention_rows_are_distributions_over_the_past(abc):
    model, tok = abc
    ids = torch.tensor([tok.encode("CAAACB\n\nAABCBBC")])
    inter = return_intermediates(model, ids)
    T = ids.shape[1]
    assert len(inter["attention"]) == model.cfg.n_layers
    for a in inter["attention"]:
        assert a.shape == (1, model.cfg.n_heads, T, T)
        torch.testing.assert_close(a.sum(-1), torch.ones(1, model.cfg.n_heads, T))
        assert torch.all(a.triu(diagonal=1) == 0)
    assert torch.equal(inter["mask"], torch.triu(torch.ones(T, T, dtype=torch.int), diagonal=1))
    # The last residual state, through the final norm and the head, gives the model's logits.
    with torch.no_grad():
        logits = model.out_head(model.final_norm(inter["hidden"][-1]))
    torch.testing.assert_close(logits, inter["logits"])
    norms = residual_norms(inter["hidden"])
    assert norms.shape == (model.cfg.n_layers + 1, T)
    torch.testing.assert_close(norms[0], torch.linalg.vector_norm(inter["hidden"][0][0], dim=-1))


def test_attention_entropy_of_uniform_and_one_hot_rows():
    T = 6
    allowed = torch.tril(torch.ones(T, T))
    uniform = (allowed / allowed.sum(-1, keepdim=True))[None, None]  # (1, 1, T, T)
    one_hot = torch.eye(T)[None, None]
    ent = attention_entropy([torch.cat([uniform, one_hot], dim=1)])  # 1 layer, 2 heads
    expected = np.mean([math.log2(t + 1) for t in range(T)])
    assert ent.shape == (1, 2)
    assert ent[0, 0].item() == pytest.approx(expected, abs=1e-6)
    assert ent[0, 1].item() == pytest.approx(0.0, abs=1e-9)
    assert uniform_attention_entropy(T) == pytest.approx(expected)

"""tables: token labels and pieces, the next-token table, tempered distributions cut like the sampler.

Expected values come from direct computations (one forward, numpy softmax and sorting), not from
the functions under test.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from build_llm import CharTokenizer, get_tokenizer
from build_llm.inspect.tables import tempered_distributions, token_label, token_labels, token_pieces


def test_token_label_makes_whitespace_and_controls_visible():
    assert token_label(" the") == "␣the"
    assert token_label("\n\n") == "\\n\\n"
    assert token_label("a\tb\x00") == "a\\tb\\x00"
    assert token_label("") == "∅"
    assert token_label("ação") == "ação"
    assert token_labels(CharTokenizer(["<PAD>", "\n", "A"]), [0, 1, 2]) == ["<PAD>", "\\n", "A"]


def test_token_pieces_join_to_the_text_even_when_a_character_spans_tokens():
    tok = get_tokenizer("gpt2")
    text = "Ação 🙂 coração, 日本語 é"
    ids = tok.encode(text)
    assert "".join(tok.decode([i]) for i in ids) != text  # some character is split across tokens
    pieces = token_pieces(tok, ids)
    assert len(pieces) == len(ids)
    assert "".join(pieces) == text


def _expected_keep(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> set[int]:
    """The sampler's rule done by hand: the k largest, then the smallest head of their renormalised
    distribution whose mass reaches top_p (a token stays if the mass before it is below top_p)."""
    order = np.argsort(-logits)[:top_k]
    z = logits[order] / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    before = np.cumsum(p) - p
    return {int(i) for i, b in zip(order, before) if b < top_p}


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_tempered_distributions_cut_like_the_sampler(temperature):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(40, generator=g) * 2
    (d,) = tempered_distributions(logits, [temperature], top_k=8, top_p=0.6)
    z = logits.double().numpy() / temperature
    probs = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    np.testing.assert_allclose(d["probs"].double().numpy(), probs, rtol=1e-5)
    assert set(torch.nonzero(d["keep"])[:, 0].tolist()) == _expected_keep(logits.double().numpy(), temperature, 8, 0.6)
    with pytest.raises(ValueError, match="temperature"):
        tempered_distributions(logits, [0.0])


def test_next_token_distribution_is_the_softmax_of_the_last_logits():
    import math

    from build_llm import GPTConfig, GPTModel, next_token_distribution
    from build_llm.data.tokenizer import PAD, CharTokenizer

    torch.manual_seed(0)
    model = GPTModel(GPTConfig.from_preset("r-abc")).train()
    tok = CharTokenizer([PAD, "\n", "A", "B", "C"])
    table = next_token_distribution(model, tok, "ABCA" * 5, k=3)  # 20 characters: the last 16 are used
    assert model.training  # its mode is restored
    model.eval()
    with torch.no_grad():
        logits = model(torch.tensor([tok.encode(("ABCA" * 5)[-16:])]))[0, -1].tolist()
    total = sum(math.exp(v) for v in logits)
    expected = sorted(((math.exp(v) / total, i) for i, v in enumerate(logits)), reverse=True)[:3]
    assert [i for _, i, _ in table] == [i for _, i in expected]
    assert [s for s, _, _ in table] == [tok.decode([i]) for _, i in expected]
    for (_, _, p), (q, _) in zip(table, expected):
        assert abs(p - q) < 1e-6
    with pytest.raises(ValueError, match="k=0"):
        next_token_distribution(model, tok, "A", k=0)

"""surprisal: per-token losses over sliding windows, the report with the ABC optimum, its HTML page.

Expected values come from direct computations (one forward per context, the markov module's
next_char_distribution), not from the functions under test.
"""

from __future__ import annotations

import math
import re
from html.parser import HTMLParser

import numpy as np
import pytest
import torch

from build_llm import CharTokenizer, GPTConfig, GPTModel, set_seed
from build_llm.data.markov import ABC, abc_text, is_abc_tokenizer, next_char_distribution
from build_llm.inspect.surprisal import surprisal_html, surprisal_report, token_losses


def _direct_losses(model, ids: list[int]) -> list[float]:
    """-ln p of token j given the previous min(j, ctx) tokens: one forward per token."""
    ctx = model.cfg.context_length
    out = []
    with torch.no_grad():
        for j in range(1, len(ids)):
            context = torch.tensor([ids[max(0, j - ctx):j]])
            out.append(-torch.log_softmax(model(context)[0, -1], -1)[ids[j]].item())
    return out


def test_token_losses_slide_windows_over_long_texts(abc):
    model, tok = abc
    ctx = model.cfg.context_length
    ids = tok.encode(abc_text(6, seed=4))[:45]
    # stride 1: every token sees the full context before it, exactly as scored one by one
    losses, starts = token_losses(model, ids, stride=1)
    np.testing.assert_allclose(losses, _direct_losses(model, ids), rtol=1e-5, atol=1e-6)
    # the default stride: each token's loss is its direct loss given the context the function reports
    losses, starts = token_losses(model, ids)
    context = np.arange(1, len(ids)) - starts
    assert context[:ctx].tolist() == list(range(1, ctx + 1))
    assert context.min() >= 1 and context.max() <= ctx and context[ctx:].min() >= ctx - ctx // 2 + 1
    with torch.no_grad():
        for j in (1, ctx, ctx + 1, len(ids) - 1):
            logits = model(torch.tensor([ids[starts[j - 1]:j]]))[0, -1]
            assert losses[j - 1] == pytest.approx(-torch.log_softmax(logits, -1)[ids[j]].item(), rel=1e-5)
    with pytest.raises(ValueError, match="stride"):
        token_losses(model, ids, stride=ctx + 1)


def test_surprisal_report_totals_and_the_abc_optimum(abc):
    model, tok = abc
    text = abc_text(7, seed=11)[:40]
    assert is_abc_tokenizer(tok)
    report = surprisal_report(model, tok, text, source=ABC, stride=1)  # stride 1: contexts as _direct_losses
    starts = np.maximum(0, np.arange(1, len(text)) - model.cfg.context_length)
    direct = np.array(_direct_losses(model, tok.encode(text)))
    assert report["tokens"] == len(text) - 1 == report["characters"]
    assert report["bits_per_token"] == pytest.approx(direct.mean() / math.log(2), rel=1e-5)
    assert report["bits_per_char"] == pytest.approx(direct.sum() / math.log(2) / (len(text) - 1), rel=1e-5)
    assert report["perplexity"] == pytest.approx(math.exp(direct.mean()), rel=1e-5)
    # The optimum given the same context, from the exact next-character distribution.
    for j in range(1, len(text)):
        p = next_char_distribution(ABC, text[starts[j - 1]:j])[text[j]]
        assert report["optimal_bits"][j - 1] == pytest.approx(-math.log2(p), abs=1e-9)
    np.testing.assert_allclose(report["excess_bits"], report["bits"] - report["optimal_bits"])


class _Spans(HTMLParser):
    """Collect the text and data-bits of every token span inside the #surprisal block."""

    def __init__(self):
        super().__init__()
        self.depth, self.inside, self.tokens, self.bits, self.current = 0, False, [], [], None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "div" and attrs.get("id") == "surprisal":
            self.inside = True
        elif self.inside and tag == "span":
            self.current = ""
            self.bits.append(float(attrs["data-bits"]) if "data-bits" in attrs else None)

    def handle_endtag(self, tag):
        if tag == "span" and self.current is not None:
            self.tokens.append(self.current)
            self.current = None
        elif tag == "div" and self.inside:
            self.inside = False

    def handle_data(self, data):
        if self.current is not None:
            self.current += data


def test_surprisal_html_holds_every_token_escaped_and_the_totals():
    text = 'a <b>bold</b> & "quoted" \'x\'\n<script>alert(1)</script>\n'
    tok = CharTokenizer.from_text(text)
    set_seed(1)
    model = GPTModel(GPTConfig(vocab_size=tok.vocab_size, context_length=64, emb_dim=16, n_heads=2, n_layers=1,
                               drop_rate=0.0)).eval()
    report = surprisal_report(model, tok, text)
    page = surprisal_html(report, title="<title> & test")
    assert "<script>" not in page and "<b>" not in page and "&lt;title&gt; &amp; test" in page
    spans = _Spans()
    spans.feed(page)
    assert spans.tokens == list(text)  # every token, in order, unescaped back to the text
    assert spans.bits[0] is None  # the first token has no prediction
    np.testing.assert_allclose(spans.bits[1:], report["bits"], atol=1e-6)
    direct = np.array(_direct_losses(model, tok.encode(text))) / math.log(2)
    shown = re.search(r'data-key="bits per token">([0-9.]+)<', page).group(1)
    assert float(shown) == pytest.approx(direct.mean(), abs=1e-4)
    assert "perplexity" in page and "bits per character" in page and "Excess" not in page


def test_context_table_merges_the_lengths_seen_once_and_says_why(abc):
    """The by-context table: lengths that occur once each (the first window of a long text) share one
    row, explained on the page; the counts still add up to the tokens, and each row's mean is the mean
    of its tokens' bits."""
    from build_llm.inspect.surprisal import context_groups

    assert context_groups(np.array([1, 2, 3, 4, 3, 4, 3, 4])) == [[1, 2], [3], [4]]
    assert context_groups(np.array([1, 2, 3])) == [[1], [2], [3]]  # one window: a row per length
    model, tok = abc
    T = model.cfg.context_length
    text = abc_text(40, seed=3)[:200]
    report = surprisal_report(model, tok, text, source=ABC)  # the default stride: half the context
    page = surprisal_html(report)
    rows = re.findall(r"<tr><td>([0-9–]+)</td><td>(\d+)</td><td>([0-9.]+)</td>", page)
    assert rows[0][0] == f"1–{T // 2}" and int(rows[0][1]) == T // 2  # the first window's short contexts
    assert all(int(n) > 1 for _, n, _ in rows[1:]) and sum(int(n) for _, n, _ in rows) == report["tokens"]
    assert float(rows[0][2]) == pytest.approx(report["bits"][:T // 2].mean(), abs=1e-4)
    assert f"Context lengths 1–{T // 2} occur once each" in page

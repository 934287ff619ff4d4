import pytest
import torch
import torch.nn as nn

from build_llm import GPTConfig, GPTModel, MultiHeadAttention


def pair(**kw):
    """The same attention weights behind the explicit and the fused path."""
    torch.manual_seed(0)
    explicit = MultiHeadAttention(32, 32, 16, 0.0, 4, impl="explicit", **kw)
    fused = MultiHeadAttention(32, 32, 16, 0.0, 4, impl="sdpa", **kw)
    fused.load_state_dict(explicit.state_dict())
    return explicit, fused


@pytest.mark.parametrize("kw", [{}, {"qkv_bias": True, "fused_qkv": True}])
def test_explicit_and_fused_paths_agree_on_outputs_and_gradients(kw):
    explicit, fused = pair(**kw)
    x = torch.randn(3, 16, 32, requires_grad=True)
    y = x.detach().clone().requires_grad_(True)
    out_e, out_f = explicit(x), fused(y)
    torch.testing.assert_close(out_e, out_f, atol=1e-5, rtol=0)
    out_e.square().sum().backward()
    out_f.square().sum().backward()
    torch.testing.assert_close(x.grad, y.grad, atol=1e-5, rtol=1e-4)
    for (name, p), q in zip(explicit.named_parameters(), fused.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_whole_model_paths_agree_in_eval_mode():
    cfg = GPTConfig.from_preset("gpt2-small", n_layers=2, vocab_size=97, context_length=24)
    torch.manual_seed(0)
    explicit = GPTModel(cfg.replace(attn_impl="explicit")).eval()
    fused = GPTModel(cfg.replace(attn_impl="sdpa")).eval()
    fused.load_state_dict(explicit.state_dict())
    idx = torch.randint(0, 97, (2, 24))
    torch.testing.assert_close(explicit(idx), fused(idx), atol=1e-5, rtol=0)


def test_auto_keeps_the_explicit_path_only_while_dropout_is_active():
    att = MultiHeadAttention(8, 8, 4, 0.1, 2)
    assert att.train().use_fused() is False
    assert att.eval().use_fused() is True
    assert MultiHeadAttention(8, 8, 4, 0.0, 2).train().use_fused() is True


def test_matches_torch_multihead_attention_as_used_by_the_r_notebook():
    # Independent reference: the R model's nn_multihead_attention is PyTorch's nn.MultiheadAttention.
    torch.manual_seed(0)
    ours = MultiHeadAttention(32, 32, 16, 0.0, 4, qkv_bias=True, fused_qkv=True).eval()
    ref = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    with torch.no_grad():
        ref.in_proj_weight.copy_(ours.W_qkv.weight)
        ref.in_proj_bias.copy_(ours.W_qkv.bias)
        ref.out_proj.weight.copy_(ours.out_proj.weight)
        ref.out_proj.bias.copy_(ours.out_proj.bias)
    x = torch.randn(2, 10, 32)
    mask = torch.triu(torch.ones(10, 10, dtype=torch.bool), diagonal=1)
    expected, weights = ref(x, x, x, attn_mask=mask, need_weights=True, average_attn_weights=False)
    torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.attention_weights(x), weights, atol=1e-6, rtol=0)


@pytest.mark.parametrize("impl", ["explicit", "sdpa"])
def test_cache_in_chunks_equals_one_pass(impl):
    cfg = GPTConfig.from_preset("r-abc", drop_rate=0.0, attn_impl=impl, vocab_size=11)
    torch.manual_seed(0)
    model = GPTModel(cfg).eval()
    idx = torch.randint(0, 11, (2, 16))
    full = model(idx)
    cache = model.new_cache(batch_size=2)
    pieces = [model(idx[:, a:b], cache=cache) for a, b in [(0, 5), (5, 6), (6, 13), (13, 16)]]
    assert cache.pos == 16
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="exceed context_length"):
        model(idx[:, :1], cache=cache)


def test_attention_weights_are_causal_rows_summing_to_one():
    att = MultiHeadAttention(16, 16, 8, 0.0, 2)
    w = att.attention_weights(torch.randn(3, 8, 16))
    assert w.shape == (3, 2, 8, 8)
    torch.testing.assert_close(w.sum(-1), torch.ones(3, 2, 8))
    assert torch.all(w.triu(diagonal=1) == 0)


def test_per_row_positions_decode_rows_of_different_lengths_as_each_alone():
    # Continuous batching: rows at different positions share one forward; each row's logits must be
    # those of its own sequence run alone (the full, uncached forward is the reference).
    cfg = GPTConfig.from_preset("gpt2-small", vocab_size=50, context_length=24, emb_dim=32, n_heads=4, n_layers=2)
    torch.manual_seed(0)
    model = GPTModel(cfg).eval()
    seqs = [torch.randint(0, 50, (1, n)) for n in (3, 9, 6)]
    cache = model.new_cache(batch_size=3)
    cache.k.fill_(1e3), cache.v.fill_(-1e3)  # stale values in unwritten slots must not leak in
    for r, s in enumerate(seqs):  # prefill each row alone into its slot of the shared buffers
        model(s[:, :-1], cache=type(cache).over(cache.k[:, r:r + 1], cache.v[:, r:r + 1], 0))
    pos = torch.tensor([s.shape[1] - 1 for s in seqs])
    rows = type(cache).over(cache.k, cache.v, pos)
    last = torch.cat([s[:, -1:] for s in seqs])  # (3, 1): each row's next token
    for step in range(4):
        logits = model(last, cache=rows)[:, -1]  # (3, V)
        for r, s in enumerate(seqs):
            torch.testing.assert_close(logits[r], model(s)[0, -1], atol=1e-5, rtol=0)
        last = logits.argmax(-1, keepdim=True)
        seqs = [torch.cat([s, last[r:r + 1]], dim=1) for r, s in enumerate(seqs)]
    assert rows.pos.tolist() == [s.shape[1] - 1 for s in seqs]
    # Two new tokens per row at once (a chunk) agree too.
    two = torch.cat([s[:, -2:] for s in seqs])
    chunk = model(two, cache=type(cache).over(cache.k, cache.v, rows.pos - 1))
    for r, s in enumerate(seqs):
        torch.testing.assert_close(chunk[r], model(s)[0, -2:], atol=1e-5, rtol=0)


def test_rotary_scores_depend_only_on_the_distance():
    """Rotary positions: q at position i and k at j score the same as at i + s and j + s."""
    from build_llm.attention import rotary

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, 8, generator=g), torch.randn(1, 1, 1, 8, generator=g)
    score = lambda i, j: (rotary(q, i, 10000.0) * rotary(k, j, 10000.0)).sum()  # noqa: E731
    torch.testing.assert_close(score(5, 2), score(12, 9), atol=1e-5, rtol=0)
    torch.testing.assert_close(score(0, 0), (q * k).sum(), atol=1e-6, rtol=0)  # position 0: no turn
    assert not torch.allclose(score(5, 2), score(5, 3))
    # a rotation keeps each vector's length
    torch.testing.assert_close(rotary(q, 7, 10000.0).norm(), q.norm())


def test_rotary_turns_pair_i_by_position_times_base_power():
    """Exact maths: pair (x_i, x_{i+hs/2}) turns by pos * base^(-2i/hs)."""
    from build_llm.attention import rotary

    x = torch.zeros(1, 1, 1, 4)
    x[..., 1] = 1.0  # the second pair, i = 1: frequency 100^(-2/4) = 0.1
    out = rotary(x, 3, 100.0)[0, 0, 0]
    angle = torch.tensor(3 * 0.1)
    torch.testing.assert_close(out, torch.stack([torch.tensor(0.0), angle.cos(), torch.tensor(0.0), angle.sin()]))


@pytest.mark.parametrize("options", [dict(pos_emb="rope"), dict(qk_norm=True),
                                     dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False, qk_norm=True)])
@pytest.mark.parametrize("impl", ["explicit", "sdpa"])
def test_options_keep_paths_and_cache_equal(options, impl):
    cfg = GPTConfig(vocab_size=11, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0, **options)
    torch.manual_seed(0)
    model = GPTModel(cfg.replace(attn_impl=impl)).eval()
    other = GPTModel(cfg.replace(attn_impl="sdpa" if impl == "explicit" else "explicit")).eval()
    other.load_state_dict(model.state_dict())
    idx = torch.randint(0, 11, (2, 16))
    full = model(idx)
    torch.testing.assert_close(other(idx), full, atol=1e-5, rtol=0)
    cache = model.new_cache(batch_size=2)
    pieces = [model(idx[:, a:b], cache=cache) for a, b in [(0, 5), (5, 6), (6, 16)]]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=0)
    assert (model.pos_emb is None) == (cfg.pos_emb == "rope")


def test_qk_norm_gives_unit_rms_queries_and_keys():
    att = MultiHeadAttention(32, 32, 16, 0.0, 4, qk_norm=True)
    q, k, _ = att.qkv(torch.randn(2, 10, 32))
    for t in (q, k):  # (B, nh, T, hs), the learned scale still 1
        torch.testing.assert_close(t.pow(2).mean(-1), torch.ones(2, 4, 10), atol=1e-3, rtol=0)  # eps: 1e-5 / mean(x^2)


def test_fused_attention_with_dropout_for_every_model_but_the_seeds():
    """The seed's training-mode numbers come from the explicit path; GPT-2 presets have no such pin."""
    book = GPTModel(GPTConfig.from_preset("book-124m", n_layers=1, emb_dim=64, n_heads=4, vocab_size=10)).train()
    gpt2 = GPTModel(GPTConfig.from_preset("gpt2-small", n_layers=1, emb_dim=64, n_heads=4, vocab_size=10)).train()
    assert book.trf_blocks[0].att.use_fused() is False
    assert gpt2.trf_blocks[0].att.use_fused() is True and gpt2.cfg.drop_rate > 0


def test_rotary_per_row_positions_decode_as_each_row_alone():
    cfg = GPTConfig(vocab_size=50, context_length=24, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0,
                    pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False)
    torch.manual_seed(0)
    model = GPTModel(cfg).eval()
    seqs = [torch.randint(0, 50, (1, n)) for n in (3, 9, 6)]
    cache = model.new_cache(batch_size=3)
    for r, s in enumerate(seqs):
        model(s[:, :-1], cache=type(cache).over(cache.k[:, r:r + 1], cache.v[:, r:r + 1], 0))
    rows = type(cache).over(cache.k, cache.v, torch.tensor([s.shape[1] - 1 for s in seqs]))
    logits = model(torch.cat([s[:, -1:] for s in seqs]), cache=rows)[:, -1]  # (3, V)
    for r, s in enumerate(seqs):
        torch.testing.assert_close(logits[r], model(s)[0, -1], atol=1e-5, rtol=0)


def test_a_lora_wrapped_model_reports_its_masks_in_the_state_dict():
    """The mask is built where the weights are, found through any parameter: a LoRA-wrapped out_proj has no
    `.weight` of its own (that failed once, in every fine-tune's checkpoint)."""
    from build_llm.book.appendix_e import replace_linear_with_lora

    model = GPTModel(GPTConfig(vocab_size=50, context_length=8, emb_dim=16, n_heads=2, n_layers=1))
    replace_linear_with_lora(model, rank=2, alpha=4)
    state = model.state_dict()
    assert torch.equal(state["trf_blocks.0.att.mask"], torch.triu(torch.ones(8, 8, dtype=torch.bool), diagonal=1))
    model.load_state_dict(state)

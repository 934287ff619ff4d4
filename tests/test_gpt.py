import pytest
import torch

from build_llm import GPTConfig, GPTModel, TransformerBlock


def test_dict_and_dataclass_build_the_same_model():
    cfg = dict(vocab_size=50, context_length=8, emb_dim=16, n_heads=2, n_layers=2, drop_rate=0.0, qkv_bias=True)
    torch.manual_seed(1)
    a = GPTModel(cfg)
    torch.manual_seed(1)
    b = GPTModel(GPTConfig(**cfg))
    idx = torch.randint(0, 50, (2, 8))
    torch.testing.assert_close(a(idx), b(idx), rtol=0, atol=0)
    torch.manual_seed(1)
    block_a = TransformerBlock(cfg)
    torch.manual_seed(1)
    block_b = TransformerBlock(GPTConfig(**cfg))
    x = torch.randn(2, 8, 16)
    torch.testing.assert_close(block_a(x), block_b(x), rtol=0, atol=0)


def test_tied_head_shares_the_embedding_and_init_is_gpt2_scaled():
    model = GPTModel(GPTConfig.from_preset("gpt2-small", n_layers=2, vocab_size=100, context_length=32))
    assert model.out_head.weight is model.tok_emb.weight
    assert model.tok_emb.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert model.trf_blocks[0].att.out_proj.weight.std().item() == pytest.approx(0.02 / 2, rel=0.1)
    assert torch.all(model.trf_blocks[0].att.W_qkv.bias == 0)


def test_untrained_loss_is_near_log_vocab_for_gpt2_init():
    model = GPTModel(GPTConfig.from_preset("gpt2-small", n_layers=2, vocab_size=1000, context_length=32)).eval()
    idx = torch.randint(0, 1000, (4, 32))
    loss = torch.nn.functional.cross_entropy(model(idx)[:, :-1].flatten(0, 1), idx[:, 1:].flatten())
    assert abs(loss.item() - torch.log(torch.tensor(1000.0)).item()) < 0.2


def test_forward_shape_and_input_validation():
    model = GPTModel(GPTConfig.from_preset("r-abc"))
    assert model(torch.randint(0, 5, (3, 16))).shape == (3, 16, 5)
    with pytest.raises(TypeError, match="expected a torch.Tensor"):
        model([[1, 2]])
    with pytest.raises(ValueError, match=r"expected shape \(batch_size, seq_len\), got \(4,\)"):
        model(torch.ones(4, dtype=torch.long))
    with pytest.raises(TypeError, match="integer dtype"):
        model(torch.ones(1, 4))
    with pytest.raises(ValueError, match="17 positions exceed context_length=16"):
        model(torch.ones(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="seq_len is 0"):
        model(torch.ones(1, 0, dtype=torch.long))


def test_causal_no_future_leak():
    torch.manual_seed(0)
    model = GPTModel(GPTConfig.from_preset("r-abc", drop_rate=0.0)).eval()
    idx = torch.randint(1, 5, (1, 16))
    changed = idx.clone()
    changed[0, 10:] = (changed[0, 10:] % 4) + 1
    a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_last_only_logits_equal_the_full_heads_last_position():
    torch.manual_seed(0)
    model = GPTModel(GPTConfig.from_preset("gpt2-small", n_layers=2, emb_dim=32, n_heads=4, vocab_size=60,
                                           context_length=16)).eval()
    idx = torch.randint(0, 60, (3, 9))
    full = model(idx)  # (3, 9, 60)
    last = model(idx, last_only=True)
    assert last.shape == (3, 1, 60)
    torch.testing.assert_close(last, full[:, -1:], rtol=1e-6, atol=1e-6)
    # with a cache (prompt, then one more token at per-row positions): the same numbers, the same cache
    cache_all, cache_last = model.new_cache(3), model.new_cache(3)
    model(idx[:, :6], cache=cache_all)
    torch.testing.assert_close(model(idx[:, :6], cache=cache_last, last_only=True), full[:, 5:6], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache_last.k, cache_all.k, rtol=0, atol=0)
    torch.testing.assert_close(model(idx[:, 6:], cache=cache_last, last_only=True), full[:, -1:], rtol=1e-5, atol=1e-5)

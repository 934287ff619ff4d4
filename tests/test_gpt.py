import pytest
import torch

from build_llm import GPTConfig, GPTModel, TransformerBlock, count_parameters, model_size_mb, parameter_table
from build_llm.config import PRESETS

# Parameter counts from exact arithmetic on each architecture (and the seeds' printed totals).
def expected_count(c: GPTConfig) -> int:
    E, V, L = c.emb_dim, c.vocab_size, c.n_layers
    attn = 4 * E * E + (3 * E if c.qkv_bias else 0) + (E if c.bias else 0)
    ff = 8 * E * E + (5 * E if c.bias else 0)
    norms = 2 * (2 * E if c.bias else E)
    head = 0 if c.tie_weights else V * E
    return V * E + c.context_length * E + L * (attn + ff + norms) + (2 * E if c.bias else E) + head


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_parameter_count_of_every_preset(name):
    cfg = GPTConfig.from_preset(name)
    with torch.device("meta"):
        model = GPTModel(cfg)
    assert count_parameters(model) == expected_count(cfg)


def test_the_seeds_totals():
    with torch.device("meta"):
        assert count_parameters(GPTModel(GPTConfig.from_preset("book-124m"))) == 163_009_536
        assert count_parameters(GPTModel(GPTConfig.from_preset("gpt2-small"))) == 124_439_808
        book = GPTModel(GPTConfig.from_preset("book-124m"))
    assert f"{model_size_mb(book):.2f}" == "621.83"  # the seed's size in MB
    assert model_size_mb(book, "bf16") == pytest.approx(621.83 / 2, abs=0.01)


def test_r_abc_parameter_shapes_match_the_r_notebook():
    # The R notebook's listing for vocab 5, block 16 (name -> shape), total 400,128.
    r_shapes = sorted([(16, 128), (5, 128)] + 2 * [(128, 128), (128,), (384, 128), (384,), (128,), (128,),
                                                    (128,), (128,), (512, 128), (512,), (128, 512), (128,)]
                      + [(128,), (128,), (5, 128)])
    model = GPTModel(GPTConfig.from_preset("r-abc"))
    assert sorted(shape for _, shape, _ in parameter_table(model)) == r_shapes
    assert count_parameters(model) == 400_128
    assert torch.all(model.tok_emb.weight[0] == 0)  # <PAD> (R's padding_idx = 1, 1-based)


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

import pytest

from build_llm import GPTConfig, GPTModel
from build_llm.config import PRESETS

SEED_CONFIG = {"vocab_size": 50257, "context_length": 1024, "emb_dim": 768, "n_heads": 12, "n_layers": 12,
               "drop_rate": 0.1, "qkv_bias": False}


def test_seed_dict_is_the_book_preset():
    assert GPTConfig.from_dict(SEED_CONFIG) == GPTConfig.from_preset("book-124m")


def test_dict_round_trip_for_every_preset():
    for name in PRESETS:
        cfg = GPTConfig.from_preset(name)
        assert GPTConfig.from_dict(cfg.to_dict()) == cfg


def test_preset_overrides_and_replace():
    cfg = GPTConfig.from_preset("gpt2-small", context_length=256)
    assert cfg.context_length == 256 and cfg.tie_weights
    assert cfg.replace(n_layers=2).n_layers == 2


@pytest.mark.parametrize("changes, words", [
    ({"emb_dim": 100, "n_heads": 12}, ["emb_dim=100", "n_heads=12", "divisible"]),
    ({"n_layers": 0}, ["n_layers=0", ">= 1"]),
    ({"vocab_size": 2.5}, ["vocab_size=2.5", "integer"]),
    ({"drop_rate": 1.0}, ["drop_rate=1.0", "[0, 1)"]),
    ({"qkv_bias": "yes"}, ["qkv_bias='yes'", "true or false"]),
    ({"gelu": "relu"}, ["gelu='relu'", "tanh"]),
    ({"attn_impl": "flash"}, ["attn_impl='flash'", "sdpa"]),
    ({"padding_idx": 50257}, ["padding_idx=50257", "[0, 50257)"]),
    ({"init_std": -1}, ["init_std=-1"]),
    ({"pos_emb": "alibi"}, ["pos_emb='alibi'", "rope"]),
    ({"norm": "batchnorm"}, ["norm='batchnorm'", "rmsnorm"]),
    ({"mlp": "reglu"}, ["mlp='reglu'", "swiglu", "geglu", "relu2"]),
    ({"ff_dim": 0}, ["ff_dim=0", ">= 1"]),
    ({"qk_norm": 1}, ["qk_norm=1", "true or false"]),
    ({"rope_base": 1}, ["rope_base=1", "> 1"]),
    ({"pos_emb": "rope", "emb_dim": 36, "n_heads": 12}, ["rope", "even head size", "3"]),
])
def test_invalid_values_name_key_value_and_valid_range(changes, words):
    with pytest.raises(ValueError) as e:
        GPTConfig.from_dict({**SEED_CONFIG, **changes})
    for word in words:
        assert word in str(e.value)


def test_unknown_key_and_unknown_preset():
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['n_head'\]; valid keys are"):
        GPTConfig.from_dict({**SEED_CONFIG, "n_head": 12})
    with pytest.raises(ValueError, match="unknown preset 'gpt3'; valid presets are"):
        GPTConfig.from_preset("gpt3")
    with pytest.raises(TypeError, match="expected a GPTConfig or a dict"):
        GPTModel([1, 2])


def test_frozen():
    with pytest.raises(Exception):
        GPTConfig().emb_dim = 3


def test_feed_forward_width_defaults():
    cfg = GPTConfig(emb_dim=128, n_heads=4)
    assert cfg.ff_hidden == 512 and cfg.replace(mlp="relu2").ff_hidden == 512
    # SwiGLU has three matrices: 8/3 of the width keeps the parameter count, rounded up to a multiple of 8
    assert cfg.replace(mlp="swiglu").ff_hidden == 344 and cfg.replace(mlp="swiglu", ff_dim=100).ff_hidden == 100


def test_the_options_default_to_the_book():
    cfg = GPTConfig.from_dict(SEED_CONFIG)
    assert (cfg.pos_emb, cfg.norm, cfg.mlp, cfg.ff_dim, cfg.qk_norm) == ("learned", "layernorm", "gelu", None, False)

import pytest
import torch

from build_llm import GPTConfig, GPTModel
from build_llm.cli import main
from build_llm.config import PRESETS
from build_llm.interop.hf import config_from_hf
from build_llm.interop.hf_decoders import function_of
from build_llm.sizing import count_parameters

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


# --- today's open models: each preset is the public config (as published, transformers 4.x keys) --------
PUBLISHED = {
    "smollm2-135m": dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True),
    "smollm2-360m": dict(model_type="llama", vocab_size=49152, hidden_size=960, intermediate_size=2560,
                         num_hidden_layers=32, num_attention_heads=15, num_key_value_heads=5,
                         max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True),
    "llama-3.2-1b": dict(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                         num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                         max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
                         tie_word_embeddings=True,
                         rope_scaling=dict(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                           original_max_position_embeddings=8192, rope_type="llama3")),
    "qwen3-0.6b": dict(model_type="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                       num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                       max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6,
                       tie_word_embeddings=True),
    "gemma-3-270m": dict(model_type="gemma3_text", vocab_size=262144, hidden_size=640, intermediate_size=2048,
                         num_hidden_layers=18, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                         max_position_embeddings=32768, rope_theta=1000000.0, rope_local_base_freq=10000.0,
                         sliding_window=512, query_pre_attn_scalar=256, rms_norm_eps=1e-6, rope_scaling=None,
                         hidden_activation="gelu_pytorch_tanh",
                         layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(18)]),
    "mistral-7b": dict(model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       max_position_embeddings=32768, rope_theta=10000.0, rms_norm_eps=1e-5, sliding_window=4096,
                       tie_word_embeddings=False),
    "qwen3-30b-a3b": dict(model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                          moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32,
                          num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
                          norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                          max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6,
                          tie_word_embeddings=False),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_open_model_presets_count_what_transformers_builds(name, capsys):
    transformers = pytest.importorskip("transformers")
    published = dict(PUBLISHED[name])
    config = transformers.AutoConfig.for_model(published.pop("model_type"), **published)
    with torch.device("meta"):  # shapes only: a 7B model in no memory
        reference = transformers.AutoModelForCausalLM.from_config(config)
    expected = sum(p.numel() for p in reference.parameters())  # a tied matrix once
    cfg = GPTConfig.from_preset(name)
    assert count_parameters(cfg) == expected
    assert main(["info", "--preset", name]) == 0
    assert f"Total parameters: {expected:,}\n" in capsys.readouterr().out
    # and the preset is what importing the published config gives, option for option
    assert function_of(config_from_hf(PUBLISHED[name])) == function_of(cfg)

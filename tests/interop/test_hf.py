"""Tests for build_llm.interop.hf: Hugging Face GPT-2 import and export, checked against transformers itself.

The reference is an independent implementation: a tiny random `transformers.GPT2LMHeadModel`, its
weights (biases and LayerNorms included) drawn at random so that every mapping is exercised.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import build_llm.interop.hf as hf_module
from build_llm import BPETokenizer, GPT2Tokenizer, GPTConfig, GPTModel, generate
from build_llm.interop.hf import config_from_hf, config_to_hf, from_hf, save_hf, to_hf

transformers = pytest.importorskip("transformers")
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaForCausalLM  # noqa: E402

TINY = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=1000, n_positions=64, bos_token_id=None, eos_token_id=None)
ATOL = 1e-5


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter drawn at random (fresh models have zero biases and unit LayerNorms)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def hf_model(seed: int = 0, **overrides) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return randomize_(GPT2LMHeadModel(GPT2Config(**{**TINY, **overrides})), seed).eval()


def tokens(vocab: int = 1000, shape=(2, 64), seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def hf_logits(hf, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf(idx).logits


def our_logits(model, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(idx)


@pytest.fixture(scope="module")
def reference():
    return hf_model()


@pytest.fixture(scope="module")
def saved(reference, tmp_path_factory):
    """The reference saved five ways: save_pretrained (whole and sharded), .bin (zip and pre-1.6
    formats), and OpenAI's original names."""
    root = tmp_path_factory.mktemp("hf")
    reference.save_pretrained(root / "safetensors")
    reference.save_pretrained(root / "sharded", max_shard_size="200KB")
    assert (root / "sharded" / "model.safetensors.index.json").is_file()
    config = json.loads((root / "safetensors" / "config.json").read_text())
    state = {k: v.clone() for k, v in reference.state_dict().items() if k != "lm_head.weight"}

    (root / "bin").mkdir()
    (root / "bin" / "config.json").write_text(json.dumps(config))
    torch.save(state, root / "bin" / "pytorch_model.bin")
    (root / "old-bin").mkdir()  # torch < 1.6's format, which cannot be memory-mapped
    (root / "old-bin" / "config.json").write_text(json.dumps(config))
    torch.save(state, root / "old-bin" / "pytorch_model.bin", _use_new_zipfile_serialization=False)

    # The files on the hub for openai-community/gpt2 name tensors without `transformer.` and carry
    # each layer's causal-mask buffer as `h.N.attn.bias`.
    legacy = {k.removeprefix("transformer."): v.contiguous() for k, v in state.items()}
    for i in range(TINY["n_layer"]):
        legacy[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
    (root / "legacy").mkdir()
    (root / "legacy" / "config.json").write_text(json.dumps(config))
    save_file(legacy, root / "legacy" / "model.safetensors", metadata={"format": "pt"})
    return root


# --------------------------------------------------------------------------------------------------
# Import
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["safetensors", "sharded", "bin", "old-bin", "legacy", "object"])
def test_import_gives_the_same_logits(reference, saved, layout):
    model = from_hf(reference if layout == "object" else saved / layout)
    assert isinstance(model, GPTModel) and not model.training
    assert model.cfg.fused_qkv and model.cfg.qkv_bias and model.cfg.tie_weights and model.cfg.gelu == "tanh"
    idx = tokens()
    torch.testing.assert_close(our_logits(model, idx), hf_logits(reference, idx), atol=ATOL, rtol=0)


def test_import_gives_the_same_greedy_tokens(reference, saved):
    model = from_hf(saved / "safetensors")
    prompt = tokens(shape=(2, 5), seed=7)
    with torch.no_grad():
        expected = reference.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=30,
                                      do_sample=False, pad_token_id=0)
    assert torch.equal(generate(model, prompt, 30), expected)
    assert torch.equal(generate(model, prompt, 30, use_cache=False), expected)


@pytest.mark.parametrize("overrides", [
    dict(tie_word_embeddings=False),
    dict(activation_function="gelu", layer_norm_epsilon=1e-6),
    dict(activation_function="gelu_pytorch_tanh", n_inner=256),
])
def test_import_variants(overrides, tmp_path):
    hf = hf_model(seed=3, **overrides)
    hf.save_pretrained(tmp_path)
    model = from_hf(tmp_path)
    assert model.cfg.tie_weights == overrides.get("tie_word_embeddings", True)
    assert model.cfg.gelu == ("exact" if overrides.get("activation_function") == "gelu" else "tanh")
    assert model.cfg.ln_eps == overrides.get("layer_norm_epsilon", 1e-5)
    idx = tokens(seed=4)
    torch.testing.assert_close(our_logits(model, idx), hf_logits(hf, idx), atol=ATOL, rtol=0)


def test_reorder_and_upcast_attn_is_the_same_function():
    hf = hf_model(seed=5, reorder_and_upcast_attn=True, attn_implementation="eager")
    idx = tokens(seed=6)
    torch.testing.assert_close(our_logits(from_hf(hf), idx), hf_logits(hf, idx), atol=ATOL, rtol=0)


def test_import_dropout_and_sizes_from_the_config():
    cfg = config_from_hf({**TINY, "resid_pdrop": 0.1, "embd_pdrop": 0.2, "attn_pdrop": 0.0, "initializer_range": 0.01})
    assert (cfg.vocab_size, cfg.context_length, cfg.emb_dim, cfg.n_heads, cfg.n_layers) == (1000, 64, 64, 4, 2)
    assert cfg.drop_rate == 0.2 and cfg.init_std == 0.01
    assert config_from_hf(TINY, drop_rate=0.0).drop_rate == 0.0


def test_gpt2_presets_are_what_import_builds():
    """An OpenAI config.json (the four sizes) gives exactly our gpt2-* presets."""
    sizes = {"gpt2-small": (768, 12, 12), "gpt2-medium": (1024, 16, 24), "gpt2-large": (1280, 20, 36),
             "gpt2-xl": (1600, 25, 48)}
    for preset, (n_embd, n_head, n_layer) in sizes.items():
        openai = {"activation_function": "gelu_new", "n_ctx": 1024, "n_embd": n_embd, "n_head": n_head,
                  "n_layer": n_layer, "n_positions": 1024, "vocab_size": 50257, "layer_norm_epsilon": 1e-05,
                  "resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1, "initializer_range": 0.02,
                  "model_type": "gpt2"}
        assert config_from_hf(openai) == GPTConfig.from_preset(preset)


@pytest.mark.parametrize("change, message", [
    ({"add_cross_attention": True}, "add_cross_attention=True is not supported"),
    ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx=True is not supported"),
    ({"scale_attn_weights": False}, "scale_attn_weights=False is not supported"),
    ({"n_inner": 100}, "n_inner=100 is not supported"),
    ({"activation_function": "relu"}, "activation_function='relu' is not supported"),
    ({"model_type": "gpt_neo"}, "model_type='gpt_neo' is not supported"),
    ({"n_head": 5}, "not divisible by n_heads=5"),
])
def test_unsupported_configs_are_refused(change, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config_from_hf({**TINY, **change})


def test_import_errors(saved, tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        from_hf(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="has no config.json"):
        from_hf(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="does not parse as JSON"):
        from_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    with pytest.raises(ValueError, match="no weights"):
        from_hf(tmp_path)
    good = (saved / "safetensors" / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="unreadable or truncated"):
        from_hf(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"this is not a torch file")
    with pytest.raises(ValueError, match="not a readable PyTorch state dict"):
        from_hf(tmp_path)
    with pytest.raises(TypeError, match="expected a directory path or a transformers GPT-2 model"):
        from_hf(42)


def test_import_rejects_weights_that_do_not_match_the_config(reference, tmp_path):
    state = {k: v.contiguous() for k, v in reference.state_dict().items() if k != "lm_head.weight"}
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    missing = dict(state)
    del missing["transformer.h.1.mlp.c_fc.bias"]
    save_file(missing, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing \['h.1.mlp.c_fc.bias'\]"):
        from_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**TINY, "n_positions": 32}))
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"wpe.weight has shape \(64, 64\), but config.json implies \(32, 64\)"):
        from_hf(tmp_path)


# --------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------


def test_import_export_round_trip(reference, saved, tmp_path):
    model = from_hf(saved / "safetensors")
    idx = tokens(seed=2)
    expected = hf_logits(reference, idx)
    torch.testing.assert_close(hf_logits(to_hf(model), idx), expected, atol=ATOL, rtol=0)
    save_hf(model, tmp_path / "out")
    loaded = GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(hf_logits(loaded, idx), expected, atol=ATOL, rtol=0)


our_shapes = {
    # Our GPT-2 preset, shrunk.
    "gpt2": GPTConfig.from_preset("gpt2-small", vocab_size=500, context_length=32, emb_dim=64, n_heads=4, n_layers=2),
    # The book's: untied head, separate Q/K/V without bias.
    "book": GPTConfig.from_preset("book-124m", vocab_size=500, context_length=32, emb_dim=64, n_heads=4, n_layers=2),
    # The R course's: exact GELU, pad row, no dropout after attention; plus no biases at all.
    "r-abc-no-bias": GPTConfig.from_preset("r-abc", emb_dim=32, bias=False),
}


@pytest.mark.parametrize("name", sorted(our_shapes))
def test_export_our_models(name, tmp_path):
    cfg = our_shapes[name]
    model = randomize_(GPTModel(cfg), seed=11).eval()
    if cfg.tie_weights:
        assert model.out_head.weight is model.tok_emb.weight
    idx = tokens(cfg.vocab_size, (2, cfg.context_length), seed=12)
    expected = our_logits(model, idx)
    save_hf(model, tmp_path)
    loaded = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert loaded.config.tie_word_embeddings == cfg.tie_weights
    assert (loaded.lm_head.weight is loaded.transformer.wte.weight) == cfg.tie_weights
    torch.testing.assert_close(hf_logits(loaded, idx), expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(hf_logits(to_hf(model), idx), expected, atol=ATOL, rtol=0)
    # and back again: the same function, now in GPT-2's layout
    torch.testing.assert_close(our_logits(from_hf(tmp_path), idx), expected, atol=ATOL, rtol=0)


def test_to_hf_copies_the_weights():
    model = GPTModel(our_shapes["gpt2"]).eval()
    hf = to_hf(model)
    idx = tokens(500, (1, 16))
    before = hf_logits(hf, idx)
    with torch.no_grad():
        model.trf_blocks[0].att.W_qkv.weight.add_(1.0)
        model.tok_emb.weight.add_(1.0)
    torch.testing.assert_close(hf_logits(hf, idx), before, atol=0, rtol=0)
    assert hf.lm_head.weight is hf.transformer.wte.weight


def test_export_refuses_what_gpt2_cannot_express(monkeypatch, tmp_path):
    # Stand-in for a future GPTConfig feature with no GPT-2 counterpart.
    monkeypatch.setattr(hf_module, "EXPRESSIBLE", hf_module.EXPRESSIBLE - {"ln_eps"})
    model = GPTModel(our_shapes["gpt2"].replace(ln_eps=1e-6))
    with pytest.raises(ValueError, match="GPT-2 cannot express this model: ln_eps=1e-06"):
        save_hf(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert config_to_hf(our_shapes["gpt2"].replace(ln_eps=1e-5))["layer_norm_epsilon"] == 1e-5


LLAMA_OPTIONS = dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False, qkv_bias=False)
llama_shapes = {
    "untied": GPTConfig(vocab_size=300, context_length=32, emb_dim=64, n_heads=4, n_layers=2, **LLAMA_OPTIONS),
    "tied-fused-qkv": GPTConfig(vocab_size=300, context_length=32, emb_dim=64, n_heads=4, n_layers=2, tie_weights=True,
                                fused_qkv=True, ff_dim=100, rope_base=500.0, ln_eps=1e-6, **LLAMA_OPTIONS),
}


@pytest.mark.parametrize("name", sorted(llama_shapes))
def test_llama_shaped_models_export_to_llama(name, tmp_path):
    """Independent reference: transformers' own LlamaForCausalLM (its RoPE, RMSNorm, SwiGLU)."""
    cfg = llama_shapes[name]
    model = randomize_(GPTModel(cfg), seed=13).eval()
    idx = tokens(cfg.vocab_size, (2, cfg.context_length), seed=14)
    expected = our_logits(model, idx)
    assert sorted(save_hf(model, tmp_path)) == ["config.json", "model.safetensors"]
    loaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.intermediate_size == cfg.ff_hidden and loaded.config.tie_word_embeddings == cfg.tie_weights
    torch.testing.assert_close(hf_logits(loaded, idx), expected, atol=ATOL, rtol=0)
    direct = to_hf(model)
    assert isinstance(direct, LlamaForCausalLM)
    torch.testing.assert_close(hf_logits(direct, idx), expected, atol=ATOL, rtol=0)
    # a sanity check of the comparison itself: a position-blind model would not match
    with torch.no_grad():
        shifted = our_logits(model, idx.roll(1, dims=1))
    assert not torch.allclose(shifted[:, 1:], expected[:, 1:], atol=1e-3)


@pytest.mark.parametrize("changes, message", [
    (dict(mlp="relu2"), "GPT-2 cannot express this model: mlp='relu2'"),
    (dict(qk_norm=True), "GPT-2 cannot express this model: qk_norm=True"),
    # Rotary positions, RMSNorm or a gated feed-forward make it the Llama family's (qk_norm is Qwen3's and
    # q/k/v biases alone Qwen2's since the family grew: tests/interop/test_hf_decoders.py).
    (dict(pos_emb="rope"), "cannot express this model: bias=True, norm='layernorm', mlp='gelu' has no counterpart"),
    ({**LLAMA_OPTIONS, "mlp": "relu2"}, "cannot express this model: mlp='relu2'"),
    ({**LLAMA_OPTIONS, "gelu": "exact", "padding_idx": 0, "bias": True}, "cannot express this model: bias=True"),
])
def test_export_refuses_other_mixes_naming_the_option(changes, message, tmp_path):
    model = GPTModel(GPTConfig(vocab_size=50, context_length=8, emb_dim=16, n_heads=2, n_layers=1, **changes))
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        save_hf(model, tmp_path / "out")
    with pytest.raises(ValueError, match="cannot express"):
        to_hf(model)
    assert not (tmp_path / "out").exists()


def test_export_writes_tokenizers_that_autotokenizer_loads(tmp_path):
    text = "O gato dorme no telhado, à noite.<|endoftext|> Ação!"
    gpt2 = GPT2Tokenizer()
    save_hf(GPTModel(our_shapes["gpt2"].replace(vocab_size=50257)), tmp_path / "gpt2", gpt2)
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "gpt2")
    assert hf_tok(text)["input_ids"] == gpt2.encode(text)
    assert hf_tok.eos_token_id == 50256
    assert json.loads((tmp_path / "gpt2" / "config.json").read_text())["eos_token_id"] == 50256

    bpe = BPETokenizer.train_from_texts(["o gato dorme no telhado à noite " * 20], 300)
    save_hf(GPTModel(our_shapes["gpt2"].replace(vocab_size=bpe.vocab_size)), tmp_path / "bpe", bpe)
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "bpe")
    assert hf_tok(text)["input_ids"] == bpe.encode(text)
    assert hf_tok.decode(bpe.encode(text)) == text


def test_save_hf_output_directory(tmp_path):
    model = GPTModel(our_shapes["gpt2"])
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        save_hf(model, tmp_path / "file")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="non-empty directory that build-llm did not create"):
        save_hf(model, tmp_path / "busy")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "keep me"
    assert save_hf(model, tmp_path / "out") == ["config.json", "model.safetensors"]
    other = GPTModel(our_shapes["gpt2"].replace(n_layers=1))
    save_hf(other, tmp_path / "out")  # an earlier export is replaced
    assert json.loads((tmp_path / "out" / "config.json").read_text())["n_layer"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "file", "out"]  # no temporary left over
    with pytest.raises(TypeError, match="expected a GPTModel"):
        save_hf(torch.nn.Linear(2, 2), tmp_path / "x")


@pytest.mark.slow
def test_full_size_gpt2_small(tmp_path):
    """The real gpt2 shape (124M parameters), in OpenAI's file layout, imported and exported."""
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config()).eval()
    hf.save_pretrained(tmp_path / "gpt2")
    model = from_hf(tmp_path / "gpt2")
    assert model.cfg == GPTConfig.from_preset("gpt2-small")
    idx = tokens(50257, (1, 256), seed=3)
    expected = hf_logits(hf, idx)
    torch.testing.assert_close(our_logits(model, idx), expected, atol=ATOL, rtol=0)
    save_hf(model, tmp_path / "back")
    loaded = GPT2LMHeadModel.from_pretrained(tmp_path / "back").eval()
    torch.testing.assert_close(hf_logits(loaded, idx), expected, atol=ATOL, rtol=0)

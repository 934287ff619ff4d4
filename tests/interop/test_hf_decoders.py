"""Llama, Mistral, Qwen2, Qwen3 and Gemma 3 (text) in and out of GPTModel, against transformers itself.

Each reference is a tiny random model of transformers' own class, made here and saved with
save_pretrained (every weight drawn at random, norms included, so every mapping is exercised):
import -> the same logits (float32) and the same greedy tokens, with and without the KV cache;
export -> transformers loads it and computes the same logits.
"""

from __future__ import annotations

import json

import pytest
import torch

from build_llm import GPTModel, generate
from build_llm.interop.hf import config_from_hf, from_hf, save_hf, to_hf

transformers = pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

ATOL = 1e-4
VOCAB, SEQ = 128, 32
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, bos_token_id=None, eos_token_id=None,
            pad_token_id=None)

FAMILIES = {
    # Llama 3's frequency bands: original context 16 < SEQ, so the scaled and blended bands both act.
    "llama": dict(BASE, rope_theta=500000.0, tie_word_embeddings=True,
                  rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                    original_max_position_embeddings=16)),
    "llama-biases": dict(BASE, model_type="llama", attention_bias=True, mlp_bias=True, num_key_value_heads=1),
    "mistral": dict(BASE, sliding_window=8, head_dim=32, rope_theta=1000.0),  # window 8 < SEQ
    "qwen2": dict(BASE, tie_word_embeddings=True),  # q/k/v biases, none on o_proj
    "qwen3": dict(BASE, head_dim=32, rms_norm_eps=1e-5),  # QK-norm; 4 heads of 32 in a 64-wide model
    # local (sliding, base 10^4) and global (base 10^6, linear scaling) layers; scores times 24^-1/2
    "gemma3_text": dict(BASE, num_hidden_layers=3, head_dim=32, sliding_window=8, query_pre_attn_scalar=24,
                        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0,
                                                            "rope_theta": 1_000_000.0},
                                         "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}),
}


def model_type(name: str) -> str:
    return FAMILIES[name].get("model_type", name.split("-")[0])


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (p.ndim == 1) * 0.5)  # norms around 0.5
    return model


def reference_model(name: str, seed: int = 0):
    options = {k: v for k, v in FAMILIES[name].items() if k != "model_type"}
    config = AutoConfig.for_model(model_type(name), **options)
    config._attn_implementation = "eager"  # the plain arithmetic: an independent reference
    torch.manual_seed(seed)
    return randomize_(AutoModelForCausalLM.from_config(config), seed).eval()


def tokens(shape=(2, SEQ), seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def logits(model, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(idx)
    return out if isinstance(out, torch.Tensor) else out.logits


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    """(name, the transformers model, its save_pretrained directory, our import of it)."""
    name = request.param
    reference = reference_model(name)
    directory = tmp_path_factory.mktemp(name)
    reference.save_pretrained(directory)
    return name, reference, directory, from_hf(directory)


def test_import_gives_transformers_logits(family):
    name, reference, _, ours = family
    idx = tokens()
    expected = logits(reference, idx)
    torch.testing.assert_close(logits(ours, idx), expected, atol=ATOL, rtol=0)
    # the comparison can fail: a position-blind or window-blind model would not match
    assert not torch.allclose(logits(ours, idx.roll(1, dims=1))[:, 1:], expected[:, 1:], atol=1e-3)


def test_the_config_holds_each_familys_options(family):
    name, _, _, ours = family
    cfg = ours.cfg
    assert cfg.pos_emb == "rope" and cfg.norm == "rmsnorm"
    expected = {
        "llama": dict(rope_scaling="llama3", rope_factor=8.0, rope_original_context=16, n_kv_heads=2, tie_weights=True),
        "llama-biases": dict(qkv_bias=True, bias=True, n_kv_heads=1),
        "mistral": dict(sliding_window=8, layer_types=None, head_size=32, n_kv_heads=2),
        "qwen2": dict(qkv_bias=True, bias=False, n_kv_heads=2),
        "qwen3": dict(qk_norm=True, head_size=32, ln_eps=1e-5),
        "gemma3_text": dict(layer_types=("sliding", "full", "sliding"), sliding_window=8, rope_local_base=10_000.0,
                            rope_scaling="linear", rope_factor=2.0, attn_scale=24 ** -0.5, norm_plus_one=True,
                            scale_emb=True, post_norms=True, mlp="geglu", tie_weights=True),
    }[name]
    assert {k: getattr(cfg, k) for k in expected} == expected


def test_greedy_tokens_are_transformers_with_and_without_the_cache(family):
    name, reference, _, ours = family
    prompt = tokens((1, 12), seed=3)
    cached = generate(ours, prompt, 20, use_cache=True)
    assert torch.equal(generate(ours, prompt, 20, use_cache=False), cached)
    with torch.no_grad():
        expected = reference.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20,
                                      do_sample=False, pad_token_id=0)
    assert torch.equal(cached, expected)


def test_batched_rows_at_their_own_positions_decode_as_each_alone(family):
    """The server's per-row cache positions, with the window and GQA, against each row alone."""
    _, _, _, ours = family
    rows = tokens((2, 14), seed=5)
    cache = ours.new_cache(2)
    cache.pos = torch.tensor([0, 0])
    with torch.no_grad():
        ours(rows[:, :10], cache)
        cache.pos = torch.tensor([10, 10])
        last = ours(rows[:, 10:14], cache)[:, -1]
    torch.testing.assert_close(last, logits(ours, rows)[:, -1], atol=ATOL, rtol=0)


def test_export_loads_in_transformers_with_the_same_logits(family, tmp_path):
    name, reference, _, ours = family
    idx = tokens(seed=2)
    expected = logits(reference, idx)
    assert sorted(save_hf(ours, tmp_path / "out")) == ["config.json", "model.safetensors"]
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["model_type"] == model_type(name)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(loaded) is type(reference)
    torch.testing.assert_close(logits(loaded, idx), expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(logits(to_hf(ours), idx), expected, atol=ATOL, rtol=0)
    # and back: the export re-imports as the same model
    assert from_hf(tmp_path / "out").cfg == ours.cfg


def test_a_transformers_model_object_imports_too(family):
    name, reference, _, ours = family
    direct = from_hf(reference)
    idx = tokens(seed=4)
    torch.testing.assert_close(logits(direct, idx), logits(ours, idx), atol=0, rtol=0)


def test_published_4x_config_keys_import_the_same(tmp_path):
    """A config.json as checkpoints on the Hub have it (transformers 4.x: rope_theta and rope_scaling,
    no rope_parameters), written by hand beside the weights of the 5.x save."""
    reference = reference_model("llama")
    reference.save_pretrained(tmp_path)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": VOCAB, "hidden_size": 64,
              "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "hidden_act": "silu", "tie_word_embeddings": True,
              "rope_theta": 500000.0, "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                       "original_max_position_embeddings": 16, "rope_type": "llama3"},
              "attention_bias": False, "mlp_bias": False, "torch_dtype": "bfloat16",
              "transformers_version": "4.45.0"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    idx = tokens()
    ours = from_hf(tmp_path)
    torch.testing.assert_close(logits(ours, idx), logits(reference, idx), atol=ATOL, rtol=0)
    assert ours.cfg == config_from_hf({**config, "rope_scaling": None,
                                       "rope_parameters": {**config["rope_scaling"], "rope_theta": 500000.0}})
    gemma = {"model_type": "gemma3_text", **{k: config[k] for k in ("vocab_size", "hidden_size", "intermediate_size",
                                                                    "num_attention_heads", "max_position_embeddings")},
             "num_hidden_layers": 7, "num_key_value_heads": 1, "head_dim": 16, "rope_theta": 1_000_000.0,
             "rope_local_base_freq": 10_000.0, "sliding_window": 512, "sliding_window_pattern": 6,
             "rope_scaling": {"rope_type": "linear", "factor": 8.0}}
    cfg = config_from_hf(gemma)
    assert cfg.types_of_layers == ("sliding",) * 5 + ("full", "sliding")
    assert (cfg.rope_base, cfg.rope_local_base, cfg.rope_scaling, cfg.rope_factor) == (1e6, 1e4, "linear", 8.0)


def test_bfloat16_sharded_checkpoints_import(tmp_path):
    reference = reference_model("qwen3").to(torch.bfloat16)
    reference.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ours = from_hf(tmp_path)
    assert ours.tok_emb.weight.dtype == torch.float32
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    idx = tokens()
    torch.testing.assert_close(logits(ours, idx), logits(reloaded, idx), atol=ATOL, rtol=0)


@pytest.mark.parametrize("changes, key", [
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_scaling.rope_type='yarn'"),
    (dict(hidden_act="relu"), "hidden_act='relu'"),
    (dict(attention_bias=True, mlp_bias=False), "attention_bias=True"),
    (dict(final_logit_softcapping=30.0), "final_logit_softcapping=30.0"),
    (dict(model_type="phi3"), "model_type='phi3'"),
    (dict(vocab_size=None), "'vocab_size' is missing; a llama config needs hidden_size"),
    (dict(model_type="gpt2", n_embd=32, n_head=4, n_layer=2, n_positions=64, vocab_size=None), "'vocab_size' is missing; a GPT-2"),
])
def test_configs_we_cannot_compute_are_refused_naming_the_key(changes, key):
    config = {k: v for k, v in {"model_type": "llama", **BASE, **changes}.items() if v is not None}
    with pytest.raises(ValueError, match=key.replace("(", r"\(").replace(".", r"\.")):
        config_from_hf(config)


@pytest.mark.parametrize("scaling, key", [
    ({"rope_type": "llama3", "factor": 8.0}, "original_max_position_embeddings"),
    ({"type": "linear"}, "factor"),
    ({"rope_type": "dynamic", "factor": 2.0}, "rope_type"),
])
def test_a_rope_refusal_is_one_line_naming_the_key(scaling, key):
    """Said once, as the key's own refusal (not wrapped in another, not a bare KeyError's name)."""
    config = {"model_type": "llama", **{k: v for k, v in BASE.items() if v is not None}, "rope_scaling": scaling}
    with pytest.raises(ValueError) as e:
        config_from_hf(config)
    assert str(e.value).startswith(f"config.json: rope_scaling.{key}") and str(e.value).count("config.json") == 1


def test_export_refuses_what_no_family_holds(tmp_path):
    ours = from_hf(reference_model("qwen3"))
    mixed = GPTModel(ours.cfg.replace(qkv_bias=True))  # QK-norm with q/k/v biases: neither Qwen2 nor Qwen3
    with pytest.raises(ValueError, match="cannot express this model: (qk_norm|qkv_bias)=True"):
        save_hf(mixed, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_import_hf_and_export_hf_commands_round_trip(tmp_path, capsys):
    from build_llm.cli import main

    reference = reference_model("gemma3_text")
    reference.save_pretrained(tmp_path / "hf")
    assert main(["import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt"), "--tokenizer", "none"]) == 0
    assert main(["export-hf", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "back")]) == 0
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    idx = tokens()
    torch.testing.assert_close(logits(loaded, idx), logits(reference, idx), atol=ATOL, rtol=0)
    (tmp_path / "bad").mkdir()
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "bad" / "config.json").write_text(json.dumps({**config, "attn_logit_softcapping": 50.0}))
    (tmp_path / "bad" / "model.safetensors").write_bytes((tmp_path / "hf" / "model.safetensors").read_bytes())
    capsys.readouterr()
    assert main(["import-hf", str(tmp_path / "bad"), "--out", str(tmp_path / "x"), "--tokenizer", "none"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "attn_logit_softcapping=50.0 is not supported" in err


@pytest.mark.parametrize("family, changes", [
    ("mistral", {}),  # no sliding_window key: transformers' 4096
    ("qwen2", {"use_sliding_window": True, "num_hidden_layers": 30}),  # its sliding_window and max_window_layers
    ("qwen3", {"use_sliding_window": True, "num_hidden_layers": 30}),
    ("qwen3_moe", {"use_sliding_window": True, "max_window_layers": 1, "num_experts": 4,
                   "num_experts_per_tok": 2}),  # every layer
])
def test_keys_a_config_leaves_out_take_transformers_defaults(family, changes):
    """A hand-written config.json may leave keys out: each then means what transformers' class gives it."""
    config = {k: v for k, v in {**BASE, **changes}.items() if v is not None}
    reference = transformers.AutoConfig.for_model(family, **config)
    ours = config_from_hf({"model_type": family, **config})
    assert ours.sliding_window == reference.sliding_window
    kinds = getattr(reference, "layer_types", None) or ["sliding_attention"] * reference.num_hidden_layers
    assert list(ours.types_of_layers) == [k.split("_")[0] for k in kinds]

"""Tests for build_llm.lora: the layers, targets, freezing, merging, adapter files, and export of a
merged model to Hugging Face (transformers as the independent reference)."""

from __future__ import annotations

import math

import pytest
import torch

from build_llm import GPTConfig, GPTModel
from build_llm.lora import (ExpertsLoRA, LinearWithLoRA, LoRALayer, MoEWithLoRA, WithTokenRows, adapter_meta,
                            apply_adapter, apply_lora, freeze_for_lora, is_adapter_tensor, merge_lora,
                            train_token_rows)
from build_llm.store.finetuned import load_adapter, save_adapter

TINY = GPTConfig.from_preset("book-124m", vocab_size=300, context_length=16, emb_dim=32, n_heads=4, n_layers=2,
                             drop_rate=0.0, qkv_bias=True)
# Llama's shape (grouped key/value heads, SwiGLU) and a Qwen3-MoE-shaped mixture of SwiGLU experts
LLAMA = GPTConfig(vocab_size=300, context_length=16, emb_dim=32, n_heads=4, n_kv_heads=2, n_layers=2, drop_rate=0.0,
                  bias=False, pos_emb="rope", norm="rmsnorm", mlp="swiglu", ff_dim=48)
MOE = LLAMA.replace(n_experts=4, n_experts_per_token=2, moe_ff_dim=24, qk_norm=True)


def tiny(cfg: GPTConfig = TINY, seed: int = 0) -> GPTModel:
    torch.manual_seed(seed)
    return GPTModel(cfg).eval()


def randomize_lora_(model: torch.nn.Module, seed: int = 1) -> None:
    """B starts at zero (no change); draw every adapter matrix, and token rows at the scale of the rows
    they replace, so that merging has work to do."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_adapter_tensor(name):
                p.copy_(torch.randn(p.shape, generator=g) * (0.05 if ".lora." in name else p.std()))


def ids(shape=(2, 16), vocab=300, seed=3) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def test_layer_initialisation_and_shapes():
    torch.manual_seed(123)
    layer = LoRALayer(10, 6, rank=4, alpha=8)
    assert layer.A.shape == (10, 4) and layer.B.shape == (4, 6)
    assert torch.count_nonzero(layer.B) == 0
    # Kaiming-uniform with a=sqrt(5) on a (10, 4) tensor: fan_in = 4, bound = 1/sqrt(fan_in) = 0.5.
    assert layer.A.abs().max() <= 0.5 and layer.A.abs().max() > 0.3
    torch.manual_seed(123)
    expected = torch.empty(10, 4)
    torch.nn.init.kaiming_uniform_(expected, a=math.sqrt(5))
    torch.testing.assert_close(layer.A.detach(), expected, rtol=0, atol=0)
    assert layer.scaling == 2.0  # alpha / rank
    assert LoRALayer(10, 6, rank=4, alpha=8, scaling=8).scaling == 8  # the book's convention


def test_wrapped_linear_starts_as_the_linear_and_adds_the_scaled_update():
    torch.manual_seed(0)
    linear = torch.nn.Linear(5, 3)
    wrapped = LinearWithLoRA(linear, rank=2, alpha=4)
    x = torch.randn(7, 5)
    torch.testing.assert_close(wrapped(x), linear(x), rtol=0, atol=0)
    with torch.no_grad():
        wrapped.lora.B.fill_(0.5)
    by_hand = x @ linear.weight.T + linear.bias + 2.0 * (x @ wrapped.lora.A @ wrapped.lora.B)
    torch.testing.assert_close(wrapped(x), by_hand)


@pytest.mark.parametrize("targets, expected", [
    (("attn",), {"att.W_query", "att.W_key", "att.W_value", "att.out_proj"}),
    (("ff",), {"ff.layers.0", "ff.layers.2"}),
    (("attn", "ff", "head"), {"att.W_query", "att.W_key", "att.W_value", "att.out_proj", "ff.layers.0",
                              "ff.layers.2", "out_head"}),
])
def test_targets_choose_the_layers(targets, expected):
    model = tiny()
    names = apply_lora(model, 2, 4, targets)
    assert {n.split(".", 2)[-1] if n.startswith("trf_blocks") else n for n in names} == expected
    assert all(isinstance(model.get_submodule(n), LinearWithLoRA) for n in names)


def test_freezing_leaves_only_adapters_and_named_weights_trainable():
    model = tiny()
    apply_lora(model, 4, 8, ("attn", "ff"))
    freeze_for_lora(model, ["out_head"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora." in n or n.startswith("out_head") for n in trainable)
    assert "out_head.weight" in trainable and "tok_emb.weight" not in trainable
    # rank 4 on every Linear of 2 blocks: 4 * (in + out) each
    per_block = 4 * 4 * (32 + 32) + 4 * (32 + 128) + 4 * (128 + 32)
    assert sum(p.numel() for n, p in model.named_parameters() if ".lora." in n) == 2 * per_block


@pytest.mark.parametrize("cfg, targets, expected", [
    (LLAMA, ("q_proj", "v_proj"), {"att.W_query", "att.W_value"}),
    (LLAMA, ("k_proj", "o_proj"), {"att.W_key", "att.out_proj"}),
    (LLAMA, ("gate_proj",), {"ff.gate"}),
    (LLAMA, ("up_proj", "down_proj"), {"ff.up", "ff.down"}),
    (LLAMA, ("ff",), {"ff.gate", "ff.up", "ff.down"}),
    (TINY, ("up_proj", "down_proj"), {"ff.layers.0", "ff.layers.2"}),  # GPT-2's c_fc and c_proj
    (MOE, ("gate_proj", "o_proj"), {"ff.fc1", "att.out_proj"}),
    (MOE, ("ff",), {"ff.fc1", "ff.fc2", "ff.fc3"}),  # the experts, not the router (ff.gate)
])
def test_single_projections_are_named_as_peft_names_them(cfg, targets, expected):
    model = tiny(cfg)
    names = apply_lora(model, 2, 4, targets)
    assert {n.split(".", 2)[-1] for n in names} == expected and len(names) == 2 * len(expected)


@pytest.mark.parametrize("cfg, targets, message", [
    (TINY.replace(fused_qkv=True), ("q_proj",), r"'q_proj' names no layer of this model.*'attn'"),
    (TINY, ("gate_proj",), r"'gate_proj' names no layer of this model.*'up_proj'"),
])
def test_a_target_the_model_lacks_is_refused_naming_those_it_has(cfg, targets, message):
    with pytest.raises(ValueError, match=message):
        apply_lora(tiny(cfg), 2, 4, targets)


def test_an_experts_adapter_adds_each_experts_own_update():
    torch.manual_seed(0)
    model = tiny(MOE)
    apply_lora(model, 3, 6, ("up_proj",))
    randomize_lora_(model)
    ff = model.trf_blocks[0].ff
    assert isinstance(ff, MoEWithLoRA) and set(ff.lora) == {"fc2"} and ff.lora["fc2"].A.shape == (4, 32, 3)
    x, moe, lora = torch.randn(5, 32), ff.moe, ff.lora["fc2"]
    for e in range(4):  # by hand: W_up[e] + 2 * (A[e] @ B[e]).T in expert e's SwiGLU, the others as they were
        up = moe.fc2[e] + 2.0 * (lora.A[e] @ lora.B[e]).t()
        by_hand = (torch.nn.functional.silu(x @ moe.fc1[e].t()) * (x @ up.t())) @ moe.fc3[e].t()
        torch.testing.assert_close(ff.expert(e, x), by_hand, atol=1e-6, rtol=0)
    assert ExpertsLoRA(moe.fc1, 3, 6).delta_weight().abs().max() == 0  # B starts at zero


@pytest.mark.parametrize("cfg, targets", [(LLAMA, ("attn", "ff")), (MOE, ("attn", "ff")), (MOE, ("down_proj",))])
def test_merged_logits_equal_adapted_logits_on_open_model_shapes(cfg, targets):
    model = tiny(cfg)
    apply_lora(model, 4, 16, targets)
    randomize_lora_(model)
    x = ids()
    with torch.no_grad():
        adapted = model(x)
        assert (adapted - tiny(cfg)(x)).abs().max() > 1e-2
        merged = merge_lora(model)(x)
    assert not any(isinstance(m, (LinearWithLoRA, MoEWithLoRA)) for m in model.modules())
    assert set(model.state_dict()) == set(tiny(cfg).state_dict())
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=0)


def test_an_experts_adapter_file_round_trip(tmp_path):
    model = tiny(MOE)
    apply_lora(model, 2, 4, ("q_proj", "ff"))
    freeze_for_lora(model)
    randomize_lora_(model)
    meta = adapter_meta(model, ("q_proj", "ff"), {"sha256": "x"})
    assert "trf_blocks.1.ff.fc3" in meta["layers"] and "trf_blocks.1.att.W_query" in meta["layers"]
    save_adapter(tmp_path, model, meta)
    tensors, loaded_meta = load_adapter(tmp_path)
    assert tensors["trf_blocks.0.ff.lora.fc3.B"].shape == (4, 2, 32)
    other = apply_adapter(tiny(MOE), tensors, loaded_meta)
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(other(x), model(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"ff.lora.fc1.A has shape \(4, 32, 2\); rank=2 on this model makes it "
                                         r"\(6, 32, 2\)"):
        apply_adapter(tiny(MOE.replace(n_experts=6)), tensors, loaded_meta)


@pytest.mark.parametrize("targets", [("attn", "ff"), ("attn", "ff", "head")])
@pytest.mark.parametrize("fused", [False, True])
def test_merged_logits_equal_adapted_logits(targets, fused):
    model = tiny(TINY.replace(fused_qkv=fused))
    apply_lora(model, 4, 16, targets)
    randomize_lora_(model)
    x = ids()
    with torch.no_grad():
        base = tiny(TINY.replace(fused_qkv=fused))(x)
        adapted = model(x)
        assert (adapted - base).abs().max() > 1e-2  # the adapter does change the function
        merged = merge_lora(model)(x)
    assert not any(isinstance(m, LinearWithLoRA) for m in model.modules())
    assert set(model.state_dict()) == set(tiny(TINY.replace(fused_qkv=fused)).state_dict())
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=0)


@pytest.mark.parametrize("tied", [False, True])
def test_token_rows_replace_the_tokens_rows_of_the_embedding_and_the_head(tied):
    cfg = TINY.replace(tie_weights=tied)
    model = tiny(cfg)
    x = ids()
    x[0, 3] = x[1, 15] = 7  # the token is read as well as predicted
    with torch.no_grad():
        before = model(x)
    train_token_rows(model, [7])
    with torch.no_grad():
        torch.testing.assert_close(model(x), before)  # the rows start as the base's (to float rounding)
    randomize_lora_(model)
    # The reference: a plain model with those rows written into its tables by hand.
    reference = tiny(cfg)
    with torch.no_grad():
        reference.tok_emb.weight[7] = model.tok_emb.token_rows.rows[0]
        reference.out_head.weight[7] = model.out_head.token_rows.rows[0]
        torch.testing.assert_close(model(x), reference(x))
    assert (model.tok_emb.token_rows is model.out_head.token_rows) == tied
    freeze_for_lora(model)
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == ({"tok_emb.token_rows.rows": 32} if tied else
                         {"tok_emb.token_rows.rows": 32, "out_head.token_rows.rows": 32})
    model(x).logsumexp(-1).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
    assert model.tok_emb.inner.weight.grad is None


def test_tied_head_cannot_take_an_adapter():
    model = tiny(GPTConfig.from_preset("gpt2-small", vocab_size=300, context_length=16, emb_dim=32, n_heads=4,
                                       n_layers=1))
    with pytest.raises(ValueError, match="tied"):
        apply_lora(model, 2, 4, ("head",))


@pytest.mark.parametrize("rank, alpha, targets, message", [
    (0, 1, ("attn",), "rank"), (2.5, 1, ("attn",), "rank"), (2, 0, ("attn",), "alpha"),
    (2, float("nan"), ("attn",), "alpha"), (2, 1, ("mlp",), "targets"), (2, 1, (), "targets"),
])
def test_bad_arguments(rank, alpha, targets, message):
    with pytest.raises(ValueError, match=message):
        apply_lora(tiny(), rank, alpha, targets)


def test_adapter_file_round_trip(tmp_path):
    model = tiny()
    apply_lora(model, 4, 8, ("attn",))
    train_token_rows(model, [7])
    freeze_for_lora(model)
    randomize_lora_(model)
    meta = adapter_meta(model, ("attn",), {"sha256": "x"})
    save_adapter(tmp_path, model, meta)
    tensors, loaded_meta = load_adapter(tmp_path)
    lora_tensors = [k for k in tensors if ".lora." in k]
    assert len(lora_tensors) == 2 * 4 * 2 and set(tensors) - set(lora_tensors) == {"tok_emb.token_rows.rows",
                                                                                   "out_head.token_rows.rows"}
    assert loaded_meta["rank"] == 4 and loaded_meta["alpha"] == 8 and loaded_meta["targets"] == ["attn"]
    assert loaded_meta["token_rows"] == [7]

    other = apply_adapter(tiny(), tensors, loaded_meta)
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(other(x), model(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="does not fit"):
        apply_adapter(tiny(TINY.replace(emb_dim=64)), tensors, loaded_meta)
    with pytest.raises(ValueError, match=r"token_rows=\[300\]; expected a list of token ids in \[0, 300\)"):
        apply_adapter(tiny(), tensors, {**loaded_meta, "token_rows": [300]})
    with pytest.raises(ValueError, match="missing or unreadable"):
        load_adapter(tmp_path / "nowhere")


@pytest.mark.parametrize("tied", [False, True])
def test_merged_model_exports_to_hugging_face_with_equal_logits(tmp_path, tied):
    transformers = pytest.importorskip("transformers")
    from build_llm.interop.hf import save_hf

    model = tiny(TINY.replace(tie_weights=tied))
    apply_lora(model, 4, 16, ("attn", "ff") if tied else ("attn", "ff", "head"))
    train_token_rows(model, [7, 299])
    randomize_lora_(model)
    x = ids()
    x[0, 3] = x[1, 5] = 7  # a token with new rows is read as well as predicted
    with torch.no_grad():
        adapted = model(x)
    merge_lora(model)
    assert not any(isinstance(m, (LinearWithLoRA, WithTokenRows)) for m in model.modules())
    assert (model.out_head.weight is model.tok_emb.weight) == tied
    save_hf(model, tmp_path / "hf")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, adapted, atol=1e-5, rtol=0)

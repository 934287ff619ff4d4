"""Qwen3-MoE in and out of Hugging Face's format, checked against transformers' Qwen3MoeForCausalLM: a tiny
random model with several experts (grouped-query attention, a head size apart from hidden / heads, QK-norm)."""

from __future__ import annotations

import json

import pytest
import torch

from build_llm import GPTConfig, GPTModel, generate
from build_llm.errors import UsageError
from build_llm.interop.hf import config_from_hf, from_hf, save_hf
from build_llm.moe import MoEFeedForward
from build_llm.sizing import active_parameters, count_parameters

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread waits on no other

TINY = dict(vocab_size=300, hidden_size=32, intermediate_size=48, moe_intermediate_size=24, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=6, num_experts_per_tok=2,
            norm_topk_prob=True, max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=1_000_000.0,
            tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)


def hf_moe(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**{**TINY, **overrides}))
    with torch.no_grad():  # random norms and a decisive router, so that every mapping and routing matters
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("mlp.gate.weight"):
                p.normal_(0, 1.0)
    return model.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    hf = hf_moe()
    path = tmp_path_factory.mktemp("qwen3_moe")
    hf.save_pretrained(path)
    return hf, path


@torch.no_grad()
def test_import_equals_transformers_and_caches(saved):
    hf, path = saved
    model = from_hf(path)
    cfg = model.cfg
    assert (cfg.n_experts, cfg.n_experts_per_token, cfg.moe_ff_dim, cfg.moe_norm_topk) == (6, 2, 24, True)
    assert (cfg.kv_heads, cfg.head_dim, cfg.qk_norm) == (2, 16, True)
    assert all(isinstance(b.ff, MoEFeedForward) for b in model.trf_blocks)
    x = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(model(x), hf(x).logits, atol=1e-4, rtol=1e-4)

    prompt = x[:1, :5]
    cached = generate(model, prompt, 20, use_cache=True)
    assert torch.equal(cached, generate(model, prompt, 20, use_cache=False))
    assert torch.equal(cached, hf.generate(prompt, max_new_tokens=20, do_sample=False, min_new_tokens=20))


@torch.no_grad()
def test_export_loads_back_in_transformers(saved, tmp_path):
    hf, path = saved
    model = from_hf(path)
    save_hf(model, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "qwen3_moe" and config["norm_topk_prob"] is True
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert isinstance(back, transformers.Qwen3MoeForCausalLM)
    x = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(back(x).logits, hf(x).logits, atol=1e-5, rtol=1e-5)


def test_config_reads_either_transformers_spelling_and_refuses_dense_layers():
    base = {**TINY, "model_type": "qwen3_moe", "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}
    v4 = dict(base)  # transformers 4 writes num_experts; 5 writes num_local_experts
    v5 = {**{k: v for k, v in base.items() if k != "num_experts"}, "num_local_experts": 6}
    assert config_from_hf(v4) == config_from_hf(v5)
    assert config_from_hf(v4).n_experts == 6
    assert config_from_hf({**base, "norm_topk_prob": False}).moe_norm_topk is False
    assert config_from_hf({**base, "decoder_sparse_step": 1, "mlp_only_layers": []}).n_experts == 6
    with pytest.raises(UsageError, match="decoder_sparse_step=2"):
        config_from_hf({**base, "decoder_sparse_step": 2})
    with pytest.raises(UsageError, match="mlp_only_layers"):
        config_from_hf({**base, "mlp_only_layers": [0]})


@torch.no_grad()
def test_a_transformers_model_object_in_and_out(saved):
    from build_llm.interop.hf import to_hf

    hf, _ = saved
    model = from_hf(hf)  # transformers 5 holds the experts stacked in memory; 4, one module each
    x = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(model(x), hf(x).logits, atol=1e-4, rtol=1e-4)
    back = to_hf(model)
    assert isinstance(back, transformers.Qwen3MoeForCausalLM)
    torch.testing.assert_close(back(x).logits, hf(x).logits, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_sharded_bfloat16_files(tmp_path):
    hf_moe(seed=4).to(torch.bfloat16).save_pretrained(tmp_path, max_shard_size="20KB")  # experts across shards
    assert (tmp_path / "model.safetensors.index.json").is_file()
    model = from_hf(tmp_path)
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    x = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(model(x), reference(x).logits, atol=1e-4, rtol=1e-4)

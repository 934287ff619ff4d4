"""build_llm.book.qwen3 (and book.bonus, which it shares with llama3): the book's Qwen3 names on GPTModel,
checked against transformers' Qwen3 and Qwen3-MoE on the book's small test configs, the cached and
batched generations against the uncached one, and the tokenizer against `tokenizers` itself."""

import pytest
import torch

from build_llm.book.qwen3 import (QWEN3_CONFIG_30B_A3B, QWEN_CONFIG_06_B, FeedForward, GroupedQueryAttention,
                                  KVCache, MoEFeedForward, Qwen3Model, Qwen3Tokenizer, RMSNorm, apply_rope,
                                  compute_rope_params, generate_text_basic_stream, generate_text_simple,
                                  generate_text_simple_stream,
                                  load_weights_into_qwen)
from build_llm.book.bonus import gpt_config
from build_llm.errors import UsageError
from build_llm.gpt import GPTModel
from build_llm.sizing import count_parameters

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread waits on no other

# The book's own test configs (its tests/test_qwen3.py): dense, and the same with four experts.
BASE = {"vocab_size": 257, "context_length": 64, "emb_dim": 32, "n_heads": 4, "n_layers": 2, "hidden_dim": 64,
        "head_dim": 8, "qk_norm": True, "n_kv_groups": 2, "rope_base": 1_000_000.0, "dtype": torch.float32}
MOE = {**BASE, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 48}


def hf_qwen3(cfg):
    common = dict(vocab_size=cfg["vocab_size"], max_position_embeddings=cfg["context_length"],
                  hidden_size=cfg["emb_dim"], num_attention_heads=cfg["n_heads"], num_hidden_layers=cfg["n_layers"],
                  intermediate_size=cfg["hidden_dim"], head_dim=cfg["head_dim"], num_key_value_heads=cfg["n_kv_groups"],
                  rope_theta=cfg["rope_base"], tie_word_embeddings=False, attn_implementation="eager")
    if cfg.get("num_experts"):
        return transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
            **common, num_experts=cfg["num_experts"], num_experts_per_tok=cfg["num_experts_per_tok"],
            moe_intermediate_size=cfg["moe_intermediate_size"], norm_topk_prob=True)).eval()
    return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common)).eval()


def loaded(cfg, seed=0):
    """A Qwen3Model and transformers' model with the same random weights (theirs, through the book's loader)."""
    torch.manual_seed(seed)
    hf = hf_qwen3(cfg)
    if cfg.get("num_experts"):  # a router that prefers some experts, so no top-k choice is a near-tie
        for layer in hf.model.layers:
            torch.nn.init.normal_(layer.mlp.gate.weight, std=1.0)
    model = Qwen3Model(cfg).eval()
    load_weights_into_qwen(model, {"n_layers": cfg["n_layers"], "hidden_dim": cfg["hidden_dim"]},
                           hf_state_dict(hf))
    return model, hf


def hf_state_dict(hf):
    """transformers' state dict with Hugging Face's file names (transformers 5 stacks the experts)."""
    state = dict(hf.state_dict())
    for key in [k for k in state if k.endswith("mlp.experts.gate_up_proj")]:
        prefix, gate_up = key[:-len("gate_up_proj")], state.pop(key)
        down = state.pop(prefix + "down_proj")
        gate, up = gate_up.chunk(2, dim=1)  # (E, 2H, C) -> (E, H, C) twice
        for e in range(gate_up.shape[0]):
            state[f"{prefix}{e}.gate_proj.weight"] = gate[e]
            state[f"{prefix}{e}.up_proj.weight"] = up[e]
            state[f"{prefix}{e}.down_proj.weight"] = down[e]
    return state


@torch.no_grad()
@pytest.mark.parametrize("cfg", [BASE, MOE], ids=["dense", "moe"])
def test_model_equals_transformers(cfg):
    model, hf = loaded(cfg)
    assert isinstance(model, GPTModel)  # the one model, not a copy of it
    x = torch.randint(0, cfg["vocab_size"], (2, 12))
    torch.testing.assert_close(model(x), hf(x).logits, atol=1e-4, rtol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("cfg", [BASE, MOE], ids=["dense", "moe"])
def test_the_kv_cache_chapters_equal_the_uncached_model(cfg):
    model, _ = loaded(cfg, seed=1)
    x = torch.randint(0, cfg["vocab_size"], (1, 9))
    full = model(x)
    model.reset_kv_cache()
    cache = KVCache(n_layers=cfg["n_layers"])
    stepwise = torch.cat([model(x[:, t:t + 1], cache=cache) for t in range(x.shape[1])], dim=1)
    torch.testing.assert_close(stepwise, full, atol=1e-5, rtol=1e-4)
    assert model.current_pos == 9

    plain = generate_text_simple(model, x, 20, use_cache=False)
    assert torch.equal(generate_text_simple(model, x, 20), plain)
    streamed = torch.cat(list(generate_text_simple_stream(model, x, 20)), dim=1)
    assert torch.equal(streamed, plain[:, 9:])
    basic = torch.cat(list(generate_text_basic_stream(model, x, 20)), dim=1)
    assert torch.equal(basic, plain[:, 9:])
    end = int(plain[0, 12])  # a stream stops before the end token's first appearance
    first = int((plain[0, 9:] == end).nonzero()[0])
    assert len(list(generate_text_simple_stream(model, x, 20, eos_token_id=end))) == first


@torch.no_grad()
def test_batched_cache_generation_equals_each_row_alone():
    model, _ = loaded(BASE, seed=2)
    prompts = torch.randint(0, BASE["vocab_size"], (3, 7))
    batched = generate_text_simple(model, prompts, 15)
    for row in range(3):
        assert torch.equal(batched[row:row + 1], generate_text_simple(model, prompts[row:row + 1], 15, use_cache=False))


@torch.no_grad()
def test_the_cache_grows_past_its_first_allocation():
    cfg = {**BASE, "context_length": 400}
    model, _ = loaded(cfg, seed=3)
    x = torch.randint(0, cfg["vocab_size"], (1, 250))
    out = generate_text_simple(model, x, 12)  # 250 + 12 positions: past the first 256 of the cache
    assert torch.equal(out, generate_text_simple(model, x, 12, use_cache=False))
    model.reset_kv_cache()
    with pytest.raises(UsageError, match="exceeds the model's context length of 400"):
        model(torch.zeros(1, 401, dtype=torch.long), cache=KVCache(2))


def test_rope_helpers_equal_transformers_rotary_embedding():
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding, apply_rotary_pos_emb

    head_dim, n = 16, 512
    cos, sin = compute_rope_params(head_dim=head_dim, theta_base=1_000_000, context_length=n)
    hf_cfg = transformers.Qwen3Config(hidden_size=64, num_attention_heads=4, head_dim=head_dim,
                                      max_position_embeddings=n, rope_theta=1_000_000.0)
    q, k = torch.randn(2, 1, 4, n, head_dim).unbind(0)
    ref_cos, ref_sin = Qwen3RotaryEmbedding(hf_cfg)(q, torch.arange(n)[None])
    torch.testing.assert_close(cos, ref_cos[0])
    torch.testing.assert_close(sin, ref_sin[0])
    ref_q, ref_k = apply_rotary_pos_emb(q, k, ref_cos, ref_sin)
    torch.testing.assert_close(apply_rope(q, cos, sin), ref_q)
    torch.testing.assert_close(apply_rope(k, cos, sin), ref_k)
    # An offset (the cache's start position), per row too, rotates to the same positions
    torch.testing.assert_close(apply_rope(q[..., 100:110, :], cos, sin, offset=100), ref_q[..., 100:110, :])
    torch.testing.assert_close(apply_rope(q[..., 100:110, :], cos, sin, offset=torch.tensor([100])),
                               ref_q[..., 100:110, :])


@torch.no_grad()
def test_the_parts_equal_transformers_modules():
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    model, hf = loaded(BASE, seed=4)
    layer, block = hf.model.layers[0], model.trf_blocks[0]
    x = torch.randn(2, 5, 32)
    ff = FeedForward(BASE)
    ff.load_state_dict(block.ff.state_dict())
    torch.testing.assert_close(ff(x), layer.mlp(x))

    att = GroupedQueryAttention(d_in=32, num_heads=4, num_kv_groups=2, head_dim=8, qk_norm=True)
    att.load_state_dict(block.att.state_dict())
    cos, sin = compute_rope_params(8, 1_000_000.0, 64)
    mask = torch.triu(torch.ones(5, 5, dtype=torch.bool), diagonal=1)
    position_embeddings = hf.model.rotary_emb(x, torch.arange(5)[None])
    expected = layer.self_attn(x, position_embeddings=position_embeddings,
                               attention_mask=torch.zeros(1, 1, 5, 5).masked_fill(mask, -torch.inf))[0]
    torch.testing.assert_close(att(x, mask, cos, sin), expected, atol=1e-5, rtol=1e-5)

    norm, ref = RMSNorm(32), Qwen3RMSNorm(32, eps=1e-6)
    torch.testing.assert_close(norm(x.bfloat16()), ref(x.bfloat16()).bfloat16())  # in float32, as Qwen3 does

    moe_model, moe_hf = loaded(MOE, seed=5)
    moe = MoEFeedForward(MOE)
    moe.load_state_dict(moe_model.trf_blocks[0].ff.state_dict())
    out = moe_hf.model.layers[0].mlp(x)
    torch.testing.assert_close(moe(x), out[0] if isinstance(out, tuple) else out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cfg", [QWEN_CONFIG_06_B, QWEN3_CONFIG_30B_A3B], ids=["0.6b", "30b-a3b"])
def test_published_configs_count_as_transformers_builds_them(cfg):
    # Both on the meta device: shapes only. The book's models have their own head (untied), as hf_qwen3's.
    with torch.device("meta"):
        hf = hf_qwen3(cfg)
    assert count_parameters(gpt_config(cfg, norm_eps=1e-6)) == sum(p.numel() for p in hf.parameters())


def test_load_refuses_a_wrong_shape_or_a_missing_tensor():
    model, hf = loaded(BASE)
    state = hf_state_dict(hf)
    state["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="Shape mismatch in tensor 'model.layers.0.self_attn.q_proj.weight'"):
        load_weights_into_qwen(model, BASE, state)
    del state["model.layers.0.self_attn.q_proj.weight"]
    with pytest.raises(UsageError, match="'model.layers.0.self_attn.q_proj.weight' is missing"):
        load_weights_into_qwen(model, BASE, state)
    with pytest.raises(UsageError, match="param_config: n_layers=3 but the model has 2"):
        load_weights_into_qwen(model, {**BASE, "n_layers": 3}, hf_state_dict(hf))


@pytest.fixture(scope="module")
def qwen_tokenizer_json(tmp_path_factory):
    """A small byte-level BPE with Qwen's special tokens, saved as a tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["Give me a short introduction to large language models.\n"] * 50 +
                            ["user assistant think"] * 50, trainer)
    tok.add_tokens(["<think>", "</think>"])
    path = tmp_path_factory.mktemp("qwen") / "tokenizer.json"
    tok.save(str(path))
    return path, tok


def test_tokenizer_wraps_the_chat_format_and_keeps_special_tokens(qwen_tokenizer_json):
    path, reference = qwen_tokenizer_json
    prompt = "Give me a short introduction to large language models."
    ids = lambda text: reference.encode(text, add_special_tokens=False).ids  # noqa: E731
    special = {t: reference.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")}

    chat = Qwen3Tokenizer(str(path), add_generation_prompt=True, add_thinking=False)
    expected = ([special["<|im_start|>"]] + ids("user\n" + prompt) + [special["<|im_end|>"]] + ids("\n")
                + [special["<|im_start|>"]] + ids("assistant\n<think>\n\n</think>\n\n"))
    assert chat.encode(prompt) == expected
    assert chat.decode(expected) == (f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
                                     "<think>\n\n</think>\n\n")
    assert chat.eos_token_id == special["<|im_end|>"] and chat.pad_token_id == special["<|endoftext|>"]
    assert chat.encode("<|im_end|>") == [special["<|im_end|>"]]

    base = Qwen3Tokenizer(str(path), repo_id="Qwen/Qwen3-0.6B-Base", apply_chat_template=False)
    assert base.encode(prompt) == ids(prompt)
    assert base.eos_token_id == special["<|endoftext|>"]
    with pytest.raises(UsageError, match="is not a file"):
        Qwen3Tokenizer(str(path.parent / "missing.json"))

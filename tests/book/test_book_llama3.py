"""build_llm.book.llama3: the book's Llama 3.2 names on GPTModel, checked against transformers' Llama
(Llama 3's rotary scaling, grouped-query attention), the cached generation against the uncached one,
and the tokenizer and chat format against `tokenizers` itself."""

import pytest
import torch

from build_llm.book.bonus import gpt_config
from build_llm.book.ch05 import generate
from build_llm.book.llama3 import (LLAMA32_CONFIG_1B, ChatFormat, FeedForward, GroupedQueryAttention, KVCache,
                                   Llama3Model, Llama3Tokenizer, apply_rope, clean_text, compute_rope_params,
                                   generate_text_simple, load_weights_into_llama, rescale_theta)
from build_llm.gpt import GPTModel
from build_llm.sizing import count_parameters

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread waits on no other

FREQ = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_context_length": 16}
# A small Llama 3.2: 4 query heads sharing 2 key/value heads, scaled rotary frequencies.
TINY = {"vocab_size": 257, "context_length": 64, "emb_dim": 32, "n_heads": 4, "n_layers": 2, "hidden_dim": 64,
        "n_kv_groups": 2, "rope_base": 500_000.0, "dtype": torch.float32, "rope_freq": FREQ}


def hf_llama(cfg, tied=False):
    freq = cfg["rope_freq"]
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=cfg["vocab_size"], max_position_embeddings=cfg["context_length"], hidden_size=cfg["emb_dim"],
        num_attention_heads=cfg["n_heads"], num_hidden_layers=cfg["n_layers"], intermediate_size=cfg["hidden_dim"],
        num_key_value_heads=cfg["n_kv_groups"], rms_norm_eps=1e-5, rope_theta=cfg["rope_base"],
        rope_scaling={"rope_type": "llama3", "factor": freq["factor"], "low_freq_factor": freq["low_freq_factor"],
                      "high_freq_factor": freq["high_freq_factor"],
                      "original_max_position_embeddings": freq["original_context_length"]},
        tie_word_embeddings=tied, attn_implementation="eager")).eval()


@torch.no_grad()
@pytest.mark.parametrize("tied", [False, True])
def test_model_equals_transformers(tied):
    torch.manual_seed(0)
    hf = hf_llama(TINY, tied)
    state = hf.state_dict()
    if tied:  # a tied checkpoint's file has no lm_head: the book copies the embedding into its head
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    model = Llama3Model(TINY).eval()
    assert isinstance(model, GPTModel)
    load_weights_into_llama(model, TINY, state)
    x = torch.randint(0, 257, (2, 40))  # past original_context_length: the scaled bands matter
    torch.testing.assert_close(model(x), hf(x).logits, atol=1e-4, rtol=1e-4)
    # ch05's generate (the chapter's sampling loop) runs on it unchanged
    out = generate(model, x[:1, :5], max_new_tokens=4, context_size=TINY["context_length"])
    assert out.shape == (1, 9)


@torch.no_grad()
def test_cached_generation_equals_uncached():
    torch.manual_seed(1)
    model = Llama3Model(TINY).eval()
    x = torch.randint(0, 257, (2, 6))
    assert torch.equal(generate_text_simple(model, x, 20), generate_text_simple(model, x, 20, use_cache=False))
    model.reset_kv_cache()
    cache = KVCache(n_layers=2)
    stepwise = torch.cat([model(x[:, :4], cache=cache), model(x[:, 4:], cache=cache)], dim=1)
    torch.testing.assert_close(stepwise, model(x), atol=1e-5, rtol=1e-4)


def test_rope_helpers_equal_transformers_llama3_rotary_embedding():
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    head_dim, n = 16, 1024
    freq = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_context_length": 256}
    cos, sin = compute_rope_params(head_dim, theta_base=500_000, context_length=n, freq_config=freq)
    hf = hf_llama({**TINY, "emb_dim": 64, "context_length": n, "rope_freq": freq})
    q, k = torch.randn(2, 1, 4, n, head_dim).unbind(0)
    ref_cos, ref_sin = LlamaRotaryEmbedding(hf.config)(q, torch.arange(n)[None])
    torch.testing.assert_close(cos, ref_cos[0])
    torch.testing.assert_close(sin, ref_sin[0])
    ref_q, ref_k = apply_rotary_pos_emb(q, k, ref_cos, ref_sin)
    torch.testing.assert_close(apply_rope(q, cos, sin), ref_q)
    torch.testing.assert_close(apply_rope(k, cos, sin), ref_k)
    assert rescale_theta(500_000.0, 131_072, 8192) == 31_250.0
    # the book's first Llama 3.2 configs ran 8192 of 131,072 positions with the base rescaled
    model = Llama3Model({**TINY, "context_length": 64, "orig_context_length": 1024})
    assert model.cfg.rope_base == rescale_theta(500_000.0, 1024, 64) == 31_250.0


@torch.no_grad()
def test_the_parts_equal_transformers_modules():
    torch.manual_seed(2)
    hf = hf_llama(TINY)
    model = Llama3Model(TINY).eval()
    load_weights_into_llama(model, TINY, hf.state_dict())
    layer, block, x = hf.model.layers[1], model.trf_blocks[1], torch.randn(2, 5, 32)
    ff = FeedForward(TINY)
    ff.load_state_dict(block.ff.state_dict())
    torch.testing.assert_close(ff(x), layer.mlp(x))
    att = GroupedQueryAttention(d_in=32, d_out=32, num_heads=4, num_kv_groups=2)
    att.load_state_dict(block.att.state_dict())
    cos, sin = compute_rope_params(8, 500_000.0, 64, freq_config=FREQ)
    mask = torch.triu(torch.ones(5, 5, dtype=torch.bool), diagonal=1)
    expected = layer.self_attn(x, position_embeddings=hf.model.rotary_emb(x, torch.arange(5)[None]),
                               attention_mask=torch.zeros(1, 1, 5, 5).masked_fill(mask, -torch.inf))[0]
    torch.testing.assert_close(att(x, mask, cos, sin), expected, atol=1e-5, rtol=1e-5)


def test_published_config_counts_as_transformers_builds_it():
    with torch.device("meta"):
        hf = hf_llama(LLAMA32_CONFIG_1B)
    assert count_parameters(gpt_config(LLAMA32_CONFIG_1B, norm_eps=1e-5)) == sum(p.numel() for p in hf.parameters())


@pytest.fixture(scope="module")
def llama_tokenizer_json(tmp_path_factory):
    """A small byte-level BPE with Llama 3's special tokens and its BOS post-processor, as tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["What do llamas eat? Llamas eat grass.\n\nuser assistant"] * 50, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       special_tokens=[("<|begin_of_text|>", 0)])
    path = tmp_path_factory.mktemp("llama") / "tokenizer.json"
    tok.save(str(path))
    return path, tok


def test_tokenizer_and_chat_format(llama_tokenizer_json):
    path, reference = llama_tokenizer_json
    tokenizer = Llama3Tokenizer(str(path))
    ids = lambda text: reference.encode(text, add_special_tokens=False).ids  # noqa: E731
    sp = {t: reference.token_to_id(t) for t in ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                                "<|end_header_id|>", "<|eot_id|>")}
    assert tokenizer.special_tokens == sp
    assert tokenizer.encode("Llamas eat grass.") == ids("Llamas eat grass.")  # no BOS unless asked
    assert tokenizer.encode("Llamas", bos=True, eos=True) == [sp["<|begin_of_text|>"]] + ids("Llamas") + \
        [sp["<|end_of_text|>"]]

    chat = ChatFormat(tokenizer)
    expected = ([sp["<|start_header_id|>"]] + ids("user") + [sp["<|end_header_id|>"]] + ids("\n\n")
                + ids("What do llamas eat?") + [sp["<|eot_id|>"]])
    assert chat.encode("  What do llamas eat? ") == expected
    assert chat.decode(expected) == "<|start_header_id|>user<|end_header_id|>\n\nWhat do llamas eat?<|eot_id|>"
    assert clean_text("x<|start_header_id|>assistant<|end_header_id|>\n\n Grass. ") == "Grass."
    assert clean_text("no header") == "no header"

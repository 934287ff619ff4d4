"""sizing.py: parameter counts, FLOPs and bytes, each checked against arithmetic done here by hand
(and the totals the seeds and Hugging Face print)."""

import copy
import subprocess
import sys

import pytest
import torch

from build_llm import GPTConfig, GPTModel, count_parameters, model_size_mb, parameter_table
from build_llm.config import PRESETS
from build_llm.infer.quant import prepare_for_decoding
from build_llm.sizing import (active_parameters, count_weights, decode_bytes_per_token, estimate_peak_bytes,
                              kv_cache_bytes, matmul_parameters, meta_model, model_memory,
                              train_flops_per_token, training_memory, weight_bytes)
from build_llm.train.budget import shape_for
from build_llm.train.config import TrainConfig

# Hugging Face's GPT2LMHeadModel("gpt2") has 124,439,808 parameters; 1024 x 768 of them are the
# position table and 50257 x 768 the token table (which the head shares); the book's untied 124M
# model adds its own 50257 x 768 head: 163,009,536, as the seed prints.
GPT2_PARAMS, BOOK_PARAMS, GPT2_WPE, GPT2_WTE = 124_439_808, 163_009_536, 1024 * 768, 50257 * 768


# Parameter counts from exact arithmetic on each architecture (and the seeds' printed totals).
def expected_count(c: GPTConfig) -> int:
    E, V, L, F = c.emb_dim, c.vocab_size, c.n_layers, c.ff_hidden
    Q, KV = c.n_heads * c.head_dim, c.kv_heads * c.head_dim  # query and key/value widths
    attn = E * Q + 2 * E * KV + Q * E + (Q + 2 * KV if c.qkv_bias else 0) + (E if c.bias else 0)
    attn += 2 * c.head_dim if c.qk_norm else 0
    gated = c.mlp in ("swiglu", "geglu")
    ff = (3 if gated else 2) * E * F + ((2 * F if gated else F) + E if c.bias else 0)
    norm = 2 * E if c.bias and c.norm == "layernorm" else E
    norms = (4 if c.post_norms else 2) * norm
    head = 0 if c.tie_weights else V * E
    table = c.context_length * E if c.pos_emb == "learned" else 0
    return V * E + table + L * (attn + ff + norms) + norm + head


@pytest.mark.parametrize("name", sorted(n for n in PRESETS if not PRESETS[n].get("n_experts")))
def test_parameter_count_of_every_dense_preset(name):  # (and against transformers: tests/test_config.py)
    cfg = GPTConfig.from_preset(name)
    with torch.device("meta"):
        model = GPTModel(cfg)
    assert count_parameters(model) == expected_count(cfg)
    assert count_parameters(cfg) == expected_count(cfg)  # a config is counted on the meta device


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


def test_trainable_only_counts_what_requires_grad():
    model = GPTModel(GPTConfig.from_preset("r-abc"))
    for p in model.trf_blocks.parameters():
        p.requires_grad = False
    frozen = sum(p.numel() for p in model.trf_blocks.parameters())
    assert count_parameters(model, trainable_only=True) == 400_128 - frozen


def test_matmul_parameters_leave_out_the_lookup_tables():
    assert matmul_parameters(GPTConfig.from_preset("gpt2-small")) == GPT2_PARAMS - GPT2_WPE  # tied: the head's
    assert matmul_parameters(GPTConfig.from_preset("book-124m")) == BOOK_PARAMS - GPT2_WPE - GPT2_WTE


def test_training_flops_follow_the_palm_formula():
    # PaLM appendix B: 6N + 12 * L * H * Q * T; gpt2-small: 12 layers of 12 heads x 64 channels, T = 1024.
    n = GPT2_PARAMS - GPT2_WPE
    assert train_flops_per_token(GPTConfig.from_preset("gpt2-small")) == 6 * n + 12 * 12 * 1024 * 768
    assert train_flops_per_token(GPTConfig.from_preset("gpt2-small")) == 6 * n + 12 * 12 * 12 * 64 * 1024


def test_decoding_reads_every_weight_but_the_lookup_tables():
    model = meta_model(GPTConfig.from_preset("gpt2-small"))
    assert decode_bytes_per_token(model) == 4 * (GPT2_PARAMS - GPT2_WPE)
    book = meta_model(GPTConfig.from_preset("book-124m"))  # untied: its token table is only looked up
    assert decode_bytes_per_token(book) == 4 * (163_009_536 - GPT2_WPE - 50257 * 768)


def test_decoding_weights_count_in_the_dtype_they_are_held_in():
    """int8 decoding weights: every Linear weight in 1 byte plus a float32 scale per row; the head
    becomes its own int8 copy, so the token table is then only looked up."""
    torch.manual_seed(0)
    cfg = GPTConfig.from_preset("gpt2-small", vocab_size=300, context_length=32, emb_dim=64, n_heads=4, n_layers=2)
    model = GPTModel(cfg).eval()
    n = count_parameters(model)
    assert count_weights(model) == n and weight_bytes(model) == 4 * n  # the causal masks are not weights
    q = prepare_for_decoding(copy.deepcopy(model), "int8")
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    weights, rows = sum(m.weight.numel() for m in linears), sum(m.out_features for m in linears)
    table, positions = 300 * 64, 32 * 64
    assert count_weights(q) == n + table + rows  # the head's own copy, one scale per row
    assert weight_bytes(q) == 4 * n - 4 * (weights - table) + weights + 4 * rows
    assert decode_bytes_per_token(q) == weight_bytes(q) - 4 * (table + positions)
    assert decode_bytes_per_token(model) == 4 * (n - positions)  # tied: the table is read whole as the head
    # int4: two weights a byte (uint8) and a bfloat16 scale per group of 64 (every width here is a multiple of 64)
    q4 = prepare_for_decoding(copy.deepcopy(model), "int4")
    assert count_weights(q4) == n + table + weights // 64
    assert weight_bytes(q4) == 4 * n - 4 * (weights - table) + weights // 2 + 2 * (weights // 64)
    assert decode_bytes_per_token(q4) == weight_bytes(q4) - 4 * (table + positions)


def test_memory_of_a_model_and_its_cache():
    cfg = GPTConfig.from_preset("gpt2-small")
    assert model_memory(cfg) == 4 * GPT2_PARAMS  # no causal-mask buffers (they were 12 x 1024 x 1024 bytes)
    assert model_memory(cfg, torch.bfloat16) == 2 * GPT2_PARAMS
    assert kv_cache_bytes(cfg) == 2 * 12 * 1024 * 768 * 4  # a key and a value per layer, position, channel
    assert kv_cache_bytes(cfg, batch_size=3, dtype=torch.bfloat16) == 3 * 2 * 12 * 1024 * 768 * 2


def test_grouped_query_attention_caches_only_the_key_value_heads():
    cfg = GPTConfig(emb_dim=64, n_heads=8, n_kv_heads=2, head_size=16, n_layers=3, context_length=32)
    assert kv_cache_bytes(cfg) == 2 * 3 * 32 * (2 * 16) * 4
    cache = GPTModel(cfg).new_cache(1)
    assert kv_cache_bytes(cfg) == cache.k.numel() * 4 + cache.v.numel() * 4


def test_a_long_context_model_holds_no_context_squared_buffer():
    """30 layers at context 8192 held 30 x 8192 x 8192 bytes (1.9 GiB) of causal masks; now none."""
    cfg = GPTConfig(emb_dim=64, n_heads=4, n_layers=30, context_length=8192, vocab_size=100)
    assert not list(meta_model(cfg).buffers())
    assert model_memory(cfg) == 4 * count_parameters(cfg)


def test_training_memory_is_weights_four_times_and_the_batches():
    """The lower bound checked before training: weights, gradients and two moments in fp32, the
    validation windows (int64), a step's inputs and targets (int64) and one micro-batch's logits
    and their gradient (fp32)."""
    cfg = GPTConfig.from_preset("r-abc")  # 400,128 parameters, vocab 5, context 16
    train = TrainConfig(batch_size=4, eval_batches=2, grad_accum=3)
    weights = 4 * 4 * 400_128
    assert training_memory(cfg, train) == weights + 4 * 2 * 8 + 4 * 3 * 16 * 16 + 2 * 4 * 16 * 5 * 4


@pytest.mark.slow  # two training children
def test_memory_estimate_is_within_25_percent_of_a_measured_peak(tmp_path):
    """Peak RSS of a child that trains a small model a few steps, against the estimate."""
    cfg = shape_for(4, 128, 64, 65)
    code = f"""
import resource
import torch
from build_llm.config import GPTConfig
from build_llm.gpt import GPTModel
from build_llm.train.loop import TrainConfig, make_optimizer, train_step
from build_llm.train.distributed import Dist
torch.set_num_threads(1)
cfg = GPTConfig.from_dict({cfg.to_dict()!r})
model = GPTModel(cfg)
tc = TrainConfig(batch_size=64)
opt = make_optimizer(model, tc, torch.device("cpu"))
for _ in range(3):
    x = torch.randint(0, 65, (64, 64)); train_step(model, opt, [(x, x)], torch.device("cpu"), tc, Dist())
# VmHWM: this process's own peak. ru_maxrss would keep the parent's peak across the exec of a vfork'd child.
hwm = [int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:")]
print(hwm[0] if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""
    # The smaller of two children's peaks (a busy machine may delay a child's frees).
    peak = min(int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
               for _ in range(2))
    estimate = estimate_peak_bytes(cfg, 64)
    assert abs(estimate - peak) / peak < 0.25, (estimate / 2**20, peak / 2**20)


def test_a_mixture_of_experts_counts_every_expert_but_a_token_uses_k():
    # Two blocks of 6 experts (2 per token), each 3 matrices of 32 x 24, a 32 x 6 router, rotary, untied.
    cfg = GPTConfig(vocab_size=64, context_length=16, emb_dim=32, n_heads=4, n_layers=2, bias=False,
                    pos_emb="rope", norm="rmsnorm", mlp="swiglu", n_experts=6, n_experts_per_token=2, moe_ff_dim=24)
    per_block = 4 * 32 * 32 + 32 * 6 + 6 * 3 * 32 * 24 + 2 * 32  # attention, router, experts, two norms
    total = 2 * 64 * 32 + 2 * per_block + 32  # token table, head, blocks, final norm
    assert count_parameters(cfg) == total
    assert active_parameters(cfg) == total - 2 * 4 * 3 * 32 * 24  # 4 experts per block idle
    assert matmul_parameters(cfg) == active_parameters(cfg) - 64 * 32  # less the token table
    dense = cfg.replace(n_experts=0)
    assert active_parameters(dense) == count_parameters(dense)


def test_the_131072_token_llama_preset_builds_and_runs_without_context_squared_memory():
    """llama-3.2-1b's context with a narrow model: a real (allocated) model, one forward and a cached
    step; nothing in it or its state dict grows with the context squared (a bool mask would be 16 GiB)."""
    cfg = GPTConfig.from_preset("llama-3.2-1b", n_layers=2, emb_dim=64, n_heads=4, n_kv_heads=2, ff_dim=128,
                                vocab_size=100)
    assert cfg.context_length == 131072
    model = GPTModel(cfg).eval()
    assert not list(model.buffers()) and not [k for k in model.state_dict() if k.endswith("mask")]
    cache = model.new_cache(1, 64)
    with torch.no_grad():
        full = model(torch.arange(17)[None] % 100)
        model(torch.arange(16)[None] % 100, cache)
        step = model(torch.tensor([[16]]), cache)
    torch.testing.assert_close(step[:, -1], full[:, -1], atol=1e-5, rtol=0)

"""int8, int4 and bf16 decoding weights: the quantisation arithmetic, the layer and whole models."""

import copy
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from build_llm import GPTConfig, GPTModel
from build_llm.attention import KVCache
from build_llm.book.appendix_e import replace_linear_with_lora
from build_llm.cli import main
from build_llm.data.tokenizer import CharTokenizer
from build_llm.errors import UsageError
from build_llm.infer import kernels
from build_llm.infer.generate import generate
from build_llm.infer.quant import (PREFILL_ROWS, CompiledStep, DecodeLinear, DecodeMoE, prepare_for_decoding,
                                   quantize_int4, quantize_int8)
from build_llm.lora import apply_lora
from build_llm.sizing import weight_bytes
from build_llm.store.checkpoint import save_checkpoint
from tiny import int8_groups_bound

# int4's kernels round each product's input to int8 per group of 64 columns: at most half a step, 1/254 of the
# group's largest input, on each (tiny.int8_groups_bound), where PyTorch's modules multiply float32 inputs, and two
# float32 computations of the same input may round it a step apart. Through a tiny model's products in series (4 a
# layer, 2 layers, the head; 2 in a mixture) that stays within 2% of the largest output (seen: under 1%).
INT4_INPUTS = 0.02


def tiny(**kw) -> GPTModel:
    torch.manual_seed(0)
    cfg = GPTConfig.from_preset("gpt2-small", **{"vocab_size": 300, "context_length": 32, "emb_dim": 64,
                                                 "n_heads": 4, "n_layers": 2, **kw})
    return GPTModel(cfg).eval()


def test_per_channel_int8_rounds_each_row_to_its_own_grid():
    torch.manual_seed(0)
    w = torch.randn(5, 40) * torch.tensor([[1e-3], [1.0], [30.0], [0.0], [2.0]])
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and q.shape == w.shape and scale.shape == (5,)
    rows = w.abs().amax(1)
    torch.testing.assert_close(scale[rows > 0], rows[rows > 0] / 127, rtol=2**-8, atol=0)  # bf16-rounded
    assert torch.equal(scale, scale.bfloat16().float())
    assert (q.abs().amax(1)[rows > 0] >= 126).all()  # each row's largest weight uses the full range
    assert (q[3] == 0).all()  # an all-zero row stays zero
    err = (q.float() * scale[:, None] - w).abs()
    assert (err <= scale[:, None] * 0.51).all()  # round to nearest: at most half a step
    exact = torch.tensor([[-127.0, 0.0, 5.0, 127.0]]) * 0.25  # already on the grid: no error at all
    q2, s2 = quantize_int8(exact)
    assert torch.equal(q2.float() * s2[:, None], exact)
    with pytest.raises(ValueError, match="2-D"):
        quantize_int8(torch.ones(3))


def test_int4_gives_each_group_its_own_scale_with_its_largest_weight_on_minus_8():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 100, generator=g) * torch.logspace(-3, 1, 6)[:, None]  # rows of very different ranges
    w[2, 64:] = 0.0  # an all-zero group stays zero
    q, scale = quantize_int4(w, 32)
    assert q.shape == (6, 100) and scale.shape == (6, 4) and scale.dtype == torch.bfloat16
    assert q.min() >= -8 and q.max() <= 7
    padded = torch.nn.functional.pad(w, (0, 28)).view(6, 4, 32)
    extreme = padded.gather(2, padded.abs().argmax(2, keepdim=True))[..., 0]  # each group's signed largest weight
    nonzero = extreme != 0
    torch.testing.assert_close(scale.float()[nonzero], extreme[nonzero] / -8, rtol=2**-8, atol=0)  # bf16-rounded
    assert (q[2, 64:] == 0).all()
    deq = q.float() * scale.float().repeat_interleave(32, dim=1)[:, :100]
    step = scale.float().abs().repeat_interleave(32, dim=1)[:, :100]
    err = (deq - w).abs()
    assert (err[q < 7] <= step[q < 7] * 0.5 * (1 + 2**-7)).all()  # round to nearest on the group's grid
    assert (err <= step * (1 + 2**-7)).all()  # +8 steps (the far end, opposite the largest weight) clamps to 7
    with pytest.raises(ValueError, match="2-D"):
        quantize_int4(torch.ones(3))


def dequantised_twin(model: GPTModel, low: GPTModel) -> GPTModel:
    """A float32 GPTModel (PyTorch's modules, no kernels) whose every Linear holds `low`'s dequantised weights."""
    twin = copy.deepcopy(model)
    twin.out_head.weight = nn.Parameter(low.out_head.dequantized())  # untied, as `low`'s head is
    for ours, theirs in zip(twin.modules(), low.modules()):
        if isinstance(ours, nn.Linear) and ours is not twin.out_head:
            ours.weight.data = theirs.dequantized()
    return twin


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_low_bit_generation_equals_pytorch_on_the_dequantised_weights(dtype):
    model = tiny()
    with torch.no_grad():
        model.out_head.weight.mul_(10)  # sharper logits: no near ties between the two sides' float rounding
    low = prepare_for_decoding(copy.deepcopy(model), dtype)
    twin = dequantised_twin(model, low)
    prompt = torch.randint(0, 300, (3, 5), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        ref = twin(prompt)
        tol = INT4_INPUTS if dtype == "int4" else 1e-4
        torch.testing.assert_close(low(prompt), ref, atol=tol * ref.abs().max().item(), rtol=0)
    assert torch.equal(generate(low, prompt, 20), generate(twin, prompt, 20))


@pytest.mark.skipif(not kernels.available(), reason="without the kernels PyTorch's float products carry the NaN")
@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_a_nan_activation_reaches_the_logits_and_generate_reports_it(dtype):
    """A damaged float weight (one of a LayerNorm's) puts a NaN into a product's input: the kernels' rounding of
    that input to integers must keep it (it gave finite numbers), so decoding stops with the NaN error rather than
    go on with finite logits."""
    low = prepare_for_decoding(tiny(), dtype)
    with torch.no_grad():
        low.trf_blocks[1].norm2.scale[3] = float("nan")  # the feed-forward's input: the residual stream stays finite
    with pytest.raises(UsageError, match="NaN"):
        generate(low, torch.tensor([[1, 2, 3]]), 3)  # 3 rows: the prompt and each step through the kernels


def test_int8_linear_is_the_dequantised_linear():
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    layer = DecodeLinear.from_linear(linear, "int8")
    x = torch.randn(3, 5, 64)
    q, scale = quantize_int8(linear.weight)
    reference = x @ (q.float() * scale[:, None]).T + linear.bias  # exact float maths on the int8 weights
    out = layer(x)
    assert out.shape == (3, 5, 48) and out.dtype == torch.float32
    torch.testing.assert_close(out, reference, atol=0.03, rtol=0.02)  # bf16 activations (without the kernels): ~3 digits
    torch.testing.assert_close(layer.dequantized(), q.float() * scale[:, None])


def test_int8_model_replaces_every_linear_and_unties_the_head():
    model = tiny()
    assert model.out_head.weight is model.tok_emb.weight
    fp32_bytes = weight_bytes(model)
    q = prepare_for_decoding(copy.deepcopy(model), "int8")
    assert not any(isinstance(m, nn.Linear) for m in q.modules())
    assert isinstance(q.out_head, DecodeLinear) and q.tok_emb.weight.dtype == torch.float32
    # Linear weights go from 4 bytes to 1 plus a float32 scale per row; the head is now its own int8
    # copy beside the float32 token table; biases and norms are unchanged.
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    weights, rows = sum(m.weight.numel() for m in linears), sum(m.out_features for m in linears)
    table = model.tok_emb.weight.numel()
    assert weight_bytes(q) == fp32_bytes - 4 * (weights - table) + weights + 4 * rows
    b = prepare_for_decoding(copy.deepcopy(model), "bfloat16")  # on the CPU: bfloat16 Linear weights only
    assert weight_bytes(b) == fp32_bytes - 4 * (weights - table) + 2 * weights


@pytest.mark.parametrize("dtype, tol", [("bfloat16", 0.02), ("int8", 0.03)])  # int4: see the dequantised twin
def test_decoding_dtypes_keep_logits_and_greedy_tokens(dtype, tol):
    model = tiny()
    idx = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    ref = model(idx)
    low = prepare_for_decoding(copy.deepcopy(model), dtype)
    out = low(idx).float()
    assert (out - ref).abs().max() < tol * ref.abs().max()
    top2 = ref.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 4 * tol * ref.abs().max()  # positions without a near tie
    assert torch.equal(out.argmax(-1)[clear], ref.argmax(-1)[clear]) and clear.sum() > 10
    assert generate(low, idx[:1, :4], 8).shape == (1, 12)


def test_prepare_for_decoding_rejects_an_unknown_dtype():
    with pytest.raises(ValueError, match="dtype='int2' is invalid; expected one of float32, bfloat16, int8, int4"):
        prepare_for_decoding(tiny(), "int2")


@pytest.mark.parametrize("dtype", ["bfloat16", "int8", "int4"])
def test_generate_cli_decodes_with_the_chosen_weights(dtype, tmp_path, capsys):
    tok = CharTokenizer.from_text("abcdefgh ")
    model = tiny(vocab_size=tok.vocab_size)
    save_checkpoint(tmp_path / "ckpt", model, tok)
    assert main(["generate", "--checkpoint", str(tmp_path / "ckpt"), "--prompt", "abc", "--max-new-tokens", "12",
                 "--dtype", dtype, "--greedy"]) == 0
    expected = generate(prepare_for_decoding(copy.deepcopy(model), dtype), torch.tensor([tok.encode("abc")]), 12)
    assert capsys.readouterr().out == tok.decode(expected[0].tolist()) + "\n"


# --- today's open models' options ------------------------------------------------------------------------
NEW_FAMILY = {
    "gqa-window": dict(n_kv_heads=2, sliding_window=5, head_size=24),  # GPT-2's norms and MLP, Mistral's attention
    "qwen3-like": dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False, qkv_bias=False, qk_norm=True,
                       n_kv_heads=1, head_size=32),
    "gemma3-like": dict(pos_emb="rope", norm="rmsnorm", mlp="geglu", bias=False, qkv_bias=False, qk_norm=True,
                        norm_plus_one=True, scale_emb=True, post_norms=True, attn_scale=0.2, n_kv_heads=2,
                        sliding_window=4, layer_types=("sliding", "full"), rope_local_base=100.0),
}


# --- the compiled one-token step (kernels.decode_step) ----------------------------------------------
needs_kernels = pytest.mark.skipif(not kernels.available(),
                                   reason="the C kernels need Linux x86-64 and a C compiler")


def modules_only(model: GPTModel) -> GPTModel:
    """The same prepared model, decoding through its PyTorch modules (the independent reference), its KV caches of
    the compiled step's dtype (bfloat16): both read the keys and values rounded alike."""
    plain = copy.deepcopy(model)
    plain.decode_step = None
    plain.cache_dtype = model.cache_dtype
    return plain


# Today's open models' shapes the compiled step computes (tiny): Llama 3 (grouped heads, llama3-scaled rotary
# positions, SwiGLU; a fused and a split qkv), Qwen3 (QK-norm, a head size apart from emb_dim / n_heads), Gemma 3
# (GeGLU, (1 + w) norms, norms after the sub-layers, scaled embeddings, a 4-token window on its local layer with its
# own rotary base), Mistral (a sliding window on every layer), Qwen3-MoE (4 experts, 2 a token, their weights
# renormalised or not; 42 rows an expert: padded to 44 in the stacked projections). Heads of 16 and 32 channels
# take the AVX2 attention where the CPU has it (8 positions at a time: positions 6 .. 25 cross its groups).
LLAMA = dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False, qkv_bias=False, n_kv_heads=2, rope_base=500.0,
             rope_scaling="llama3", rope_factor=8.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
             rope_original_context=16)
STEP_SHAPES = {
    "gpt2": {},
    "gpt2-split": {"fused_qkv": False, "qkv_bias": False, "bias": False, "gelu": "exact"},
    "llama3": LLAMA,
    "llama3-split": dict(LLAMA, fused_qkv=False, n_kv_heads=1),
    "qwen3": dict(NEW_FAMILY["qwen3-like"], fused_qkv=False, ln_eps=1e-6),
    "gemma3": dict(NEW_FAMILY["gemma3-like"], fused_qkv=False, gelu="tanh"),
    "mistral": dict(LLAMA, rope_scaling="none", sliding_window=5),
    "heads-of-12": dict(n_kv_heads=2, head_size=12),  # a head size that is no multiple of 8: the portable attention
    "heads-of-72": dict(n_kv_heads=1, head_size=72),  # the AVX2 attention's 64 channels at a time, then 8
}
QWEN3_MOE = dict(STEP_SHAPES["qwen3"], n_experts=4, n_experts_per_token=2, moe_ff_dim=42, moe_norm_topk=True)
STEP_SHAPES.update({"qwen3-moe": QWEN3_MOE, "qwen3-moe-unnormed": dict(QWEN3_MOE, moe_norm_topk=False, moe_ff_dim=32)})


@needs_kernels
@pytest.mark.parametrize("dtype", ["bfloat16", "int8", "int4"])
@pytest.mark.parametrize("shape", sorted(STEP_SHAPES))
def test_compiled_step_computes_what_the_modules_compute(dtype, shape):
    kw = STEP_SHAPES[shape]
    model = prepare_for_decoding(tiny(**kw), dtype)
    assert isinstance(model.decode_step, CompiledStep)
    plain = modules_only(model)
    gen = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, 300, (5, 6), generator=gen)  # 5 rows: a group of 4 in the kernels, then one
    caches = [model.new_cache(5), plain.new_cache(5)]
    assert caches[0].k.dtype == caches[1].k.dtype == torch.bfloat16
    with torch.inference_mode():
        for m, cache in zip((model, plain), caches):
            m(prompt, cache=cache)
        for step in range(20):  # rows at positions 6 .. 25, every one a single C call on one side
            ids = torch.randint(0, 300, (5, 1), generator=gen)
            fast, ref = model(ids, cache=caches[0]), plain(ids, cache=caches[1])
            assert fast.shape == ref.shape == (5, 1, 300)
            torch.testing.assert_close(fast, ref, atol=(INT4_INPUTS if dtype == "int4" else 2e-4) * ref.abs().max().item(),
                                       rtol=0)
    assert caches[0].pos == caches[1].pos == 26
    for fast, ref in ((caches[0].k, caches[1].k), (caches[0].v, caches[1].v)):  # the keys and values it wrote
        fast, ref = fast.float(), ref.float()  # each side's float32 key rounded to bfloat16: at most one step apart
        torch.testing.assert_close(fast, ref, atol=(INT4_INPUTS if dtype == "int4" else 2**-7) * ref.abs().max().item(),
                                   rtol=0)
    assert torch.equal(generate(model, prompt, 12), generate(plain, prompt, 12))


@needs_kernels
@pytest.mark.parametrize("dtype, shape", [("int8", "gpt2"), ("int4", "gpt2"), ("bfloat16", "llama3"),
                                          ("int8", "qwen3"), ("int8", "gemma3"), ("int8", "qwen3-moe"),
                                          ("int4", "qwen3-moe-unnormed")])
def test_compiled_step_takes_a_position_per_row_and_refuses_what_is_out_of_range(dtype, shape):
    model = prepare_for_decoding(tiny(**STEP_SHAPES[shape]), dtype)
    assert isinstance(model.decode_step, CompiledStep)
    plain = modules_only(model)
    prompts = [torch.randint(0, 300, (1, n), generator=torch.Generator().manual_seed(n)) for n in (3, 9)]
    k, v = (torch.zeros(2, 2, 4, 32, 16, dtype=torch.bfloat16) for _ in range(2))  # (layers, rows, heads, max_len, head_dim)
    if shape != "gpt2":  # the model's own cache shape: (layers, rows, kv_heads, max_len, head_dim)
        k, v = (torch.zeros_like(t) for t in (model.new_cache(2).k, model.new_cache(2).v))
    for row, p in enumerate(prompts):  # each row's prompt into its own slot
        model(p, cache=KVCache.over(k[:, row:row + 1], v[:, row:row + 1], 0))
    pos = torch.tensor([3, 9])
    with torch.inference_mode():
        both = model(torch.tensor([[7], [8]]), cache=KVCache.over(k, v, pos.clone()))[:, -1]  # (2, V)
        for row, (p, token) in enumerate(zip(prompts, (7, 8))):
            alone = plain(torch.cat([p, torch.tensor([[token]])], dim=1), cache=plain.new_cache(1))[0, -1]
            torch.testing.assert_close(both[row], alone, atol=2e-4 * alone.abs().max().item(), rtol=0)
        before = k.clone()
        with pytest.raises(IndexError, match="outside the vocabulary"):
            model(torch.tensor([[300], [1]]), cache=KVCache.over(k, v, pos.clone()))
        short = torch.zeros(2, 1, k.shape[2], 3, k.shape[4], dtype=torch.bfloat16)  # room for 3 positions
        with pytest.raises(IndexError, match="outside the KV cache"):
            model(torch.tensor([[1]]), cache=KVCache.over(short, short.clone(), 3))
        with pytest.raises(ValueError, match="contiguous in their last 3 dimensions"):
            model(torch.tensor([[1]]), cache=KVCache.over(k[:, :1, :, :3], v[:, :1, :, :3], 2))
        with pytest.raises(ValueError, match=re.escape(f"shape {tuple(k[:, :1].shape)} does not fit 2 rows")):
            model(torch.tensor([[1], [2]]), cache=KVCache.over(k[:, :1], v[:, :1], pos.clone()))
        assert torch.equal(k, before)  # nothing written


@needs_kernels
@pytest.mark.parametrize("dtype", ["int8", "bfloat16"])
def test_compiled_step_keeps_keys_and_values_rounded_to_bfloat16_as_pytorch_rounds_them(dtype):
    model = prepare_for_decoding(tiny(), dtype)
    plain = copy.deepcopy(model)
    plain.decode_step = None  # the modules, on a float32 cache: the keys and values unrounded
    prompt = torch.randint(0, 300, (3, 5), generator=torch.Generator().manual_seed(3))
    ids = torch.randint(0, 300, (3, 1), generator=torch.Generator().manual_seed(4))
    ours, ref = model.new_cache(3), plain.new_cache(3)
    assert (ours.k.dtype, ref.k.dtype) == (torch.bfloat16, torch.float32)
    with torch.inference_mode():
        for m, cache in ((model, ours), (plain, ref)):
            m(prompt, cache=cache)
            m(ids, cache=cache)  # position 5: the compiled step writes it on our side
    # The first block's: its keys and values are products of the same inputs on both sides (a later block's inputs
    # have been through attention over keys rounded on one side only). To nearest, ties to even: equal but where
    # the two sides' float32 sums straddle a rounding boundary (a truncation would differ at about half of them).
    for fast, exact in ((ours.k[0, :, :, 5], ref.k[0, :, :, 5]), (ours.v[0, :, :, 5], ref.v[0, :, :, 5])):
        assert (fast == exact.to(torch.bfloat16)).float().mean() > 0.99


@needs_kernels
def test_a_float32_cache_decodes_through_the_modules():
    model = prepare_for_decoding(tiny(), "int8")
    plain = copy.deepcopy(model)
    plain.decode_step = None
    prompt = torch.randint(0, 300, (2, 4), generator=torch.Generator().manual_seed(6))
    caches = [KVCache(2, 2, 4, 32, 16) for _ in range(2)]  # float32: not the compiled step's cache
    with torch.inference_mode():
        for m, cache in zip((model, plain), caches):
            m(prompt, cache=cache)
        assert torch.equal(model(torch.tensor([[5], [6]]), cache=caches[0]), plain(torch.tensor([[5], [6]]), cache=caches[1]))


def test_compiled_step_only_for_models_it_computes_exactly():
    model = prepare_for_decoding(tiny(mlp="relu2"), "int8")  # ReLU squared: not the step's
    assert model.decode_step is None and generate(model, torch.tensor([[1, 2]]), 4).shape == (1, 6)
    moe = tiny(**QWEN3_MOE)
    apply_lora(moe, rank=2, alpha=4, targets=["ff"])  # the experts' adapters read float32 experts: PyTorch decodes
    model = prepare_for_decoding(moe, "int8")
    assert model.decode_step is None and not isinstance(model.trf_blocks[0].ff.moe, DecodeMoE)
    assert generate(model, torch.tensor([[1, 2]]), 4).shape == (1, 6)

    adapted = tiny()
    replace_linear_with_lora(adapted, rank=2, alpha=4)  # every Linear wrapped with an adapter: not the step's
    assert prepare_for_decoding(adapted, "int8").decode_step is None
    assert generate(adapted, torch.tensor([[1, 2]]), 4).shape == (1, 6)
    assert prepare_for_decoding(tiny(), "float32").decode_step is None
    assert GPTModel.decode_step is None  # a plain model decodes through its modules


def test_int4_layer_refuses_scales_for_another_group_size():
    q, scale = quantize_int4(torch.randn(8, 100), 32)  # 4 groups a row
    assert DecodeLinear(q, scale, None, group=32).group == 32
    with pytest.raises(ValueError, match="a scale per group of `group` columns"):
        DecodeLinear(q, scale, None, group=64)  # would read 2 scales a row: garbage


def dequantized_reference(low: GPTModel, model: GPTModel) -> GPTModel:
    """`model` in float32 with each Linear's weight replaced by the one the decoding layer holds."""
    ref = copy.deepcopy(model)
    lows = dict(low.named_modules())
    with torch.no_grad():
        for name, m in ref.named_modules():
            if isinstance(m, nn.Linear):
                m.weight = nn.Parameter(lows[name].dequantized().float())
    return ref


@pytest.mark.parametrize("name", sorted(NEW_FAMILY))
@pytest.mark.parametrize("dtype", ["bfloat16", "int8", "int4"])
def test_new_family_models_decode_low_precision_weights(name, dtype, tmp_path, capsys):
    model = tiny(fused_qkv=False, **NEW_FAMILY[name])
    low = prepare_for_decoding(copy.deepcopy(model), dtype)
    assert isinstance(low.decode_step, CompiledStep)  # cached one-token steps in C, the prompt through PyTorch
    idx = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    ref = dequantized_reference(low, model)(idx)
    out = low(idx).float()
    assert (out - ref).abs().max() < 0.02 * ref.abs().max()  # int8's activations are bfloat16, nothing else differs
    cached = generate(low, idx[:1, :4], 10)
    assert torch.equal(cached, generate(low, idx[:1, :4], 10, use_cache=False))
    tok = CharTokenizer.from_text("abcdefgh ")
    small = tiny(vocab_size=tok.vocab_size, fused_qkv=False, **NEW_FAMILY[name])
    save_checkpoint(tmp_path / "ckpt", small, tok)
    assert main(["generate", "--checkpoint", str(tmp_path / "ckpt"), "--prompt", "abc", "--max-new-tokens", "12",
                 "--dtype", dtype, "--greedy"]) == 0
    expected = generate(prepare_for_decoding(copy.deepcopy(small), dtype), torch.tensor([tok.encode("abc")]), 12)
    assert capsys.readouterr().out == tok.decode(expected[0].tolist()) + "\n"


@needs_kernels
@pytest.mark.parametrize("dtype", ["bfloat16", "int8", "int4"])
def test_a_prompt_multiplies_the_dequantised_weight_and_a_few_rows_run_the_kernels(dtype):
    torch.manual_seed(0)
    layer = DecodeLinear.from_linear(nn.Linear(96, 40), dtype)
    x = torch.randn(2, PREFILL_ROWS // 2 + 1, 96)  # PREFILL_ROWS + 2 rows: float32 BLAS on the dequantised weight
    torch.testing.assert_close(layer(x), F.linear(x, layer.dequantized(), layer.bias), rtol=1e-6, atol=1e-6)
    few = x[:, :3]  # 6 rows: the kernels (int8: x rounded to 15 bits; int4: to int8 per group), the same up to that
    exact = few.double() @ layer.dequantized().double().T + layer.bias.double()
    rounding = int8_groups_bound(few.reshape(6, 96), layer.dequantized()).view(2, 3, 40) if dtype == "int4" else 0
    assert ((layer(few).double() - exact).abs() - rounding).max() < 1e-4


# --- a mixture of experts: each row through the experts its router chooses -----------------------------------
def chosen_experts(model: GPTModel, ids: torch.Tensor, cache) -> list[torch.Tensor]:
    """Each block's experts (B, k) for one step of ids (B, 1) through the modules (which advance `cache`)."""
    chosen = []
    hooks = [b.ff.register_forward_hook(lambda m, args, out: chosen.append(m.route(args[0].flatten(0, 1))[0]))
             for b in model.trf_blocks]
    model(ids, cache=cache)
    for h in hooks:
        h.remove()
    return chosen


@needs_kernels
def test_compiled_mixture_routes_each_row_to_its_own_experts():
    model = prepare_for_decoding(tiny(**QWEN3_MOE), "int8")
    plain = modules_only(model)
    gen = torch.Generator().manual_seed(5)
    prompt = torch.randint(0, 300, (6, 4), generator=gen)
    caches = [model.new_cache(6), plain.new_cache(6)]
    with torch.inference_mode():
        for m, cache in zip((model, plain), caches):
            m(prompt, cache=cache)
        choices = set()
        for step in range(6):
            ids = torch.randint(0, 300, (6, 1), generator=gen)
            fast = model(ids, cache=caches[0])
            for chosen in chosen_experts(plain, ids, caches[1]):
                choices |= {tuple(sorted(row.tolist())) for row in chosen}
            ref = plain(ids, cache=KVCache.over(caches[1].k, caches[1].v, caches[1].pos - 1))  # the step again
            torch.testing.assert_close(fast, ref, atol=2e-4 * ref.abs().max().item(), rtol=0)
    assert len(choices) >= 4  # rows of one batch (and steps) took different pairs of experts


@needs_kernels
def test_compiled_mixture_breaks_ties_as_the_modules_do():
    model = tiny(**QWEN3_MOE)
    with torch.no_grad():
        for b in model.trf_blocks:
            b.ff.gate.weight.zero_()  # every expert equally likely: the lowest k indices win on both sides
            b.ff.fc1[:2].mul_(-1)  # experts 0 and 1 unlike 2 and 3
    low = prepare_for_decoding(model, "int8")
    plain = modules_only(low)
    prompt = torch.randint(0, 300, (2, 5), generator=torch.Generator().manual_seed(4))
    caches = [low.new_cache(2), plain.new_cache(2)]
    with torch.inference_mode():
        for m, cache in zip((low, plain), caches):
            m(prompt, cache=cache)
        ids = torch.tensor([[3], [9]])
        fast = low(ids, cache=caches[0])
        chosen = chosen_experts(plain, ids, caches[1])
        ref = plain(ids, cache=KVCache.over(caches[1].k, caches[1].v, caches[1].pos - 1))
    assert all(torch.equal(c, torch.tensor([[0, 1], [0, 1]])) for c in chosen)
    torch.testing.assert_close(fast, ref, atol=2e-4 * ref.abs().max().item(), rtol=0)


@pytest.mark.parametrize("dtype, tol", [("bfloat16", 2**-8), ("int8", 2**-7), ("int4", 2**-3)])
def test_decode_moe_is_the_mixture_on_its_stacked_low_precision_experts(dtype, tol):
    model = tiny(**QWEN3_MOE)
    moe = model.trf_blocks[0].ff
    low = prepare_for_decoding(copy.deepcopy(model), dtype)
    ours = low.trf_blocks[0].ff
    assert isinstance(ours, DecodeMoE) and isinstance(ours.gate, nn.Linear)  # the router stays float32
    assert torch.equal(ours.gate.weight, moe.gate.weight)
    twin = ours.dequantized()  # a float32 MoEFeedForward on the weights ours holds
    for name in ("fc1", "fc2", "fc3"):  # each expert's matrix where it belongs, quantised
        w, deq = getattr(moe, name), getattr(twin, name)
        assert deq.shape == w.shape and (deq - w).abs().max() <= tol * w.abs().max()
    x = torch.randn(3, 50, 64, generator=torch.Generator().manual_seed(6))  # about 75 tokens an expert
    chosen, _ = moe.route(x.flatten(0, 1))
    assert chosen.flatten().bincount(minlength=moe.n_experts).min() >= PREFILL_ROWS  # each expert's rows: float32 BLAS
    with torch.inference_mode():
        ref = twin(x)
        for rows in (x[:, :1], x):  # a few rows in the kernels; a prompt's widened to float32 (PREFILL_ROWS)
            few = dtype == "int4" and rows.shape[1] == 1  # int4's kernels round the inputs to int8 per group
            torch.testing.assert_close(ours(rows), ref[:, :rows.shape[1]],
                                       atol=(INT4_INPUTS if few else 1e-4) * ref.abs().max().item(), rtol=0)

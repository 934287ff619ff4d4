"""Model sizing: parameters, FLOPs and bytes, each counted in one place.

The CLI's `info`, the memory checks before loading or training, the time budget's rule and plan,
and the benchmark all size a model with these functions. Sizing a config builds its model on the
meta device: every shape, no memory, no initialisation."""

from __future__ import annotations

import torch
import torch.nn as nn

from build_llm.config import GPTConfig
from build_llm.gpt import GPTModel
from build_llm.moe import MoEFeedForward
from build_llm.runtime import get_dtype


def meta_model(cfg: GPTConfig) -> GPTModel:
    """A GPTModel of `cfg` on the meta device: the shapes of every tensor, nothing allocated."""
    with torch.device("meta"):
        return GPTModel(cfg)


# --- parameters ----------------------------------------------------------------------------------
def count_parameters(model: nn.Module | GPTConfig, trainable_only: bool = False) -> int:
    """Number of parameters of a model, or of a GPTModel of a config; a tied matrix counts once (as
    `model.parameters()` yields it once)."""
    if isinstance(model, GPTConfig):
        model = meta_model(model)
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def inactive_expert_parameters(cfg: GPTConfig) -> int:
    """Parameters of the experts a token is not routed to: in each of the n_layers mixtures, the
    n_experts - n_experts_per_token others, of three emb_dim x expert_hidden matrices each. 0 if dense."""
    if not cfg.n_experts:
        return 0
    return cfg.n_layers * (cfg.n_experts - cfg.n_experts_per_token) * 3 * cfg.emb_dim * cfg.expert_hidden


def active_parameters(cfg: GPTConfig) -> int:
    """Parameters one token's forward pass uses (the "A3B" of Qwen3-30B-A3B): all but the experts it is
    not routed to, the embeddings included; count_parameters itself for a dense model."""
    return count_parameters(cfg) - inactive_expert_parameters(cfg)


def lookup_tables(model: GPTModel) -> list[torch.Tensor]:
    """The embedding tables a token reads one row of: the position table (if any) and the token
    table, unless the output head multiplies by that same matrix (tied)."""
    tables = [model.pos_emb.weight] if model.pos_emb is not None else []
    return tables if model.out_head.weight is model.tok_emb.weight else tables + [model.tok_emb.weight]


def matmul_parameters(cfg: GPTConfig) -> int:
    """N of the FLOP count and of the time budget's loss rule: the parameters that take part in a
    token's matrix products (all but the lookup tables and the experts it is not routed to)."""
    model = meta_model(cfg)
    return count_parameters(model) - sum(t.numel() for t in lookup_tables(model)) - inactive_expert_parameters(cfg)


def parameter_table(model: nn.Module) -> list[tuple[str, tuple[int, ...], int]]:
    """(name, shape, count) for each parameter, like the R notebook's listing."""
    return [(name, tuple(p.shape), p.numel()) for name, p in model.named_parameters()]


def format_parameter_table(model: nn.Module) -> str:
    rows = parameter_table(model)
    width = max(len(name) for name, _, _ in rows)
    lines = [f"{name:<{width}}  {' x '.join(map(str, shape)):>14}  {count:>13,}" for name, shape, count in rows]
    return "\n".join(lines)


# --- FLOPs ---------------------------------------------------------------------------------------
def train_flops_per_token(cfg: GPTConfig) -> int:
    """PaLM (Chowdhery et al. 2022) appendix B: 6N for the matrix products (forward 2N, backward 4N)
    plus 12 * L * H * Q * T for attention's scores and weighted sums over a context of T, where
    H heads of Q channels make the width C."""
    return 6 * matmul_parameters(cfg) + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * cfg.context_length


# --- bytes ---------------------------------------------------------------------------------------
def weights(model: nn.Module) -> list[torch.Tensor]:
    """The tensors that hold a model's weights, each once (a tied matrix is one tensor): its
    parameters and the buffers in which a decoding layer keeps bfloat16, int8 or int4 weights (int4:
    two a byte, uint8), their scales and biases (not LoRA's row ids, int64)."""
    held = [b for b in model.buffers() if b.is_floating_point() or b.dtype in (torch.int8, torch.uint8)]
    return list(model.parameters()) + held


def count_weights(model: nn.Module) -> int:
    """Number of weights (see `weights`): a trained model's parameter count; once decoding layers
    hold bfloat16, int8 or int4 weights, those (with their scales, and the head's own copy where
    quantisation unties it) in place of the Linear parameters, so that a quantized model is sized as
    it runs. A byte of int4 holds two."""
    return sum(t.numel() * (2 if t.dtype == torch.uint8 else 1) for t in weights(model))


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every weight (see `weights`) at the dtype it is held in."""
    return sum(t.numel() * t.element_size() for t in weights(model))


def decode_bytes_per_token(model: GPTModel) -> int:
    """Bytes of weights one decoding step reads: every weight once, except the lookup tables, of which
    it reads one row (a tied token table is read whole, as the output head)."""
    return weight_bytes(model) - sum(t.numel() * t.element_size() for t in lookup_tables(model))


def model_size_mb(model: nn.Module, dtype: torch.dtype | str = torch.float32) -> float:
    """Size of the parameters in MiB (1024 * 1024 bytes, as the seed computes it) at `dtype`."""
    if isinstance(dtype, str):
        dtype = get_dtype(dtype)
    return count_parameters(model) * torch.empty((), dtype=dtype).element_size() / (1024 * 1024)


def model_memory(cfg: GPTConfig, dtype: torch.dtype = torch.float32) -> int:
    """Bytes a GPTModel of `cfg` holds: its parameters plus any buffers (none today: no layer stores a
    causal mask, so this is linear in the context length)."""
    model = meta_model(cfg)
    params = count_parameters(model) * torch.empty(0, dtype=dtype).element_size()
    return params + sum(b.numel() * b.element_size() for b in model.buffers())


# Float32 copies of a Linear's weight that converting it holds at once besides the weight itself (quant.py's
# quantize_*: int8's quotient and its rounding; int4's padded copy too; bfloat16's cast and packed copy).
CONVERSION_COPIES = {"float32": 1.0, "bfloat16": 1.0, "int8": 2.0, "int4": 3.0}


def decoded_linear_bytes(out_features: int, in_features: int, dtype: str, bias: bool, group: int) -> int:
    """Bytes of one Linear's decoding weights (quant.DecodeLinear, in the kernels' layout: rows padded to 4,
    columns to 32): bfloat16, int8 with a float32 scale a row, or int4 two a byte with a bfloat16 scale a group."""
    n4, k32 = -(-out_features // 4) * 4, -(-in_features // 32) * 32
    extra = 4 * out_features * bias
    if dtype == "bfloat16":
        return 2 * n4 * k32 + extra
    if dtype == "int8":
        return n4 * k32 + 4 * out_features + extra
    groups = -(-in_features // group)
    return out_features * groups * group // 2 + 2 * out_features * groups + extra


def decoded_weights(module: nn.Module) -> list[tuple[torch.Tensor, int, int, bool]]:
    """(weight, rows, columns, bias) of each product decoding converts under `module` (quant.replace_linears):
    every Linear but a mixture's router, and each mixture's experts, stacked (E x out rows, out padded to 4)."""
    out = []
    for parent in module.modules():
        for child in parent.children():
            if isinstance(child, MoEFeedForward):
                out += [(w, w.shape[0] * -(-w.shape[1] // 4) * 4, w.shape[2], False) for w in (child.fc1, child.fc2, child.fc3)]
            elif isinstance(child, nn.Linear) and not isinstance(parent, MoEFeedForward):
                out.append((child.weight, child.out_features, child.in_features, child.bias is not None))
    return out


def decoding_memory(cfg: GPTConfig, dtype: str = "float32", group: int = 64) -> int:
    """Peak bytes of loading `cfg` for decoding in `dtype` part by part (store.checkpoint.load_parts): the
    decoding weights (every product's at `dtype`, the head's own copy included; the rest float32) plus the
    largest part in flight (its float32 weights that do not stay, and converting its largest product: see
    CONVERSION_COPIES). `group`: int4's weights per scale."""
    model = meta_model(cfg)
    products = decoded_weights(model)
    if dtype == "float32":
        final = model_memory(cfg)
    else:
        converted = {id(w) for w, *_ in products} - {id(model.tok_emb.weight)}  # a tied table stays float32
        final = sum(p.numel() * 4 for p in model.parameters() if id(p) not in converted)
        final += sum(decoded_linear_bytes(rows, cols, dtype, bias, group) for _, rows, cols, bias in products)
    in_blocks = {id(w) for block in model.trf_blocks for w, *_ in decoded_weights(block)}
    parts = [decoded_weights(block) for block in model.trf_blocks]
    parts.append([p for p in products if id(p[0]) not in in_blocks])  # the head
    in_flight = 0
    for own in parts:
        largest = max((w.numel() * 4 for w, *_ in own), default=0)
        passing = 0 if dtype == "float32" else sum(w.numel() * 4 for w, *_ in own if w is not model.tok_emb.weight)
        in_flight = max(in_flight, passing + int(CONVERSION_COPIES[dtype] * largest))
    return final + in_flight


def kv_cache_bytes(cfg: GPTConfig, batch_size: int = 1, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of a KV cache for `batch_size` sequences of the whole context: a key and a value per
    layer, position and key/value channel (fewer than emb_dim under grouped-query attention)."""
    channels = cfg.kv_heads * cfg.head_dim
    return 2 * batch_size * cfg.n_layers * cfg.context_length * channels * torch.empty(0, dtype=dtype).element_size()


def training_memory(model_cfg: GPTConfig, train_cfg) -> int:
    """A lower bound of the bytes training needs (checked before anything is allocated, behind the
    plan's `estimate_peak_bytes`): fp32 weights, gradients and AdamW's two moments, the fixed
    validation windows, a step's micro-batches (inputs and targets, int64, all drawn at once) and
    one micro-batch's logits with their gradient. `train_cfg`: a TrainConfig."""
    B, T = train_cfg.batch_size, model_cfg.context_length
    windows = B * train_cfg.eval_batches * 8 + B * train_cfg.grad_accum * T * 16
    logits = 2 * B * T * model_cfg.vocab_size * 4
    return 4 * model_memory(model_cfg) + windows + logits


def estimate_peak_bytes(cfg: GPTConfig, batch_size: int, explicit_attention: bool | None = None) -> int:
    """Peak resident memory of training `cfg` at `batch_size` windows per micro-batch, float32:
    the interpreter with torch (about 320 MB), weights, gradients and AdamW's two moments, the
    activations autograd keeps per layer (about 20 floats per token and channel, plus the T x T
    attention weights five times over when dropout forces the explicit path) and the logits with
    their softmax and gradient. Calibrated against measured peaks (docs/time-budget.md); a plan
    that would not fit is refused with it."""
    B, T, C, L, V, H = batch_size, cfg.context_length, cfg.emb_dim, cfg.n_layers, cfg.vocab_size, cfg.n_heads
    if explicit_attention is None:
        explicit_attention = cfg.drop_rate > 0 and getattr(cfg, "attn_impl", "auto") != "sdpa"
    state = 4 * 4 * count_parameters(cfg)  # weights, gradients, two moments
    per_layer = 20 * B * T * C + (5 * B * H * T * T if explicit_attention else 0)
    logits = 4 * B * T * V
    return int(320 * 2**20 + state + 4 * L * per_layer + 4 * logits)

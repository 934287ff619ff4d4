"""Decoding weights in fewer bytes: bfloat16, weight-only int8 with one scale per output channel, and
weight-only int4 with one scale per group of INT4_GROUP weights of a row.

Decoding one token at batch 1 multiplies a single row vector by every weight matrix, so its speed is
set by how many bytes of weights it streams from memory: float32 reads 4 bytes per weight, bfloat16
2, int8 1 (plus one scale per output row). `prepare_for_decoding(model, "int8")` replaces every
`nn.Linear`, the output head included, with a `DecodeLinear` holding int8 weights:

    W[o, :] ~= scale[o] * q[o, :],   scale[o] = max_i |W[o, i]| / 127,   q = round(W / scale) in [-127, 127]

(symmetric, per output channel: each row keeps its own range, so one large row does not coarsen
the others); `"bfloat16"` does the same with bfloat16 weights. `"int4"` has 16 levels, too few for a
whole row's range, so each group of INT4_GROUP consecutive weights of a row gets its own scale:

    W[o, i] ~= d[o, g] * q[o, i],   d[o, g] = (the group's weight of largest magnitude) / -8,   q in [-8, 7]

(the largest weight lands exactly on -8, the end with one more level); 4 bits a weight plus a bfloat16
scale a group. A tied output head gets its own copy;
the token table stays float32 for the lookup, and everything outside the Linear layers (LayerNorm,
attention, the residual stream) stays float32; the compiled step's KV cache holds bfloat16 (see
CompiledStep.cache_dtype). A mixture of experts becomes a `DecodeMoE`:
each projection's experts stacked in one such layer, its router left float32.

The products run in `kernels.matvec` (a prompt in pieces of 16 rows), which widens the weights to
float32 in registers inside the multiply loop, and the one-token steps (a mixture's included: each row
through its chosen experts only) in `CompiledStep`. Where the kernels are unavailable, PyTorch's run:
`aten._weight_int8pack_mm` with bfloat16 activations for int8 (the fastest weight-only int8 path PyTorch had on the development CPU;
`torch._int_mm` needs quantised activations, dequantising first writes and re-reads a float32 copy),
its bfloat16 product, and for int4 a float32 product with the weights dequantised at every call (correct,
slow: PyTorch has no int4 product on the CPU that takes float activations).

int4's kernels also round the activations: each product's input to int8 per group of INT4_GROUP columns (the
group's step max |x| / 127, to nearest, ties to even; an all-zero group stays zero, and one holding a NaN or an
infinity makes every output it reaches NaN, as float arithmetic would, so `generate` reports it), so that a group's
products are integers (4-bit times 8-bit, summed exactly in int32) times one weight scale and one input scale.
That moves an input by at most half a step: PyTorch's float32 product on the same int4 weights (without the
kernels, and for a prompt of PREFILL_ROWS rows or more) differs from the kernels' by that much, not only by
float rounding.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F

from build_llm.config import GPTConfig
from build_llm.errors import UsageError
from build_llm.gpt import use_decoding_layout
from build_llm.infer import kernels
from build_llm.moe import MoEFeedForward
from build_llm.transformer import TransformerBlock

DECODE_DTYPES = ("float32", "bfloat16", "int8", "int4")
# Weights per int4 scale. Measured on the development machine (2-core AMD EPYC, AVX2, busy): gpt2-small's
# products on one thread took 21, 20 and 15 ms a token with groups of 32, 64 and 128 (int8's: 24-38 ms); a small
# trained character model's held-out perplexity rose by 0.02%, 0.06% and 0.18% over float32's. 64: most of
# 128's speed, a third of its loss (`build-llm bench --checkpoint` reports it for any checkpoint).
INT4_GROUP = 64
# From this many input rows (a prompt), a layer's product widens its weight to float32 once and multiplies it with
# PyTorch's float32 BLAS, which then beats widening it inside the kernels for every row. Measured on the
# development machine (AVX2, one thread, a 3072 x 768 layer): at 512 rows bf16 380 -> 94 ms, int8 394 -> 111,
# int4 197 -> 165; at 64 rows bf16 42 -> 14, int8 43 -> 27, int4 about even; at 16 rows the kernels win.
PREFILL_ROWS = 64
# The GPTConfig fields the C decoding step reads (or that do not change eval-mode numbers).
KERNEL_FIELDS = {"vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "drop_rate", "qkv_bias", "tie_weights",
                 "bias", "gelu", "fused_qkv", "padding_idx", "attn_out_dropout", "attn_impl", "init_std", "ln_eps",
                 "pos_emb", "rope_base", "norm", "mlp", "ff_dim", "qk_norm", "n_kv_heads", "head_size", "rope_scaling",
                 "rope_factor", "rope_low_freq_factor", "rope_high_freq_factor", "rope_original_context",
                 "sliding_window", "layer_types", "rope_local_base", "attn_scale", "norm_plus_one", "scale_emb",
                 "post_norms", "n_experts", "n_experts_per_token", "moe_ff_dim", "moe_norm_topk"}
KERNEL_MLPS = ("gelu", "swiglu", "geglu")  # not relu2


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale): int8 (out, in) and float32 (out,) with weight ~= scale[:, None] * q; each scale is
    a bfloat16 value (the kernel's), about max |row| / 127."""
    if weight.ndim != 2:
        raise UsageError(f"weight: expected a 2-D (out, in) matrix, got shape {tuple(weight.shape)}")
    w = weight.detach().float()
    # The kernel takes its scales in bfloat16: round them to bfloat16 first, and quantise against
    # the rounded value, so that scale * q is exactly what the kernel multiplies.
    scale = (w.abs().amax(dim=1) / 127).to(torch.bfloat16).float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row stays zero
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale


def quantize_int4(weight: torch.Tensor, group: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale): int8 (out, in) values in [-8, 7] and bfloat16 (out, groups) scales, groups = ceil(in / group),
    with weight[o, i] ~= scale[o, i // group] * q[o, i]."""
    if weight.ndim != 2:
        raise UsageError(f"weight: expected a 2-D (out, in) matrix, got shape {tuple(weight.shape)}")
    n, k = weight.shape
    kp = -(-k // group) * group
    w = torch.zeros(n, kp)
    w[:, :k] = weight.detach().float()
    w = w.view(n, kp // group, group)  # (out, groups, group)
    extreme = w.gather(2, w.abs().argmax(dim=2, keepdim=True))  # (out, groups, 1): signed, largest magnitude
    scale = (extreme / -8).to(torch.bfloat16)  # the kernel's dtype: quantise against the rounded value
    scale = torch.where(scale != 0, scale, torch.ones_like(scale))  # an all-zero group stays zero
    q = torch.round(w / scale.float()).clamp_(-8, 7).to(torch.int8)
    return q.view(n, kp)[:, :k].contiguous(), scale[..., 0].contiguous()


class DecodeLinear(nn.Module):
    """A Linear layer for decoding (no training) whose weight is bfloat16, int8 with a float32 scale per
    output channel, or int4 (`group` > 0: int8 values in [-8, 7], held two to a byte, with a bfloat16 scale
    per group of `group` weights of a row); its input and output stay float32. On a CPU where `kernels` run,
    the weight is kept in their packed layout (`packed` is True) and every product runs in them."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None,
                 group: int = 0) -> None:
        super().__init__()
        int4 = (group > 0 and weight.dtype == torch.int8 and scale is not None
                and scale.shape == (weight.shape[0], -(-weight.shape[1] // group)))
        if not int4 and (weight.dtype not in (torch.bfloat16, torch.int8) or group
                         or (scale is None) != (weight.dtype == torch.bfloat16)):
            raise ValueError("DecodeLinear: expected a bfloat16 weight, an int8 weight with a scale per row, or int4 "
                             "values with a scale per group of `group` columns")
        self.out_features, self.in_features = weight.shape
        self.group = group
        self.packed = weight.device.type == "cpu" and kernels.available()
        if int4:  # two values a byte, whether or not the kernels run (dequantized() reads them back)
            self.register_buffer("weight", kernels.pack_int4(weight, group))
        else:
            self.register_buffer("weight", kernels.pack(weight) if self.packed else weight.contiguous())
        self.register_buffer("scale", None if scale is None else scale.contiguous() if int4 else scale.float().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear, dtype: str) -> "DecodeLinear":
        return cls.from_weight(linear.weight, linear.bias, dtype)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, dtype: str) -> "DecodeLinear":
        """The (out, in) float `weight` in `dtype` (bfloat16, int8 or int4)."""
        if dtype == "int8":
            return cls(*quantize_int8(weight), bias)
        if dtype == "int4":
            return cls(*quantize_int4(weight, INT4_GROUP), bias, group=INT4_GROUP)
        return cls(weight.detach().to(torch.bfloat16), None, bias)

    def dequantized(self, start: int = 0, n: int | None = None) -> torch.Tensor:
        """The float32 (out, in) weight this layer stands for; rows [start, start + n) of it when given (`start` a
        multiple of 4: the first row of a packed tile)."""
        n = self.out_features - start if n is None else n
        scale = None if self.scale is None else self.scale[start:start + n]
        if self.group:
            q = kernels.unpack_int4(self.weight[start:start + n], self.in_features, self.group).float()
            return q * scale.float().repeat_interleave(self.group, dim=1)[:, :self.in_features]
        if self.packed:
            w = kernels.unpack(self.weight[start // 4:-(-(start + n) // 4)], n, self.in_features)
        else:
            w = self.weight[start:start + n]
        w = w.float()
        return w if scale is None else w * scale[:, None]

    def rows_product(self, x: torch.Tensor, start: int, n: int) -> torch.Tensor:
        """x (m, in) times rows [start, start + n) of the weight (`start` a multiple of 4), no bias: (m, n). How
        DecodeMoE multiplies one expert's rows of a projection that stacks every expert's."""
        if self.packed and x.shape[0] < PREFILL_ROWS:
            w = self.weight[start:start + n] if self.group else self.weight[start // 4:-(-(start + n) // 4)]
            return kernels.matvec(x, w, n, None if self.scale is None else self.scale[start:start + n], None,
                                  self.group)
        return F.linear(x.float(), self.dequantized(start, n))  # a prompt (see PREFILL_ROWS), or no kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed and x.numel() >= PREFILL_ROWS * self.in_features:  # a prompt: see PREFILL_ROWS
            return F.linear(x.float(), self.dequantized(), self.bias)  # (..., out)
        if self.packed:  # (..., out)
            return kernels.matvec(x, self.weight, self.out_features, self.scale, self.bias, self.group)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).float()  # (B*T, in)
        if x2.device.type != "cpu" or self.group:  # correct everywhere, fast only where the kernels run
            y = F.linear(x2, self.dequantized())
        elif self.scale is None:  # PyTorch's bfloat16 product, in bfloat16
            y = F.linear(x2.to(torch.bfloat16), self.weight).float()
        else:  # PyTorch's weight-only int8 kernel, fastest with bfloat16 activations
            y = torch.ops.aten._weight_int8pack_mm(x2.to(torch.bfloat16), self.weight,
                                                   self.scale.to(torch.bfloat16)).float()
        if self.bias is not None:
            y = y + self.bias
        return y.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        kind = "bfloat16" if self.scale is None else f"int4, groups of {self.group}" if self.group else "int8 per-channel"
        return f"in_features={self.in_features}, out_features={self.out_features}, {kind}"


def expert_rows(n: int) -> int:
    """The rows each expert's (n, in) matrix takes in a DecodeMoE's stacked projection: n padded to a multiple of 4,
    so that every expert starts on the first row of a packed tile."""
    return -(-n // 4) * 4


class DecodeMoE(nn.Module):
    """A block's MoEFeedForward for decoding: each projection's experts stacked in one DecodeLinear (expert e's rows
    from e * expert_rows(out) on, zero rows padding it to a multiple of 4), packed as every other product is. The
    router stays a float32 Linear: its top-k is the model's choice of experts, which a coarser router could change,
    and its n_experts rows cost little beside the k experts' 3 matrices. Routing and grouping are MoEFeedForward's
    own methods, run on this module's router and experts."""

    route = MoEFeedForward.route
    forward = MoEFeedForward.forward

    def __init__(self, moe: MoEFeedForward, dtype: str) -> None:
        super().__init__()
        self.n_experts, self.n_experts_per_token, self.norm_topk = moe.n_experts, moe.n_experts_per_token, moe.norm_topk
        self.gate = moe.gate
        self.hidden, self.emb_dim = moe.fc1.shape[1], moe.fc1.shape[2]
        self.fc1, self.fc2, self.fc3 = (self.stack(w, dtype) for w in (moe.fc1, moe.fc2, moe.fc3))

    @staticmethod
    def stack(w: torch.Tensor, dtype: str) -> DecodeLinear:
        n_experts, out, inp = w.shape
        padded = w.detach()
        if out != expert_rows(out):  # a copy only where rows are missing (Qwen3-MoE's widths are multiples of 4)
            padded = w.new_zeros(n_experts, expert_rows(out), inp)  # (E, out4, in): an all-zero row stays zero
            padded[:, :out] = w.detach()
        return DecodeLinear.from_weight(padded.reshape(-1, inp), None, dtype)  # (E * out4, in)

    def project(self, lin: DecodeLinear, n: int, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e's (n, in) matrix of the stacked `lin` times x (m, in): (m, n)."""
        return lin.rows_product(x, e * expert_rows(n), n)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e's SwiGLU on its tokens x (n, C) -> (n, C)."""
        h = F.silu(self.project(self.fc1, self.hidden, e, x)) * self.project(self.fc2, self.hidden, e, x)  # (n, H)
        return self.project(self.fc3, self.emb_dim, e, h)

    def dequantized(self) -> MoEFeedForward:
        """A float32 MoEFeedForward holding the weights this module stands for."""
        cfg = {"emb_dim": self.emb_dim, "n_experts": self.n_experts, "n_experts_per_token": self.n_experts_per_token,
               "moe_ff_dim": self.hidden, "moe_norm_topk": self.norm_topk, "mlp": "swiglu", "vocab_size": 1,
               "n_heads": 1}
        moe = MoEFeedForward(cfg)
        moe.gate.load_state_dict(self.gate.state_dict())
        for name, out in (("fc1", self.hidden), ("fc2", self.hidden), ("fc3", self.emb_dim)):
            w = getattr(self, name).dequantized().view(self.n_experts, expert_rows(out), -1)[:, :out]  # (E, out, in)
            getattr(moe, name).data.copy_(w)
        return moe


@torch.no_grad()
def replace_linears(model: nn.Module, dtype: str) -> int:
    """Replace every nn.Linear under `model` by a DecodeLinear of `dtype`, and every block's mixture of experts by a
    DecodeMoE (its router left float32), in place; returns how many. A mixture that LoRA's adapters wrap keeps its
    float32 experts (the adapters read them)."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, MoEFeedForward) and isinstance(parent, TransformerBlock):
                setattr(parent, name, DecodeMoE(child, dtype))
                count += 1
            # A router stays float32, also when a converted mixture is met again (a model converted block by block)
            elif isinstance(child, nn.Linear) and not isinstance(parent, (MoEFeedForward, DecodeMoE)):
                setattr(parent, name, DecodeLinear.from_linear(child, dtype))
                count += 1
    return count


class CompiledStep:
    """A one-token decoding step in one C call (`kernels.decode_step`): every block, the final norm and the head,
    with the DecodeLinear weights in the kernels' layout, for GPT-2's shape and Llama's (RMSNorm, rotary positions
    with their scaling, SwiGLU or GeGLU, grouped key/value heads; Qwen3's, Qwen3-MoE's and Gemma 3's options too).
    The PyTorch modules compute the same numbers (up to float rounding) in about 25 operations a block, each costing
    microseconds of dispatch that add up to about as much time as the products themselves at batch 1.

    `prepare_for_decoding` sets one as the model's `decode_step` where `supports(model)`; `GPTModel.forward`
    hands it every cached one-token step. It describes the model's tensors by address, built at the first call
    and kept while the head's weight stays where it is (a deep copy starts afresh); it holds every tensor it
    describes, so none is freed under it, and a module replaced after the first step is not seen."""

    # Its KV cache (GPTModel.new_cache): keys and values rounded to bfloat16, half the bytes of float32 to read at each
    # step (at 16 rows of ~100 positions, as many as gpt2-small's int8 weights); the modules read it the same way.
    cache_dtype = torch.bfloat16

    def __init__(self) -> None:
        self.built: tuple | None = None  # (weight address it was built for, kernels.Model, tensors it points to)

    def __deepcopy__(self, memo: dict) -> "CompiledStep":
        return CompiledStep()

    @staticmethod
    def supports(model: nn.Module) -> bool:
        """Whether the C step computes this model: every field outside KERNEL_FIELDS at its default (so an option
        added to GPTConfig later runs in PyTorch until the kernel learns it), a mixture of experts (if any) a
        DecodeMoE in every block, every product a packed DecodeLinear."""
        cfg = getattr(model, "cfg", None)
        if cfg is None or cfg.mlp not in KERNEL_MLPS:
            return False
        defaults = {f.name: f.default for f in dataclasses.fields(GPTConfig)}
        if any(v != defaults[k] for k, v in cfg.to_dict().items() if k not in KERNEL_FIELDS):
            return False
        if any(isinstance(b.ff, DecodeMoE) != bool(cfg.n_experts) for b in model.trf_blocks):
            return False  # say, a mixture that LoRA's adapters wrap
        return all(isinstance(m, DecodeLinear) and m.packed for m in CompiledStep.linears(model)) \
            and model.tok_emb.weight.dtype == torch.float32

    @staticmethod
    def block_linears(block: nn.Module) -> tuple[list, nn.Module, list]:
        """A block's products: q, k, v (or the fused qkv); the attention's output; the feed-forward's first (the gate
        when gated), its up projection when gated, and last (a mixture's: its experts' stacked gate, up, down)."""
        att, ff = block.att, block.ff
        qkv = [att.W_qkv] if att.fused_qkv else [att.W_query, att.W_key, att.W_value]
        if isinstance(ff, DecodeMoE):
            return qkv, att.out_proj, [ff.fc1, ff.fc2, ff.fc3]
        return qkv, att.out_proj, [ff.gate, ff.up, ff.down] if ff.gated else [ff.layers[0], ff.layers[2]]

    @staticmethod
    def linears(model: nn.Module) -> list[nn.Module]:
        """Every product the step runs: each block's (see `block_linears`), and the head."""
        out = [model.out_head]
        for block in model.trf_blocks:
            qkv, att_out, ff = CompiledStep.block_linears(block)
            out += [*qkv, att_out, *ff]
        return out

    @staticmethod
    def fill_block(b: kernels.Block, block: nn.Module, ptr, lin, norm) -> None:
        """Describe one TransformerBlock in `b` (`ptr`, `lin`, `norm`: a tensor's, a layer's, a norm's description)."""
        att = block.att
        qkv, att_out, ff = CompiledStep.block_linears(block)
        (b.ln1_w, b.ln1_b), (b.ln2_w, b.ln2_b) = norm(block.norm1), norm(block.norm2)
        (b.post1_w, b.post1_b), (b.post2_w, b.post2_b) = norm(block.post_norm1), norm(block.post_norm2)
        b.q_norm, b.k_norm = (norm(att.q_norm)[0], norm(att.k_norm)[0]) if att.qk_norm else (None, None)
        b.inv_freq = None if att.rope is None else ptr(att.rope.inv_freq(att.head_dim))  # (head_dim / 2,)
        b.window = att.window or 0
        for j, m in enumerate(qkv):
            b.qkv[j] = lin(m)
        b.n_qkv, b.att_out, b.fc, b.ff_out = len(qkv), lin(att_out), lin(ff[0]), lin(ff[-1])
        if len(ff) == 3:
            b.up = lin(ff[1])
        if isinstance(block.ff, DecodeMoE):  # each stacked projection described as one expert's (n: its rows)
            moe = block.ff
            b.n_experts, b.top_k, b.norm_topk, b.router = (moe.n_experts, moe.n_experts_per_token, moe.norm_topk,
                                                           ptr(moe.gate.weight))
            b.fc.n, b.up.n, b.ff_out.n = moe.hidden, moe.hidden, moe.emb_dim

    def describe(self, model: nn.Module) -> tuple:
        cfg, keep = model.cfg, []

        def ptr(t: torch.Tensor | None) -> int | None:  # held in `keep`: never freed while described
            if t is None:
                return None
            t = t.detach().contiguous() if t.dtype in kernels.KINDS else t.detach().float().contiguous()
            keep.append(t)
            return t.data_ptr()

        def lin(m: DecodeLinear) -> kernels.Lin:
            return kernels.Lin(ptr(m.weight), ptr(m.scale), ptr(m.bias), m.out_features, m.in_features,
                               kernels.KINDS[m.weight.dtype], m.group)

        def norm(n: nn.Module) -> tuple[int | None, int | None]:  # (weight, shift); Gemma's (1 + scale) made once
            if isinstance(n, nn.Identity):
                return None, None
            return ptr(n.scale + 1 if getattr(n, "plus_one", False) else n.scale), ptr(n.shift)

        blocks = (kernels.Block * cfg.n_layers)()
        for b, block in zip(blocks, model.trf_blocks):
            self.fill_block(b, block, ptr, lin, norm)
        act = "silu" if cfg.mlp == "swiglu" else "gelu_tanh" if cfg.gelu == "tanh" else "gelu_erf"
        att_scale = cfg.attn_scale if cfg.attn_scale is not None else cfg.head_dim ** -0.5
        emb_scale = float(torch.tensor(cfg.emb_dim ** 0.5)) if cfg.scale_emb else 1.0  # float32, as GPTModel rounds it
        desc = kernels.Model(cfg.n_layers, cfg.emb_dim, cfg.n_heads, cfg.kv_heads, cfg.head_dim, cfg.ff_hidden,
                             cfg.vocab_size, kernels.ACTIVATIONS[act], cfg.norm == "rmsnorm", cfg.ln_eps, att_scale,
                             emb_scale, ptr(model.tok_emb.weight),
                             None if model.pos_emb is None else ptr(model.pos_emb.weight), *norm(model.final_norm),
                             lin(model.out_head), blocks)
        return model.out_head.weight.data_ptr(), desc, keep + [blocks]

    def __call__(self, model: nn.Module, in_idx: torch.Tensor, cache) -> torch.Tensor:
        """Logits (B, 1, vocab_size) for one new token per row (in_idx (B, 1)) after cache.pos; advances it."""
        if self.built is None or self.built[0] != model.out_head.weight.data_ptr():
            self.built = self.describe(model)
        pos = cache.pos if isinstance(cache.pos, torch.Tensor) else torch.full((in_idx.shape[0],), cache.pos)
        logits = kernels.decode_step(self.built[1], in_idx.reshape(-1).long().contiguous(), pos.long().contiguous(),
                                     cache.k, cache.v, model.cfg.context_length)
        cache.pos += 1
        return logits[:, None, :]  # (B, 1, V)


def check_decode_dtype(dtype: str, device: torch.device | str = "cpu") -> str:
    """`dtype` if it is a decoding dtype that runs on `device` (int8 and int4 run on the CPU only)."""
    if dtype not in DECODE_DTYPES:
        raise UsageError(f"dtype={dtype!r} is invalid; expected one of {', '.join(DECODE_DTYPES)}")
    if dtype in ("int8", "int4") and torch.device(device).type != "cpu":
        raise UsageError(f"dtype={dtype!r} runs on the CPU; use bfloat16 or float32 on other devices")
    return dtype


@torch.no_grad()
def prepare_for_decoding(model: nn.Module, dtype: str = "float32") -> nn.Module:
    """Put an eval-mode model's weights in the form decoding reads fastest, in place; returns it.

    float32: the fastest memory layout (see `use_decoding_layout`). bfloat16 on the CPU, int8 and int4:
    every Linear, the output head included, becomes a DecodeLinear of that dtype (a tied head gets
    its own copy; the token table, norms, attention and residual stream stay float32, and the KV cache holds
    bfloat16 where the compiled step runs: see CompiledStep.cache_dtype).
    bfloat16 on other devices: the whole model in bfloat16. The model is for inference afterwards
    (no training; a checkpoint is saved from the original).
    """
    check_decode_dtype(dtype)
    model.eval()
    convert_for_decoding(model, dtype)
    return finish_decoding(model, dtype)


@torch.no_grad()
def convert_for_decoding(part: nn.Module, dtype: str) -> nn.Module:
    """A model, or one part of it (a block; the model with its blocks already converted), in the decoding
    `dtype`, in place: what prepare_for_decoding does to each part, so that a checkpoint converted part by
    part as it is read (store.checkpoint.load_parts) ends with the same weights, bit for bit."""
    device = next(part.parameters()).device
    check_decode_dtype(dtype, device)
    if dtype == "bfloat16" and device.type != "cpu":
        part.to(torch.bfloat16)
    elif dtype != "float32":
        replace_linears(part, dtype)
    return part


def finish_decoding(model: nn.Module, dtype: str) -> nn.Module:
    """The whole-model steps of prepare_for_decoding, after every part is converted: the compiled step where
    it runs, and the decoding memory layout."""
    if dtype != "float32" and CompiledStep.supports(model):  # every product a packed DecodeLinear
        model.decode_step = CompiledStep()
    use_decoding_layout(model)
    return model

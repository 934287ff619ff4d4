"""Decoding weights in fewer bytes: bfloat16, and weight-only int8 with one scale per output channel.

Decoding one token at batch 1 multiplies a single row vector by every weight matrix, so its speed is
set by how many bytes of weights it streams from memory: float32 reads 4 bytes per weight, bfloat16
2, int8 1 (plus one scale per output row). `prepare_for_decoding(model, "int8")` replaces every
`nn.Linear`, the output head included, with an `Int8Linear`:

    W[o, :] ~= scale[o] * q[o, :],   scale[o] = max_i |W[o, i]| / 127,   q = round(W / scale) in [-127, 127]

(symmetric, per output channel: each row keeps its own range, so one large row does not coarsen
the others). Its product runs in PyTorch's weight-only int8 kernel `aten._weight_int8pack_mm`,
which widens the int8 weights on the fly inside the matrix-vector loop; the activations enter it in
bfloat16, the kernel's fast path on CPU, and everything outside the Linear layers (embeddings,
LayerNorm, attention, the KV cache, the residual stream) stays float32. A tied output head gets its
own int8 copy; the token table stays float32 for the lookup.

Other int8 paths were measured on the development CPU (AVX-512, no VNNI, no AMX; see the README):
the same kernel with float32 activations is several times slower than float32 itself,
dequantising to float32 before each product reads the int8 weights and then writes and re-reads
a float32 copy, and `torch._int_mm` (int8 x int8) needs quantised activations and is slower at
batch 1; `_weight_int8pack_mm` with bfloat16 activations was the fastest weight-only path.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import UsageError
from .generate import use_decoding_layout

DECODE_DTYPES = ("float32", "bfloat16", "int8")


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale): int8 (out, in) and float32 (out,) with weight ~= scale[:, None] * q; each scale is
    a bfloat16 value (the kernel's), about max |row| / 127."""
    if weight.ndim != 2:
        raise ValueError(f"weight: expected a 2-D (out, in) matrix, got shape {tuple(weight.shape)}")
    w = weight.detach().float()
    # The kernel takes its scales in bfloat16: round them to bfloat16 first, and quantise against
    # the rounded value, so that scale * q is exactly what the kernel multiplies.
    scale = (w.abs().amax(dim=1) / 127).to(torch.bfloat16).float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row stays zero
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale


class Int8Linear(nn.Module):
    """A Linear layer whose weight is int8 with a float scale per output channel (no training)."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 compute_dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.compute_dtype = compute_dtype
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale.to(compute_dtype))
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear, compute_dtype: torch.dtype = torch.bfloat16) -> "Int8Linear":
        q, scale = quantize_int8(linear.weight)
        return cls(q, scale, linear.bias, compute_dtype)

    def dequantized(self) -> torch.Tensor:
        """The float32 (out, in) weight this layer stands for."""
        return self.qweight.float() * self.scale.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(self.compute_dtype)  # (B*T, in)
        if x2.device.type == "cpu":
            y = torch.ops.aten._weight_int8pack_mm(x2, self.qweight, self.scale)  # (B*T, out)
        else:  # the kernel is CPU-only here; elsewhere dequantise (correct, not fast)
            y = F.linear(x2, self.qweight.to(self.compute_dtype)) * self.scale
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


@torch.no_grad()
def quantize_linears(model: nn.Module, compute_dtype: torch.dtype = torch.bfloat16) -> int:
    """Replace every nn.Linear under `model` by an Int8Linear, in place; returns how many."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, Int8Linear.from_linear(child, compute_dtype))
                count += 1
    return count


def check_decode_dtype(dtype: str) -> str:
    if dtype not in DECODE_DTYPES:
        raise UsageError(f"dtype={dtype!r} is invalid; expected one of {', '.join(DECODE_DTYPES)}")
    return dtype


@torch.no_grad()
def prepare_for_decoding(model: nn.Module, dtype: str = "float32") -> nn.Module:
    """Put an eval-mode model's weights in the form decoding reads fastest, in place; returns it.

    float32: the fastest memory layout (see `use_decoding_layout`); bfloat16: every weight and
    activation in bfloat16; int8: every Linear, the output head included, as an Int8Linear. The
    model is for inference afterwards (no training, and a checkpoint is saved from the original).
    """
    check_decode_dtype(dtype)
    model.eval()
    if dtype == "bfloat16":
        model.to(torch.bfloat16)
    elif dtype == "int8":
        if next(model.parameters()).device.type != "cpu":
            raise UsageError("dtype='int8' runs on the CPU; use bfloat16 or float32 on other devices")
        quantize_linears(model)
    use_decoding_layout(model)
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and int8 weight buffer (tied tensors once)."""
    seen: dict[int, int] = {}
    for t in list(model.parameters()) + [b for m in model.modules() if isinstance(m, Int8Linear)
                                          for b in m.buffers()]:
        seen[t.data_ptr()] = t.numel() * t.element_size()
    return sum(seen.values())

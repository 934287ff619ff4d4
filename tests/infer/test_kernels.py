"""The matrix-vector kernels (AVX-512 or portable, whichever this CPU runs; and the portable build alone)
against exact float64 arithmetic on the same numbers."""

import ctypes
import shutil
import subprocess

import pytest
import torch
import torch.nn.functional as F

from build_llm.infer import kernels
from build_llm.infer.quant import DecodeLinear, quantize_int4, quantize_int8
from tiny import int8_groups, int8_groups_bound

needs_kernels = pytest.mark.skipif(not kernels.available(),
                                   reason="the C kernels need Linux x86-64 and a C compiler")


@pytest.fixture(scope="module")
def portable_so(tmp_path_factory):
    """The portable C alone (-DKERNELS_PORTABLE: what a CPU without AVX2 or AVX-512 runs), built once."""
    if not kernels.available():
        pytest.skip("the C kernels need Linux x86-64 and a C compiler")
    out = tmp_path_factory.mktemp("portable") / "portable.so"
    subprocess.run([shutil.which("cc") or "gcc", *kernels.CFLAGS, "-DKERNELS_PORTABLE", str(kernels.SOURCE), "-o",
                    str(out), "-lm"], check=True)
    return out


@pytest.fixture(scope="module", params=["as built", "portable"])
def library(request, portable_so):
    """The kernels as this machine builds them, then the portable C alone, each installed as the library
    `kernels` calls."""
    if request.param == "as built":
        yield kernels._lib
        return
    built, kernels._lib = kernels._lib, kernels._bind(ctypes.CDLL(str(portable_so)))
    assert not kernels.wide()
    yield kernels._lib
    kernels._lib = built


def x16_rounded(x: torch.Tensor) -> torch.Tensor:
    """x as the int8 kernels take it: rounded to int16 per row (max |x| -> 32767), in float64."""
    x_scale = x.abs().amax(1, keepdim=True) / 32767  # float32 arithmetic, as in the kernel
    x16 = torch.round(x * (1 / x_scale))
    assert x16.abs().max() <= 32767
    return x16.double() * x_scale.double()


@pytest.mark.parametrize("rows", [1, 3, kernels.MAX_ROWS + 5])  # beyond MAX_ROWS: taken in two calls
# groups of 64 (AVX2: 8 groups at a time, then 4, then 1-3: 12, 13 and 15 groups a row) and others (portable)
@pytest.mark.parametrize("n, k, group", [(1, 1, 32), (7, 20, 64), (9, 100, 32), (64, 768, 64), (6, 832, 64),
                                         (5, 960, 64), (50, 3072, 128)])
def test_int4_matvec_is_the_float64_product_of_the_dequantised_weights(library, rows, n, k, group):
    g = torch.Generator().manual_seed(n * 1000 + k)
    x, w, bias = torch.randn(rows, k, generator=g), torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    q, scale = quantize_int4(w, group)
    dequantised = q.double() * scale.double().repeat_interleave(group, dim=1)[:, :k]
    exact = int8_groups(x, group) @ dequantised.T + bias.double()
    tol = 1e-5 * (x.abs().double() @ dequantised.abs().T).max().item()  # float32 sums of the groups' exact sums
    got = kernels.matvec(x, kernels.pack_int4(q, group), n, scale, bias, group)
    torch.testing.assert_close(got.double(), exact, atol=tol, rtol=0)


def test_int4_rounds_inputs_to_int8_per_group_ties_to_even(library):
    """Group 0's largest input is 127, so its step is exactly 1 and its half-integers are ties: 2.5 -> 2, 3.5 -> 4
    (rounding half away from zero gives another product); group 1 is all zero; group 2 holds 1000 and 0.1
    (rounded to 0: a group's small inputs are lost beside its large one, other groups' are not)."""
    x = torch.zeros(1, 192)
    x[0, 0], x[0, 1:64] = 127.0, torch.arange(1, 64) % 9 - 4.5  # -3.5 .. 3.5 in steps of 1, and -4.5
    x[0, 128], x[0, 129] = 1000.0, 0.1
    q = (torch.arange(3 * 192) % 16 - 8).view(3, 192).to(torch.int8)
    scale = torch.ones(3, 3, dtype=torch.bfloat16)
    packed = kernels.pack_int4(q, 64)
    got = kernels.matvec(x, packed, 3, scale, None, 64).double()
    even = x.clone()
    even[0, 1:64] = torch.round(x[0, 1:64])  # ties to even
    even[0, 129] = 0.0
    away = even.clone()
    away[0, 1:64] = torch.sign(x[0, 1:64]) * torch.floor(x[0, 1:64].abs() + 0.5)
    assert torch.equal(got, even.double() @ q.double().T)
    assert not torch.equal(got, away.double() @ q.double().T)


def dequantised_int4(w: torch.Tensor, group: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w quantised to int4: (packed, scale, the float64 weights they stand for)."""
    q, scale = quantize_int4(w, group)
    return kernels.pack_int4(q, group), scale, q.double() * scale.double().repeat_interleave(group, 1)[:, :w.shape[1]]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("col", [5, 190])  # in a whole group of 64 (AVX2's rounding), in the last, partial one
def test_a_nan_or_infinite_input_makes_its_row_nan_not_finite(library, bad, col):
    """A damaged model's NaN or infinity must reach the logits, where `generate` reports it. Rounded to an integer
    (undefined in C: AVX2 gave 127, the portable C 0) it gave finite outputs; now each of its row's outputs is NaN,
    and the other rows are what they are without it."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 200, generator=g), torch.randn(6, 200, generator=g)
    x[1, col] = bad
    packed, scale, dequantised = dequantised_int4(w)
    exact = int8_groups(x) @ dequantised.T  # the spec, computed on its own
    assert exact[1].isnan().all() and exact[[0, 2]].isfinite().all()
    tol = 1e-5 * (x[[0, 2]].abs().double() @ dequantised.abs().T).max().item()
    torch.testing.assert_close(kernels.matvec(x, packed, 6, scale, None, 64).double(), exact, atol=tol, rtol=0,
                               equal_nan=True)
    q, scale = quantize_int8(w)
    int8 = kernels.matvec(x, kernels.pack(q), 6, scale)
    assert int8[1].isnan().all() and torch.equal(int8[[0, 2]], kernels.matvec(x[[0, 2]], kernels.pack(q), 6, scale))


def test_inputs_too_small_for_their_step_are_zero(library):
    """Where 1 / step overflows float32 (a group's largest |x| below 127 * 2^-128, int4; a row's below
    32767 * 2^-128, int8), the inputs are taken as 0: they multiplied into infinities (rounded to the largest
    integer whatever their size) and NaNs (zeros: 127 in AVX2, 0 in the portable C)."""
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(2, 192, generator=g), torch.randn(6, 192, generator=g)
    x[0, 64:128] = torch.randn(64, generator=g) * 1e-38
    x[0, 70] = 0.0
    x[1] *= 1e-36  # int4's groups: steps of about 2e-38, normal; int8's row: too small
    packed, scale, dequantised = dequantised_int4(w)
    rounded = int8_groups(x)
    assert (rounded[0, 64:128] == 0).all() and (rounded[1] != 0).any()
    tol = 1e-5 * (x.abs().double() @ dequantised.abs().T).max().item()
    torch.testing.assert_close(kernels.matvec(x, packed, 6, scale, None, 64).double(), rounded @ dequantised.T,
                               atol=tol, rtol=0)
    q, scale = quantize_int8(w)
    int8 = kernels.matvec(x, kernels.pack(q), 6, scale)
    assert (int8[1] == 0).all() and int8[0].abs().min() > 0.0


def test_int4_packs_two_values_a_byte_and_unpacks_them():
    q = (torch.arange(3 * 40) % 16 - 8).view(3, 40).to(torch.int8)
    packed = kernels.pack_int4(q, 32)
    assert packed.shape == (3, 32) and packed.dtype == torch.uint8  # 40 columns padded to 64, two a byte
    assert int(packed[0, 0]) == (int(q[0, 0]) + 8) | ((int(q[0, 16]) + 8) << 4)  # value j and j + 16
    assert int(packed[0, 16]) == (int(q[0, 32]) + 8) | (8 << 4)  # the padding holds 0 (stored as 8)
    assert torch.equal(kernels.unpack_int4(packed, 40, 32), q)


@pytest.mark.parametrize("rows", [1, 3, kernels.MAX_ROWS + 5])  # beyond MAX_ROWS: taken in two calls
@pytest.mark.parametrize("n, k", [(1, 1), (7, 20), (9, 33), (64, 768), (50, 3072)])  # tails of 4 rows, 16 columns
def test_matvec_is_the_float64_product_of_the_stored_weights(library, rows, n, k):
    g = torch.Generator().manual_seed(n * 1000 + k)
    x = torch.randn(rows, k, generator=g)
    w = torch.randn(n, k, generator=g)
    bias = torch.randn(n, generator=g)
    wb = w.to(torch.bfloat16)
    q, scale = quantize_int8(w)
    exact_bf16 = x.double() @ wb.double().T + bias.double()
    # int8 takes x rounded to int16 per row (max |x| -> 32767), then sums the products exactly
    exact_int8 = x16_rounded(x) @ (q.double() * scale.double()[:, None]).T
    tol = 1e-5 * (x.abs().double() @ w.abs().double().T).max().item()  # float32 accumulation over k terms
    torch.testing.assert_close(kernels.matvec(x, kernels.pack(wb), n, None, bias).double(), exact_bf16, atol=tol, rtol=0)
    torch.testing.assert_close(kernels.matvec(x, kernels.pack(q), n, scale).double(), exact_int8, atol=tol, rtol=0)


@pytest.mark.parametrize("n, k", [(9, 33), (64, 768), (10, 5000)])  # 5000 columns: two of INT8_CHUNK's exact sums
def test_int8_rows_of_a_batch_get_the_bits_they_get_alone(library, n, k):
    """The server decodes its sequences together: each row of a batch (the AVX-512 kernel takes 4 at a time, then 1)
    must give what it gives alone, to the bit, so that greedy tokens do not depend on the batch."""
    g = torch.Generator().manual_seed(k)
    x, w = torch.randn(kernels.MAX_ROWS, k, generator=g), torch.randn(n, k, generator=g)
    q, scale = quantize_int8(w)
    packed = kernels.pack(q)
    for rows in (kernels.MAX_ROWS, 7):
        together = kernels.matvec(x[:rows], packed, n, scale)
        alone = torch.cat([kernels.matvec(x[i:i + 1], packed, n, scale) for i in range(rows)])
        assert torch.equal(together, alone)


@pytest.fixture(scope="module")
def activations(tmp_path_factory):
    """kernels.c's `activation` (static, inside the decoding step), exported by a library that includes the source."""
    if not kernels.available():
        pytest.skip("the C kernels need Linux x86-64 and a C compiler")
    tmp = tmp_path_factory.mktemp("activation")
    (tmp / "act.c").write_text(f'#include "{kernels.SOURCE}"\n'
                               "void act(int64_t a, const float *x, float *y, int64_t n) {\n"
                               "    for (int64_t i = 0; i < n; i++) y[i] = activation(a, x[i]);\n}\n")
    subprocess.run([shutil.which("cc") or "gcc", *kernels.CFLAGS, str(tmp / "act.c"), "-o", str(tmp / "act.so"), "-lm"],
                   check=True)
    lib = ctypes.CDLL(str(tmp / "act.so"))
    lib.act.argtypes = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    return lib


def test_tanh_gelu_as_one_exp_is_pytorchs_for_every_float(activations):
    """The step's GELU (tanh) as v / (1 + exp(-2u)) against PyTorch's 0.5 v (1 + tanh u) over float32's whole range,
    one bit pattern in 4099 (every exponent, both signs): NaN and infinities where PyTorch's are (v = -inf: -inf / inf,
    as -inf * 0); elsewhere within 4 units of float32 rounding of |v| (measured: 3.2), where exp overflows (u << 0:
    v / inf = a zero) and where v^3 does (|v| > 7e12) too. The formulas round differently: 1 + tanh u loses digits
    for u < 0 (v = -9: PyTorch 0, this -1.3e-28)."""
    bits = torch.arange(0, 2**32, 4099, dtype=torch.int64)
    x = torch.cat([(bits - (bits >= 2**31).long() * 2**32).int().view(torch.float32),
                   torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 3.4e38, -3.4e38, -9.0, 9.0])])
    y = torch.empty_like(x)
    activations.act(0, x.data_ptr(), y.data_ptr(), len(x))  # GELU_TANH
    ref = F.gelu(x, approximate="tanh")
    assert torch.equal(y.isnan(), ref.isnan()) and torch.equal(y.isinf(), ref.isinf()), "NaN or infinity differ"
    both = torch.isfinite(ref)
    err = (y[both].double() - ref[both].double()).abs()
    assert (err <= 4 * 2**-24 * x[both].double().abs() + 2**-149).all()  # (+ a subnormal's step: v / 2 for tiny v)


def test_int8_products_equal_the_portable_kernels_to_the_bit(portable_so):
    """Where this CPU runs AVX2 but not AVX-512, the int8 products take the AVX2 intrinsics: their sums are exact
    integers, as the portable loop's are, so the numbers are the same bits."""
    if kernels.wide():
        pytest.skip("this CPU runs the AVX-512 kernels, whose float sums are ordered otherwise")
    g = torch.Generator().manual_seed(1)
    for rows, n, k in [(1, 50, 3072), (5, 9, 33), (16, 64, 768), (3, 10, 5000)]:
        x, w, bias = torch.randn(rows, k, generator=g), torch.randn(n, k, generator=g), torch.randn(n, generator=g)
        q, scale = quantize_int8(w)
        packed = kernels.pack(q)
        fast = kernels.matvec(x, packed, n, scale, bias)
        built, kernels._lib = kernels._lib, kernels._bind(ctypes.CDLL(str(portable_so)))
        try:
            portable = kernels.matvec(x, packed, n, scale, bias)
        finally:
            kernels._lib = built
        assert torch.equal(fast, portable)


@pytest.mark.parametrize("rows", [2, 3, 5, 17])  # the AVX2 kernel takes rows in pairs, then the odd one alone
@pytest.mark.parametrize("n, k", [(9, 4096), (6, 4128), (5, 8224)])  # one whole INT8_CHUNK; one and a tile; two and a tile
def test_int8_rows_in_groups_at_the_exact_sums_limit_equal_the_portable_kernels_and_each_row_alone(portable_so, rows,
                                                                                                    n, k):
    """Rows multiplied together, at the chunk's length where an int32 lane's sum comes closest to overflowing: every
    row gets the bits the portable loop gives it, and the bits it gets alone; the largest sums equal the exact integer."""
    g = torch.Generator().manual_seed(rows * k)
    x, w = torch.randn(rows, k, generator=g), torch.randn(n, k, generator=g)
    x[0], w[0] = 1.0, 1.0  # row 0 rounds to 32767 throughout, weight row 0 to 127: 4096 * 32767 * 127 a chunk
    x[-1], w[-1] = -1.0, -1.0
    q, scale = quantize_int8(w)
    packed = kernels.pack(q)
    fast = kernels.matvec(x, packed, n, scale)
    alone = torch.cat([kernels.matvec(x[i:i + 1], packed, n, scale) for i in range(rows)])
    built, kernels._lib = kernels._lib, kernels._bind(ctypes.CDLL(str(portable_so)))
    try:
        portable = kernels.matvec(x, packed, n, scale)
    finally:
        kernels._lib = built
    assert torch.equal(fast, alone) and torch.equal(fast, portable)
    # Row 0 by weight row 0 (and the last by the last): each chunk's exact sum 32767 * 127 * its columns, converted
    # to float32 and added in float32, then times x's scale (1 / 32767) and the weight row's, in float32
    f32 = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
    for row, col in ((0, 0), (-1, -1)):
        dot = f32(0.0)
        for k0 in range(0, k, 4096):
            dot = dot + f32(32767 * 127 * (min(k, k0 + 4096) - k0))
        assert fast[row, col] == dot * (f32(1.0) / 32767) * scale[col]


@needs_kernels
@pytest.mark.parametrize("dtype", ["bfloat16", "int8", "int4"])
def test_decode_linear_gives_the_same_with_and_without_the_kernels(dtype, monkeypatch):
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40)
    layer = DecodeLinear.from_linear(linear, dtype)
    x = torch.randn(2, 3, 96)  # 6 rows: the kernel's path
    fast = layer(x)
    assert layer.packed
    monkeypatch.setattr(kernels, "_lib", False)  # PyTorch's kernels (bfloat16 activations; int4: float32)
    plain = DecodeLinear.from_linear(linear, dtype)
    assert not plain.packed and torch.equal(plain.dequantized(), layer.dequantized())
    slow = plain(x)
    exact = x.double() @ plain.dequantized().double().T + plain.bias.double()
    assert fast.shape == slow.shape == (2, 3, 40)
    # float32 activations (int8: rounded to 15 bits; int4: to int8 per group of 64, at most the rounding's bound),
    # against bfloat16 activations (~3 significant digits)
    rounding = int8_groups_bound(x.view(-1, 96), plain.dequantized()).view(2, 3, 40) if dtype == "int4" else 0
    assert ((fast.double() - exact).abs() - rounding).max() < 1e-4
    assert (slow.double() - exact).abs().max() < (1e-5 if dtype == "int4" else 0.05)


def test_pack_lays_out_tiles_of_4_rows_by_32_columns_and_unpack_inverts_it():
    w = torch.arange(5 * 40).view(5, 40).to(torch.int8)
    packed = kernels.pack(w)
    assert packed.shape == (2, 2, 4, 32)  # rows padded to 8, columns to 64
    assert torch.equal(packed[0, 1, 2, :8], w[2, 32:40]) and (packed[0, 1, 2, 8:] == 0).all()
    assert torch.equal(packed[1, 0, 0], w[4, :32]) and (packed[1, :, 1:] == 0).all()
    assert torch.equal(kernels.unpack(packed, 5, 40), w)


def test_unavailable_kernels_say_so(monkeypatch):
    monkeypatch.setattr(kernels, "_lib", None)
    monkeypatch.setenv("BUILD_LLM_KERNELS", "0")
    assert kernels.available() is False

"""qtool's W8A8 runtime (`qtool.runtime.w8a8`): pure functions against float64 references of the same math,
and against the real clients' own functions on the same inputs:

* compressed-tensors 0.20 ``forward_quantize`` (dynamic per-token int8 fake quantization): identical values;
* bitsandbytes 0.50 ``Linear8bitLt`` in eval mode on CPU (``MatMul8bitLt``, LLM.int8() with and without an
  outlier threshold): identical outputs (``torch.equal``), float32 / bfloat16 / float16.

Whole-model comparisons through transformers live in tests/formats/test_ct_w8a8.py and test_bnb_int8.py.
"""

from __future__ import annotations

import logging

import pytest
import torch

from qtool.formats.affine import AffineCodec
from qtool.runtime import w8a8
from qtool.runtime.w8a8 import Int8ActLinear

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tokens(batch: int, seq: int, width: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    """Activations with per-token magnitudes spread over 3 decades, one all-zero token, one token whose
    largest magnitude is negative (it must map to -128) and one whose largest is positive (127)."""
    g = gen(seed)
    x = torch.randn(batch, seq, width, generator=g) * torch.logspace(-2, 1, batch * seq).reshape(batch, seq, 1)
    x[0, 1] = 0
    x[0, 2, 7] = -127.5  # scale = 127.5 / 127.5 = 1 exactly: -127.5 rounds half-to-even to -128
    x[0, 3, 9] = 127.5  # clamps to 127 before rounding
    return x.to(dtype)


# ---- integer matmul ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("m,k,n", [(1, 256, 512), (7, 512, 256), (33, 576, 1536), (5, 4096, 64)])
def test_int_matmul_exact(m, k, n):
    """torch._int_mm and the chunked float32 emulation both equal the float64 (exact) product."""
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=gen(1))
    b = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=gen(2))
    ref = (a.double() @ b.double().T).to(torch.int64)
    assert torch.equal(w8a8.int_matmul(a, b).to(torch.int64), ref)
    assert torch.equal(w8a8.int_matmul_emulated(a, b).to(torch.int64), ref)
    assert w8a8.int_matmul(a, b).dtype == torch.int32


def test_int_matmul_worst_case_needs_chunks():
    """All codes -128 over 4096 columns: sums of 2^26 that plain float32 BLAS need not get right; ours do."""
    a = torch.full((3, 4096), -128, dtype=torch.int8)
    b = torch.full((5, 4096), -128, dtype=torch.int8)
    assert (w8a8.int_matmul(a, b) == 4096 * 128 * 128).all()
    assert (w8a8.int_matmul_emulated(a, b) == 4096 * 128 * 128).all()
    odd = torch.randint(-128, 128, (4, 4096), dtype=torch.int8, generator=gen(3))
    ref = (odd.double() @ a.double().T).to(torch.int64)
    assert torch.equal(w8a8.int_matmul_emulated(odd, a).to(torch.int64), ref)
    with pytest.raises(ValueError, match="int8"):
        w8a8.int_matmul(a.float(), b)


# ---- compressed-tensors: per-token int8 --------------------------------------------------------------------
def ct_args():
    from compressed_tensors.quantization import QuantizationArgs

    return QuantizationArgs(num_bits=8, type="int", symmetric=True, dynamic=True, strategy="token")


def ct_client_fake_quant(x: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' own forward_quantize on a module's input (dynamic: no stored scale)."""
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize
    from compressed_tensors.quantization.quant_config import QuantizationStatus

    module = torch.nn.Linear(x.shape[-1], 8)
    module.quantization_status = QuantizationStatus.COMPRESSED
    return forward_quantize(module, x, "input", ct_args())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ct_fake_quant_equals_compressed_tensors(dtype):
    x = tokens(3, 11, 256, dtype)
    ours = w8a8.ct_fake_quantize(x)
    theirs = ct_client_fake_quant(x)
    assert ours.dtype == theirs.dtype == dtype
    assert torch.equal(ours, theirs)
    codes, scale = w8a8.ct_token_quantize(x)
    assert codes[0, 2, 7] == -128 and codes[0, 3, 9] == 127  # absmax / 127.5: -absmax -> -128, +absmax -> 127
    assert (codes[0, 1] == 0).all() and scale[0, 1].item() == torch.finfo(dtype).eps


def test_ct_two_dimensional_inputs_are_per_token():
    """compressed-tensors reduces over dims >= 2: a 2-D input gets one scale for the whole tensor there.
    qtool always quantizes rows (tokens), i.e. what compressed-tensors does for the [1, seq, hidden] input."""
    x = tokens(1, 9, 256)[0]
    assert torch.equal(w8a8.ct_fake_quantize(x), ct_client_fake_quant(x.unsqueeze(0))[0])
    assert not torch.equal(w8a8.ct_fake_quantize(x), ct_client_fake_quant(x))


def test_ct_codes_vs_float64_reference():
    """Codes = round(clamp(x / s, -128, 127)) with s = absmax / 127.5, recomputed in float64 (same float32 s):
    identical except where the float32 quotient sits within float rounding of a .5 tie."""
    x = tokens(4, 16, 512)
    codes, scale = w8a8.ct_token_quantize(x)
    absmax = x.double().abs().amax(-1, keepdim=True)
    assert torch.equal(scale, (absmax.float() / 127.5).where(absmax > 0, torch.finfo(torch.float32).eps))
    quotient = x.double() / scale.double()
    ref = torch.round(quotient.clamp(-128, 127))
    near_tie = ((quotient - quotient.floor()) - 0.5).abs() < 1e-5
    diff = (codes.double() - ref).abs()
    assert diff.max() <= 1 and not (diff.bool() & ~near_tie).any()
    assert codes.min() == -128 and codes.max() == 127


WEIGHT_CODECS = [AffineCodec(8, 0, True), AffineCodec(8, 64, False), AffineCodec(4, 64, True),
                 AffineCodec(8, 0, True, torch.bfloat16)]


@pytest.mark.parametrize("codec", WEIGHT_CODECS, ids=lambda c: f"{c.name}-{str(c.scale_dtype)[6:]}")
def test_ct_linear_vs_float64_reference(codec):
    """Integer path = sum_k q_x q_w (exact) scaled by s_x s_w: against float64 of the same codes and scales."""
    w = torch.randn(192, 512, generator=gen(4)) * 0.05
    q = codec.encode(w)
    x = tokens(2, 13, 512)
    bias = torch.randn(192, generator=gen(5))
    zero = None if codec.symmetric else q.params["zero"]
    out = w8a8.ct_linear(x, q.codes, q.params["scale"], zero, bias)
    xq, sx = w8a8.ct_token_quantize(x)
    wd = w8a8.ct_dequantize(q.codes.double(), q.params["scale"].double(), None if zero is None else zero.double())
    ref = (xq.double() * sx.double()) @ wd.T + bias.double()
    assert out.shape == (2, 13, 192) and out.dtype == torch.float32
    assert ((out.double() - ref).abs() / ref.abs().amax()).max() < 1e-6
    # the float path (compressed-tensors' own arithmetic) is the same up to float32 rounding, plus the
    # rounding of each dequantized weight to the scale dtype (compressed-tensors dequantizes in it)
    flt = w8a8.ct_linear_float(x, q.codes, q.params["scale"], zero, bias)
    tol = 1e-5 if codec.scale_dtype == torch.float32 else 1e-2
    assert ((flt.double() - ref).abs() / ref.abs().amax()).max() < tol


def test_ct_linear_low_precision_inputs():
    """bfloat16 inputs: codes as compressed-tensors computes them in bfloat16, output cast back."""
    q = AffineCodec(8, 0, True).encode(torch.randn(64, 256, generator=gen(6)) * 0.05)
    x = tokens(2, 5, 256, torch.bfloat16)
    out = w8a8.ct_linear(x, q.codes, q.params["scale"])
    xq, sx = w8a8.ct_token_quantize(x)
    assert torch.equal(xq.to(torch.bfloat16) * sx, ct_client_fake_quant(x))
    ref = (xq.double() * sx.double()) @ w8a8.ct_dequantize(q.codes, q.params["scale"]).double().T
    assert out.dtype == torch.bfloat16
    assert ((out.double() - ref).abs() / ref.abs().amax()).max() < 1e-2  # one bfloat16 rounding of the output


# ---- bitsandbytes LLM.int8() ------------------------------------------------------------------------------
def bnb_client(cb: torch.Tensor, scb: torch.Tensor, threshold: float, bias: torch.Tensor | None = None):
    """A bitsandbytes Linear8bitLt holding (CB, SCB) as transformers' loader builds it, in eval mode."""
    bnb = pytest.importorskip("bitsandbytes")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # "inputs will be cast to float16"
    lin = bnb.nn.Linear8bitLt(cb.shape[1], cb.shape[0], bias=bias is not None, has_fp16_weights=False,
                              threshold=threshold)
    lin.weight = bnb.nn.Int8Params(cb.clone(), requires_grad=False, has_fp16_weights=False, CB=cb.clone(),
                                   SCB=scb.clone())
    if bias is not None:
        lin.bias = torch.nn.Parameter(bias.clone(), requires_grad=False)
    return lin.eval()


def bnb_weights(out=192, inp=256, seed=7):
    q = AffineCodec(8, 0, True).encode(torch.randn(out, inp, generator=gen(seed)) * 0.05)
    return q.codes, q.params["scale"].reshape(-1) * 127


def with_outliers(x: torch.Tensor, cols=(5, 77, 130), value=9.0) -> torch.Tensor:
    x = x.clone()
    x[..., list(cols)] = value * torch.sign(x[..., list(cols)] + 0.1)  # every entry of these columns is large
    return x


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("threshold", [0.0, 3.0])
def test_bnb_linear_equals_bitsandbytes(dtype, threshold):
    cb, scb = bnb_weights()
    bias = torch.randn(192, generator=gen(8)).to(dtype)
    x = with_outliers(tokens(2, 9, 256, seed=9)).to(dtype)
    x[1, 4, 200] = 5.0  # a single outlier element in a column that is otherwise small
    for inp in (x, x[1], x[1, :1], x[:, :0]):  # 3-D, 2-D, one row (bnb does not zero columns then), empty
        for b in (None, bias):
            client = bnb_client(cb, scb, threshold, b)
            with torch.no_grad():
                theirs = client(inp)
            ours = w8a8.bnb_linear(inp, cb, scb, b, threshold)
            assert ours.dtype == theirs.dtype == dtype
            assert torch.equal(ours, theirs), (tuple(inp.shape), b is not None)


def test_bnb_row_quantize_vs_float64_reference():
    """Rows of float16(x): outlier elements zeroed, absmax per row, round(a * 127 / absmax), outlier columns 0."""
    x = with_outliers(tokens(3, 7, 256, seed=10)).reshape(-1, 256)
    x[4, 200] = 5.0
    before = x.clone()
    codes, stats, cols = w8a8.bnb_row_quantize(x, threshold=3.0)
    assert torch.equal(x, before)  # the caller's input is not modified (bitsandbytes restores it too)
    h = x.to(torch.float16).double()
    outlier = h.abs() >= 3.0
    assert cols.tolist() == torch.argwhere(outlier.any(0)).view(-1).tolist()
    assert 200 in cols.tolist() and 5 in cols.tolist()
    h[outlier] = 0
    assert torch.equal(stats.double(), h.abs().amax(1))
    absmax = h.abs().amax(1, keepdim=True)
    ref = torch.round(h * (127.0 / absmax)).where(absmax > 0, 0.0)  # the all-zero token: codes 0
    ref[:, cols] = 0
    assert (codes.double() - ref).abs().max() <= 1  # float32 (bnb) vs float64 at exact ties only
    assert (codes.double() != ref).float().mean() < 1e-3


def test_bnb_linear_vs_float64_reference():
    cb, scb = bnb_weights()
    x = tokens(2, 9, 256, seed=11)
    out = w8a8.bnb_linear(x, cb, scb)
    codes, stats, _ = w8a8.bnb_row_quantize(x.reshape(-1, 256))
    ref = (codes.double() @ cb.double().T) * stats.double()[:, None] * scb.double()[None, :] / 127**2
    rel = ((out.reshape(-1, 192).double() - ref).abs() / ref.abs().amax()).max()
    assert abs(rel - 1.8e-5) < 1e-5  # bitsandbytes' 6.200124e-05 for 1/127^2: +1.8e-5 relative, kept on purpose


def test_bnb_outlier_columns_stay_float():
    """LLM.int8(): columns with entries above the threshold are multiplied in float, so their contribution
    is the float product exactly, and the whole output is far closer to float than without decomposition."""
    cb, scb = bnb_weights()
    w = w8a8.bnb_dequantize(cb, scb)
    cols = [5, 77, 130]
    x = with_outliers(torch.randn(2, 9, 256, generator=gen(13)), cols, value=40.0)
    y = w8a8.bnb_linear(x, cb, scb, threshold=6.0)
    rest = x.clone()
    rest[..., cols] = 0
    float_part = x[..., cols] @ w[:, cols].T
    assert torch.allclose(y - w8a8.bnb_linear(rest, cb, scb, threshold=6.0), float_part, rtol=0, atol=1e-5)
    exact = x @ w.T
    err_split = (y - exact).abs().max().item()
    err_plain = (w8a8.bnb_linear(x, cb, scb, threshold=0.0) - exact).abs().max().item()
    print(f"outliers: max |d| vs float {err_split:.3g} with threshold 6, {err_plain:.3g} without")
    assert err_split < err_plain / 4
    module = Int8ActLinear(cb, scb, scheme="bnb", threshold=6.0)
    assert torch.equal(module(x), y)


# ---- the module -------------------------------------------------------------------------------------------------
def test_int8_act_linear_module():
    q = AffineCodec(8, 64, False).encode(torch.randn(64, 256, generator=gen(14)) * 0.05)
    bias = torch.randn(64, generator=gen(15))
    m = Int8ActLinear(q.codes, q.params["scale"], q.params["zero"], bias)
    x = tokens(2, 5, 256)
    assert torch.equal(m(x), w8a8.ct_linear(x, q.codes, q.params["scale"], q.params["zero"], bias))
    assert torch.equal(m.dequantized_weight(), q.dequantize())
    assert m.state_dict() == {} and "scheme=ct" in repr(m)
    m.matmul = "float"
    assert torch.equal(m(x), w8a8.ct_linear_float(x, q.codes, q.params["scale"], q.params["zero"], bias))
    cb, scb = bnb_weights(64)
    b = Int8ActLinear(cb, scb, scheme="bnb", threshold=6.0)
    assert torch.equal(b.dequantized_weight(), cb * scb[:, None] * w8a8.BNB_DEQUANT) and "threshold=6.0" in repr(b)


@pytest.mark.parametrize("kwargs,match", [
    (dict(scheme="gguf"), "scheme"),
    (dict(codes=torch.zeros(4, 8)), "int8"),
    (dict(scale=torch.ones(4, 3)), "n_groups"),
    (dict(zero=torch.zeros(4, 1)), "zero"),
    (dict(threshold=6.0), "outlier"),
    (dict(scheme="bnb", scale=torch.ones(4, 1)), "SCB"),
    (dict(scheme="bnb", scale=torch.ones(4, dtype=torch.float16)), "SCB"),
    (dict(scheme="bnb", scale=torch.ones(4), matmul="float"), "matmul"),
    (dict(bias=torch.zeros(5)), "bias"),
])
def test_int8_act_linear_rejects(kwargs, match):
    args = dict(codes=torch.zeros(4, 8, dtype=torch.int8), scale=torch.ones(4, 1))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        Int8ActLinear(args.pop("codes"), args.pop("scale"), **args)

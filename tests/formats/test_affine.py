"""AffineCodec: error bounds, clip search, validation, and parity with compressed-tensors' quantize."""

from __future__ import annotations

import time

import pytest
import torch

from qtool.errors import IndivisibleError
from qtool.formats.affine import AffineCodec, dequantize_with, quantize_with
from qtool.formats.base import Codec, QTensor

BITS = [2, 3, 4, 8]
GROUPS = [32, 64, 128, 0]


def weights(out=48, inp=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * 0.05
    w[3, 17] = 0.9  # an outlier
    w[5] = torch.rand(inp, generator=g) * 0.1  # an all-positive row (asym matters)
    w[7, :128] = 0.0  # an all-zero group (for every group size <= 128)
    return w


def pre_clamp(codec: AffineCodec, w: torch.Tensor, params) -> torch.Tensor:
    s, z = codec.column_params(params, w.shape[1])
    return w / s.float() + z.float()


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("sym", [True, False])
def test_error_within_half_step(bits, group, sym):
    codec = AffineCodec(bits, group, sym)
    w = weights()
    q = codec.encode(w)
    assert q.codes.dtype == torch.int8 and q.codes.shape == w.shape
    n_groups = 256 // (group or 256)
    assert q.params["scale"].shape == (48, n_groups) and q.params["scale"].dtype == torch.float32
    assert q.params["zero"].shape == (48, n_groups) and q.params["zero"].dtype == torch.int8
    assert int(q.codes.min()) >= codec.qmin and int(q.codes.max()) <= codec.qmax
    if sym:
        assert (q.params["zero"] == 0).all()
    dq = q.dequantize()
    assert torch.isfinite(dq).all()
    scale, _ = codec.column_params(q.params, 256)
    err = (w - dq).abs()
    # with float32 scales nothing clips by more than half a step, so the bound holds everywhere
    assert (err <= scale * (0.5 + 1e-5) + 1e-12).all(), float((err / scale).max())
    assert (dq[7, :128] == 0).all()  # an all-zero group reconstructs exactly, no NaN


@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sym", [True, False])
def test_low_precision_scales(scale_dtype, sym):
    codec = AffineCodec(4, 64, sym, scale_dtype=scale_dtype)
    w = weights()
    q = codec.encode(w)
    assert q.params["scale"].dtype == scale_dtype
    dq = q.dequantize()
    y = pre_clamp(codec, w, q.params)
    unclipped = (y >= codec.qmin) & (y <= codec.qmax)
    scale, zero = codec.column_params(q.params, 256)
    err = (w - dq).abs()
    assert unclipped.float().mean() > 0.95
    # plus the rounding of the product (q - zp) * scale to the scale dtype
    bound = scale.float() * 0.5 * (1 + 1e-3) + dq.abs() * torch.finfo(scale_dtype).eps
    assert (err[unclipped] <= bound[unclipped]).all()
    # dequantize is what a loader computes: (q - zp) in the scale dtype, times the scale, in the scale dtype
    loader = ((q.codes.to(scale_dtype) - zero.to(scale_dtype)) * scale).float()
    assert torch.equal(dq, loader)


def test_degenerate_groups_never_nan():
    w = torch.zeros(4, 64)
    w[1] = 1e-30  # underflows a float16 scale
    w[2, 0] = -1e-8
    for codec in (AffineCodec(4, 32, True, torch.float16), AffineCodec(4, 32, False, torch.float16),
                  AffineCodec(8, 0, False, clip_search=True)):
        q = codec.encode(w)
        assert torch.isfinite(q.params["scale"].float()).all() and (q.params["scale"] > 0).all()
        dq = q.dequantize()
        assert torch.isfinite(dq).all()
        assert (dq[0] == 0).all() and (dq[3] == 0).all()
        assert (w - dq).abs().max() <= 1e-8


def weighted_group_mse(codec, w, q, importance):
    out, inp = w.shape
    e = (w - q.dequantize()).square() * importance
    return e.reshape(out, codec.n_groups(inp), -1).sum(-1)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [32, 128, 0])
@pytest.mark.parametrize("sym", [True, False])
def test_clip_search_never_worse(bits, group, sym):
    g = torch.Generator().manual_seed(1)
    w = torch.distributions.Laplace(0.0, 0.03).sample((32, 256))  # heavy tails: clipping pays off
    importance = torch.rand(256, generator=g) * 10
    plain, clip = AffineCodec(bits, group, sym), AffineCodec(bits, group, sym, clip_search=True)
    for imp in (None, importance):
        ones = torch.ones(256) if imp is None else imp
        e_plain = weighted_group_mse(plain, w, plain.encode(w, imp), ones)
        e_clip = weighted_group_mse(clip, w, clip.encode(w, imp), ones)
        assert (e_clip <= e_plain).all()
        if bits <= 4:
            assert e_clip.sum() < 0.97 * e_plain.sum()


def test_clip_search_uses_importance():
    w = torch.distributions.Laplace(0.0, 0.03).sample((16, 128))
    imp = torch.ones(128)
    imp[:8] = 1000.0
    codec = AffineCodec(3, 0, True, clip_search=True)
    weighted, unweighted = codec.encode(w, imp), codec.encode(w)
    e_w = weighted_group_mse(codec, w, weighted, imp).sum()
    e_u = weighted_group_mse(codec, w, unweighted, imp).sum()
    assert e_w <= e_u
    with pytest.raises(ValueError, match="importance"):
        codec.fit(w, torch.ones(127))
    with pytest.raises(ValueError, match="importance"):
        codec.fit(w, -torch.ones(128))


def test_indivisible():
    codec = AffineCodec(4, 128, True)
    with pytest.raises(IndivisibleError) as e:
        codec.check_shape((1536, 576))
    assert "576" in str(e.value) and "128" in str(e.value)
    with pytest.raises(IndivisibleError):
        codec.encode(torch.randn(8, 576))
    AffineCodec(4, 64, True).check_shape((1536, 576))  # 576 = 9 * 64
    AffineCodec(4, 0, True).check_shape((1536, 576))


@pytest.mark.parametrize(
    "args",
    [(1, 64, True), (9, 64, True), (4, -1, True), (4.0, 64, True), (4, 64, True, torch.int8)],
)
def test_validation(args):
    with pytest.raises(ValueError):
        AffineCodec(*args)


def test_names_and_protocol():
    assert AffineCodec(4, 64, False).name == "int4_g64_asym"
    assert AffineCodec(8, 0, True).name == "int8_ch_sym"
    assert AffineCodec(3, 128, True, clip_search=True).name == "int3_g128_sym_clip"
    codec = AffineCodec(4, 64, True)
    assert isinstance(codec, Codec)
    assert codec == AffineCodec(4, 64, True) and hash(codec) == hash(AffineCodec(4, 64, True))
    q = codec.encode(weights())
    assert isinstance(q, QTensor) and q.shape == (48, 256) and q.nbytes == codec.nbytes((48, 256))


@pytest.mark.parametrize("group", [64, 0])
def test_column_helpers_match_full_quantize(group):
    """GPTQ quantizes one column at a time through quantize_with/dequantize_with + column_params."""
    codec = AffineCodec(4, group, False)
    w = weights()
    params = codec.fit(w)
    full = codec.quantize(w, params)
    s, z = codec.column_params(params, w.shape[1])
    cols = [quantize_with(w[:, j:j + 1], s[:, j:j + 1], z[:, j:j + 1], codec.bits) for j in range(w.shape[1])]
    assert torch.equal(torch.cat(cols, 1), full)
    assert torch.equal(dequantize_with(full, s, z), codec.dequantize(QTensor(codec, (48, 256), full, params)))


def test_round_half_to_even():
    codec = AffineCodec(4, 0, True)
    params = {"scale": torch.ones(1, 1), "zero": torch.zeros(1, 1, dtype=torch.int8)}
    x = torch.tensor([[0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 7.6, -9.0]])
    assert codec.quantize(x, params).tolist() == [[0, 2, 2, 0, -2, -2, 7, -8]]


def ct_args(codec: AffineCodec):
    from compressed_tensors.quantization import QuantizationArgs

    if codec.group_size:
        return QuantizationArgs(num_bits=codec.bits, symmetric=codec.symmetric, strategy="group",
                                group_size=codec.group_size)
    return QuantizationArgs(num_bits=codec.bits, symmetric=codec.symmetric, strategy="channel")


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group", [32, 128, 0])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
def test_parity_with_compressed_tensors(bits, group, sym, scale_dtype):
    from compressed_tensors.quantization.lifecycle.forward import dequantize, fake_quantize, quantize

    codec = AffineCodec(bits, group, sym, scale_dtype=scale_dtype, clip_search=not sym)
    w = weights()
    q = codec.encode(w)
    args = ct_args(codec)
    scale, zero = q.params["scale"], q.params["zero"]
    ct_codes = quantize(w, scale, zero, args, dtype=torch.int8)
    assert torch.equal(ct_codes, q.codes)
    ct_fake = fake_quantize(w, scale, zero, args)
    assert torch.equal(ct_fake.float(), q.dequantize())
    ct_dq = dequantize(q.codes, scale, zero, args)
    assert torch.equal(ct_dq.float(), q.dequantize())


def test_fast_enough():
    torch.manual_seed(0)
    w = torch.randn(1536, 576)
    for codec in (AffineCodec(4, 64, False), AffineCodec(8, 0, True)):
        codec.encode(w)
        t = time.perf_counter()
        q = codec.encode(w)
        codec.dequantize(q)
        assert time.perf_counter() - t < 1.0  # milliseconds when the machine is idle; generous for CI
    clip = AffineCodec(4, 64, False, clip_search=True)
    t = time.perf_counter()
    clip.encode(w, torch.rand(576))
    assert time.perf_counter() - t < 5.0


# ---- float zero points (HQQ) -------------------------------------------------------------------
def test_float_zero_identity_and_validation():
    fz = AffineCodec(4, 64, False, float_zero=True)
    assert fz.name == "int4_g64_asym_fz" and AffineCodec(8, 0, False, float_zero=True).name == "int8_ch_asym_fz"
    assert AffineCodec(4, 64, False, clip_search=True, float_zero=True).name == "int4_g64_asym_clip_fz"
    assert AffineCodec(4, 64, False).float_zero is False and fz != AffineCodec(4, 64, False)
    with pytest.raises(ValueError, match="symmetric"):
        AffineCodec(4, 64, True, float_zero=True)
    with pytest.raises(TypeError):
        AffineCodec(4, 64, False, float_zero=1)
    # the zero counts in the scale dtype, unpacked: [out, n_groups]
    for dt, size in ((torch.float32, 4), (torch.float16, 2)):
        int_zero, fzc = AffineCodec(4, 64, False, dt), AffineCodec(4, 64, False, dt, float_zero=True)
        packed_zp = 4 * (48 * 4 // 32) * 4  # int32 [ceil(48*4/32), 4 groups]
        assert fzc.nbytes((48, 256)) == int_zero.nbytes((48, 256)) - packed_zp + 48 * 4 * size


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group", GROUPS)
def test_float_zero_fit_is_plain_min_max(bits, group):
    codec = AffineCodec(bits, group, False, float_zero=True)
    w = weights()
    q = codec.encode(w)
    scale, zero = q.params["scale"], q.params["zero"]
    assert zero.dtype == torch.float32 and zero.shape == scale.shape
    assert (zero != zero.round()).any()  # fractional zero points, no rounding
    wg = w.reshape(48, codec.n_groups(256), -1)
    lo, hi = wg.amin(-1), wg.amax(-1)  # the group's own range, 0 not forced in
    nonconst = hi > lo
    assert torch.allclose(scale[nonconst], ((hi - lo) / (2**bits - 1))[nonconst])
    assert torch.allclose(zero, codec.qmin - lo / scale)
    # min maps to qmin and max to qmax; nothing clips, so every error is within half a step
    assert (q.codes.reshape(wg.shape).amin(-1)[nonconst] == codec.qmin).all()
    assert (q.codes.reshape(wg.shape).amax(-1)[nonconst] == codec.qmax).all()
    err = (w - q.dequantize()).abs()
    s, _ = codec.column_params(q.params, 256)
    assert (err <= s * (0.5 + 1e-4) + 1e-7).all(), float((err / s).max())
    if group:
        assert (q.dequantize()[7, :128] == 0).all()  # constant groups: scale 1, exact


def test_float_zero_constant_groups_and_overflow():
    w = torch.tensor([[0.25] * 32 + [-3.0] * 32])
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        q = AffineCodec(4, 32, False, dt, float_zero=True).encode(w)
        assert torch.equal(q.dequantize(), w)  # (qmin - (qmin - v)) * 1 == v for these values
    with pytest.raises(ValueError, match="zero point overflows"):
        AffineCodec(4, 32, False, torch.float16, float_zero=True).encode(torch.full((1, 32), 7e4))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group", [32, 128])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_float_zero_parity_with_compressed_tensors(bits, group, scale_dtype):
    """compressed-tensors' quantize/dequantize with a float zero ([1, group] block, zp_dtype) equal ours."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize, fake_quantize, quantize

    codec = AffineCodec(bits, group, False, scale_dtype=scale_dtype, float_zero=True)
    w = weights()
    q = codec.encode(w)
    assert q.params["zero"].dtype == scale_dtype
    args = QuantizationArgs(num_bits=bits, symmetric=False, strategy="block", block_structure=[1, group],
                            zp_dtype=scale_dtype)
    scale, zero = q.params["scale"], q.params["zero"]
    assert torch.equal(quantize(w, scale, zero, args, dtype=torch.int8), q.codes)
    assert torch.equal(dequantize(q.codes, scale, zero, args).float(), q.dequantize())
    assert torch.equal(fake_quantize(w, scale, zero, args).float(), q.dequantize())
    # the zero really is used as a float: rounding it changes the weights
    rounded = dequantize(q.codes, scale, zero.round(), args).float()
    assert not torch.equal(rounded, q.dequantize())


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dequantize_with_equals_half_precision_arithmetic(scale_dtype):
    """The float32 fast path of `dequantize_with` (integer zero) gives exactly the scale-dtype arithmetic
    loaders run, over the whole int8 code and zero range and scales from subnormal to large."""
    from qtool.formats.affine import dequantize_with

    g = torch.Generator().manual_seed(0)
    codes = torch.randint(-128, 128, (64, 256), generator=g, dtype=torch.int8)
    zero = torch.randint(-128, 128, (64, 1), generator=g, dtype=torch.int8)
    scale = (torch.rand(64, 1, generator=g) * 8 - 20).exp2().to(scale_dtype)  # 2^-20 .. 2^-12: fp16 subnormals
    scale[::2] = (torch.rand(32, 1, generator=g) * 10).to(scale_dtype)
    ref = ((codes.to(scale_dtype) - zero.to(scale_dtype)) * scale).float()
    assert torch.equal(dequantize_with(codes, scale, zero), ref)
    fz = (zero.float() + 0.3).to(scale_dtype)  # a float zero keeps the scale-dtype subtraction (it rounds)
    assert torch.equal(dequantize_with(codes, scale, fz), ((codes.to(scale_dtype) - fz) * scale).float())

"""NF4Codec against bitsandbytes' own CPU kernels (the oracle), plus error bounds and byte counts."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

from qtool.errors import IndivisibleError
from qtool.formats.base import Codec
from qtool.formats.nf4 import (
    DYNAMIC_MAP,
    FP4_TABLE,
    NF4_TABLE,
    NF4Codec,
    _quantize_nested,
    create_dynamic_map,
)

F = pytest.importorskip("bitsandbytes.functional")

SHAPES = [(128, 256), (96, 200), (33, 7), (300, 257), (1, 1)]  # short tail blocks, odd numel, >256 blocks


@pytest.fixture(autouse=True)
def _eager_bnb():
    """bnb's generic dequant path is wrapped in torch.compile; run it eagerly (same ops, no compile time)."""
    with torch._dynamo.config.patch(disable=True):
        yield


def _bnb_codes(packed: torch.Tensor, n: int) -> torch.Tensor:
    flat = packed.reshape(-1)
    return torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1)[:n]


def test_tables_equal_bnb():
    assert torch.equal(NF4_TABLE, F.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(FP4_TABLE, F.get_4bit_type("fp4", device="cpu"))
    assert torch.equal(create_dynamic_map(), F.create_dynamic_map())
    assert torch.equal(DYNAMIC_MAP, F.create_dynamic_map())


@pytest.mark.parametrize("kind", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("block_size", [32, 64, 256])
@pytest.mark.parametrize("shape", SHAPES)
def test_bit_exact_with_bnb(kind, double_quant, block_size, shape):
    torch.manual_seed(0)
    w = torch.randn(shape) * 0.05
    w.view(-1)[::97] *= 8  # outliers: blocks with very different absmax, spread for the nested quant
    q = NF4Codec(kind, block_size, double_quant).encode(w)
    packed, state = F.quantize_4bit(w, blocksize=block_size, compress_statistics=double_quant,
                                    quant_type=kind)

    assert q.codes.dtype == torch.uint8 and q.codes.shape == (w.numel(),)
    assert torch.equal(q.codes, _bnb_codes(packed, w.numel()))
    assert torch.equal(q.params["quant_map"], state.code)
    if double_quant:
        assert torch.equal(q.params["absmax_q"], state.absmax)
        assert torch.equal(q.params["nested_absmax"], state.state2.absmax)
        assert torch.equal(q.params["offset"], state.offset)
        assert torch.equal(q.params["nested_quant_map"], state.state2.code)
    else:
        assert torch.equal(q.params["absmax"], state.absmax)
    # bnb's CPU dequant computes quant_map[code] * absmax in float32, as we do: equal, not merely close
    out = q.dequantize()
    assert out.dtype == torch.float32 and out.shape == w.shape
    assert torch.equal(out, F.dequantize_4bit(packed, state))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_match_bnb(dtype):
    w = (torch.randn(64, 192) * 0.05).to(dtype)
    q = NF4Codec("nf4", 64, True).encode(w)
    packed, state = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    assert torch.equal(q.codes, _bnb_codes(packed, w.numel()))
    assert torch.equal(q.params["absmax_q"], state.absmax)


def test_nested_codes_follow_bnb_cpu_lookup_table():
    """Values chosen on the LUT grid, where the CPU kernel and exact nearest-neighbour search disagree."""
    x = torch.randint(-65535, 65536, (256 * 64,)).float() / 65535
    x[::256] = 1.0
    q, state = F.quantize_blockwise(x, blocksize=256)
    codes, absmax = _quantize_nested(x)
    assert torch.equal(codes, q) and torch.equal(absmax, state.absmax)
    nearest = torch.bucketize(x, (DYNAMIC_MAP[:-1] + DYNAMIC_MAP[1:]) / 2).to(torch.uint8)
    assert not torch.equal(nearest, q)  # the LUT emulation is needed, exact search would fail this test


def test_zero_blocks():
    w = torch.zeros(8, 512)
    w[0, :64] = torch.linspace(-1, 1, 64)
    for dq in (False, True):
        q = NF4Codec("nf4", 64, dq).encode(w)
        packed, state = F.quantize_4bit(w, blocksize=64, compress_statistics=dq, quant_type="nf4")
        assert torch.equal(q.codes, _bnb_codes(packed, w.numel()))
        assert torch.equal(q.dequantize(), F.dequantize_4bit(packed, state))


@pytest.mark.parametrize("kind,bound", [("nf4", 0.1), ("fp4", 0.13)])
def test_error_bound_gaussian(kind, bound):
    """Relative RMSE on N(0, 1) weights, measured 0.092 (nf4) and 0.122 (fp4) at block 64."""
    torch.manual_seed(0)
    w = torch.randn(256, 1024)
    for dq in (False, True):
        err = NF4Codec(kind, 64, dq).encode(w).dequantize() - w
        assert (err.pow(2).mean() / w.pow(2).mean()).sqrt() < bound
    # every element lies within half the largest table gap of the block absmax
    q = NF4Codec(kind, 64).encode(w)
    gap = q.params["quant_map"].sort().values.diff().max()
    assert ((q.dequantize() - w).abs().view(-1, 64) <= gap / 2 * q.params["absmax"].view(-1, 1) + 1e-6).all()


def test_quantize_uses_fixed_params():
    w = torch.randn(16, 128)
    codec = NF4Codec("nf4", 64)
    params = codec.fit(w)
    assert torch.equal(codec.quantize(w, params), codec.encode(w).codes)
    doubled = codec.quantize(2 * w, params)  # scales fixed: twice the values saturate to the table ends
    assert (doubled != codec.encode(2 * w).codes).any()


def test_protocol_names_and_validation():
    assert isinstance(NF4Codec(), Codec)
    assert NF4Codec().name == "nf4_b64" and NF4Codec(double_quant=True).name == "nf4_b64_dq"
    assert NF4Codec("fp4", 128).name == "fp4_b128" and NF4Codec().bits == 4
    for bad in (dict(kind="int4"), dict(block_size=48), dict(block_size=16), dict(block_size=8192)):
        with pytest.raises(ValueError):
            NF4Codec(**bad)
    NF4Codec().check_shape((7, 3))
    with pytest.raises(IndivisibleError):
        NF4Codec().check_shape((0, 64))
    assert NF4Codec("nf4").pad_code == 7 and NF4Codec("fp4").pad_code == 0


@pytest.mark.parametrize("shape,dq,expected", [
    ((128, 256), False, 16384 + 4 * 512 + 64),
    ((128, 256), True, 16384 + 512 + 64 + 4 * 2 + 1024),
    ((33, 7), False, 116 + 4 * 4 + 64),
])
def test_nbytes_rule(shape, dq, expected):
    assert NF4Codec("nf4", 64, dq).nbytes(shape) == expected


def test_large_tensor_is_vectorised():
    import time

    w = torch.randn(49152, 576)
    start = time.process_time()
    NF4Codec("nf4", 64, True).encode(w)
    cpu = time.process_time() - start
    start = time.process_time()
    F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    assert cpu < 3 * (time.process_time() - start) + 0.5  # same order as bnb's own CPU quantizer

"""GGUF float codecs (F32, F16, BF16) against gguf-py: bit-exact rounding (NaN payloads, ties, overflow,
subnormals), bit-exact decoding, byte round trips, and the QTensor layout (values in params["value"])."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from qtool.formats.gguf_base import GGUF_CODECS, GGUFCodec
from qtool.formats.gguf_float import BF16, F16, F32, bf16_bits

CODECS = {"f32": F32, "f16": F16, "bf16": BF16}
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
SPECIAL_BITS = [
    0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF80FFFF, 0x7FBFFFFF, 0x7FFFFFFF,  # quiet / signalling NaNs, payloads
    0x7F800000, 0xFF800000, 0x00000000, 0x80000000,  # +-inf, +-0
    0x3F808000, 0x3F818000, 0x3F808001, 0x3F807FFF,  # bf16 ties to even (down, up), just above / below a tie
    0x7F7FFFFF, 0xFF7FFFFF, 0x7F7F8000,  # float32 max: bf16 rounds to inf; a tie at the top
    0x00000001, 0x807FFFFF, 0x00400000,  # float32 subnormals
    0x477FF000, 0x477FE000, 0x477FEFFF,  # 65520 (f16 tie -> inf), 65504 (f16 max), just below the tie
    0x33800000, 0x33000000, 0x33000001, 0x387FC000,  # f16 subnormal range: 2^-24, 2^-25 (tie -> 0), just above
    0x3F802000, 0x3F806000,  # f16 ties (1 + 2^-11 -> 1, 1 + 3*2^-11 -> up)
]


def data(rows: int = 16, cols: int = 64, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = (rng.standard_normal((rows, cols)) * np.exp(rng.uniform(-40, 40, (rows, cols)))).astype(np.float32)
    a.reshape(-1).view(np.uint32)[: len(SPECIAL_BITS)] = SPECIAL_BITS
    return a


def bits32(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def test_registered_with_gguf_ids_and_sizes():
    for name, c in CODECS.items():
        qt = GGMLQuantizationType[name.upper()]
        assert GGUF_CODECS[name] is c and isinstance(c, GGUFCodec)
        assert c.ggml_type == int(qt) and (c.block_size, c.type_size) == GGML_QUANT_SIZES[qt]
        assert c.sub_block == 1 and c.levels == ()
    assert (F32.bits, F16.bits, BF16.bits) == (32, 16, 16)
    assert F16.nbytes((3, 10)) == 60 and BF16.row_bytes(7) == 14


@pytest.mark.parametrize("name", list(CODECS))
@pytest.mark.filterwarnings("ignore:overflow encountered in cast")
def test_bit_exact_with_gguf(name):
    c = CODECS[name]
    a = data()
    q = c.encode(torch.from_numpy(a.copy()))
    assert q.codes.dtype == torch.uint8 and tuple(q.codes.shape) == (16, 0)
    assert q.params["value"].dtype == DTYPES[name] and tuple(q.params["value"].shape) == a.shape
    packed = c.pack(q)
    assert packed.dtype == torch.uint8 and tuple(packed.shape) == (16, c.row_bytes(64))
    ref = np.ascontiguousarray(gguf.quants.quantize(a, GGMLQuantizationType[name.upper()])).view(np.uint8)
    assert np.array_equal(packed.numpy(), ref.reshape(packed.shape))
    # decoding: bit for bit what gguf-py gives (NaN payloads included)
    deq = gguf.quants.dequantize(ref.reshape(packed.shape), GGMLQuantizationType[name.upper()])
    assert np.array_equal(bits32(c.dequantize(q).numpy()), bits32(np.asarray(deq).reshape(a.shape)))
    # round trip
    q2 = c.unpack(packed, a.shape)
    assert torch.equal(c.pack(q2), packed)
    assert np.array_equal(bits32(c.dequantize(q2).numpy()), bits32(c.dequantize(q).numpy()))
    assert q.nbytes == packed.numel()


def test_bf16_rounding_rule():
    """RNE on the top 16 bits; NaN keeps sign and top payload bits with the quiet bit forced."""
    x = torch.from_numpy(np.array(SPECIAL_BITS, dtype=np.uint32).view(np.float32))
    got = bf16_bits(x).numpy().view(np.uint16)
    expect = {0x3F808000: 0x3F80, 0x3F818000: 0x3F82, 0x3F808001: 0x3F81, 0x3F807FFF: 0x3F80,
              0x7F7FFFFF: 0x7F80, 0x7F800001: 0x7FC0, 0xFF80FFFF: 0xFFC0, 0x7FBFFFFF: 0x7FFF, 0x80000000: 0x8000}
    for b, want in expect.items():
        assert got[SPECIAL_BITS.index(b)] == want, hex(b)


@pytest.mark.parametrize("name", list(CODECS))
def test_faithful_and_importance_change_nothing(name):
    c = CODECS[name]
    w = torch.randn(8, 32)
    a = c.pack(c.encode(w))
    assert torch.equal(a, c.pack(c.encode(w, torch.rand(32), faithful=True)))
    assert torch.equal(c.fit(w, faithful=True)["value"].view(torch.uint8), c.fit(w)["value"].view(torch.uint8))


@pytest.mark.parametrize("name", list(CODECS))
def test_quantize_columns_rounds_onto_the_type(name):
    c = CODECS[name]
    w = torch.randn(8, 32) * 3
    q = c.encode(w)
    sc, of = c.column_grid(q.params, slice(4, 9))
    assert tuple(sc.shape) == (8, 5) and bool((sc == 1).all()) and bool((of == 0).all())
    col = c.quantize_columns(w[:, 4:9], sc, of)
    assert col.dtype == torch.float32 and torch.equal(col, c.dequantize(q)[:, 4:9])
    assert tuple(c.quantize(w, q.params).shape) == (8, 0)


def test_f16_errors_are_fp16_rounding():
    w = torch.randn(32, 64)
    assert torch.equal(F16.dequantize(F16.encode(w)), w.half().float())
    assert torch.equal(F32.dequantize(F32.encode(w)), w)
    err = (BF16.dequantize(BF16.encode(w)) - w).abs() / w.abs()
    assert float(err.max()) <= 2.0 ** -8

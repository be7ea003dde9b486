"""AWQ GEMM packing: the [0,2,4,6,1,3,5,7] interleave on known patterns, round trips, refusals, config."""

from __future__ import annotations

import pytest
import torch

from qtool.errors import IndivisibleError, UsageError
from qtool.formats import awq_format as af
from qtool.formats.affine import AffineCodec
from qtool.formats.base import QTensor


def i32(word: int) -> int:
    return word - 2**32 if word >= 2**31 else word


def reference_pack(u: torch.Tensor) -> list[list[int]]:
    """Independent reference: word c of row r holds column 8c + ORDER[i] in bits 4i..4i+3 (u unsigned [rows, cols])."""
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    return [[i32(sum(int(row[8 * c + order[i]]) << (4 * i) for i in range(8))) for c in range(len(row) // 8)]
            for row in u.tolist()]


def test_interleave_known_pattern():
    codec = AffineCodec(4, 16, False, torch.float16)
    out, inp = 16, 32
    codes_u = (torch.arange(out) % 8).unsqueeze(1).expand(out, inp)  # output column j holds code j % 8
    zeros_u = (torch.arange(out) % 8 + 8).unsqueeze(1).expand(out, 2)  # zero of column j = 8 + j % 8
    q = QTensor(codec, (out, inp), (codes_u - 8).to(torch.int8),
                {"scale": torch.full((out, 2), 0.25, dtype=torch.float16), "zero": (zeros_u - 8).to(torch.int8)})
    packed = af.pack(q)
    assert packed["qweight"].shape == (inp, out // 8) and packed["qweight"].dtype == torch.int32
    # nibble i holds column ORDER[i]: 0, 2, 4, 6, 1, 3, 5, 7 -> 0x75316420 (sequential would be 0x76543210)
    assert (packed["qweight"] == 0x75316420).all()
    assert packed["qzeros"].shape == (2, 2) and (packed["qzeros"] == i32(0xFDB9ECA8)).all()  # zeros stored as-is
    assert packed["scales"].shape == (2, out) and packed["scales"].dtype == torch.float16


def test_pack_matches_reference_on_random_codes():
    codec = AffineCodec(4, 32, False, torch.float16)
    q = codec.encode(torch.randn(24, 64))
    packed = af.pack(q)
    assert packed["qweight"].tolist() == reference_pack(q.codes.T.to(torch.int16) + 8)
    assert packed["qzeros"].tolist() == reference_pack(q.params["zero"].T.to(torch.int16) + 8)
    assert torch.equal(packed["scales"], q.params["scale"].T)


def test_symmetric_codec_writes_zero_8():
    q = AffineCodec(4, 32, True, torch.float16).encode(torch.randn(16, 64))
    assert (af.pack(q)["qzeros"] == i32(0x88888888)).all()


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.float32])
def test_round_trip(symmetric, group_size, scale_dtype):
    codec = AffineCodec(4, group_size, symmetric, scale_dtype)
    w = torch.randn(40, 256) * 0.05
    w[:, :128] = w[:, :128].abs()  # non-negative groups: zero point 0 is stored as-is
    q = codec.encode(w)
    packed = af.pack(q)
    assert set(packed) == set(af.KEYS)
    back = af.unpack(packed, group_size, symmetric)
    assert back.codec == AffineCodec(4, group_size, symmetric, torch.float16)
    assert torch.equal(back.codes, q.codes) and torch.equal(back.params["zero"], q.params["zero"])
    assert torch.equal(back.params["scale"], q.params["scale"].half())
    if scale_dtype == torch.float16:
        assert torch.equal(back.dequantize(), q.dequantize())
    else:  # float32 scales are rounded to the format's float16
        assert torch.allclose(back.dequantize(), q.dequantize(), rtol=2**-10, atol=0)
    if not symmetric:
        assert (q.params["zero"] == -8).any()
    again = af.pack(back)
    assert all(torch.equal(again[k], packed[k]) for k in packed)


def test_refusals():
    with pytest.raises(UsageError, match="4-bit"):
        af.pack(AffineCodec(8, 32, True).encode(torch.randn(16, 64)))
    with pytest.raises(UsageError, match="per-channel"):
        af.pack(AffineCodec(4, 0, False).encode(torch.randn(16, 64)))
    with pytest.raises(UsageError, match="float zero"):
        af.pack(AffineCodec(4, 32, False, float_zero=True).encode(torch.randn(16, 64)))
    with pytest.raises(IndivisibleError, match="multiple of 8"):
        af.pack(AffineCodec(4, 32, False).encode(torch.randn(12, 64)))
    packed = af.pack(AffineCodec(4, 32, False, torch.float16).encode(torch.randn(16, 64)))
    with pytest.raises(ValueError, match="do not fit"):
        af.unpack(packed, 16)


def test_quantization_config_read_by_transformers():
    from transformers import AwqConfig

    cfg = af.quantization_config(AffineCodec(4, 64, False), ["model.layers.0.mlp.down_proj", "lm_head"])
    assert cfg == {"bits": 4, "group_size": 64, "modules_to_not_convert": ["lm_head", "model.layers.0.mlp.down_proj"],
                   "quant_method": "awq", "version": "gemm", "zero_point": True}
    theirs = AwqConfig.from_dict(dict(cfg)).to_dict()
    for key in cfg:
        assert theirs[key] == cfg[key], key
    assert af.quantization_config(AffineCodec(4, 128, True), [])["modules_to_not_convert"] is None
    with pytest.raises(UsageError):
        af.quantization_config(AffineCodec(3, 128, True), [])

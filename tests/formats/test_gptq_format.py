"""GPTQ packing (v1 and v2): hand-computed bit layouts, round trips, refusals, and the config transformers reads."""

from __future__ import annotations

import pytest
import torch

from qtool.errors import IndivisibleError, UsageError
from qtool.formats import gptq_format as gf
from qtool.formats.affine import AffineCodec
from qtool.formats.base import QTensor
from qtool.formats.nf4 import NF4Codec


def i32(word: int) -> int:
    """An unsigned 32-bit word as the int32 a safetensors file holds."""
    return word - 2**32 if word >= 2**31 else word


def qtensor(codec: AffineCodec, codes_u: torch.Tensor, zeros_u: torch.Tensor, scale: torch.Tensor) -> QTensor:
    """A QTensor from UNSIGNED codes/zeros (as GPTQ thinks of them); qtool's are signed (minus 2^(b-1))."""
    half = 1 << (codec.bits - 1)
    return QTensor(codec, tuple(codes_u.shape), (codes_u - half).to(torch.int8),
                   {"scale": scale.to(codec.scale_dtype), "zero": (zeros_u - half).to(torch.int8)})


def bitstream_words(values: list[int], bits: int) -> list[int]:
    """Independent reference: values at bit i*bits of one little-endian bit stream, cut into 32-bit words."""
    big = sum(v << (bits * i) for i, v in enumerate(values))
    return [(big >> (32 * k)) & 0xFFFFFFFF for k in range(len(values) * bits // 32)]


def test_known_layout_4bit_sym_v1_and_v2():
    codec = AffineCodec(4, 8, True, torch.float16)
    out, inp = 8, 16
    codes = (torch.arange(inp).unsqueeze(0) + torch.arange(out).unsqueeze(1)) % 16  # code[o, i] = (i + o) % 16
    q = qtensor(codec, codes, torch.full((out, 2), 8), torch.full((out, 2), 0.5))
    v1, v2 = gf.pack(q, "gptq"), gf.pack(q, "gptq_v2")
    assert v1["qweight"].dtype == torch.int32 and v1["qweight"].shape == (2, 8)
    # along IN, sequential, LSB first: column 0 holds inputs 0..7 = codes 0..7 -> 0x76543210
    assert int(v1["qweight"][0, 0]) == 0x76543210
    assert int(v1["qweight"][0, 1]) == i32(0x87654321)  # column 1: codes 1..8
    assert int(v1["qweight"][1, 0]) == i32(0xFEDCBA98)  # column 0, inputs 8..15
    assert torch.equal(v1["qweight"], v2["qweight"])
    # symmetric zero 8: v1 stores 7 in every field (the -1 quirk), v2 stores 8
    assert v1["qzeros"].shape == (2, 1) and (v1["qzeros"] == 0x77777777).all()
    assert (v2["qzeros"] == i32(0x88888888)).all()
    assert v1["scales"].dtype == torch.float16 and v1["scales"].shape == (2, 8)
    assert v1["g_idx"].dtype == torch.int32 and v1["g_idx"].tolist() == [0] * 8 + [1] * 8


@pytest.mark.parametrize("bits,v1_word,v2_word", [(2, 0x55555555, 0xAAAAAAAA), (8, 0x7F7F7F7F, 0x80808080)])
def test_symmetric_zero_words(bits, v1_word, v2_word):
    codec = AffineCodec(bits, 32, True, torch.float16)
    q = codec.encode(torch.randn(32, 64))
    assert (gf.pack(q, "gptq")["qzeros"] == i32(v1_word)).all()
    assert (gf.pack(q, "gptq_v2")["qzeros"] == i32(v2_word)).all()


def test_known_layout_3bit_three_words():
    """32 codes in 3 words: 10 codes, one split 2+1 bits, 10 codes, one split 1+2, 10 codes (one bit stream)."""
    codec = AffineCodec(3, 32, True, torch.float16)
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 8, (32, 64), generator=g)
    q = qtensor(codec, codes, torch.full((32, 2), 4), torch.ones(32, 2))
    packed = gf.pack(q, "gptq")
    assert packed["qweight"].shape == (6, 32) and packed["qzeros"].shape == (2, 3)
    for col in (0, 5, 31):
        for block in (0, 1):
            expected = bitstream_words(codes[col, 32 * block: 32 * block + 32].tolist(), 3)
            got = [int(w) & 0xFFFFFFFF for w in packed["qweight"][3 * block: 3 * block + 3, col]]
            assert got == expected
    # code 10 straddles words 0/1: its low 2 bits are word 0's top bits, its high bit is word 1's bit 0
    w0, w1 = (int(packed["qweight"][k, 0]) & 0xFFFFFFFF for k in (0, 1))
    assert ((w0 >> 30) | ((w1 & 1) << 2)) == int(codes[0, 10])
    # symmetric zero 4: v1 stores 3 in each logical field, v2 stores 4
    v2 = gf.pack(q, "gptq_v2")
    assert [int(w) & 0xFFFFFFFF for w in packed["qzeros"][0]] == bitstream_words([3] * 32, 3)
    assert [int(w) & 0xFFFFFFFF for w in v2["qzeros"][0]] == bitstream_words([4] * 32, 3)


@pytest.mark.parametrize("bits", gf.BITS)
@pytest.mark.parametrize("fmt,symmetric", [("gptq", True), ("gptq_v2", True), ("gptq_v2", False)])
@pytest.mark.parametrize("group_size", [32, 0])
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16])
def test_round_trip_exact(bits, fmt, symmetric, group_size, scale_dtype):
    codec = AffineCodec(bits, group_size, symmetric, scale_dtype)
    w = torch.randn(64, 96) * 0.05
    w[:, :32] = w[:, :32].abs()  # non-negative groups: asymmetric zero point 0 (the v1-breaking value)
    q = codec.encode(w)
    packed = gf.pack(q, fmt)
    assert set(packed) == set(gf.KEYS)
    back = gf.unpack(packed, bits, group_size or -1, symmetric, fmt)
    assert back.shape == q.shape and torch.equal(back.codes, q.codes)
    assert torch.equal(back.params["zero"], q.params["zero"])
    assert back.codec == AffineCodec(bits, group_size, symmetric, torch.float16)
    # bfloat16 scales of this range are float16-representable, so the dequantized weight is unchanged
    assert torch.equal(back.params["scale"].float(), q.params["scale"].float())
    assert torch.allclose(back.dequantize(), q.dequantize(), rtol=2**-8, atol=0)
    if scale_dtype == torch.float16:
        assert torch.equal(back.dequantize(), q.dequantize())
    if not symmetric and group_size:
        assert (q.params["zero"].to(torch.int16) + (1 << (bits - 1)) == 0).any()  # zero 0 was really tested
    again = gf.pack(back, fmt)
    assert all(torch.equal(again[k], packed[k]) for k in packed)


@pytest.mark.parametrize("bits", gf.BITS)
def test_v1_is_v2_minus_one_per_field(bits):
    codec = AffineCodec(bits, 32, True, torch.float16)
    q = codec.encode(torch.randn(64, 64))
    v1, v2 = gf.pack(q, "gptq")["qzeros"], gf.pack(q, "gptq_v2")["qzeros"]
    from qtool.formats.compressed_tensors import unpack_int32

    f1, f2 = unpack_int32(v1, bits, 64), unpack_int32(v2, bits, 64)
    assert torch.equal(f1.to(torch.int16) + 1, f2.to(torch.int16))


def test_float32_scales_are_rounded_to_float16():
    codec = AffineCodec(4, 32, True, torch.float32)
    q = codec.encode(torch.randn(16, 64) * 0.05)
    packed = gf.pack(q, "gptq")
    assert packed["scales"].dtype == torch.float16
    assert torch.equal(packed["scales"], q.params["scale"].T.half())
    with pytest.raises(ValueError, match="overflows"):
        gf.pack(QTensor(codec, q.shape, q.codes, {**q.params, "scale": q.params["scale"] * 1e8}), "gptq")


def test_refusals():
    asym = AffineCodec(4, 32, False, torch.float16)
    q = asym.encode(torch.randn(16, 64))
    with pytest.raises(UsageError, match="gptq_v2"):
        gf.pack(q, "gptq")
    gf.pack(q, "gptq_v2")
    with pytest.raises(UsageError, match="5-bit"):
        gf.pack(AffineCodec(5, 32, True).encode(torch.randn(16, 64)), "gptq_v2")
    with pytest.raises(UsageError, match="integer affine"):
        gf.check_codec(NF4Codec("nf4", 64), "gptq")
    with pytest.raises(UsageError, match="float zero"):  # HQQ-style float zero points
        gf.pack(AffineCodec(4, 32, False, float_zero=True).encode(torch.randn(16, 64)), "gptq_v2")
    with pytest.raises(IndivisibleError, match="divisible by 32"):
        gf.pack(AffineCodec(3, 0, True).encode(torch.randn(32, 48)), "gptq")
    with pytest.raises(IndivisibleError, match="divisible by 8"):
        gf.pack(AffineCodec(4, 0, True).encode(torch.randn(12, 64)), "gptq")
    with pytest.raises(ValueError, match="checkpoint format"):
        gf.pack(q, "gptq_v3")


def test_act_order_g_idx_is_written_and_read_back():
    """A QTensor with act-order groups writes its g_idx as is (natural ones write i // group_size) and unpacks to
    the same codes, params and weight; the unpacked weight is (q - z[g_idx]) * s[g_idx], computed by hand here."""
    codec = AffineCodec(4, 8, False, torch.float16)
    out, inp = 8, 16
    codes = (torch.arange(inp).unsqueeze(0) + torch.arange(out).unsqueeze(1)) % 16
    zeros = torch.tensor([[3, 12]] * out)
    scale = torch.tensor([[0.5, 2.0]] * out)
    g_idx = torch.tensor([1, 0] * 8, dtype=torch.int32)  # even columns in group 1, odd ones in group 0
    q = qtensor(codec, codes, zeros, scale)
    q = QTensor(codec, q.shape, q.codes, q.params | {"g_idx": g_idx})
    packed = gf.pack(q, "gptq_v2")
    assert packed["g_idx"].dtype == torch.int32 and torch.equal(packed["g_idx"], g_idx)
    back = gf.unpack(packed, 4, 8, False, "gptq_v2")
    assert torch.equal(back.codes, q.codes) and back.params.keys() == q.params.keys()
    assert all(torch.equal(back.params[k], q.params[k]) for k in q.params)
    by_hand = torch.tensor([[(c - (12 if j % 2 == 0 else 3)) * (2.0 if j % 2 == 0 else 0.5)
                             for j, c in enumerate(row)] for row in codes.tolist()])
    assert torch.equal(back.dequantize(), by_hand) and torch.equal(q.dequantize(), by_hand)
    # the same file read with the natural map is another weight
    natural = dict(packed, g_idx=(torch.arange(inp) // 8).to(torch.int32))
    nat = gf.unpack(natural, 4, 8, False, "gptq_v2")
    assert "g_idx" not in nat.params and not torch.equal(nat.dequantize(), by_hand)
    plain = AffineCodec(4, 32, True, torch.float16).encode(torch.randn(16, 64))
    assert torch.equal(gf.pack(plain, "gptq")["g_idx"], (torch.arange(64) // 32).to(torch.int32))
    assert "g_idx" not in gf.unpack(gf.pack(plain, "gptq"), 4, 32, True, "gptq").params


def test_unpack_refuses_broken_g_idx():
    q = AffineCodec(4, 32, True, torch.float16).encode(torch.randn(16, 64))
    packed = gf.pack(q, "gptq")
    for bad in (packed["g_idx"] + 1, packed["g_idx"][:-1], packed["g_idx"].float(), packed["g_idx"] - 1):
        with pytest.raises(ValueError, match="g_idx"):
            gf.unpack(dict(packed, g_idx=bad), 4, 32, True, "gptq")
    with pytest.raises(ValueError, match="g_idx"):
        gf.pack(QTensor(q.codec, q.shape, q.codes, q.params | {"g_idx": packed["g_idx"] + 1}), "gptq")
    reversed_map = gf.unpack(dict(packed, g_idx=packed["g_idx"].flip(0)), 4, 32, True, "gptq")
    assert torch.equal(reversed_map.params["g_idx"], packed["g_idx"].flip(0))
    with pytest.raises(ValueError, match="do not fit"):
        gf.unpack(packed, 4, 16, True, "gptq")


def test_desc_act_config():
    from transformers import GPTQConfig

    cfg = gf.quantization_config(AffineCodec(4, 64, False), "gptq_v2", ["lm_head"], desc_act=True)
    assert cfg["desc_act"] is True and cfg["static_groups"] is False
    assert GPTQConfig.from_dict(dict(cfg)).to_dict()["desc_act"] is True
    with pytest.raises(ValueError, match="static_groups"):
        gf.quantization_config(AffineCodec(4, 64, False), "gptq_v2", ["lm_head"], desc_act=True, static_groups=True)


def test_gptq_dynamic_groups_pack_deterministically():
    """Two GPTQ runs with act-order groups give byte-identical tensors (g_idx included)."""
    from qtool.methods import gptq

    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 128, generator=g)
    x = torch.randn(256, 128, generator=g) * torch.rand(128, generator=g)
    packs = [gf.pack(gptq.quantize(w, AffineCodec(4, 32, True, torch.float16), x.T @ x,
                                   gptq.GPTQParams(act_order="dynamic"))[0], "gptq") for _ in range(2)]
    assert not torch.equal(packs[0]["g_idx"], (torch.arange(128) // 32).to(torch.int32))
    assert all(torch.equal(packs[0][k], packs[1][k]) and packs[0][k].dtype == packs[1][k].dtype for k in gf.KEYS)


def test_quantization_config_read_by_transformers():
    from transformers import GPTQConfig

    cfg = gf.quantization_config(AffineCodec(4, 64, True), "gptq", ["lm_head"], damp_percent=0.05)
    assert cfg["quant_method"] == "gptq" and cfg["format"] == cfg["checkpoint_format"] == "gptq"
    assert (cfg["bits"], cfg["group_size"], cfg["sym"], cfg["desc_act"]) == (4, 64, True, False)
    assert cfg["meta"] == {"quantizer": ["qtool:0.1.0"]} and cfg["pack_dtype"] == "int32"
    assert "dynamic" not in cfg and "modules_in_block_to_quantize" not in cfg
    theirs = GPTQConfig.from_dict(dict(cfg)).to_dict()
    for key in ("bits", "group_size", "sym", "desc_act", "damp_percent", "format", "checkpoint_format", "meta"):
        assert theirs[key] == cfg[key], key

    v2 = gf.quantization_config(AffineCodec(2, 0, False), "gptq_v2", ["lm_head", "model.layers.0.mlp.down_proj"],
                                quantized=["model.layers.1.mlp.down_proj"])
    assert v2["group_size"] == -1 and v2["sym"] is False and v2["format"] == "gptq_v2"
    assert v2["modules_in_block_to_quantize"] == [["model.layers.1.mlp.down_proj"]]
    assert v2["dynamic"] == {r"-:^model\.layers\.0\.mlp\.down_proj$": {}}
    assert GPTQConfig.from_dict(dict(v2)).to_dict()["format"] == "gptq_v2"
    with pytest.raises(UsageError):
        gf.quantization_config(AffineCodec(4, 64, False), "gptq", [])
    with pytest.raises(ValueError, match="damp"):
        gf.quantization_config(AffineCodec(4, 64, True), "gptq", [], damp_percent=0.0)

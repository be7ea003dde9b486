"""compressed-tensors pack-quantized: bit parity with compressed-tensors 0.20 and a real transformers load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from qtool.formats import compressed_tensors as ct
from qtool.formats.affine import AffineCodec

ct_helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")


def random_codes(rows, cols, bits, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (rows, cols), generator=g, dtype=torch.int8)


# ---- packing -----------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("cols", [1, 7, 32, 33, 64, 100, 576])
def test_pack_int32_bit_exact_with_compressed_tensors(bits, cols):
    codes = random_codes(9, cols, bits, seed=bits * 1000 + cols)
    ours = ct.pack_int32(codes, bits)
    theirs = ct_helpers.pack_to_int32(codes, bits)
    assert ours.dtype == torch.int32 and ours.shape == (9, -(-cols * bits // 32))
    assert torch.equal(ours, theirs)
    assert torch.equal(ct.unpack_int32(theirs, bits, cols), codes)
    assert torch.equal(ct_helpers.unpack_from_int32(ours, bits, torch.Size([9, cols])), codes)
    # zero points pack along dim 0: ours is "transpose, pack rows, transpose back"
    zp_theirs = ct_helpers.pack_to_int32(codes.T.contiguous(), bits, packed_dim=0)
    assert torch.equal(ct.pack_int32(codes, bits).T, zp_theirs)


@pytest.mark.parametrize("bits", [3, 4])
def test_pack_in_row_slices(monkeypatch, bits):
    monkeypatch.setattr(ct, "_ROWS_ELEMS", 200)  # forces several row slices
    codes = random_codes(37, 100, bits)
    packed = ct.pack_int32(codes, bits)
    assert torch.equal(packed, ct_helpers.pack_to_int32(codes, bits))
    assert torch.equal(ct.unpack_int32(packed, bits, 100), codes)


def test_known_layout_4bit():
    codes = torch.arange(-8, 8, dtype=torch.int8).reshape(1, 16)
    packed = ct.pack_int32(codes, 4)
    # offset codes 0..15; element i at bits 4i..4i+3, LSB first
    assert [w & 0xFFFFFFFF for w in packed[0].tolist()] == [0x76543210, 0xFEDCBA98]


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="range"):
        ct.pack_int32(torch.tensor([[8]], dtype=torch.int8), 4)
    with pytest.raises(ValueError, match="int8"):
        ct.pack_int32(torch.zeros(2, 2, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="words"):
        ct.unpack_int32(torch.zeros(2, 3, dtype=torch.int32), 4, 8)


CODECS = [AffineCodec(4, 64, True), AffineCodec(4, 64, False), AffineCodec(8, 0, True),
          AffineCodec(8, 0, False), AffineCodec(2, 32, False, torch.bfloat16),
          AffineCodec(3, 128, True, torch.float16),
          AffineCodec(4, 0, False, clip_search=True)]


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: f"{c.name}-{str(c.scale_dtype)[6:]}")
def test_pack_round_trip_and_nbytes(codec):
    w = torch.randn(72, 256) * 0.05  # 72 rows: zero points straddle int32 words for 3-bit, pad for 4/8
    q = codec.encode(w)
    tensors = ct.pack(q)
    expect = {"weight_packed", "weight_scale", "weight_shape"}
    if not codec.symmetric:
        expect.add("weight_zero_point")
    assert set(tensors) == expect
    assert tensors["weight_shape"].dtype == torch.int64 and tensors["weight_shape"].tolist() == [72, 256]
    assert tensors["weight_scale"].dtype == codec.scale_dtype
    if not codec.symmetric:
        assert tensors["weight_zero_point"].shape == (-(-72 * codec.bits // 32), codec.n_groups(256))
    assert sum(t.numel() * t.element_size() for t in tensors.values()) == codec.nbytes((72, 256)) == q.nbytes
    back = ct.unpack(tensors, codec)
    assert back.shape == q.shape and torch.equal(back.codes, q.codes)
    assert torch.equal(back.params["zero"], q.params["zero"])
    assert torch.equal(back.params["scale"], q.params["scale"])
    assert torch.equal(back.dequantize(), q.dequantize())


@pytest.mark.parametrize("codec", CODECS[:5], ids=lambda c: c.name)
def test_pack_equals_compressed_tensors_compressor(codec):
    """compressed-tensors' own compressor, fed our weight/scale/zero, writes exactly our tensors."""
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    w = torch.randn(64, 256) * 0.05
    q = codec.encode(w)
    scheme = QuantizationScheme(targets=["Linear"], weights=ct.weight_args(codec))
    state = {"weight": w, "weight_scale": q.params["scale"], "weight_zero_point": q.params["zero"]}
    theirs = PackedQuantizationCompressor.compress(state, scheme)
    ours = ct.pack(q)
    assert set(theirs) == set(ours)
    for k in ours:
        assert theirs[k].dtype == ours[k].dtype and torch.equal(theirs[k], ours[k]), k
    dense = PackedQuantizationCompressor.decompress(ours, scheme)["weight"]
    assert torch.equal(dense.float(), q.dequantize())


# ---- config ------------------------------------------------------------------------------------
NAMES = [f"model.layers.{i}.{m}" for i in range(2)
         for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]


def test_quantization_config_single_and_mixed():
    from compressed_tensors.quantization import QuantizationConfig
    from transformers import CompressedTensorsConfig

    sym = AffineCodec(4, 64, True)
    cfg = ct.quantization_config([(sym, NAMES)], ["lm_head"], all_linear=NAMES + ["lm_head"])
    assert list(cfg) == sorted(cfg)
    assert cfg["config_groups"]["group_0"]["targets"] == ["Linear"]
    assert cfg["format"] == "pack-quantized" and cfg["quantization_status"] == "compressed"
    assert cfg["config_groups"]["group_0"]["weights"]["strategy"] == "group"
    assert "dequantize" not in cfg
    # byte-identical output for the same inputs
    again = ct.quantization_config([(sym, NAMES[::-1])], ["lm_head"], all_linear=NAMES + ["lm_head"])
    assert json.dumps(cfg, sort_keys=True) == json.dumps(again, sort_keys=True)
    # without all_linear the targets are exact names
    named = ct.quantization_config([(sym, NAMES)], ["lm_head"])
    assert named["config_groups"]["group_0"]["targets"] == sorted(NAMES)

    attn = [n for n in NAMES if "self_attn" in n]
    mlp = [n for n in NAMES if "mlp" in n]
    mixed = ct.quantization_config([(sym, attn), (AffineCodec(8, 0, True), mlp),
                                    (AffineCodec(4, 64, True, clip_search=True), attn[:0])], ["lm_head"])
    assert len(mixed["config_groups"]) == 2  # clip_search does not change the on-disk scheme
    assert mixed["config_groups"]["group_1"]["weights"]["strategy"] == "channel"
    assert mixed["config_groups"]["group_1"]["weights"]["group_size"] is None
    assert ct.transformers_load_warning(mixed) is None
    for c in (cfg, mixed):
        QuantizationConfig.model_validate(c)
        assert CompressedTensorsConfig.from_dict(c).is_quantization_compressed

    asym = ct.quantization_config([(AffineCodec(4, 64, False), NAMES)], ["lm_head"])
    assert asym["dequantize"] is True and CompressedTensorsConfig.from_dict(asym).dequantize
    assert ct.transformers_load_warning(asym) is None
    mixed_asym = ct.quantization_config([(AffineCodec(4, 64, False), attn), (AffineCodec(8, 0, True), mlp)],
                                        [])
    assert "dequantize" not in mixed_asym and "5.23" in ct.transformers_load_warning(mixed_asym)

    with pytest.raises(ValueError, match="more than one"):
        ct.quantization_config([(sym, attn), (AffineCodec(8, 0, True), attn)], [])
    with pytest.raises(ValueError, match="ignored"):
        ct.quantization_config([(sym, NAMES)], [NAMES[0]])


# ---- the real client: transformers + compressed-tensors ------------------------------------------------
def write_quantized(src: Path, dst: Path, codec_for, wrong_pack=None, method=None) -> dict[str, torch.Tensor]:
    """Quantize every ``*_proj`` Linear of the HF dir `src` into a compressed-tensors dir `dst`.

    `codec_for(module_name)` picks the codec, `method(w, codec) -> QTensor` the method (default: the codec's
    own RTN). Returns the float state dict with the dequantized weights (the reference).
    `wrong_pack(q) -> tensors` replaces `ct.pack` (negative controls).
    """
    dst.mkdir(parents=True)
    state = load_file(src / "model.safetensors")
    tensors, reference, schemes, linear = {}, {}, {}, []
    for key, w in state.items():
        reference[key] = w
        if not key.endswith("_proj.weight"):
            tensors[key] = w
            continue
        module = key.removesuffix(".weight")
        codec = codec_for(module)
        q = method(w, codec) if method else codec.encode(w)
        reference[key] = q.dequantize()
        for k, t in (wrong_pack or ct.pack)(q).items():
            tensors[f"{module}.{k}"] = t
        schemes.setdefault(codec, []).append(module)
        linear.append(module)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = ct.quantization_config(list(schemes.items()), ["lm_head"],
                                                           all_linear=linear + ["lm_head"])
    (dst / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for f in src.iterdir():
        if f.name not in ("config.json", "model.safetensors"):
            shutil.copy(f, dst / f.name)
    return reference


def logits_rel_error(src: Path, dst: Path, reference: dict[str, torch.Tensor], **load_kwargs) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(dst)
    texts = ("The quick brown fox jumps over the lazy dog.", "Quantization keeps logits close.")
    rows = [tok(t).input_ids for t in texts]
    n = min(map(len, rows))
    ids = torch.tensor([r[:n] for r in rows])
    loaded = AutoModelForCausalLM.from_pretrained(dst, **load_kwargs).eval()
    ref = AutoModelForCausalLM.from_pretrained(src).eval()
    ref.load_state_dict(reference)
    with torch.no_grad():
        a, b = loaded(ids).logits.float(), ref(ids).logits.float()
    return float((a - b).norm() / b.norm())


def not_offset(q):
    """Negative control: two's-complement nibbles instead of codes + 2^(b-1)."""
    bad = ct.pack(q)
    half = 1 << (q.codec.bits - 1)
    flipped = ((q.codes.to(torch.int16) + half) ^ half) - half  # stores (code + half) ^ half = code & (2^b-1)
    bad["weight_packed"] = ct.pack_int32(flipped.to(torch.int8), q.codec.bits)
    return bad


def nibbles_swapped(q):
    """Negative control: adjacent codes swapped (high/low nibble order reversed, as bitsandbytes does)."""
    bad = ct.pack(q)
    swapped = q.codes.reshape(q.shape[0], -1, 2).flip(-1).reshape(q.shape)
    bad["weight_packed"] = ct.pack_int32(swapped.contiguous(), q.codec.bits)
    return bad


SCHEMES = {
    "int4_g64_sym": lambda m: AffineCodec(4, 64, True),
    "int4_g64_asym": lambda m: AffineCodec(4, 64, False),
    "int8_ch_sym": lambda m: AffineCodec(8, 0, True),
    "int4_ch_asym_clip": lambda m: AffineCodec(4, 0, False, clip_search=True),
    "mixed_sym": lambda m: AffineCodec(4, 64, True) if "self_attn" in m else AffineCodec(8, 0, True),
}


@pytest.mark.parametrize("scheme", SCHEMES)
def test_transformers_loads_bit_exact(tiny_llama, tmp_path, scheme):
    """A user's plain ``AutoModelForCausalLM.from_pretrained(dir)`` reproduces our dequantized weights."""
    dst = tmp_path / scheme
    reference = write_quantized(tiny_llama, dst, SCHEMES[scheme])
    err = logits_rel_error(tiny_llama, dst, reference)
    print(f"{scheme}: logits rel error {err:.3g}")
    assert err <= 1e-3


@pytest.mark.parametrize("wrong", [not_offset, nibbles_swapped])
def test_negative_controls_fail(tiny_llama, tmp_path, wrong):
    dst = tmp_path / "bad"
    reference = write_quantized(tiny_llama, dst, SCHEMES["int4_g64_sym"], wrong_pack=wrong)
    err = logits_rel_error(tiny_llama, dst, reference)
    print(f"{wrong.__name__}: logits rel error {err:.3g}")
    assert err > 0.1


def test_asymmetric_trap(tiny_llama, tmp_path):
    """Without the ``dequantize`` key, transformers 5.23-5.24 cannot load an asymmetric pack-quantized file.

    Its meta-device ``compress_model`` leaves ``weight_zero_point`` unpacked [out, n_groups] while the file
    holds it packed [ceil(out*b/32), n_groups]. `quantization_config` writes ``"dequantize": true`` for a
    single asymmetric scheme; this test checks the failure it avoids and the explicit-argument path.
    """
    import transformers
    from transformers import CompressedTensorsConfig

    dst = tmp_path / "asym"
    reference = write_quantized(tiny_llama, dst, SCHEMES["int4_g64_asym"])
    assert json.loads((dst / "config.json").read_text())["quantization_config"]["dequantize"] is True
    explicit = CompressedTensorsConfig(dequantize=True)
    assert logits_rel_error(tiny_llama, dst, reference, quantization_config=explicit) <= 1e-3

    config = json.loads((dst / "config.json").read_text())
    del config["quantization_config"]["dequantize"]
    (dst / "config.json").write_text(json.dumps(config))
    version = tuple(int(p) for p in transformers.__version__.split(".")[:2])
    if (5, 23) <= version <= (5, 24):
        with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
            logits_rel_error(tiny_llama, dst, reference)
    else:  # a transformers release without the bug must load the canonical file as is
        assert logits_rel_error(tiny_llama, dst, reference) <= 1e-3


def test_mixed_asymmetric_transformers_limits(tiny_llama, tmp_path):
    """Pins the behaviour `transformers_load_warning` reports (a canary for a transformers fix).

    Mixed groups with an asymmetric one: 5.23-5.24 fail the default load on the packed zero point, and their
    ``dequantize=True`` path silently applies group_0's scheme to every layer; other releases load bit-exactly.
    """
    import transformers
    from transformers import CompressedTensorsConfig

    def codec_for(m):
        return AffineCodec(4, 64, False) if "self_attn" in m else AffineCodec(8, 0, True)

    dst = tmp_path / "mixed_asym"
    reference = write_quantized(tiny_llama, dst, codec_for)
    config = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert "dequantize" not in config and ct.transformers_load_warning(config)
    version = tuple(int(p) for p in transformers.__version__.split(".")[:2])
    if (5, 23) <= version <= (5, 24):
        with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
            logits_rel_error(tiny_llama, dst, reference)
        with pytest.raises(RuntimeError):  # group_0's scheme is applied to every layer: conversion errors
            logits_rel_error(tiny_llama, dst, reference,
                             quantization_config=CompressedTensorsConfig(dequantize=True))
    else:
        assert logits_rel_error(tiny_llama, dst, reference) <= 1e-3


# ---- float zero points (HQQ): [1, group] blocks with zp_dtype ----------------------------------------
FZ_CODECS = [AffineCodec(4, 64, False, float_zero=True), AffineCodec(2, 32, False, torch.bfloat16, float_zero=True),
             AffineCodec(3, 128, False, torch.float16, float_zero=True), AffineCodec(8, 64, False, float_zero=True)]


def hqq_encode(w, codec):
    from qtool.methods import hqq

    return hqq.quantize(w, codec)


@pytest.mark.parametrize("codec", FZ_CODECS, ids=lambda c: f"{c.name}-{str(c.scale_dtype)[6:]}")
def test_float_zero_pack_round_trip_and_compressor(codec):
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    w = torch.randn(72, 256) * 0.05
    q = hqq_encode(w, codec)
    assert not torch.equal(q.params["zero"], q.params["zero"].round())  # really fractional
    tensors = ct.pack(q)
    assert set(tensors) == {"weight_packed", "weight_scale", "weight_shape", "weight_zero_point"}
    zp = tensors["weight_zero_point"]
    assert zp.dtype == codec.scale_dtype and zp.shape == (72, codec.n_groups(256))  # unpacked, float
    assert sum(t.numel() * t.element_size() for t in tensors.values()) == codec.nbytes((72, 256)) == q.nbytes
    back = ct.unpack(tensors, codec)
    for k in ("scale", "zero"):
        assert back.params[k].dtype == q.params[k].dtype and torch.equal(back.params[k], q.params[k])
    assert torch.equal(back.codes, q.codes) and torch.equal(back.dequantize(), q.dequantize())
    with pytest.raises(ValueError, match="weight_zero_point"):
        ct.unpack({**tensors, "weight_zero_point": zp.to(torch.int8)}, codec)

    # compressed-tensors' own compressor, fed our weight/scale/zero under our args, writes our tensors
    args = ct.weight_args(codec)
    assert args["strategy"] == "block" and args["block_structure"] == [1, codec.group_size]
    assert QuantizationArgs.model_validate(args).zp_dtype == codec.scale_dtype
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    state = {"weight": w, "weight_scale": q.params["scale"], "weight_zero_point": q.params["zero"]}
    theirs = PackedQuantizationCompressor.compress(state, scheme)
    assert set(theirs) == set(tensors)
    for k in tensors:
        assert theirs[k].dtype == tensors[k].dtype and torch.equal(theirs[k], tensors[k]), k
    dense = PackedQuantizationCompressor.decompress(tensors, scheme)["weight"]
    assert torch.equal(dense.float(), q.dequantize())


def test_float_zero_config():
    from compressed_tensors.quantization import QuantizationConfig
    from transformers import CompressedTensorsConfig

    fz = AffineCodec(4, 64, False, float_zero=True)
    cfg = ct.quantization_config([(fz, NAMES)], ["lm_head"], all_linear=NAMES + ["lm_head"])
    weights = cfg["config_groups"]["group_0"]["weights"]
    assert weights == {"actorder": None, "block_structure": [1, 64], "dynamic": False, "group_size": None,
                       "num_bits": 4, "strategy": "block", "symmetric": False, "type": "int",
                       "zp_dtype": "torch.float32"}
    assert cfg["dequantize"] is True and ct.transformers_load_warning(cfg) is None
    QuantizationConfig.model_validate(cfg)
    assert CompressedTensorsConfig.from_dict(cfg).is_quantization_compressed
    # float vs integer zeros, and float zeros of different dtypes, are different on-disk schemes
    attn = [n for n in NAMES if "self_attn" in n]
    mlp = [n for n in NAMES if "mlp" in n]
    mixed = ct.quantization_config([(fz, attn[:2]), (AffineCodec(4, 64, False), attn[2:]),
                                    (AffineCodec(4, 64, False, torch.float16, float_zero=True), mlp)], [])
    assert [g["weights"]["strategy"] for g in mixed["config_groups"].values()] == ["block", "group", "block"]
    assert mixed["config_groups"]["group_2"]["weights"]["zp_dtype"] == "torch.float16"
    assert ct.transformers_load_warning(mixed)  # the integer asymmetric group still has packed zero points
    fz_sym = ct.quantization_config([(fz, attn), (AffineCodec(8, 0, True), mlp)], [])
    assert ct.transformers_load_warning(fz_sym) is None  # float zeros are unpacked: the default path loads
    per_channel = AffineCodec(4, 0, False, float_zero=True)
    with pytest.raises(ValueError, match="per-channel"):
        ct.weight_args(per_channel)
    with pytest.raises(ValueError, match="per-channel"):
        ct.pack(per_channel.encode(torch.randn(8, 64)))


def fz_rounded(q):
    """Negative control: the zero point rounded to an integer (what an int zero-point format would keep)."""
    bad = ct.pack(q)
    bad["weight_zero_point"] = bad["weight_zero_point"].round()
    return bad


def edit_weights_config(dst: Path, **changes):
    config = json.loads((dst / "config.json").read_text())
    qc = config["quantization_config"]
    for group in qc["config_groups"].values():
        if group["weights"]["strategy"] == "block":
            group["weights"].update(changes)
            group["weights"] = {k: v for k, v in group["weights"].items() if v is not ...}
    qc.pop("dequantize", None)  # the default (compressed) path
    (dst / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.float16])
def test_transformers_loads_float_zero(tiny_llama, tmp_path, scale_dtype):
    """HQQ float zeros: the config as written (dequantize=True) loads bit-exactly; the default path too."""
    dst = tmp_path / "hqq"
    reference = write_quantized(tiny_llama, dst, lambda m: AffineCodec(4, 64, False, scale_dtype, float_zero=True),
                                method=hqq_encode)
    err = logits_rel_error(tiny_llama, dst, reference)
    print(f"hqq int4_g64 {scale_dtype}: logits rel error {err:.3g}")
    assert err <= 1e-5
    from qtool.runtime.load import load_model  # qtool's own loader rebuilds the float-zero codec from the config

    ours = load_model(dst)[0].state_dict()
    for key, w in reference.items():
        if key.endswith("_proj.weight"):
            assert torch.equal(ours[key], w), key
    edit_weights_config(dst)
    err = logits_rel_error(tiny_llama, dst, reference)
    print(f"hqq int4_g64 {scale_dtype} default path: logits rel error {err:.3g}")
    assert err <= 1e-3  # float16 scales: the default path dequantizes in the model dtype (float32)


def test_transformers_loads_mixed_float_zero(tiny_llama, tmp_path):
    def codec_for(m):
        return AffineCodec(4, 64, False, float_zero=True) if "self_attn" in m else AffineCodec(8, 0, True)

    dst = tmp_path / "mixed_fz"
    reference = write_quantized(tiny_llama, dst, codec_for,
                                method=lambda w, c: hqq_encode(w, c) if c.float_zero else c.encode(w))
    assert "dequantize" not in json.loads((dst / "config.json").read_text())["quantization_config"]
    err = logits_rel_error(tiny_llama, dst, reference)
    print(f"mixed hqq + int8 sym: logits rel error {err:.3g}")
    assert err <= 1e-3


def test_float_zero_negative_controls(tiny_llama, tmp_path):
    """Each of these must visibly break the load: rounded zeros, no zp_dtype, the `group` strategy."""
    import compressed_tensors

    def codec_for(m):
        return AffineCodec(4, 64, False, float_zero=True)

    dst = tmp_path / "rounded"
    reference = write_quantized(tiny_llama, dst, codec_for, wrong_pack=fz_rounded, method=hqq_encode)
    err = logits_rel_error(tiny_llama, dst, reference)
    print(f"zero rounded: logits rel error {err:.3g}")
    assert err > 0.02

    dst = tmp_path / "no_zp_dtype"  # the default path then makes an int8 zero-point parameter: zeros truncated
    reference = write_quantized(tiny_llama, dst, codec_for, method=hqq_encode)
    edit_weights_config(dst, zp_dtype=...)
    err = logits_rel_error(tiny_llama, dst, reference)
    print(f"no zp_dtype: logits rel error {err:.3g}")
    assert err > 0.02

    if compressed_tensors.__version__.startswith("0.20."):  # canary: 0.20 unpacks group zero points as int32
        dst = tmp_path / "group"
        reference = write_quantized(tiny_llama, dst, codec_for, method=hqq_encode)
        edit_weights_config(dst, strategy="group", group_size=64, block_structure=None)
        with pytest.raises(ValueError, match="int32"):
            logits_rel_error(tiny_llama, dst, reference)

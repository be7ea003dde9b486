"""GPTQ on-disk layout (``quant_method: gptq``), checkpoint formats ``gptq`` (v1) and ``gptq_v2``.

Per quantized Linear ``P`` (keys relative to ``P.``; G = number of groups, 1 for per-channel):

* ``qweight`` int32 [in*b/32, out]: unsigned codes (signed code + 2^(b-1)) packed along the **input**
  dimension, LSB first. For b in {2, 4, 8} that is 32/b codes per word; for b = 3 it is 32 codes per 3 words
  (the dense bit stream: code i of a column at bit 3i, codes 10 and 21 straddle two words).
* ``qzeros`` int32 [G, out*b/32]: unsigned zero points packed the same way along the **output** dimension.
  ``gptq_v2`` stores the true zero (0x88888888 for symmetric 4-bit); ``gptq`` (v1) stores zero - 1
  (0x77777777). The v1 encoding mirrors how GPTQModel (the reader transformers uses) converts it: for
  b in {2, 4, 8} a word-wise subtraction of 0x55555555 / 0x11111111 / 0x01010101, for b = 3 a per-field
  subtraction modulo 8. For zeros >= 1, which is every symmetric zero, both equal "each field minus one".
* ``scales`` float16 [G, out]; ``g_idx`` int32 [in]: the group of each input column, always written.
  ``i // group_size`` for natural and static act-order groups (all zeros per-channel); for act-order groups
  (``act_order: dynamic``, the QTensor's ``g_idx``) the position of column i in the act-order // group_size,
  which GPTQ readers apply as ``scales[g_idx[i]]``, ``zeros[g_idx[i]]`` (config ``desc_act: true``).

Scales: GPTQ readers expect float16 scales, so `pack` stores them in float16 whatever the codec's
``scale_dtype``: exact for float16 scales and for bfloat16 scales in float16's normal range, a rounding of
float32 scales (relative 2^-11). For a file bit-exact with the engine's QTensors, quantize with float16 scales.

Refused (`qtool.errors.UsageError`): codecs other than integer `AffineCodec` with 2/3/4/8 bits, float
zero points (HQQ-style), and **asymmetric v1**. An asymmetric zero of 0 has no v1 encoding that all readers
agree on: GPTQModel/transformers add 1 word-wise (a field of 0 stored as -1 carries into its neighbour) while
AutoGPTQ-style readers add 1 per field. Asymmetric codecs are written as ``gptq_v2`` instead.
"""

from __future__ import annotations

import re

import torch

from qtool import __version__
from qtool.errors import IndivisibleError, UsageError
from qtool.formats.affine import AffineCodec, check_g_idx, natural_g_idx
from qtool.formats.base import QTensor
from qtool.formats.compressed_tensors import pack_int32, unpack_int32

FORMATS = ("gptq", "gptq_v2")
BITS = (2, 3, 4, 8)
KEYS = ("qweight", "qzeros", "scales", "g_idx")
QUANTIZER = f"qtool:{__version__}"


def check_codec(codec, fmt: str) -> None:
    """Raise `UsageError` when `codec` cannot be written as GPTQ checkpoint format `fmt`."""
    if fmt not in FORMATS:
        raise ValueError(f"GPTQ checkpoint format must be one of {FORMATS}, got {fmt!r}")
    if not isinstance(codec, AffineCodec):
        raise UsageError(f"{fmt} holds integer affine codes; codec {getattr(codec, 'name', codec)!r} is not one")
    if getattr(codec, "float_zero", False):
        raise UsageError(f"{fmt} stores integer zero points; codec {codec.name} has float zero points (HQQ): "
                         "write it as compressed-tensors or use an integer-zero codec")
    if codec.bits not in BITS:
        raise UsageError(f"{fmt} holds {', '.join(map(str, BITS))}-bit codes, not {codec.bits}-bit")
    if fmt == "gptq" and not codec.symmetric:
        raise UsageError(f"asymmetric codec {codec.name} cannot be written as GPTQ v1 (format gptq): v1 stores "
                         "zero - 1, and a zero point of 0 is read differently by GPTQModel/transformers and by "
                         "AutoGPTQ-style readers; use `format: gptq_v2`, or `symmetric: true` for v1")


def check_shape(shape: tuple[int, int], bits: int) -> None:
    """GPTQ packs `in` codes into rows and `out` zero points into columns of 32-bit words."""
    out, inp = shape
    if (inp * bits) % 32 or (out * bits) % 32:
        need = 32 // bits if bits in (2, 4, 8) else 32
        raise IndivisibleError(f"GPTQ {bits}-bit packing needs in and out features divisible by {need} "
                               f"(weight {out}x{inp})")


# ---- zero-point encodings --------------------------------------------------------------------------------------
def _word_constant(bits: int) -> int:
    """0x55555555 (2-bit), 0x11111111 (4-bit), 0x01010101 (8-bit): a 1 in every field of a word."""
    return sum(1 << (bits * k) for k in range(32 // bits))


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    words = words & 0xFFFFFFFF
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def shift_zeros(qzeros: torch.Tensor, bits: int, delta: int) -> torch.Tensor:
    """Add `delta` (+1: v1 -> v2, -1: v2 -> v1) to packed zero points as GPTQModel does."""
    if bits == 3:  # per field, modulo 8 (fields straddle words, so a word-wise add would be wrong)
        cols = qzeros.shape[1] * 32 // 3
        u = unpack_int32(qzeros, 3, cols).to(torch.int16) + 4
        return pack_int32((((u + delta) & 7) - 4).to(torch.int8), 3)
    return _to_int32(qzeros.to(torch.int64) + delta * _word_constant(bits))


# ---- tensors ---------------------------------------------------------------------------------------------------
def pack(q: QTensor, fmt: str = "gptq") -> dict[str, torch.Tensor]:
    """QTensor of an `AffineCodec` -> GPTQ tensors (``qweight``, ``qzeros``, ``scales``, ``g_idx``)."""
    codec = q.codec
    check_codec(codec, fmt)
    inp = q.shape[1]
    check_shape(q.shape, codec.bits)
    scales = q.params["scale"].T.to(torch.float16).contiguous()
    if not torch.isfinite(scales).all():
        raise ValueError(f"GPTQ scales are float16; a {codec.scale_dtype} scale of this weight overflows it")
    qzeros = pack_int32(q.params["zero"].T.contiguous(), codec.bits)
    if fmt == "gptq":
        qzeros = shift_zeros(qzeros, codec.bits, -1)
    g_idx = q.params.get("g_idx")
    return {
        "qweight": pack_int32(q.codes, codec.bits).T.contiguous(),
        "qzeros": qzeros.contiguous(),
        "scales": scales,
        "g_idx": (natural_g_idx(inp, codec.group_width(inp)) if g_idx is None
                  else check_g_idx(g_idx, inp, codec.n_groups(inp)).clone()),
    }


def unpack(tensors: dict[str, torch.Tensor], bits: int, group_size: int, symmetric: bool,
           fmt: str = "gptq") -> QTensor:
    """GPTQ tensors -> QTensor (AffineCodec with the file's scale dtype); `group_size` -1 or 0 = per channel.

    v1 zero points are decoded as transformers/GPTQModel decode them. A ``g_idx`` other than ``i // group_size``
    (act-order groups, ``desc_act``) is kept in the QTensor's params; it must map every column to a group.
    """
    if fmt not in FORMATS:
        raise ValueError(f"GPTQ checkpoint format must be one of {FORMATS}, got {fmt!r}")
    if bits not in BITS:
        raise ValueError(f"GPTQ bits must be one of {BITS}, got {bits}")
    qweight, qzeros, scales = tensors["qweight"], tensors["qzeros"], tensors["scales"]
    inp, out = qweight.shape[0] * 32 // bits, qweight.shape[1]
    codec = AffineCodec(bits, max(group_size, 0), symmetric, scale_dtype=scales.dtype)
    codec.check_shape((out, inp))
    n_groups = codec.n_groups(inp)
    if scales.shape != (n_groups, out) or qzeros.shape != (n_groups, out * bits // 32):
        raise ValueError(f"GPTQ tensors do not fit a {out}x{inp} {bits}-bit weight with {n_groups} groups: "
                         f"scales {tuple(scales.shape)}, qzeros {tuple(qzeros.shape)}")
    params = {}
    g_idx = tensors.get("g_idx")
    if g_idx is not None:
        g_idx = check_g_idx(g_idx, inp, n_groups)
        if not torch.equal(g_idx, natural_g_idx(inp, codec.group_width(inp))):
            params["g_idx"] = g_idx
    if fmt == "gptq":
        qzeros = shift_zeros(qzeros, bits, +1)
    codes = unpack_int32(qweight.T.contiguous(), bits, inp)
    zero = unpack_int32(qzeros, bits, out).T.contiguous()
    return QTensor(codec=codec, shape=(out, inp), codes=codes,
                   params={"scale": scales.T.contiguous(), "zero": zero} | params)


# ---- config ----------------------------------------------------------------------------------------------------
def quantization_config(codec: AffineCodec, fmt: str, unquantized: list[str], *, damp_percent: float = 0.01,
                        static_groups: bool = False, quantized: list[str] | None = None,
                        desc_act: bool = False) -> dict:
    """config.json ``quantization_config`` for one GPTQ scheme (what transformers' GPTQConfig and GPTQModel read).

    `unquantized` lists modules kept in float (``lm_head`` is never quantized by GPTQ readers). When decoder
    linears are among them, the readers are told so: ``modules_in_block_to_quantize`` (optimum/transformers
    keep a block linear only if its name ends with an entry: the full names of `quantized` are given) and
    ``dynamic`` negative rules ``-:^name$`` (GPTQModel). `desc_act` says the file holds act-order groups
    (``g_idx`` not sequential, GPTQ ``act_order: dynamic``): kernels then reorder by ``g_idx``; it excludes
    `static_groups` (static act-order groups keep a sequential ``g_idx``, so they are written with
    ``desc_act: false``). `damp_percent` must be in (0, 1), as transformers checks; it is informational
    (RTN writes the default 0.01).
    """
    check_codec(codec, fmt)
    if not 0 < damp_percent < 1:
        raise ValueError(f"damp_percent must be in (0, 1) (transformers refuses others), got {damp_percent}")
    if desc_act and static_groups:
        raise ValueError("desc_act (act-order groups with a g_idx) and static_groups exclude each other")
    cfg = {
        "bits": codec.bits,
        "checkpoint_format": fmt,
        "damp_percent": damp_percent,
        "desc_act": desc_act,
        "format": fmt,
        "group_size": codec.group_size or -1,
        "lm_head": False,
        "meta": {"quantizer": [QUANTIZER]},
        "pack_dtype": "int32",
        "quant_method": "gptq",
        "static_groups": static_groups,
        "sym": codec.symmetric,
        "true_sequential": True,
    }
    skipped = sorted(n for n in unquantized if n != "lm_head")
    if skipped:
        if not quantized:
            raise ValueError("quantization_config: `quantized` module names are needed when block linears stay float")
        cfg["modules_in_block_to_quantize"] = [sorted(quantized)]
        cfg["dynamic"] = {f"-:^{re.escape(name)}$": {} for name in skipped}
    return cfg

"""AWQ GEMM on-disk layout (``quant_method: awq``, ``version: gemm``), 4-bit only.

Per quantized Linear ``P`` (keys relative to ``P.``; G = in / group_size):

* ``qweight`` int32 [in, out/8]: the transposed unsigned codes ``code[in, out]`` (signed code + 8) packed
  along the **output** dimension (the opposite of GPTQ), 8 per word in the interleaved order
  ``AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]``: nibble i (bits 4i..4i+3) of word c holds column ``8c + ORDER[i]``.
* ``qzeros`` int32 [G, out/8]: unsigned zero points, same packing and interleave, stored as-is (no -1).
* ``scales`` float16 [G, out].

Dequant: ``W[in, out] = (q - z) * s`` with z and s repeated over each group of `group_size` inputs.
AWQ is zero-point (asymmetric) by nature: a symmetric codec is written with every zero = 8, and the config
always says ``zero_point: true`` (the file holds explicit zeros either way).

Scales are stored in float16 as every AWQ reader expects (see `formats/gptq_format.py` for what that does to
bfloat16/float32 scales). Refused (`qtool.errors.UsageError`): non-4-bit or non-`AffineCodec` codecs, float zero
points (HQQ), per-channel codecs (write a group size) and act-order groups (a QTensor with ``g_idx``: AWQ
files have no g_idx).
"""

from __future__ import annotations

import torch

from qtool.errors import IndivisibleError, UsageError
from qtool.formats.affine import AffineCodec
from qtool.formats.base import QTensor
from qtool.formats.compressed_tensors import pack_int32, unpack_int32

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)
KEYS = ("qweight", "qzeros", "scales")


def check_codec(codec) -> None:
    """Raise `UsageError` when `codec` cannot be written as AWQ GEMM."""
    if not isinstance(codec, AffineCodec):
        raise UsageError(f"awq holds integer affine codes; codec {getattr(codec, 'name', codec)!r} is not one")
    if getattr(codec, "float_zero", False):
        raise UsageError(f"awq stores integer zero points; codec {codec.name} has float zero points (HQQ): "
                         "write it as compressed-tensors or use an integer-zero codec")
    if codec.bits != 4:
        raise UsageError(f"awq (GEMM) holds 4-bit codes, not {codec.bits}-bit")
    if not codec.group_size:
        raise UsageError(f"awq needs a group size; codec {codec.name} is per-channel")


def _columns(out: int) -> torch.Tensor:
    """Column order of the packed stream: position 8c+i holds output column 8c+ORDER[i]."""
    return (torch.arange(out // 8).unsqueeze(1) * 8 + torch.tensor(AWQ_ORDER)).reshape(-1)


def pack(q: QTensor) -> dict[str, torch.Tensor]:
    """QTensor of a 4-bit grouped `AffineCodec` -> AWQ GEMM tensors (``qweight``, ``qzeros``, ``scales``)."""
    codec = q.codec
    check_codec(codec)
    if "g_idx" in q.params:
        raise UsageError("awq (GEMM) has no g_idx: it cannot hold act-order groups (GPTQ `act_order: dynamic`); "
                         "write format gptq/gptq_v2, or use static groups (`act_order: true`)")
    out = q.shape[0]
    if out % 8:
        raise IndivisibleError(f"awq packs 8 output columns per word; out features {out} is not a multiple of 8")
    codec.check_shape(q.shape)
    scales = q.params["scale"].T.to(torch.float16).contiguous()
    if not torch.isfinite(scales).all():
        raise ValueError(f"AWQ scales are float16; a {codec.scale_dtype} scale of this weight overflows it")
    cols = _columns(out)
    return {
        "qweight": pack_int32(q.codes.T[:, cols].contiguous(), 4),
        "qzeros": pack_int32(q.params["zero"].T[:, cols].contiguous(), 4),
        "scales": scales,
    }


def unpack(tensors: dict[str, torch.Tensor], group_size: int, symmetric: bool = False) -> QTensor:
    """AWQ GEMM tensors -> QTensor (4-bit AffineCodec with the file's scale dtype).

    `symmetric` only names the codec (the zero points read from the file are used either way).
    """
    qweight, qzeros, scales = tensors["qweight"], tensors["qzeros"], tensors["scales"]
    inp, out = qweight.shape[0], qweight.shape[1] * 8
    codec = AffineCodec(4, group_size, symmetric, scale_dtype=scales.dtype)
    check_codec(codec)
    codec.check_shape((out, inp))
    n_groups = codec.n_groups(inp)
    if scales.shape != (n_groups, out) or qzeros.shape != (n_groups, out // 8):
        raise ValueError(f"AWQ tensors do not fit a {out}x{inp} weight with {n_groups} groups: "
                         f"scales {tuple(scales.shape)}, qzeros {tuple(qzeros.shape)}")
    cols = _columns(out)
    codes_t = torch.empty(inp, out, dtype=torch.int8)
    codes_t[:, cols] = unpack_int32(qweight, 4, out)
    zero_t = torch.empty(n_groups, out, dtype=torch.int8)
    zero_t[:, cols] = unpack_int32(qzeros, 4, out)
    return QTensor(codec=codec, shape=(out, inp), codes=codes_t.T.contiguous(),
                   params={"scale": scales.T.contiguous(), "zero": zero_t.T.contiguous()})


def quantization_config(codec: AffineCodec, modules_to_not_convert: list[str]) -> dict:
    """config.json ``quantization_config`` as AutoAWQ writes it (transformers' AwqConfig reads it).

    `modules_to_not_convert` lists modules kept in float by full name (transformers matches a name from its
    start at a module boundary, or as a suffix); ``None`` when empty.
    """
    check_codec(codec)
    return {
        "bits": 4,
        "group_size": codec.group_size,
        "modules_to_not_convert": sorted(modules_to_not_convert) or None,
        "quant_method": "awq",
        "version": "gemm",
        "zero_point": True,
    }

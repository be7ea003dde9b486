"""bitsandbytes 8-bit (LLM.int8()) on-disk layout, as transformers' bnb 8-bit quantizer loads it.

Per quantized Linear ``P`` (keys relative to ``P.``; bnb ``Linear8bitLt._save_to_state_dict``):

* ``weight``         int8 [out, in]: ``CB = round(W * 127 / SCB[row])``, row-major;
* ``SCB``            float32 [out]: the row absmax;
* ``weight_format``  uint8 scalar ``0`` (= "row"; bnb's ``maybe_rearrange_weight`` rejects anything else).

bitsandbytes dequantizes ``W = CB * SCB * (1/127)`` (``int8_vectorwise_dequant``) and at run time quantizes
the activations per row (LLM.int8(), with outlier columns above ``llm_int8_threshold`` kept in float): see
`qtool.runtime.w8a8`.

Mapping from qtool's codec. ``AffineCodec(bits=8, group_size=0, symmetric=True)`` stores
``scale = fl32(absmax / 127)`` and codes ``round(w / scale)``; this writes ``SCB = fl32(scale * 127)``
and the codes unchanged, and reads back ``scale = fl32(SCB / 127)``. Measured on 81,920 random rows
(absmax 1e-4..1e2, float32 scales): ``SCB / 127`` gives the scale back exactly every time (with
float16/bfloat16 scales ``scale * 127`` is exact in float32 anyway), ``SCB`` is within 1 ulp of the row's
true absmax, and bitsandbytes' own dequantization ``CB * SCB * fl32(1/127)`` is within 2 ulp of qtool's
``codes * scale`` (two roundings against one; tests/formats/test_bnb_int8.py).
The codes themselves are qtool's: bitsandbytes, quantizing a float32 weight itself, first rounds it to
float16 and multiplies by ``127 / absmax``, so ~1% of its codes differ by one step from qtool's.
"""

from __future__ import annotations

import torch

from qtool.formats.affine import AffineCodec
from qtool.formats.base import QTensor

KEYS = ("weight", "SCB", "weight_format")


def check_codec(codec) -> None:
    """Raise TypeError/ValueError unless `codec` is an 8-bit per-channel symmetric integer-zero AffineCodec."""
    if not isinstance(codec, AffineCodec):
        raise TypeError(f"bitsandbytes 8-bit needs an AffineCodec, got {type(codec).__name__}")
    if codec.bits != 8 or codec.group_size != 0 or not codec.symmetric or codec.float_zero:
        raise ValueError(f"bitsandbytes 8-bit holds int8 per-channel symmetric weights (int8_ch_sym), "
                         f"got {codec.name}")


def pack(q: QTensor) -> dict[str, torch.Tensor]:
    """QTensor of ``AffineCodec(8, 0, True)`` -> {weight int8 [out, in], SCB float32 [out], weight_format}."""
    check_codec(q.codec)
    out, _ = q.shape
    scale = q.params["scale"].reshape(-1)
    if scale.numel() != out:
        raise ValueError(f"bitsandbytes 8-bit: expected one scale per row ({out}), got {tuple(q.params['scale'].shape)}")
    return {
        "weight": q.codes.to(torch.int8).contiguous(),
        "SCB": (scale.float() * 127).contiguous(),
        "weight_format": torch.tensor(0, dtype=torch.uint8),
    }


def check_tensors(tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(CB, SCB) of one module's tensors, or ValueError naming what is malformed.

    A missing ``weight_format`` means "row" (as bitsandbytes reads it); any other value than 0 is refused.
    """
    cb, scb = tensors.get("weight"), tensors.get("SCB")
    if cb is None or scb is None:
        raise ValueError(f"bitsandbytes 8-bit needs weight and SCB, found {sorted(tensors)}")
    if cb.dtype != torch.int8 or cb.ndim != 2:
        raise ValueError(f"weight must be 2-D int8, got {cb.dtype} {tuple(cb.shape)}")
    if scb.dtype != torch.float32 or tuple(scb.shape) != (cb.shape[0],):
        raise ValueError(f"SCB must be float32 [{cb.shape[0]}], got {scb.dtype} {tuple(scb.shape)}")
    if not torch.isfinite(scb).all() or (scb < 0).any():
        raise ValueError("SCB holds row absmax values: it must be finite and >= 0")
    fmt = tensors.get("weight_format")
    if fmt is not None:
        if fmt.numel() != 1 or fmt.is_floating_point() or fmt.is_complex():
            raise ValueError(f"weight_format must be an integer scalar, got {fmt.dtype} {tuple(fmt.shape)}")
        if int(fmt.reshape(-1)[0]) != 0:
            raise ValueError(f"weight_format {int(fmt.reshape(-1)[0])} is not 0 (row-major); only row-major "
                             "8-bit weights load")
    extra = set(tensors) - set(KEYS)
    if extra:
        raise ValueError(f"unexpected bitsandbytes 8-bit tensors {sorted(extra)}")
    return cb, scb


def unpack(tensors: dict[str, torch.Tensor]) -> QTensor:
    """Inverse of `pack`: a QTensor of ``AffineCodec(8, 0, True)`` with ``scale = SCB / 127`` [out, 1]."""
    cb, scb = check_tensors(tensors)
    codec = AffineCodec(bits=8, group_size=0, symmetric=True)
    scale = (scb / 127).reshape(-1, 1)
    zero = torch.zeros(scale.shape, dtype=torch.int8)
    return QTensor(codec=codec, shape=(int(cb.shape[0]), int(cb.shape[1])), codes=cb, params={"scale": scale, "zero": zero})


def quantization_config(threshold: float, skip_modules: list[str]) -> dict:
    """``quantization_config`` for config.json, equal (keys and order) to
    ``BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=threshold, llm_int8_skip_modules=...).to_dict()``.

    `threshold` is LLM.int8()'s outlier threshold (0 = every input column in int8); `skip_modules` stay dense.
    """
    if not (isinstance(threshold, (int, float)) and not isinstance(threshold, bool) and 0 <= threshold < float("inf")):
        raise ValueError(f"llm_int8_threshold must be a finite number >= 0, got {threshold!r}")
    return {
        "quant_method": "bitsandbytes",
        "_load_in_8bit": True,
        "_load_in_4bit": False,
        "llm_int8_threshold": float(threshold),
        "llm_int8_skip_modules": list(skip_modules),
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "bnb_4bit_quant_type": "fp4",
        "bnb_4bit_use_double_quant": False,
        "bnb_4bit_compute_dtype": "float32",
        "bnb_4bit_quant_storage": "uint8",
        "load_in_4bit": False,
        "load_in_8bit": True,
    }

"""bitsandbytes 4-bit on-disk packing, as transformers' bnb quantizer loads it (`Linear4bit` state dict).

Per quantized Linear, keys relative to the module prefix (bnb `Linear4bit._save_to_state_dict` +
`QuantState.as_dict(packed=True)`):

* ``weight``: uint8 [ceil(n/2), 1], two codes per byte, flattened element 2k in the HIGH nibble and 2k+1 in
  the LOW nibble; an odd n is padded with the code of 0.0.
* ``weight.absmax``: float32 [n_blocks], or uint8 [n_blocks] under double quant.
* ``weight.quant_map``: float32 [16]. Double quant only: ``weight.nested_absmax`` float32
  [ceil(n_blocks/256)], ``weight.nested_quant_map`` float32 [256].
* ``weight.quant_state.bitsandbytes__{nf4,fp4}``: uint8, the UTF-8 bytes of ``json.dumps`` of
  {quant_type, blocksize, dtype, shape} (+ nested_blocksize, nested_dtype, nested_offset), in that order
  (bnb `pack_dict_to_tensor`).
"""

from __future__ import annotations

import json

import torch

from qtool.formats.base import QTensor
from qtool.formats.nf4 import NESTED_BLOCK_SIZE, NF4Codec

QUANT_STATE_PREFIX = "weight.quant_state.bitsandbytes__"
WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
COMPUTE_DTYPES = ("float32", "float16", "bfloat16")


def pack(q: QTensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Serialize an `NF4Codec` QTensor; `dtype` is the original weight dtype recorded in the quant state."""
    codec = q.codec
    if not isinstance(codec, NF4Codec):
        raise TypeError(f"bnb.pack needs an NF4Codec QTensor, got {type(codec).__name__}")
    if dtype not in WEIGHT_DTYPES:
        raise ValueError(f"bnb 4-bit records a float16/bfloat16/float32 weight dtype, got {dtype}")
    codes = q.codes
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_full((1,), codec.pad_code)])
    out = {"weight": ((codes[0::2] << 4) | codes[1::2]).unsqueeze(1)}
    state = {"quant_type": codec.kind, "blocksize": codec.block_size,
             "dtype": str(dtype).removeprefix("torch."), "shape": list(q.shape)}
    p = q.params
    if codec.double_quant:
        out.update({"weight.absmax": p["absmax_q"], "weight.quant_map": p["quant_map"],
                    "weight.nested_absmax": p["nested_absmax"],
                    "weight.nested_quant_map": p["nested_quant_map"]})
        state.update(nested_blocksize=NESTED_BLOCK_SIZE, nested_dtype="float32",
                     nested_offset=p["offset"].item())
    else:
        out.update({"weight.absmax": p["absmax"], "weight.quant_map": p["quant_map"]})
    blob = json.dumps(state).encode("utf-8")
    out[QUANT_STATE_PREFIX + codec.kind] = torch.tensor(list(blob), dtype=torch.uint8)
    return {k: v.contiguous() for k, v in out.items()}


def unpack(tensors: dict[str, torch.Tensor]) -> QTensor:
    """Inverse of `pack` (keys relative to the module prefix).

    The QTensor holds the stored parameters only: under double quant the exact pre-compression absmax is not
    on disk, so ``params`` has no ``absmax`` key (`NF4Codec.dequantize` does not need it).
    """
    state_keys = [k for k in tensors if k.startswith(QUANT_STATE_PREFIX)]
    if len(state_keys) != 1:
        raise ValueError(f"expected exactly one {QUANT_STATE_PREFIX}* tensor, found {state_keys}")
    state = json.loads(bytes(tensors[state_keys[0]].tolist()).decode("utf-8"))
    double_quant = "nested_offset" in state
    nested = (state.get("nested_blocksize"), state.get("nested_dtype"))
    if double_quant and nested != (NESTED_BLOCK_SIZE, "float32"):
        raise ValueError(f"unsupported nested quant state {state}")
    codec = NF4Codec(kind=state["quant_type"], block_size=state["blocksize"], double_quant=double_quant)
    shape = tuple(state["shape"])
    packed = tensors["weight"].reshape(-1)
    codes = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)[: torch.Size(shape).numel()]
    params = {"quant_map": tensors["weight.quant_map"]}
    if double_quant:
        params.update(absmax_q=tensors["weight.absmax"], nested_absmax=tensors["weight.nested_absmax"],
                      offset=torch.tensor(state["nested_offset"], dtype=torch.float32),
                      nested_quant_map=tensors["weight.nested_quant_map"])
    else:
        params["absmax"] = tensors["weight.absmax"]
    return QTensor(codec, shape, codes, params)


def quantization_config(codec: NF4Codec, skip_modules: list[str], compute_dtype: str) -> dict:
    """``quantization_config`` for config.json, equal (keys and order) to `BitsAndBytesConfig.to_dict()`.

    `skip_modules` become ``llm_int8_skip_modules`` (modules left dense, e.g. ``["lm_head"]``);
    `compute_dtype` is the dtype name the 4-bit matmul runs in.
    """
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype must be one of {COMPUTE_DTYPES}, got {compute_dtype!r}")
    return {
        "quant_method": "bitsandbytes",
        "_load_in_8bit": False,
        "_load_in_4bit": True,
        "llm_int8_threshold": 6.0,
        "llm_int8_skip_modules": list(skip_modules),
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "bnb_4bit_quant_type": codec.kind,
        "bnb_4bit_use_double_quant": codec.double_quant,
        "bnb_4bit_compute_dtype": compute_dtype,
        "bnb_4bit_quant_storage": "uint8",
        "load_in_4bit": True,
        "load_in_8bit": False,
    }

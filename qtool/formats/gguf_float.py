"""GGUF float tensor types: F32, F16, BF16.

They are not on the ``scale * levels[code] + offset`` grid, so these codecs have ``sub_block=1``, ``levels=()``
and override the grid methods. Representation of a `QTensor` of a float type:

    codes:            uint8 (rows, 0)           no per-element codes: the value *is* the stored field
    params["value"]:  (rows, cols) in the stored dtype (float32 / float16 / bfloat16), exactly the file's
                      elements, bit for bit (NaN payloads included)

``dequantize`` is ``value.float()`` (F16 through numpy, so NaN payloads match gguf-py bit for bit); ``pack`` is
the little-endian bytes of ``value``; ``unpack`` is a view.

Rounding (bit-exact with gguf-py, `gguf.quants.quantize`):

* F16: numpy ``astype(np.float16)`` (round to nearest even, overflow to inf, NaN keeps its sign and top
  payload bits). torch's own fp16 cast canonicalises NaNs, so the cast goes through numpy.
* BF16: ggml's ``ggml_compute_fp32_to_bf16``: NaN forced quiet (keeping sign and the top payload bits),
  otherwise round to nearest even on the upper 16 bits. torch's bf16 cast canonicalises NaNs, so it is done
  on the bits here.

``quantize_columns`` (the GPTQ seam) returns the *rounded values* (float32) of the column, not codes: a
float type has no code table, so "quantize then dequantize" is the rounding itself. ``importance`` and
``faithful`` are accepted and ignored (the rounding is the only choice).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from qtool.formats.base import QTensor
from qtool.formats.gguf_base import GGUFCodec, register


def bf16_bits(x: torch.Tensor) -> torch.Tensor:
    """float32 -> bf16 bit patterns (int16 tensor) exactly as ggml/gguf-py: NaN quieted, else RNE."""
    n = x.float().contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    nan = (n & 0x7FFFFFFF) > 0x7F800000
    n = torch.where(nan, (n & 0xFFFF0000) | (64 << 16), n)
    n = (n + (0x7FFF + ((n >> 16) & 1))) >> 16
    n = n & 0xFFFF
    return torch.where(n >= 0x8000, n - 0x10000, n).to(torch.int16)


def to_bf16(x: torch.Tensor) -> torch.Tensor:
    """float32 -> torch.bfloat16 tensor holding ggml's rounding of `x`."""
    return bf16_bits(x).view(torch.bfloat16)


def to_f16(x: torch.Tensor) -> torch.Tensor:
    """float32 -> torch.float16 tensor holding numpy's ``astype(np.float16)`` of `x` (bit-exact, NaNs too)."""
    with np.errstate(over="ignore"):  # overflow to inf is the rounding's answer, as in numpy/gguf-py
        a = x.detach().float().contiguous().cpu().numpy().astype(np.float16)
    return torch.from_numpy(a.view(np.int16)).view(torch.float16)


@dataclass(frozen=True, eq=False)
class FloatCodec(GGUFCodec):
    """F32 / F16 / BF16: the value itself is stored (see the module doc for the QTensor layout)."""

    @property
    def dtype(self) -> torch.dtype:
        return {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[self.name]

    def round(self, x: torch.Tensor) -> torch.Tensor:
        """float32 `x` -> the stored representation (tensor of `self.dtype`)."""
        x = x.float()
        if self.name == "f32":
            return x.clone()
        if self.name == "f16":
            return to_f16(x)
        return to_bf16(x)

    # ---- the grid methods, overridden
    def sub_index(self, cols: int) -> torch.Tensor:
        return torch.arange(cols)

    def dequantize(self, q: QTensor) -> torch.Tensor:
        v = q.params["value"]
        if v.dtype == torch.float16:  # via numpy: torch sets the quiet bit of signalling NaNs, numpy/gguf-py do not
            return torch.from_numpy(v.contiguous().view(torch.int16).numpy().view(np.float16).astype(np.float32))
        return v.float() if v.dtype != torch.float32 else v.clone()

    def quantize(self, w: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """No per-element codes: an empty (rows, 0) uint8 tensor (the values live in ``params["value"]``)."""
        return torch.empty((w.shape[0], 0), dtype=torch.uint8)

    def quantize_columns(self, x: torch.Tensor, scale: torch.Tensor | None = None,
                         offset: torch.Tensor | None = None) -> torch.Tensor:
        """The column rounded onto this float type, as float32 values (scale/offset are ignored)."""
        return self.round(x).float()

    def column_grid(self, params: dict[str, torch.Tensor], cols: slice) -> tuple[torch.Tensor, torch.Tensor]:
        rows = params["value"].shape[0]
        n = len(range(*cols.indices(params["value"].shape[1])))
        return torch.ones(rows, n), torch.zeros(rows, n)

    # ---- fit / encode
    def fit(self, w: torch.Tensor, importance: torch.Tensor | None = None, *,
            faithful: bool = False) -> dict[str, torch.Tensor]:
        return {"value": self.round(w)}

    def encode(self, w: torch.Tensor, importance: torch.Tensor | None = None, *, faithful: bool = False) -> QTensor:
        w = w.float()
        self.check_shape(tuple(w.shape))
        params = self.fit(w, importance, faithful=faithful)
        return QTensor(self, tuple(w.shape), self.quantize(w, params), params)

    # ---- bytes
    def pack(self, q: QTensor) -> torch.Tensor:
        v = q.params["value"]
        if v.dtype != self.dtype:
            raise TypeError(f"{self.name.upper()} QTensor holds {v.dtype}, expected {self.dtype}")
        return v.contiguous().view(torch.uint8).reshape(v.shape[0], self.row_bytes(v.shape[1]))

    def unpack(self, data: torch.Tensor, shape: tuple[int, int]) -> QTensor:
        rows, cols = shape
        data = data.contiguous().view(torch.uint8).reshape(rows, self.row_bytes(cols))
        value = data.view(self.dtype).reshape(rows, cols).clone()
        return QTensor(self, (rows, cols), torch.empty((rows, 0), dtype=torch.uint8), {"value": value})


def _make(name: str, qtype: GGMLQuantizationType) -> FloatCodec:
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    return register(FloatCodec(name=name, ggml_type=int(qtype), block_size=block_size, type_size=type_size,
                               sub_block=1, levels=()))


F32 = _make("f32", GGMLQuantizationType.F32)
F16 = _make("f16", GGMLQuantizationType.F16)
BF16 = _make("bf16", GGMLQuantizationType.BF16)

"""The codec seam.

A codec owns the number grid and the parameters of one format, nothing else: no model knowledge, no file
I/O. Every method quantizes *through the codec it is given*; what leaves a method is a `QTensor`, and only
writers turn a QTensor into on-disk tensors (see `formats/compressed_tensors.py`, `formats/bnb.py`).

Shapes: a weight W is (out, in); groups/blocks run along `in` (or along the flattened tensor for bnb).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol, runtime_checkable

import torch


def evenly_spaced_rows(w: torch.Tensor, n: int) -> torch.Tensor:
    """`n` evenly spaced rows of `w` (all rows when it has no more). Every codec encodes rows independently, so
    a sample's error estimates the whole tensor's (fallback choices, AWQ's search on GGUF grids, sensitivity)."""
    if w.shape[0] <= n:
        return w
    return w[torch.linspace(0, w.shape[0] - 1, n).round().long()]


@dataclass(frozen=True, eq=False)
class QTensor:
    """A quantized weight: integer codes plus the codec's parameters.

    `codes` are unpacked integer codes (layout defined by the codec); `params` holds the codec's tensors
    (e.g. ``scale``/``zero`` for affine, ``absmax`` for nf4). `codec` is the frozen codec that made it.
    """

    codec: "Codec"
    shape: tuple[int, int]
    codes: torch.Tensor
    params: dict[str, torch.Tensor]

    def dequantize(self) -> torch.Tensor:
        return self.codec.dequantize(self)

    def take_rows(self, rows: "slice | torch.Tensor") -> "QTensor":
        """Rows `rows` (a slice or 1-D indices) as a QTensor of their own (block codecs: every param is per
        row), so a vocabulary-sized tensor is decoded a slice at a time, or only the token rows a lookup needs."""
        if self.codec.grid_kind != "block":
            raise TypeError(f"take_rows needs a block codec, not {self.codec.name}")
        n = self.shape[0]
        params = {k: v[rows] if v.dim() == 2 and v.shape[0] == n else v for k, v in self.params.items()}
        codes = self.codes[rows]
        return QTensor(self.codec, (codes.shape[0], self.shape[1]), codes, params)

    @staticmethod
    def cat_rows(parts: "list[QTensor]") -> "QTensor":
        """The inverse of `take_rows`: row blocks of one block codec's tensor, stacked."""
        if len(parts) == 1:
            return parts[0]
        first = parts[0]
        params = {k: torch.cat([p.params[k] for p in parts]) if v.dim() == 2 and v.shape[0] == first.shape[0] else v
                  for k, v in first.params.items()}
        rows = sum(p.shape[0] for p in parts)
        return QTensor(first.codec, (rows, first.shape[1]), torch.cat([p.codes for p in parts]), params)

    @property
    def nbytes(self) -> int:
        if "g_idx" in self.params:  # act-order groups (affine codecs): the group map is stored too
            return self.codec.nbytes(self.shape, g_idx=True)
        return self.codec.nbytes(self.shape)


@runtime_checkable
class Codec(Protocol):
    """What every codec implements (implementations are frozen dataclasses).

    `grid_kind` says which grid a method rounds onto, so methods dispatch on it (never on a codec's class):
      "affine": b-bit integers with a scale/zero per (row, group) (`formats/affine.py`): AWQ's clip search
                works on its ranges (`params_from_range`), GPTQ sweeps columns (natively where it can);
      "table":  codes index a fixed value table scaled per block (NF4/FP4): data-free absmax fits;
      "block":  GGUF block types (`formats/gguf_base.py`): each block's params are fitted first, weighted by
                the inputs' importance (llama.cpp's imatrix, which every method hands to `fit`), then GPTQ
                sweeps through them (`methods/gptq_blocks.py`).
    """

    grid_kind: ClassVar[str]

    @property
    def name(self) -> str:
        """Registry/YAML-style name, e.g. ``int4_g64_asym`` or ``nf4_b64_dq``."""

    @property
    def bits(self) -> int:
        """Bits per code."""

    def check_shape(self, shape: tuple[int, int]) -> None:
        """Raise `qtool.errors.IndivisibleError` when this codec cannot represent `shape`."""

    def fit(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Choose the parameters (scales, zeros, absmax...) for float weight `w` (out, in).

        `importance` (in,) optionally weights input channels (imatrix / diag(H)); codecs may ignore it.
        """

    def quantize(self, w: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """Float values -> integer codes under fixed `params`."""

    def encode(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> QTensor:
        """fit + quantize in one call."""

    def dequantize(self, q: QTensor) -> torch.Tensor:
        """Codes + params -> float32 weight of shape `q.shape`."""

    def nbytes(self, shape: tuple[int, int]) -> int:
        """Exact bytes this codec's on-disk tensors take for a weight of `shape`."""

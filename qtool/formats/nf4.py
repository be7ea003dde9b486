"""bitsandbytes 4-bit codec (NF4 / FP4, optional double quantization), bit-exact with bitsandbytes.

Semantics (bitsandbytes 0.50, `bitsandbytes/functional.py` + `backends/default/ops.py` + `csrc/cpu_ops.cpp`):

* The weight is flattened row-major and cut into blocks of `block_size` consecutive elements (the last block
  may be short). ``absmax[b] = max|x|`` over block b.
* Each element is scaled into [-1, 1] (``x * (1/absmax)`` for full blocks, ``x / absmax`` for the short tail
  block, absmax clamped at 1e-38) and mapped to the nearest entry of the 16-entry table by bucketizing on
  the midpoints of the sorted table (a value exactly on a midpoint goes to the lower entry). FP4's table is
  not sorted, so the sorted position is mapped back to the table index.
* Dequantization: ``x = quant_map[code] * absmax[block]`` in float32.
* Double quantization (bnb ``compress_statistics=True``): ``offset = mean(absmax)``; ``absmax - offset`` is
  quantized blockwise (blocks of 256) to uint8 codes of the 8-bit dynamic map with per-block
  ``nested_absmax``. The codes are chosen the way bnb's CPU kernel chooses them: through a 65536-bin lookup
  table over [-1, 1] (CUDA's exact nearest-neighbour search can differ by one code on rare values; the file
  is valid either way because loaders only dequantize). Reconstruction:
  ``absmax = nested_quant_map[code] * nested_absmax[i // 256] + offset`` in float32.
  As in bnb, the 4-bit codes are computed with the exact absmax, before it is compressed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from qtool.errors import IndivisibleError
from qtool.formats.base import QTensor

BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCK_SIZE = 256

# bnb `get_4bit_type("nf4")`: quantiles of N(0, 1), exact float32 values from bitsandbytes.
NF4_TABLE = torch.tensor(
    [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
     -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
     0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
     0.7229568362236023, 1.0],
    dtype=torch.float32,
)
# bnb `get_4bit_type("fp4")`: 1 sign, 2 exponent, 1 mantissa bit, in bit-pattern order, divided by its max
# (12). Index 8 ("-0") is stored as +0.0, exactly as bnb stores it.
FP4_TABLE = torch.tensor([0, 0.0625, 8, 12, 4, 6, 2, 3, 0, -0.0625, -8, -12, -4, -6, -2, -3],
                         dtype=torch.float32) / 12.0
TABLES = {"nf4": NF4_TABLE, "fp4": FP4_TABLE}


def create_dynamic_map() -> torch.Tensor:
    """bnb's signed 8-bit dynamic map (`create_dynamic_map()` with its defaults): 256 sorted float32 values.

    For exponent i in 0..6 the 2**i midpoints of ``linspace(0.1, 1, 2**i + 1)`` are scaled by 10**(i-6), with
    both signs; 0 and 1 complete the 256 entries.
    """
    data: list[float] = []
    for i in range(7):
        boundaries = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (i - 6)) * means).tolist()
        data += (-(10 ** (i - 6)) * means).tolist()
    data += [0.0, 1.0]
    return torch.tensor(sorted(data), dtype=torch.float32)


DYNAMIC_MAP = create_dynamic_map()


def _sorted_bounds(table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Midpoints of the sorted table and the sorted->table index map (bnb `_get_4bit_quantize_bounds`)."""
    order = torch.argsort(table, stable=True)
    return (table[order[:-1]] + table[order[1:]]) / 2, order


_BOUNDS = {kind: _sorted_bounds(table) for kind, table in TABLES.items()}


def _lookup_table(code: torch.Tensor, size: int = 65536) -> torch.Tensor:
    """bnb CPU `build_quantize_lut`: bin i of [-1, 1] -> number of code midpoints below the bin's value."""
    midpoints = 0.5 * (code[:-1] + code[1:])
    values = -1.0 + (2.0 * torch.arange(size, dtype=torch.float32)) / (size - 1)
    return torch.searchsorted(midpoints, values).to(torch.uint8)


_DYNAMIC_LUT = _lookup_table(DYNAMIC_MAP)


def _block_absmax(flat: torch.Tensor, block_size: int) -> torch.Tensor:
    """max|x| per block of `block_size` consecutive elements of 1-D `flat` (last block may be short)."""
    full = flat.numel() - flat.numel() % block_size
    absmax = torch.linalg.vector_norm(flat[:full].view(-1, block_size), ord=math.inf, dim=1)
    if full < flat.numel():
        absmax = torch.cat([absmax, flat[full:].abs().amax().unsqueeze(0)])
    return absmax


def _per_block(values: torch.Tensor, scale: torch.Tensor, block_size: int) -> torch.Tensor:
    """values[i] * scale[i // block_size] for 1-D float32 `values`."""
    full = values.numel() - values.numel() % block_size
    out = (values[:full].view(-1, block_size) * scale[: full // block_size].view(-1, 1)).reshape(-1)
    if full < values.numel():
        out = torch.cat([out, values[full:] * scale[-1]])
    return out


def _quantize_nested(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bnb CPU `quantize_blockwise(x, blocksize=256)` on the dynamic map: (uint8 codes, float32 absmax)."""
    absmax = _block_absmax(x, NESTED_BLOCK_SIZE)
    inverse = torch.where(absmax == 0, torch.zeros_like(absmax), 1.0 / absmax)
    normed = _per_block(x, inverse, NESTED_BLOCK_SIZE).clamp(-1.0, 1.0)
    index = ((normed + 1.0) * 0.5 * 65535.0 + 0.5).long()  # float32, truncated: bnb `norm_to_lut_index`
    empty = (absmax == 0).repeat_interleave(NESTED_BLOCK_SIZE)[: x.numel()]  # all-zero block: codes 0
    return _DYNAMIC_LUT[index].masked_fill_(empty, 0), absmax


@dataclass(frozen=True)
class NF4Codec:
    """bitsandbytes 4-bit codec over the flattened weight.

    params without double quant: ``absmax`` float32 [n_blocks], ``quant_map`` float32 [16].
    With double quant: ``absmax_q`` uint8 [n_blocks], ``nested_absmax`` float32 [ceil(n_blocks/256)],
    ``offset`` float32 0-d, ``quant_map`` float32 [16], ``nested_quant_map`` float32 [256]; `fit` also
    returns ``absmax`` (the exact block absmax the codes are scaled by, as in bnb; it is not stored on disk).
    codes: uint8 [numel], values 0..15, in flattened row-major order (no padding element).
    """

    grid_kind: ClassVar[str] = "table"  # formats/base.Codec

    kind: str = "nf4"
    block_size: int = 64
    double_quant: bool = False

    def __post_init__(self):
        if self.kind not in TABLES:
            raise ValueError(f"kind must be 'nf4' or 'fp4', got {self.kind!r}")
        if self.block_size not in BLOCK_SIZES:
            raise ValueError(f"block_size must be one of {BLOCK_SIZES}, got {self.block_size}")

    @property
    def name(self) -> str:
        return f"{self.kind}_b{self.block_size}" + ("_dq" if self.double_quant else "")

    @property
    def bits(self) -> int:
        return 4

    @property
    def pad_code(self) -> int:
        """The code bnb stores in the low nibble of the last byte when numel is odd (the code of 0.0)."""
        return int(self._codes(torch.zeros(1), torch.ones(1))[0])

    def check_shape(self, shape: tuple[int, ...]) -> None:
        """Any non-empty shape works: blocks run over the flattened tensor."""
        if math.prod(shape) == 0:
            raise IndivisibleError(f"{self.name}: cannot quantize an empty tensor of shape {tuple(shape)}")

    def fit(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Block absmax (and its double quantization); `importance` is ignored (bnb has no such notion)."""
        self.check_shape(tuple(w.shape))
        absmax = _block_absmax(w.reshape(-1).float(), self.block_size)
        params = {"absmax": absmax, "quant_map": TABLES[self.kind].clone()}
        if self.double_quant:
            offset = absmax.mean()
            absmax_q, nested_absmax = _quantize_nested(absmax - offset)
            params.update(absmax_q=absmax_q, nested_absmax=nested_absmax, offset=offset,
                          nested_quant_map=DYNAMIC_MAP.clone())
        return params

    def quantize(self, w: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """Codes for `w` scaled by ``params["absmax"]`` (the stored, reconstructed absmax when absent)."""
        scale = params["absmax"] if "absmax" in params else self.stored_absmax(params)
        return self._codes(w.reshape(-1).float(), scale)

    def encode(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> QTensor:
        params = self.fit(w, importance)
        return QTensor(self, tuple(w.shape), self.quantize(w, params), params)

    def stored_absmax(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """The absmax a loader sees: ``params["absmax"]``, or its reconstruction under double quant."""
        if not self.double_quant:
            return params["absmax"]
        nested = params["nested_quant_map"][params["absmax_q"].long()]
        return _per_block(nested, params["nested_absmax"], NESTED_BLOCK_SIZE) + params["offset"]

    def dequantize(self, q: QTensor) -> torch.Tensor:
        values = q.params["quant_map"][q.codes.long()]
        return _per_block(values, self.stored_absmax(q.params), self.block_size).reshape(q.shape)

    def nbytes(self, shape: tuple[int, ...]) -> int:
        """Bytes of the tensors bnb serializes for a weight of `shape` (n elements, b = ceil(n/block_size)).

        ``weight`` ceil(n/2) + ``absmax`` 4b (1b with double quant) + ``quant_map`` 64, and with double quant
        ``nested_absmax`` 4*ceil(b/256) + ``nested_quant_map`` 1024. The ``quant_state.bitsandbytes__*`` JSON
        blob is not counted: its length depends on the dtype name and on the printed offset.
        """
        n = math.prod(shape)
        blocks = -(-n // self.block_size)
        total = -(-n // 2) + 16 * 4
        if self.double_quant:
            return total + blocks + 4 * -(-blocks // NESTED_BLOCK_SIZE) + 256 * 4
        return total + 4 * blocks

    def _codes(self, flat: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
        """bnb default `quantize_4bit` op on 1-D float32 `flat` with block scales `absmax`."""
        full = flat.numel() - flat.numel() % self.block_size
        scale = absmax.clamp(min=1e-38)
        scaled = flat[:full].view(-1, self.block_size) * (1.0 / scale[: full // self.block_size].view(-1, 1))
        scaled = scaled.clamp_(-1, 1).reshape(-1)
        if full < flat.numel():
            scaled = torch.cat([scaled, torch.clamp(flat[full:] / scale[-1], -1, 1)])
        bounds, order = _BOUNDS[self.kind]
        codes = torch.bucketize(scaled, bounds, out_int32=True)
        if self.kind != "nf4":
            codes = order[codes]
        return codes.to(torch.uint8)

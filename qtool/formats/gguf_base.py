"""GGUF block codecs: the shared shape of every ggml quantized type, and their registry.

Every ggml block type reconstructs an element as

    value = scale[r, s] * levels[code] + offset[r, s]

where ``r`` is the row, ``s = column // sub_block`` the sub-block (the block itself for the 32-element legacy
types), ``levels`` the type's code table (``arange(16)`` for Q4_K, ``arange(16) - 8`` for Q4_0, the
non-uniform ``kvalues`` for IQ4_NL/IQ4_XS ...) and ``scale``/``offset`` the *decoded* float32 values the file
holds (``d * sc``, ``-dmin * m``, computed in float32 exactly as ggml and gguf-py do). A codec's params are

    params["scale"], params["offset"]: float32 (rows, cols // sub_block)   decoded, exactly what the file gives
    params[...]:                       whatever raw fields its `pack` needs (fp16 d / dmin, 6-bit sub-scales)

and its codes are uint8 indices into ``levels`` (rows, cols). Because ``scale``/``offset`` are the decoded
values, `dequantize` is one formula for every type, and a method that walks columns (GPTQ) can round any
column onto any type's grid with `quantize_columns` once the params are fitted (``fit``): the seam that lets
GPTQ compensate error through the k-quant grids.

Per type a codec implements only:

* ``fit(w, importance) -> params``: choose the block/sub-block parameters (already rounded to what the file
  stores), optionally importance-weighted (an imatrix / diag(H) vector of length ``cols``);
* ``encode(w, importance) -> QTensor``: fit + the codes (default: nearest level under the fitted params;
  types whose llama.cpp reference computes codes differently override it);
* ``pack(q) -> uint8 (rows, cols // block_size * type_size)`` and ``unpack(data, shape) -> QTensor``: the
  byte layout of ggml's block structs (formats.md §2).

Types register themselves in ``GGUF_CODECS`` under their lower-case ggml name (``q4_k``); `gguf_codec(name)`
imports the family modules on first use.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import ClassVar

import torch

from qtool.errors import IndivisibleError
from qtool.formats.base import QTensor

GGUF_CODECS: dict[str, "GGUFCodec"] = {}
FAMILIES = ("qtool.formats.gguf_float", "qtool.formats.gguf_legacy", "qtool.formats.gguf_k4",
            "qtool.formats.gguf_k16")


def register(codec: "GGUFCodec") -> "GGUFCodec":
    if codec.name in GGUF_CODECS:
        raise ValueError(f"GGUF codec {codec.name} registered twice")
    GGUF_CODECS[codec.name] = codec
    return codec


def _load_families() -> None:
    for mod in FAMILIES:
        importlib.import_module(mod)


def gguf_codec(name: str) -> "GGUFCodec":
    """The codec of ggml type `name` (case-insensitive: ``q4_k``, ``Q4_K``); a clear error lists the known ones."""
    _load_families()
    key = name.lower()
    if key not in GGUF_CODECS:
        raise KeyError(f"unknown GGUF type {name!r}; known: {', '.join(sorted(GGUF_CODECS))}")
    return GGUF_CODECS[key]


def all_gguf_codecs() -> dict[str, "GGUFCodec"]:
    _load_families()
    return dict(GGUF_CODECS)


class one_thread:
    """Run a codec's block loops on one torch thread (restored after): each op touches one cache-sized chunk, and
    intra-op threading of such ops costs far more than it gains on a loaded few-core machine (measured 10-500x,
    e.g. a 128x1024 Q4_K encode: 0.2 s on one thread, 27 s on two with the cores shared)."""

    def __enter__(self):
        self.n = torch.get_num_threads()
        if self.n != 1:
            torch.set_num_threads(1)

    def __exit__(self, *exc):
        if self.n != 1:
            torch.set_num_threads(self.n)


ROW_CHUNK_ELEMS = 1 << 21  # elements per row chunk of whole-tensor passes (8 MiB per float32 temporary)


def row_chunks(rows: int, cols: int, elems: int = ROW_CHUNK_ELEMS) -> list[slice]:
    """Row slices of about `elems` elements covering `rows` rows: whole-tensor passes (quantize, dequantize)
    keep their per-element temporaries this size, so a vocabulary-sized tensor never needs several copies."""
    step = max(1, elems // max(cols, 1))
    return [slice(r, min(rows, r + step)) for r in range(0, rows, step)]


def fp16_round(x: torch.Tensor) -> torch.Tensor:
    """float32 -> the nearest fp16 value (round to nearest even), back as float32: what ggml stores in `d`."""
    return x.float().to(torch.float16).float()


def nearest_int(x: torch.Tensor) -> torch.Tensor:
    """ggml's ``nearest_int``: round half to even (as ``np.rint``), as an int32 tensor."""
    return torch.round(x).to(torch.int32)


def roundf(x: torch.Tensor) -> torch.Tensor:
    """C ``roundf``: half away from zero (Q8_0's reference rounding)."""
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


@dataclass(frozen=True, eq=False)
class GGUFCodec:
    """Base of every GGUF block codec (subclasses are frozen dataclasses with no extra fields).

    ``name`` (lower-case ggml type name), ``ggml_type`` (the id, formats.md §1.2), ``block_size`` (elements
    per block), ``type_size`` (bytes per block), ``sub_block`` (elements sharing one scale/offset),
    ``levels`` (the code table as a tuple of ints/floats; empty for the float types).
    """

    grid_kind: ClassVar[str] = "block"  # formats/base.Codec
    name: str
    ggml_type: int
    block_size: int
    type_size: int
    sub_block: int
    levels: tuple = ()

    # ---- identity (frozen dataclasses compare by name: one codec object per ggml type)
    def __eq__(self, other):
        return isinstance(other, GGUFCodec) and other.name == self.name

    def __hash__(self):
        return hash(("gguf", self.name))

    @property
    def bits(self) -> float:
        return 8 * self.type_size / self.block_size  # bits per weight, block overhead included

    @property
    def levels_tensor(self) -> torch.Tensor:
        return torch.tensor(self.levels, dtype=torch.float32)

    # ---- shapes and sizes
    def check_shape(self, shape: tuple[int, int]) -> None:
        if shape[-1] % self.block_size:
            raise IndivisibleError(f"{self.name.upper()} needs rows that are a multiple of {self.block_size} "
                                   f"elements; this tensor's rows have {shape[-1]}")

    def group_width(self, cols: int) -> int:
        """Columns sharing one decoded scale/offset (AWQ normalises weight magnitudes per such group)."""
        return self.sub_block if self.levels else cols

    def row_bytes(self, cols: int) -> int:
        return cols // self.block_size * self.type_size

    def nbytes(self, shape: tuple[int, ...]) -> int:
        rows = 1
        for n in shape[:-1]:
            rows *= n
        return rows * self.row_bytes(shape[-1])

    # ---- the generic grid (valid for every block type; the float types override)
    def sub_index(self, cols: int) -> torch.Tensor:
        return torch.arange(cols) // self.sub_block

    def dequantize(self, q: QTensor) -> torch.Tensor:
        rows, cols = q.shape
        out = torch.empty(rows, cols)
        lv = self.levels_tensor
        for r in row_chunks(rows, cols):  # per-element temporaries stay chunk-sized (a 100M-entry embedding)
            scale = q.params["scale"][r].repeat_interleave(self.sub_block, dim=1)
            offset = q.params["offset"][r].repeat_interleave(self.sub_block, dim=1)
            torch.mul(scale, lv[q.codes[r].long()], out=out[r]).add_(offset)  # scale·level + offset, no FMA
        return out

    def quantize(self, w: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """Nearest level of each element under fixed `params` (ties to the lower level), uint8 codes."""
        rows, cols = w.shape
        codes = torch.empty(rows, cols, dtype=torch.uint8)
        for r in row_chunks(rows, cols):
            scale = params["scale"][r].repeat_interleave(self.sub_block, dim=1)
            offset = params["offset"][r].repeat_interleave(self.sub_block, dim=1)
            codes[r] = self.quantize_columns(w[r].float(), scale, offset)
        return codes

    def quantize_columns(self, x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """Codes for `x` given per-element (broadcastable) decoded `scale`/`offset`: the nearest value
        ``scale * level + offset``. Works on any slice (one column for GPTQ's sweep)."""
        lv = self.levels_tensor
        safe = torch.where(scale == 0, torch.ones_like(scale), scale)
        t = (x - offset) / safe  # position on the level axis (any sign of scale); scale 0: any code gives offset
        mids = (lv[1:] + lv[:-1]) / 2  # |value - v_i| = |scale| * |t - level_i|: nearest in t is nearest in value
        idx = torch.bucketize(t, mids, right=False)
        return idx.clamp_(0, len(self.levels) - 1).to(torch.uint8)

    def column_grid(self, params: dict[str, torch.Tensor], cols: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoded (scale, offset) of each element in columns `cols`: (rows, len(cols)) each."""
        idx = self.sub_index(cols.stop)[cols]
        return params["scale"][:, idx], params["offset"][:, idx]

    # ---- per type
    def fit(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def encode(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> QTensor:
        w = w.float()
        self.check_shape(tuple(w.shape))
        params = self.fit(w, importance)
        return QTensor(self, tuple(w.shape), self.quantize(w, params), params)

    def pack(self, q: QTensor) -> torch.Tensor:
        raise NotImplementedError

    def unpack(self, data: torch.Tensor, shape: tuple[int, int]) -> QTensor:
        raise NotImplementedError

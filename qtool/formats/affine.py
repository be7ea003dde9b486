"""Affine integer codec with compressed-tensors semantics.

Codes are **signed** b-bit integers in ``[qmin, qmax] = [-2^(b-1), 2^(b-1)-1]``, stored as int8, with one
``scale`` and one integer ``zero`` per (row, group); groups run along the input dimension.

    quantize:   q = clamp(round(w / scale + zero), qmin, qmax)      (torch.round: half to even)
    dequantize: w' = (q - zero) * scale                              (computed in the scale's dtype)

Parameter choice (``fit``), per group, on the range ``lo = min(0, min w)``, ``hi = max(0, max w)`` (zero is
always representable):

* symmetric:  ``scale = max(|lo|, hi) / qmax`` and ``zero = 0``; no code ever clips.
* asymmetric: ``scale = (hi - lo) / (2^b - 1)`` and ``zero = clamp(round(qmin - lo / scale), qmin, qmax)``.
* float zero (``float_zero=True``, asymmetric only; HQQ's zero point): the zero is a float stored in
  ``scale_dtype``, neither rounded nor clamped, fitted on the group's own range ``lo = min w``, ``hi = max w``
  (zero need not be representable: a fractional zero cannot reproduce 0 exactly anyway):
  ``scale = (hi - lo) / (2^b - 1)``, ``zero = qmin - lo / scale``, so ``lo`` maps to ``qmin`` and ``hi`` to
  ``qmax``. A constant group gets ``scale = 1`` and reconstructs its value up to the zero's rounding in
  ``scale_dtype``. Codes stay signed b-bit integers; quantize and dequantize use the same formulas.

The scale is rounded to ``scale_dtype`` first and the zero point and codes are computed from that stored
scale, so `dequantize` returns exactly what a loader (compressed-tensors, vLLM) reconstructs. A group whose
scale is zero (all-zero group, or an underflow in ``scale_dtype``) gets ``scale = 1``: its codes then encode
the values exactly (0) or with an error below the group's absolute max, never NaN/Inf.

Act-order groups (GPTQ ``act_order: dynamic``): params may also hold ``g_idx``, int32 [in], the group of
each input column, when a group's columns are not contiguous. Column j then uses ``scale[:, g_idx[j]]`` and
``zero[:, g_idx[j]]`` (``scale[:, g_idx]`` as GPTQ loaders and compressed-tensors <= 0.18 effectively index it);
without ``g_idx`` the group of column j is ``j // group_width``. `check_g_idx` validates one.

``clip_search`` shrinks the range by factors ``1.0, 0.975, ..., 0.5`` and keeps, per group, the factor with
the smallest squared reconstruction error, weighted per input column by ``importance`` when given (the MSE
clip of GPTQ's ``mse`` option / llama.cpp's ``make_qx_quants`` search). Factor 1.0 is the plain fit, and only
a strictly smaller error replaces it, so a clipped fit is never worse than the plain one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from qtool.errors import IndivisibleError
from qtool.formats.base import QTensor

_SCALE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CLIP_GRID = tuple(1.0 - 0.025 * i for i in range(21))  # 1.0 ... 0.5; 1.0 first (= plain fit)


def qrange(bits: int) -> tuple[int, int]:
    """Signed code range ``(qmin, qmax)`` for `bits`."""
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def quantize_with(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """``clamp(round(x / scale + zero), qmin, qmax)`` as int8, broadcasting `scale`/`zero` against `x`.

    Works on any slice (e.g. one column with ``scale[:, g:g+1]``); computed in float32 like
    compressed-tensors' ``quantize`` on a float32 input.
    """
    qmin, qmax = qrange(bits)
    y = x.float() / scale.float() + zero.float()
    return torch.round(y.clamp_(qmin, qmax)).to(torch.int8)


def check_g_idx(g_idx: torch.Tensor, in_features: int, n_groups: int) -> torch.Tensor:
    """`g_idx` as int32 after checking it maps each of `in_features` columns to a group in ``[0, n_groups)``.

    Raises ValueError otherwise. Group sizes are not checked: readers index ``scale[:, g_idx]`` whatever they are.
    """
    if g_idx.ndim != 1 or g_idx.shape[0] != in_features or g_idx.is_floating_point() or g_idx.dtype == torch.bool:
        raise ValueError(f"g_idx must be integers of shape ({in_features},), got {g_idx.dtype} {tuple(g_idx.shape)}")
    if in_features and (int(g_idx.min()) < 0 or int(g_idx.max()) >= n_groups):
        raise ValueError(f"g_idx values must be group indices in 0..{n_groups - 1}, got "
                         f"{int(g_idx.min())}..{int(g_idx.max())}")
    return g_idx.to(torch.int32)


def natural_g_idx(in_features: int, group_width: int) -> torch.Tensor:
    """The g_idx of contiguous groups, ``j // group_width`` (int32 [in])."""
    return (torch.arange(in_features) // group_width).to(torch.int32)


def dequantize_with(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``(codes - zero) * scale`` computed in ``scale.dtype`` (as loaders do), returned as float32.

    With an integer zero the float32 arithmetic below gives the same values ~3x faster than half-precision
    tensor ops: ``codes - zero`` is an integer below 2^8 and its product with a bf16/fp16 scale (8 or 11
    significant bits) is exact in float32, so one rounding to ``scale.dtype`` is the rounding of the
    half-precision product. A float zero point is subtracted in ``scale.dtype`` (that rounds too)."""
    if zero.is_floating_point() or codes.is_floating_point():
        d = codes.to(scale.dtype) - zero.to(scale.dtype)
        return (d * scale).float()
    p = (codes.float() - zero.float()) * scale.float()
    return p if scale.dtype == torch.float32 else p.to(scale.dtype).float()


@dataclass(frozen=True)
class AffineCodec:
    """Signed affine b-bit integers, one scale/zero per (row, group) — compressed-tensors INT weights.

    Fields: `bits` 2..8; `group_size` > 0 columns per group, or 0 for one group per output channel;
    `symmetric` (zero point fixed at 0); `scale_dtype` of the stored scales (float32/float16/bfloat16);
    `clip_search` to pick a shrunk range per group by (importance-weighted) MSE; `float_zero` for a float
    zero point (requires ``symmetric=False``).

    params: ``scale`` [out, n_groups] in `scale_dtype`, ``zero`` int8 [out, n_groups] (zeros if symmetric),
    or ``zero`` in `scale_dtype` with `float_zero`; optionally ``g_idx`` int32 [in] (module docstring).
    codes: int8 [out, in].
    """

    grid_kind: ClassVar[str] = "affine"  # formats/base.Codec
    bits: int
    group_size: int
    symmetric: bool
    scale_dtype: torch.dtype = torch.float32
    clip_search: bool = False
    float_zero: bool = False

    def __post_init__(self):
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ValueError(f"affine codec: bits must be an integer in 2..8, got {self.bits!r}")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 0:
            raise ValueError(
                "affine codec: group_size must be a positive integer, or 0 for per-channel, "
                f"got {self.group_size!r}"
            )
        if self.scale_dtype not in _SCALE_DTYPES:
            raise ValueError(
                f"affine codec: scale_dtype must be one of float32/float16/bfloat16, got {self.scale_dtype!r}"
            )
        if not isinstance(self.float_zero, bool):
            raise TypeError(f"affine codec: float_zero must be a bool, got {self.float_zero!r}")
        if self.float_zero and self.symmetric:
            raise ValueError("affine codec: float_zero needs symmetric=False (a symmetric zero point is 0)")

    # ---- identity -------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        """``int{bits}_{g<size>|ch}_{sym|asym}[_clip][_fz]``, e.g. ``int4_g64_asym``, ``int4_g64_asym_fz``."""
        group = f"g{self.group_size}" if self.group_size else "ch"
        kind = "sym" if self.symmetric else "asym"
        return f"int{self.bits}_{group}_{kind}" + ("_clip" if self.clip_search else "") + ("_fz" if self.float_zero else "")

    @property
    def qmin(self) -> int:
        return qrange(self.bits)[0]

    @property
    def qmax(self) -> int:
        return qrange(self.bits)[1]

    # ---- shapes ---------------------------------------------------------------------------------
    def group_width(self, in_features: int) -> int:
        """Columns per group for a weight with `in_features` columns."""
        return self.group_size or in_features

    def n_groups(self, in_features: int) -> int:
        return in_features // self.group_width(in_features)

    def check_shape(self, shape: tuple[int, int]) -> None:
        """Raise `IndivisibleError` when `group_size` does not divide the input width."""
        if len(shape) != 2 or min(shape) < 1:
            raise ValueError(f"affine codec: expected a non-empty 2-D shape (out, in), got {tuple(shape)}")
        out, inp = shape
        if self.group_size and inp % self.group_size:
            raise IndivisibleError(
                f"group size {self.group_size} does not divide input width {inp} (weight {out}x{inp})"
            )

    def nbytes(self, shape: tuple[int, int], g_idx: bool = False) -> int:
        """Exact bytes of the compressed-tensors ``pack-quantized`` tensors for a weight of `shape`.

        weight_packed int32 [out, ceil(in*b/32)] + weight_scale [out, n_groups] + weight_shape int64 [2]
        + (asymmetric only) weight_zero_point int32 [ceil(out*b/32), n_groups], or with `float_zero`
        weight_zero_point [out, n_groups] in `scale_dtype` (unpacked; see `formats/compressed_tensors.py`)
        + with `g_idx` (act-order groups) the int32 [in] group map (``weight_g_idx``).
        """
        self.check_shape(shape)
        out, inp = shape
        if g_idx:
            return self.nbytes(shape) + 4 * inp
        g = self.n_groups(inp)
        n = 4 * out * math.ceil(inp * self.bits / 32)
        n += out * g * torch.empty((), dtype=self.scale_dtype).element_size()
        n += 2 * 8
        if self.float_zero:
            n += out * g * torch.empty((), dtype=self.scale_dtype).element_size()
        elif not self.symmetric:
            n += 4 * math.ceil(out * self.bits / 32) * g
        return n

    # ---- parameters -----------------------------------------------------------------------------
    def _grouped(self, w: torch.Tensor) -> torch.Tensor:
        out, inp = w.shape
        return w.reshape(out, self.n_groups(inp), self.group_width(inp))

    def params_from_range(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale in `scale_dtype`, zero) for per-group ranges ``lo <= hi`` (any equal shapes).

        The zero is int8, or with `float_zero` a float in `scale_dtype`. Integer zeros need ``lo <= 0 <= hi``.
        """
        lo, hi = lo.float(), hi.float()
        if self.symmetric:
            scale = torch.maximum(-lo, hi) / self.qmax
        else:
            scale = (hi - lo) / (2**self.bits - 1)
        scale = scale.to(self.scale_dtype)
        if not torch.isfinite(scale).all():
            raise ValueError(f"affine codec: scale overflows {self.scale_dtype} (weight range too large)")
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        if self.symmetric:
            zero = torch.zeros(scale.shape, dtype=torch.int8, device=scale.device)
        elif self.float_zero:
            zero = (self.qmin - lo / scale.float()).to(self.scale_dtype)
            if not torch.isfinite(zero).all():
                raise ValueError(f"affine codec: zero point overflows {self.scale_dtype} (weight range too large)")
        else:
            zero = torch.round(self.qmin - lo / scale.float()).clamp_(self.qmin, self.qmax).to(torch.int8)
        return scale, zero

    def fit(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Choose ``scale``/``zero`` per (row, group) for `w` (out, in); see the module docstring."""
        w = self._check_weight(w)
        wg = self._grouped(w)
        lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)
        if not self.float_zero:  # an integer zero point must represent 0: widen the range to include it
            lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
        if not self.clip_search:
            scale, zero = self.params_from_range(lo, hi)
            return {"scale": scale, "zero": zero}

        if importance is None:
            imp = torch.ones(1, 1, wg.shape[-1], device=w.device)
        else:
            imp = importance.float().to(w.device)
            if imp.shape != (w.shape[1],) or not torch.isfinite(imp).all() or (imp < 0).any():
                raise ValueError(
                    f"affine codec: importance must be finite, non-negative, of shape ({w.shape[1]},), "
                    f"got shape {tuple(importance.shape)}"
                )
            imp = imp.reshape(1, wg.shape[1], wg.shape[2])
        best_err = best_scale = best_zero = None
        for p in CLIP_GRID:
            scale, zero = self.params_from_range(lo * p, hi * p)
            s, z = scale.unsqueeze(-1), zero.unsqueeze(-1)
            err = ((dequantize_with(quantize_with(wg, s, z, self.bits), s, z) - wg).square_() * imp).sum(-1)
            if best_err is None:
                best_err, best_scale, best_zero = err, scale, zero
                continue
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, scale, best_scale)
            best_zero = torch.where(better, zero, best_zero)
        return {"scale": best_scale, "zero": best_zero}

    # ---- codes ----------------------------------------------------------------------------------
    def column_params(
        self, params: dict[str, torch.Tensor], in_features: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-column ``(scale, zero)``, each [out, in]: the group parameters repeated over their columns.

        Slice them (``[:, j:j+1]``) to quantize single columns with `quantize_with` (GPTQ).
        """
        if "g_idx" in params:
            g = params["g_idx"].long()
            return params["scale"][:, g], params["zero"][:, g]
        gw = self.group_width(in_features)
        return (params["scale"].repeat_interleave(gw, dim=1), params["zero"].repeat_interleave(gw, dim=1))

    def quantize(self, w: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """Float weight (out, in) -> int8 codes (out, in) under fixed `params`."""
        w = self._check_weight(w)
        if "g_idx" in params:
            return quantize_with(w, *self.column_params(params, w.shape[1]), self.bits)
        wg = self._grouped(w)
        q = quantize_with(wg, params["scale"].unsqueeze(-1), params["zero"].unsqueeze(-1), self.bits)
        return q.reshape(w.shape)

    def column_grid(self) -> tuple[int, int, torch.dtype] | None:
        """``(qmin, qmax, scale_dtype)`` of the integer grid `quantize_columns`/`dequantize_columns` implement:
        ``q = clamp(round(x / s + z))``, decoded ``(q - z) * s`` in `scale_dtype` with an integer zero (what a
        native GPTQ sweep needs to reproduce them bit for bit); None with a float zero point."""
        return None if self.float_zero else (self.qmin, self.qmax, self.scale_dtype)

    def quantize_columns(self, x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """Codes of a column slice `x` [out, k] under per-column params (see `column_params`)."""
        return quantize_with(x, scale, zero, self.bits)

    def dequantize_columns(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """Float32 values of a column slice of codes, exactly as loaders reconstruct them."""
        return dequantize_with(codes, scale, zero)

    def encode(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> QTensor:
        """fit + quantize."""
        params = self.fit(w, importance)
        codes = self.quantize(w, params)
        return QTensor(codec=self, shape=(int(w.shape[0]), int(w.shape[1])), codes=codes, params=params)

    def dequantize(self, q: QTensor) -> torch.Tensor:
        """``(codes - zero) * scale`` in the scale dtype, as float32 [out, in] (per column through ``g_idx``)."""
        out, inp = q.shape
        if "g_idx" in q.params:
            return dequantize_with(q.codes, *self.column_params(q.params, inp))
        cg = q.codes.reshape(out, self.n_groups(inp), self.group_width(inp))
        w = dequantize_with(cg, q.params["scale"].unsqueeze(-1), q.params["zero"].unsqueeze(-1))
        return w.reshape(out, inp)

    def _check_weight(self, w: torch.Tensor) -> torch.Tensor:
        if w.ndim != 2:
            raise ValueError(f"affine codec: expected a 2-D weight (out, in), got shape {tuple(w.shape)}")
        self.check_shape(tuple(w.shape))
        w = w.float()
        if not torch.isfinite(w).all():
            raise ValueError("affine codec: weight contains NaN or Inf")
        return w

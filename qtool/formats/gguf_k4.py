"""GGUF k-quants with 256-element super-blocks of 8 sub-blocks of 32: Q4_K, Q5_K and IQ4_XS.

Decoded grid (formats.md §2.2, §2.4), per sub-block ``s`` of 32 elements:

* Q4_K / Q5_K: ``value = (d·sc_s)·q − d_min·m_s`` with ``q`` in 0..15 / 0..31, ``d``/``d_min`` fp16 per
  super-block and 6-bit ``sc``/``m`` packed in 12 bytes (``get_scale_min_k4``). Levels ``arange(16|32)``,
  ``scale = d·sc``, ``offset = −(d_min·m)``. Raw params: ``d``, ``dmin`` (float16, rows × blocks),
  ``sc``, ``m`` (uint8, rows × sub-blocks).
* IQ4_XS: ``value = (d·(ls_s − 32))·kvalues[q]``, ``d`` fp16, ``ls`` 6-bit. Levels = the ``kvalues`` table,
  ``scale = d·(ls − 32)``, ``offset = 0``. Raw params: ``d`` (float16), ``ls`` (uint8, 0..63).

Two encoders per type:

* ``faithful=True``: llama.cpp's reference algorithm (no imatrix: ``quantize_row_q4_K_ref`` /
  ``quantize_row_q5_K_ref``, i.e. per-sub-block ``make_qkx2_quants`` on ``av_x + |x|`` weights and sub-scales
  ``nearest(63·s/max)``; with an imatrix: ``quantize_row_qX_K_impl``, i.e. ``make_qkx3_quants`` +
  ``make_qp_quants``; IQ4_XS: ``quantize_row_iq4_nl_impl`` over 8 sub-blocks with ``ntry = 7``). The codes are
  the ones llama.cpp writes: IQ4_XS rounds with the un-rounded fp32 ``d``, so they can differ from "nearest
  level under the stored params" (``encode`` returns llama.cpp's codes, ``fit`` only the params).
* default: a better encoder for the same bytes (lower Σω·(x − x̂)², see below): a wider per-sub-block
  scale search under the true objective (with least-squares refits), then alternating refinement over the
  whole super-block: a joint integer search of each sub-block's 6-bit sub-scale(s) with the codes re-rounded
  for every candidate, and weighted least squares for the super-block ``d`` (and ``d_min``) given the
  integers and codes, keeping the best state per super-block. Its codes are exactly the nearest levels under
  the fitted params (`quantize`), so GPTQ walking columns with ``fit``'s params rounds onto the same grid.

Objective ω: with an ``importance`` vector, llama.cpp's element weight ``imp[col]·sqrt(σ² + x²)`` with
``σ² = 2·Σx²/256`` over the super-block (what its ``_impl`` quantizers weight by); without one, plain squared
error (llama.cpp's ``av_x + |x|`` / ``x²`` weights are only its search heuristics). `weighted_error` computes it.

Native path: the Q4_K/Q5_K default encoder runs in ``kernels/cpu/gguf_kquants.cpp`` (formats/kquant_native.py:
one call per tensor, super-blocks over ``torch.get_num_threads()`` threads, results independent of the count)
whenever `runtime.native` can build it: the same algorithm and grids, float32 operations and sums in torch's
order, codes computed as `quantize` does. The torch code below is its twin and the fallback (``QTOOL_NATIVE=0``,
no compiler, NaN/Inf input); the two agree except where torch's not-always-correctly-rounded sqrt moves an
importance weight by an ulp and a near-tie goes the other way. ``faithful=True`` and IQ4_XS always run in torch.

Speed (torch path): everything is vectorized over (rows × super-blocks) in chunks of ``_CHUNK_ELEMS`` elements
(small enough to stay in cache); Python loops run only over search candidates, sweeps and the 8 entries of
``make_qp_quants``. Per-element ``torch.where`` / ``bucketize`` are avoided (branchy kernels, slow on
random data); `quantize_columns` is overridden by exactly equivalent arithmetic (ties to the lower level).
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np
import torch

from qtool.formats import kquant_native
from qtool.formats.base import QTensor
from qtool.formats.gguf_base import GGUFCodec, register, one_thread

QK_K = 256
SUB = 32
NSUB = QK_K // SUB
KVALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
FP16_MAX = 65504.0
_CHUNK_ELEMS = 1 << 16  # elements per processing chunk (cache-sized; measured best on 1-2 cores)

_GT = gguf.GGMLQuantizationType

# default encoder search grids
# Q4_K/Q5_K: initial code assignments round((nmax + k)·(x − min)/(max − min)), each LS-refitted (llama.cpp
# tries k in [-1, 1] (Q4_K) / [-0.5, 1] (Q5_K); the winners on real and synthetic weights spread over [-6, 3])
_KS_Q4 = tuple(-4.0 + 7.0 * i / 39 for i in range(40))
_KS_Q5 = tuple(-6.0 + 9.0 * i / 23 for i in range(24))
_REFINE = 2  # `_fit_subblocks` rounds of (nearest codes, LS refit) after the grid
# whole-code-step shifts of the min tried as well (same interior, other clipping: often a better basin)
_SHIFTS_Q4 = (-2.0, -1.0, 1.0, 2.0)
_SHIFTS_Q5 = (-4.0, -3.0, -2.0, -1.0, 1.0, 2.0, 3.0, 4.0)
# candidates (prefix lengths of _PAIRS) of the joint sub-scale search, one entry per refinement round
_SCHEDULE_Q4 = (17, 17, 13)
_SCHEDULE_Q5 = (17, 9, 5)
# (sc, m) offsets tried around the rounded continuous optimum: scale and min errors are correlated (diagonal)
_PAIRS = ((0, 0), (-1, 0), (1, 0), (0, -1), (0, 1), (-1, -1), (1, 1), (-2, -1), (-1, -2), (-2, -2), (2, 2),
          (2, 1), (1, 2), (-3, -3), (-3, -2), (-2, -3), (3, 3))
# IQ4_XS: the signed max-|x| element of a sub-block is mapped to ±c, c in this grid (llama.cpp: 127 and -120..-134)
_IQ4_CANDS = tuple(float(c) for c in np.geomspace(85.0, 185.0, 14)) + tuple(-float(c) for c in np.geomspace(85.0, 185.0, 14))


def _f32(v: float) -> np.float32:
    return np.float32(v)


def _div(num, den: torch.Tensor) -> torch.Tensor:
    """float32 ``num / den`` as one IEEE division (``scalar / tensor`` in torch is reciprocal·scalar)."""
    return torch.full_like(den, float(num)) / den


def _rint(t: torch.Tensor) -> torch.Tensor:
    return torch.round(t)  # half to even, as ggml's nearest_int


def _fp16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float16)


def _fp16_sat(t: torch.Tensor) -> torch.Tensor:
    """fp16 rounding that saturates instead of overflowing to inf (default encoder only)."""
    return t.clamp(-FP16_MAX, FP16_MAX).to(torch.float16)


def _nz(t: torch.Tensor) -> torch.Tensor:
    """`t` with zeros replaced by ones (safe divisor; callers mask the zero case)."""
    return torch.where(t == 0, torch.ones_like(t), t)


def _vdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vecdot(a, b)


# ----------------------------------------------------------------------------------------------------------
# byte layout helpers


def _pack_scale_min(sc: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """(N, 8) 6-bit sc / m -> (N, 12) bytes as ``get_scale_min_k4`` reads them."""
    sc = sc.to(torch.int32)
    m = m.to(torch.int32)
    lo = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    mid = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    hi = (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4)
    return torch.cat([lo, mid, hi], dim=1).to(torch.uint8)


def _unpack_scale_min(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b = b.to(torch.int32)
    d, mm, md = b[:, 0:4], b[:, 4:8], b[:, 8:12]
    sc = torch.cat([d & 63, (md & 15) | ((d >> 6) << 4)], dim=1)
    m = torch.cat([mm & 63, (md >> 4) | ((mm >> 6) << 4)], dim=1)
    return sc.to(torch.uint8), m.to(torch.uint8)


def _fp16_bytes(d: torch.Tensor) -> torch.Tensor:
    """(N,) float16 -> (N, 2) little-endian bytes."""
    return d.to(torch.float16).contiguous().view(torch.int16).reshape(-1, 1).view(torch.uint8).reshape(-1, 2)


def _bytes_fp16(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.int16).view(torch.float16).reshape(-1)


def _nibbles_k(codes: torch.Tensor) -> torch.Tensor:
    """(N, 256) codes (low 4 bits used) -> (N, 128) bytes: element 64k+32h+l in nibble h of byte 32k+l."""
    c = (codes.to(torch.int32) & 15).reshape(-1, 4, 2, 32)
    return (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(-1, 128).to(torch.uint8)


def _unnibbles_k(qs: torch.Tensor) -> torch.Tensor:
    q = qs.to(torch.int32).reshape(-1, 4, 1, 32)
    return torch.cat([q & 15, q >> 4], dim=2).reshape(-1, QK_K)


# ----------------------------------------------------------------------------------------------------------
# nearest level without per-element branches


def _uniform_codes(t: torch.Tensor, nmax: int) -> torch.Tensor:
    """Codes for positions `t` on the level axis of ``arange(nmax + 1)``: the nearest level, ties to the lower
    one. Equal to ``bucketize(t, mids, right=False)`` (`GGUFCodec.quantize_columns`): ``t − ½`` is exact
    wherever it can decide a code (Sterbenz for t in [¼, 1], and t ≥ 1 is a multiple of ulp(t) ≥ ulp(½))."""
    return torch.nan_to_num(t, nan=float("inf")).sub_(0.5).ceil_().clamp_(0, nmax)  # NaN -> top level, as bucketize


def _uniform_codes_(t: torch.Tensor, nmax: int) -> torch.Tensor:
    """`_uniform_codes` in place on a NaN-free search temporary."""
    return t.sub_(0.5).ceil_().clamp_(0, nmax)


_KV = torch.tensor(KVALUES, dtype=torch.float32)
_KV_MIDS = (_KV[1:] + _KV[:-1]) / 2  # exact (integers / 2)
_KB_LO, _KB_HI = -130, 116  # unit buckets [k, k+1) covering the table; beyond it the end pairs decide


def _kv_bucket_tables():
    """For each unit bucket: the pair (j, j+1) whose midpoint is closest to the bucket centre. Midpoints are
    ≥ 11.5 apart, so any v in the bucket lies strictly between mid[j-1] and mid[j+1]: its nearest entry is j
    or j+1, decided by comparing v with mid[j] (or, ggml-style, v − lo with hi − v)."""
    centers = torch.arange(_KB_LO, _KB_HI + 1, dtype=torch.float64) + 0.5
    j = (centers[:, None] - _KV_MIDS.double()[None, :]).abs().argmin(1)
    return j.float(), _KV[j], _KV[j + 1]


_KV_J, _KV_LO, _KV_HI = _kv_bucket_tables()


def _kv_pair(v: torch.Tensor):
    """(j, lo, hi) of the deciding table pair for each element of `v` (any shape; NaN reads as 0)."""
    kb = v.floor().clamp_(_KB_LO, _KB_HI).nan_to_num_(0.0).sub_(_KB_LO).to(torch.int64).reshape(-1)
    shape = v.shape
    return (_KV_J.index_select(0, kb).reshape(shape), _KV_LO.index_select(0, kb).reshape(shape),
            _KV_HI.index_select(0, kb).reshape(shape))


def _kv_codes(t: torch.Tensor) -> torch.Tensor:
    """Nearest kvalues index, ties to the lower one: equal to ``bucketize(t, mids, right=False)``."""
    j, lo, hi = _kv_pair(t)
    return j.add_((t > (lo + hi) * 0.5).float())


def _kv_values(v: torch.Tensor) -> torch.Tensor:
    """The nearest kvalues entry itself (search helper; tie rule irrelevant there)."""
    _, lo, hi = _kv_pair(v)
    up = (v > (lo + hi) * 0.5).float()
    return torch.addcmul(lo, up, hi - lo)


def _kv_best_index_ggml(v: torch.Tensor) -> torch.Tensor:
    """ggml's ``best_index_int8``: ``x − val[lo] < val[hi] − x ? lo : hi`` in float32 (ties to the upper)."""
    j, lo, hi = _kv_pair(v)
    return j.add_(1.0 - ((v - lo) < (hi - v)).float())


# ----------------------------------------------------------------------------------------------------------
# llama.cpp helper algorithms (faithful path), vectorized over independent blocks (rows of the inputs)


def _make_qkx(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int):
    """``make_qkx2_quants`` / ``make_qkx3_quants`` (same algorithm, weights given) on (N, n) blocks.

    Returns (scale, the_min, L): ``x ≈ scale·L − the_min``, the_min ≥ 0 (min forced ≤ 0)."""
    mn = mn0 = x.amin(-1).clamp(max=0.0)
    mx = x.amax(-1)
    sum_w = w.sum(-1)
    sum_x = _vdot(w, x)
    degen = mx == mn
    ones = torch.ones_like(mx)
    iscale = _div(nmax, torch.where(degen, ones, mx - mn))
    scale = _div(1.0, iscale)
    L = (x - mn[:, None]).mul_(iscale[:, None]).round_().clamp_(0, nmax)
    diff = (scale[:, None] * L).add_(mn[:, None]).sub_(x)  # (scale·L + min) − x, ggml's op order
    best = _vdot(w, diff.mul_(diff))
    for i in range(nstep + 1):
        # ggml quirk kept: `min` is the best fit so far, so later candidates start from it
        f = _f32(rmin) + _f32(rdelta) * _f32(i) + _f32(nmax)
        iscale = _div(f, torch.where(degen, ones, mx - mn))
        La = (x - mn[:, None]).mul_(iscale[:, None]).round_().clamp_(0, nmax)
        wl = w * La
        sum_l = wl.sum(-1)
        sum_l2 = _vdot(wl, La)
        sum_xl = _vdot(wl, x)
        D = sum_w * sum_l2 - sum_l * sum_l
        ts = (sum_w * sum_xl - sum_x * sum_l) / D
        tm = (sum_l2 * sum_x - sum_l * sum_xl) / D
        pos = tm > 0
        tm = torch.where(pos, torch.zeros_like(tm), tm)
        ts = torch.where(pos, sum_xl / sum_l2, ts)
        diff = (ts[:, None] * La).add_(tm[:, None]).sub_(x)
        cur = _vdot(w, diff.mul_(diff))
        upd = (D > 0) & (cur < best)
        best = torch.where(upd, cur, best)
        scale = torch.where(upd, ts, scale)
        mn = torch.where(upd, tm, mn)
        L.add_((La - L).mul_(upd.float()[:, None]))  # L = upd ? La : L (integers: exact)
    scale = torch.where(degen, torch.zeros_like(scale), scale)
    L.mul_((~degen).float()[:, None])
    return scale, -torch.where(degen, mn0, mn), L


def _make_qp(x: torch.Tensor, w: torch.Tensor, nmax: int):
    """``make_qp_quants`` on (N, n) non-negative blocks: returns (scale, L) with ``x ≈ scale·L``."""
    mx = x.amax(-1).clamp(min=0.0)
    zero = mx < 1e-15
    mx = torch.where(zero, torch.ones_like(mx), mx)
    iscale = _div(nmax, mx)
    L = _rint(iscale[:, None] * x)
    scale = _div(1.0, iscale)
    diff = x - scale[:, None] * L
    best = ((w * diff) * diff).sum(-1)
    for i in range(-4, 5):
        if i == 0:
            continue
        iscale_i = _div(_f32(0.1) * _f32(i) + _f32(nmax), mx)
        scale_i = _div(1.0, iscale_i)
        li = _rint(iscale_i[:, None] * x).clamp_(max=nmax)
        diff = x - scale_i[:, None] * li
        mse = ((w * diff) * diff).sum(-1)
        upd = mse < best
        best = torch.where(upd, mse, best)
        iscale = torch.where(upd, iscale_i, iscale)
    L = _rint(iscale[:, None] * x).clamp_(0, nmax)  # (≥ 0: ggml stores it in a uint8)
    wx = w * x
    sumlx = (wx * L).sum(-1)
    suml2 = ((w * L) * L).sum(-1)
    for _ in range(5):
        for i in range(x.shape[1]):
            wi, xi, li, wxi = w[:, i], x[:, i], L[:, i], wx[:, i]
            slx = sumlx - wxi * li
            sl2 = suml2 - (wi * li) * li
            ok = (slx > 0) & (sl2 > 0)
            new_l = _rint((xi * sl2) / slx).clamp_(0, nmax)
            ch = ok & (new_l != li)
            slx = slx + wxi * new_l
            sl2 = sl2 + (wi * new_l) * new_l
            acc = ch & ((slx * slx) * suml2 > (sumlx * sumlx) * sl2)
            L[:, i] = torch.where(acc, new_l, li)
            sumlx = torch.where(acc, slx, sumlx)
            suml2 = torch.where(acc, sl2, suml2)
    scale = torch.where(suml2 > 0, sumlx / suml2, torch.zeros_like(sumlx))
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    L = torch.where(zero[:, None], torch.zeros_like(L), L)
    return scale, L


# ----------------------------------------------------------------------------------------------------------
# objective weights


def _sigma2(x: torch.Tensor) -> torch.Tensor:
    """(N, 8, 32) -> (N, 1, 1): llama.cpp's ``σ² = 2·Σx²/256`` per super-block."""
    return (2 * (x * x).sum(dim=(1, 2), keepdim=True)) / QK_K


def _imatrix_weights(x: torch.Tensor, imp: torch.Tensor) -> torch.Tensor:
    return imp * torch.sqrt(_sigma2(x) + x * x)


def _objective_weights(x: torch.Tensor, imp: torch.Tensor | None) -> torch.Tensor | None:
    """ω for the default encoder (None = all ones). A 1e-4 relative floor keeps zero-importance sub-blocks
    from collapsing to zero (they still cost something in plain error); a super-block whose importance is all
    zero is fitted unweighted."""
    if imp is None:
        return None
    om = _imatrix_weights(x, imp)
    mean = om.mean(dim=(1, 2), keepdim=True)
    om = om + 1e-4 * mean
    return torch.where(mean > 0, om, torch.ones_like(om))


def weighted_error(codec: GGUFCodec, w: torch.Tensor, q: QTensor, importance: torch.Tensor | None = None) -> float:
    """Σ ω·(w − ŵ)²: ω = ``imp[col]·sqrt(σ² + w²)`` (σ² = 2·Σw²/256 per super-block) with an importance
    vector, else 1 (plain squared error). The quantity the default encoder minimizes (float64 sum)."""
    w = w.float()
    rows, cols = w.shape
    x = w.reshape(-1, NSUB, SUB)
    r = (x - q.dequantize().reshape(x.shape)).double()
    if importance is None:
        return float((r * r).sum())
    imp = importance.float().reshape(1, -1).expand(rows, cols).reshape(-1, NSUB, SUB)
    om = _imatrix_weights(x, imp).double()
    return float((om * r * r).sum())


# ----------------------------------------------------------------------------------------------------------
# default encoder, Q4_K / Q5_K


def _stats(x, om, q):
    """Σωq, Σωq², Σωxq over the last dim (om None = unweighted)."""
    if om is None:
        return q.sum(-1), _vdot(q, q), _vdot(q, x)
    wq = om * q
    return wq.sum(-1), _vdot(wq, q), _vdot(wq, x)


def _affine_lsq(Sw, Sl, Sll, Sx, Sxl):
    """Weighted LS of ``x ≈ a·l + b`` with b ≤ 0 from the sufficient statistics; (a, b, solvable)."""
    D = Sw * Sll - Sl * Sl
    ok = D > 0
    Ds = torch.where(ok, D, torch.ones_like(D))
    a = (Sw * Sxl - Sx * Sl) / Ds
    b = (Sll * Sx - Sl * Sxl) / Ds
    pos = b > 0
    a = torch.where(pos, Sxl / _nz(Sll), a)
    b = torch.where(pos, torch.zeros_like(b), b)
    return a, b, ok


def _fit_subblocks(x: torch.Tensor, om: torch.Tensor | None, nmax: int, ks, refine: int):
    """Continuous per-sub-block ``x ≈ a·q − mn`` (a ≥ 0, mn ≥ 0) minimizing Σω·err², codes nearest.

    A grid of initial code assignments ``round((nmax + k)·(x − min)/(max − min))`` (k in `ks`, much wider
    than llama.cpp's), each followed by the weighted LS fit and scored exactly from the sufficient statistics
    (error of that fit with those codes); then `refine` rounds of (nearest codes, LS refit)."""
    mn0 = x.amin(-1).clamp(max=0.0)
    rng = x.amax(-1) - mn0
    flat = rng == 0
    xm = (x - mn0[..., None]).div_(_nz(rng)[..., None])
    if om is None:
        Sw = torch.full_like(rng, float(x.shape[-1]))
        Sx = x.sum(-1)
        Sxx = _vdot(x, x)
    else:
        Sw = om.sum(-1)
        Sx = _vdot(om, x)
        Sxx = _vdot(om * x, x)
    best = torch.full_like(Sw, float("inf"))
    a = torch.zeros_like(Sw)
    b = mn0.clone()
    for k in ks:
        q = (xm * float(nmax + k)).round_().clamp_(0, nmax)
        Sl, Sll, Sxl = _stats(x, om, q)
        ak, bk, ok = _affine_lsq(Sw, Sl, Sll, Sx, Sxl)
        err = Sxx - 2 * ak * Sxl - 2 * bk * Sx + ak * ak * Sll + 2 * ak * bk * Sl + bk * bk * Sw
        u = ok & (err < best)
        best = torch.where(u, err, best)
        a = torch.where(u, ak, a)
        b = torch.where(u, bk, b)
    for _ in range(refine):
        q = _uniform_codes_((x - b[..., None]).div_(_nz(a)[..., None]), nmax)
        Sl, Sll, Sxl = _stats(x, om, q)
        a2, b2, ok = _affine_lsq(Sw, Sl, Sll, Sx, Sxl)
        ok = ok & (a2 > 0)
        a = torch.where(ok, a2, a)
        b = torch.where(ok, b2, b)
    a = torch.where(flat, torch.zeros_like(a), a.clamp(min=0.0))
    return a, -b


def _sub_error_k(x, om, A, B, nmax):
    """Per-sub-block Σω·err² for decoded scale A and min B (N, 8): value = A·q − B, q nearest; (err, q)."""
    A3, B3 = A[..., None], B[..., None]
    xb = x + B3
    q = _uniform_codes_(xb * _div(1.0, _nz(A3)), nmax)
    r = torch.addcmul(xb, q, A3, value=-1.0)  # x − (A·q − B)
    if om is None:
        return _vdot(r, r), q
    return _vdot(om, r.mul_(r)), q


def _refit_d_dmin(x, om, sc, m, q, d, dmin):
    """Weighted LS of (d, dmin) in ``x ≈ d·(sc·q) − dmin·m`` over each super-block (sc, m, q fixed)."""
    if om is None:
        Sw = torch.full(sc.shape, float(SUB))
        Sx = x.sum(-1)
    else:
        Sw = om.sum(-1)
        Sx = _vdot(om, x)
    Sq, Sqq, Sxq = _stats(x, om, q)
    A11 = (sc * sc * Sqq).sum(-1)
    A12 = -(sc * m * Sq).sum(-1)
    A22 = (m * m * Sw).sum(-1)
    b1 = (sc * Sxq).sum(-1)
    b2 = -(m * Sx).sum(-1)
    det = A11 * A22 - A12 * A12
    ok = det > 0
    dets = torch.where(ok, det, torch.ones_like(det))
    dn = (b1 * A22 - A12 * b2) / dets
    dmn = (A11 * b2 - A12 * b1) / dets
    ok = ok & (dn > 0) & (dmn >= 0)
    # no min used at all: scale-only LS
    only = (A22 == 0) & (A11 > 0)
    d1 = b1 / _nz(A11)
    d_new = torch.where(ok, dn, torch.where(only & (d1 > 0), d1, d.float()))
    dm_new = torch.where(ok, dmn, dmin.float())
    return _fp16_sat(d_new), _fp16_sat(dm_new)


class _Best:
    """Per-super-block best state (error + fields) under keep-if-better updates."""

    def __init__(self, err, *fields):
        self.err, self.fields = err, list(fields)

    def offer(self, err, *fields):
        u = err < self.err
        self.err = torch.where(u, err, self.err)
        self.fields = [torch.where(u.reshape(u.shape + (1,) * (f.dim() - u.dim())), nf, f)
                       for f, nf in zip(self.fields, fields)]


def _better_k(x: torch.Tensor, om: torch.Tensor | None, nmax: int, ks, refine: int = _REFINE, schedule=(17, 17, 17),
              shifts=_SHIFTS_Q4):
    """Q4_K/Q5_K fields (d, dmin fp16; sc, m float integers) minimizing Σω·(x − x̂)² per super-block."""
    a, mn = _fit_subblocks(x, om, nmax, ks, refine)
    d = _fp16_sat(a.amax(-1) / 63.0)
    dmin = _fp16_sat(mn.amax(-1) / 63.0)
    best = None
    for npairs in schedule:
        pairs = _PAIRS[:npairs]
        df, dmf = d.float()[:, None], dmin.float()[:, None]
        s0 = torch.round(a / _nz(df))
        m0 = torch.round(mn / _nz(dmf))
        sub = None
        # around the rounded continuous optimum, plus the same scale with the codes shifted by whole steps
        # (x ≈ a·q − mn = a·(q + k) − (mn + k·a): equal in the interior, different at the clip edges, and the
        # only way to land on the min lattice when the sub-block leaves levels unused, e.g. on-grid input)
        cands = [(s0 + so, m0 + mo) for so, mo in pairs]
        cands += [(s0, torch.round((mn + k * a) / _nz(dmf))) for k in shifts]
        for s_, m_ in cands:
            s_ = s_.clamp_(0, 63)
            m_ = m_.clamp_(0, 63)
            E, _ = _sub_error_k(x, om, df * s_, dmf * m_, nmax)
            if sub is None:
                sub = _Best(E, s_, m_)
            else:
                sub.offer(E, s_, m_)
        sc, m = sub.fields
        if best is None:
            best = _Best(sub.err.sum(-1), d, dmin, sc, m)
        else:
            best.offer(sub.err.sum(-1), d, dmin, sc, m)
        # d, dmin by weighted LS over the super-block with the sub-scales and codes fixed
        _, q = _sub_error_k(x, om, df * sc, dmf * m, nmax)
        d2, dm2 = _refit_d_dmin(x, om, sc, m, q, d, dmin)
        E, _ = _sub_error_k(x, om, d2.float()[:, None] * sc, dm2.float()[:, None] * m, nmax)
        best.offer(E.sum(-1), d2, dm2, sc, m)
        d, dmin = best.fields[0], best.fields[1]
    d, dmin, sc, m = best.fields
    return d, dmin, sc, m


# ----------------------------------------------------------------------------------------------------------
# default encoder, IQ4_XS


def _signed_absmax(x: torch.Tensor) -> torch.Tensor:
    hi = x.amax(-1)
    lo = x.amin(-1)
    return torch.where(hi >= -lo, hi, lo)


def _fit_signed_scales(x: torch.Tensor, om: torch.Tensor | None, cands, refine: int):
    """Continuous per-sub-block signed scales (x ≈ s·kvalues[q], q nearest) maximizing (Σωqx)²/Σωq², the best
    of each sign (the table is asymmetric: −127..113); returns (best, best of the other sign)."""
    mx = _signed_absmax(x)
    mxs = _nz(mx)
    wx = x if om is None else om * x
    fits = []
    for sign in (1.0, -1.0):
        best = torch.zeros_like(mx)
        s = torch.zeros_like(mx)
        for c in cands:
            if c * sign < 0:
                continue
            qv = _kv_values(x * _div(c, mxs)[..., None])
            sqx = _vdot(wx, qv)
            sqq = _vdot(qv, qv) if om is None else _vdot(om * qv, qv)
            gain = sqx * sqx / _nz(sqq)
            u = (sqq > 0) & (gain > best)
            best = torch.where(u, gain, best)
            s = torch.where(u, sqx / _nz(sqq), s)
        for _ in range(refine):
            qv = _kv_values(x * _div(1.0, _nz(s))[..., None])
            sqx = _vdot(wx, qv)
            sqq = _vdot(qv, qv) if om is None else _vdot(om * qv, qv)
            s = torch.where((sqq > 0) & (s != 0), sqx / _nz(sqq), s)
        fits.append((best, s))
    (b1, s1), (b2, s2) = fits
    u = b1 >= b2
    return torch.where(u, s1, s2), torch.where(u, s2, s1)


def _sub_error_iq4(x, om, S):
    """Per-sub-block Σω·err² with decoded scale S (N, 8), codes nearest; (err, kvalues of the codes)."""
    S3 = S[..., None]
    qv = _kv_values(x * _div(1.0, _nz(S3)))
    r = torch.addcmul(x, qv, S3, value=-1.0)
    if om is None:
        return _vdot(r, r), qv
    return _vdot(om, r.mul_(r)), qv


def _better_iq4(x: torch.Tensor, om: torch.Tensor | None, cands=_IQ4_CANDS, refine: int = 1, iters: int = 2,
                offs=(-1.0, 0.0, 1.0)):
    """IQ4_XS fields (d fp16, l = ls − 32 as float integers) minimizing Σω·(x − x̂)² per super-block."""
    s, s_other = _fit_signed_scales(x, om, cands, refine)
    d = _fp16_sat(-_signed_absmax(s) / 32.0)
    best = None
    for _ in range(iters):
        df = d.float()[:, None]
        l0 = torch.round(s / _nz(df))
        sub = None
        cands_l = [l0 + o for o in offs] + [torch.round(s_other / _nz(df))]
        for l_ in cands_l:
            l_ = l_.clamp_(-32, 31)
            E, _ = _sub_error_iq4(x, om, df * l_)
            if sub is None:
                sub = _Best(E, l_)
            else:
                sub.offer(E, l_)
        (l,) = sub.fields
        if best is None:
            best = _Best(sub.err.sum(-1), d, l)
        else:
            best.offer(sub.err.sum(-1), d, l)
        # d by weighted LS over the super-block, sub-scales and codes fixed
        _, qv = _sub_error_iq4(x, om, df * l)
        z = qv * l[..., None]
        wz = z if om is None else om * z
        num = _vdot(wz, x).sum(-1)
        den = _vdot(wz, z).sum(-1)
        d2 = _fp16_sat(torch.where(den > 0, num / _nz(den), d.float()))
        E, _ = _sub_error_iq4(x, om, d2.float()[:, None] * l)
        best.offer(E.sum(-1), d2, l)
        d = best.fields[0]
    return tuple(best.fields)


# ----------------------------------------------------------------------------------------------------------
# codecs


@dataclass(frozen=True, eq=False)
class _SuperBlockCodec(GGUFCodec):
    """Shared driver: chunking over rows, importance broadcasting, params assembly."""

    def _chunks(self, w: torch.Tensor, importance: torch.Tensor | None):
        rows, cols = w.shape
        step = max(1, _CHUNK_ELEMS // cols)
        imp = None if importance is None else importance.reshape(1, cols // QK_K, NSUB, SUB)
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            x = w[r0:r1].reshape(-1, NSUB, SUB)
            ip = None if imp is None else imp.expand(r1 - r0, -1, -1, -1).reshape(-1, NSUB, SUB)
            yield x, ip

    def _run(self, w: torch.Tensor, importance: torch.Tensor | None, faithful: bool):
        w = w.float().contiguous()
        if w.dim() != 2:
            raise ValueError(f"{self.name.upper()} encodes 2-D weights; got shape {tuple(w.shape)}")
        self.check_shape(tuple(w.shape))
        if importance is not None:
            importance = importance.detach().float().reshape(-1)
            if importance.numel() != w.shape[1]:
                raise ValueError(f"importance has {importance.numel()} entries; the weight has {w.shape[1]} columns")
        if not faithful and (fields := self._native(w, importance)) is not None:
            return self._assemble(tuple(w.shape), fields)  # the whole tensor in kernels/cpu/gguf_kquants.cpp
        enc = self._faithful if faithful else self._better
        with one_thread():
            parts = [enc(x, ip) for x, ip in self._chunks(w, importance)]
        fields = {k: None if parts[0][k] is None else torch.cat([p[k] for p in parts]) for k in parts[0]}
        return self._assemble(tuple(w.shape), fields)

    def fit(self, w: torch.Tensor, importance: torch.Tensor | None = None, *, faithful: bool = False):
        return self._run(w, importance, faithful)[1]

    def encode(self, w: torch.Tensor, importance: torch.Tensor | None = None, *, faithful: bool = False) -> QTensor:
        shape = tuple(w.shape)
        codes, params = self._run(w, importance, faithful)
        if codes is None:  # default encoder: the nearest levels under the fitted params (the GPTQ seam)
            codes = self.quantize(w.float(), params)
        return QTensor(self, shape, codes, params)

    def _native(self, w: torch.Tensor, importance: torch.Tensor | None):
        return None

    # subclasses: _faithful / _better(x (N,8,32), imp | None) -> dict of per-super-block fields
    #             (codes None when they are the nearest levels), _assemble(shape, fields) -> (codes, params);
    #             _native(w, imp) -> the default encoder's fields (codes included) of the whole tensor from the
    #             native kernel, or None (no kernel, or a type it does not cover)


@dataclass(frozen=True, eq=False)
class _KQuantCodec(_SuperBlockCodec):
    """Q4_K / Q5_K: ``x = d·sc·q − dmin·m``."""

    @property
    def nmax(self) -> int:
        return len(self.levels) - 1

    def quantize_columns(self, x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        # same t as the base class, then the branch-free equivalent of its bucketize (ties to the lower level)
        safe = torch.where(scale == 0, torch.ones_like(scale), scale)
        t = (x - offset) / safe
        return _uniform_codes(t, self.nmax).to(torch.uint8)

    # ---- faithful: llama.cpp quantize_row_qX_K_ref / quantize_row_qX_K_impl
    def _faithful(self, x: torch.Tensor, imp: torch.Tensor | None):
        n = x.shape[0]
        nmax = self.nmax
        if imp is None:
            av_x = torch.sqrt((x * x).sum(-1, keepdim=True) / SUB)
            wt = av_x + x.abs()
            rmin, rdelta, nstep = (-1.0, 0.1, 20) if nmax == 15 else (-0.5, 0.1, 15)
            scales, mins, L = _make_qkx(x.reshape(-1, SUB), wt.reshape(-1, SUB), nmax, rmin, rdelta, nstep)
            scales, mins = scales.reshape(n, NSUB), mins.reshape(n, NSUB)
            max_scale, max_min = scales.amax(-1), mins.amax(-1)
            max_scale = torch.where(max_scale > 0, max_scale, 0.0)  # ggml: starts at +0, strict > (never -0)
            max_min = torch.where(max_min > 0, max_min, 0.0)
            inv_scale = torch.where(max_scale > 0, _div(63.0, _nz(max_scale)), 0.0)
            inv_min = torch.where(max_min > 0, _div(63.0, _nz(max_min)), 0.0)
            # uint8_t ls = nearest_int(...): wraps mod 256 before MIN(63, ·)
            sc = (_rint(inv_scale[:, None] * scales).to(torch.int32) & 255).clamp(max=63)
            m = (_rint(inv_min[:, None] * mins).to(torch.int32) & 255).clamp(max=63)
            d = _fp16(max_scale / _f32(63.0))
            dmin = _fp16(max_min / _f32(63.0))
        else:
            wt = _imatrix_weights(x, imp)
            sw = wt.sum(-1)
            scales, mins, L = _make_qkx(x.reshape(-1, SUB), wt.reshape(-1, SUB), nmax, -0.9, 0.05, 36)
            scales, mins = scales.reshape(n, NSUB), mins.reshape(n, NSUB)
            d_block, sc = _make_qp(scales, sw, 63)
            m_block, m = _make_qp(mins, sw, 63)
            sc, m = sc.to(torch.int32), m.to(torch.int32)
            d = _fp16(d_block)
            dmin = _fp16(m_block)
        L = L.reshape(n, NSUB, SUB)
        dd = d.float()[:, None] * sc.float()
        dm = dmin.float()[:, None] * m.float()
        nz = (dd != 0).float()[..., None]
        q = _rint((x + dm[..., None]) / _nz(dd)[..., None]).clamp_(0, nmax)
        q = L.add_((q - L).mul_(nz))  # ggml leaves a sub-block with d·sc == 0 with its make_qkx codes
        return {"d": d, "dmin": dmin, "sc": sc.to(torch.uint8), "m": m.to(torch.uint8),
                "codes": q.to(torch.uint8).reshape(n, QK_K)}

    def _native(self, w: torch.Tensor, importance: torch.Tensor | None):
        if self.nmax == 15:
            return kquant_native.encode_k4(w, importance, 15, _KS_Q4, _REFINE, _SHIFTS_Q4, _SCHEDULE_Q4, _PAIRS)
        return kquant_native.encode_k4(w, importance, 31, _KS_Q5, _REFINE, _SHIFTS_Q5, _SCHEDULE_Q5, _PAIRS)

    def _better(self, x: torch.Tensor, imp: torch.Tensor | None):
        om = _objective_weights(x, imp)
        if self.nmax == 15:
            d, dmin, sc, m = _better_k(x, om, 15, _KS_Q4, schedule=_SCHEDULE_Q4, shifts=_SHIFTS_Q4)
        else:
            d, dmin, sc, m = _better_k(x, om, 31, _KS_Q5, schedule=_SCHEDULE_Q5, shifts=_SHIFTS_Q5)
        return {"d": d, "dmin": dmin, "sc": sc.to(torch.uint8), "m": m.to(torch.uint8), "codes": None}

    # ---- params <-> fields
    def _assemble(self, shape, f):
        rows, cols = shape
        nb = cols // QK_K
        d = f["d"].reshape(rows, nb)
        dmin = f["dmin"].reshape(rows, nb)
        sc = f["sc"].reshape(rows, nb * NSUB)
        m = f["m"].reshape(rows, nb * NSUB)
        scale = d.float().repeat_interleave(NSUB, dim=1) * sc.float()
        offset = -(dmin.float().repeat_interleave(NSUB, dim=1) * m.float())
        params = {"scale": scale, "offset": offset, "d": d, "dmin": dmin, "sc": sc, "m": m}
        codes = None if f["codes"] is None else f["codes"].reshape(rows, cols)
        return codes, params

    def pack(self, q: QTensor) -> torch.Tensor:
        rows, cols = q.shape
        nb = cols // QK_K
        p = q.params
        codes = q.codes.reshape(rows * nb, QK_K).to(torch.int32)
        parts = [_fp16_bytes(p["d"].reshape(-1)), _fp16_bytes(p["dmin"].reshape(-1)),
                 _pack_scale_min(p["sc"].reshape(-1, NSUB), p["m"].reshape(-1, NSUB))]
        if self.nmax == 31:
            hb = ((codes >> 4) & 1).reshape(-1, NSUB, SUB)  # bit 4 of element 32s+l -> qh[l] bit s
            qh = (hb << torch.arange(NSUB, dtype=torch.int32).reshape(1, NSUB, 1)).sum(1)
            parts.append(qh.to(torch.uint8))
        parts.append(_nibbles_k(codes))
        return torch.cat(parts, dim=1).reshape(rows, nb * self.type_size)

    def unpack(self, data: torch.Tensor, shape: tuple[int, int]) -> QTensor:
        shape = tuple(shape)
        self.check_shape(shape)
        b = torch.as_tensor(data).reshape(-1, self.type_size)
        d = _bytes_fp16(b[:, 0:2])
        dmin = _bytes_fp16(b[:, 2:4])
        sc, m = _unpack_scale_min(b[:, 4:16])
        if self.nmax == 31:
            qh = b[:, 16:48].to(torch.int32).reshape(-1, 1, SUB)
            hb = (qh >> torch.arange(NSUB, dtype=torch.int32).reshape(1, NSUB, 1)) & 1
            codes = _unnibbles_k(b[:, 48:176]) | (hb.reshape(-1, QK_K) << 4)
        else:
            codes = _unnibbles_k(b[:, 16:144])
        f = {"d": d, "dmin": dmin, "sc": sc, "m": m, "codes": codes.to(torch.uint8)}
        codes, params = self._assemble(shape, f)
        return QTensor(self, shape, codes, params)


@dataclass(frozen=True, eq=False)
class _IQ4XSCodec(_SuperBlockCodec):
    """IQ4_XS: ``x = d·(ls − 32)·kvalues[q]``."""

    def quantize_columns(self, x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        # same t as the base class, then a branch-free exact equivalent of its bucketize (ties to the lower)
        safe = torch.where(scale == 0, torch.ones_like(scale), scale)
        t = torch.nan_to_num((x - offset) / safe, nan=float("inf"))  # NaN -> top level, as bucketize
        return _kv_codes(t).to(torch.uint8)

    # ---- faithful: llama.cpp quantize_row_iq4_nl_impl(QK_K, 32, ..., ntry = 7)
    def _faithful(self, x: torch.Tensor, imp: torch.Tensor | None):
        n = x.shape[0]
        xb = x.reshape(-1, SUB)
        wt = (x * x if imp is None else _imatrix_weights(x, imp)).reshape(-1, SUB)
        amax, arg = xb.abs().max(-1)  # first index of the largest |x| (ggml: strict >)
        mx = xb.gather(1, arg[:, None])[:, 0]
        zero = amax < 1e-15
        mxs = torch.where(zero, torch.ones_like(mx), mx)

        def fit_at(idv):
            qv = _kv_values_ggml(idv[:, None] * xb)
            wq = wt * qv
            return _vdot(wq, xb), _vdot(wq, qv)

        d0 = (-mxs) / _f32(-127.0)
        sumqx, sumq2 = fit_at(_div(1.0, d0))
        dsc = torch.where(sumq2 > 0, sumqx / sumq2, torch.zeros_like(sumqx))
        best = dsc * sumqx
        for itry in range(-7, 8):
            sumqx, sumq2 = fit_at(_div(float(itry - 127), mxs))
            upd = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
            dsc = torch.where(upd, sumqx / sumq2, dsc)
            best = torch.where(upd, dsc * sumqx, best)
        scales = torch.where(zero, torch.zeros_like(dsc), dsc).reshape(n, NSUB)
        _, iarg = scales.abs().max(-1)
        max_scale = scales.gather(1, iarg[:, None])[:, 0]
        d = (-max_scale) / _f32(32.0)
        id_ = torch.where(d != 0, _div(1.0, _nz(d)), 0.0)
        l = _rint(id_[:, None] * scales).clamp_(-32, 31)
        dl = d[:, None] * l
        idl = torch.where(dl != 0, _div(1.0, _nz(dl)), 0.0)
        codes = _kv_best_index_ggml(idl[..., None] * x)  # with the un-rounded fp32 d, as ggml
        return {"d": _fp16(d), "ls": (l + 32).to(torch.uint8), "codes": codes.to(torch.uint8).reshape(n, QK_K)}

    def _better(self, x: torch.Tensor, imp: torch.Tensor | None):
        om = _objective_weights(x, imp)
        d, l = _better_iq4(x, om)
        return {"d": d, "ls": (l + 32).to(torch.uint8), "codes": None}

    def _assemble(self, shape, f):
        rows, cols = shape
        nb = cols // QK_K
        d = f["d"].reshape(rows, nb)
        ls = f["ls"].reshape(rows, nb * NSUB)
        scale = d.float().repeat_interleave(NSUB, dim=1) * (ls.to(torch.int32) - 32).float()
        params = {"scale": scale, "offset": torch.zeros_like(scale), "d": d, "ls": ls}
        codes = None if f["codes"] is None else f["codes"].reshape(rows, cols)
        return codes, params

    def pack(self, q: QTensor) -> torch.Tensor:
        rows, cols = q.shape
        nb = cols // QK_K
        p = q.params
        ls = p["ls"].reshape(-1, NSUB).to(torch.int32)
        sh = ((ls >> 4) << (2 * torch.arange(NSUB, dtype=torch.int32))).sum(1)  # u16, little-endian
        scales_h = torch.stack([sh & 255, sh >> 8], dim=1)
        lo = ls & 15
        scales_l = lo[:, 0::2] | (lo[:, 1::2] << 4)
        c = q.codes.reshape(-1, NSUB, 2, 16).to(torch.int32)
        qs = (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(-1, 128)
        out = torch.cat([_fp16_bytes(p["d"].reshape(-1)), scales_h.to(torch.uint8), scales_l.to(torch.uint8),
                         qs.to(torch.uint8)], dim=1)
        return out.reshape(rows, nb * self.type_size)

    def unpack(self, data: torch.Tensor, shape: tuple[int, int]) -> QTensor:
        shape = tuple(shape)
        self.check_shape(shape)
        b = torch.as_tensor(data).reshape(-1, self.type_size)
        d = _bytes_fp16(b[:, 0:2])
        sh = b[:, 2].to(torch.int32) | (b[:, 3].to(torch.int32) << 8)
        sl = b[:, 4:8].to(torch.int32)
        lo = torch.stack([sl & 15, sl >> 4], dim=2).reshape(-1, NSUB)
        hi = (sh[:, None] >> (2 * torch.arange(NSUB, dtype=torch.int32))) & 3
        ls = lo | (hi << 4)
        qs = b[:, 8:136].to(torch.int32).reshape(-1, NSUB, 1, 16)
        codes = torch.cat([qs & 15, qs >> 4], dim=2).reshape(-1, QK_K)
        f = {"d": d, "ls": ls.to(torch.uint8), "codes": codes.to(torch.uint8)}
        codes, params = self._assemble(shape, f)
        return QTensor(self, shape, codes, params)


def _kv_values_ggml(v: torch.Tensor) -> torch.Tensor:
    """kvalues[best_index_int8(v)] (faithful search helper)."""
    _, lo, hi = _kv_pair(v)
    up = 1.0 - ((v - lo) < (hi - v)).float()
    return torch.addcmul(lo, up, hi - lo)


def _mk(cls, name: str, gt: gguf.GGMLQuantizationType, levels: tuple):
    bs, ts = gguf.GGML_QUANT_SIZES[gt]
    return register(cls(name=name, ggml_type=int(gt), block_size=bs, type_size=ts, sub_block=SUB, levels=levels))


Q4_K = _mk(_KQuantCodec, "q4_k", _GT.Q4_K, tuple(range(16)))
Q5_K = _mk(_KQuantCodec, "q5_k", _GT.Q5_K, tuple(range(32)))
IQ4_XS = _mk(_IQ4XSCodec, "iq4_xs", _GT.IQ4_XS, KVALUES)

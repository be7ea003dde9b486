"""GGUF legacy 32-element block types: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and IQ4_NL (formats.md §2.1, §2.4).

Grid (``value = scale * levels[code] + offset``, one scale/offset per 32-element block):

    Q8_0    levels -128..127        scale = fp16 d                 offset = 0      codes = int8 q + 128
    Q4_0    levels -8..7            scale = fp16 d                 offset = 0      codes = stored nibble
    Q5_0    levels -16..15          scale = fp16 d                 offset = 0      codes = stored 5 bits
    Q4_1    levels 0..15            scale = fp16 d                 offset = fp16 m
    Q5_1    levels 0..31            scale = fp16 d                 offset = fp16 m
    IQ4_NL  levels kvalues_iq4nl    scale = fp16 d                 offset = 0      codes = stored nibble

params: ``scale``/``offset`` float32 (rows, cols/32) (the decoded values), ``d`` (and ``m`` for the ``_1``
types) float16 (rows, cols/32): the raw fields `pack` writes.

Encoders (the torch ones vectorized over blocks, in chunks of `CHUNK_BLOCKS` blocks, run single-threaded: see
`gguf_base.one_thread`; the default one also native, below):

* ``faithful=True`` reproduces llama.cpp (`ggml-quants.c`):
  - no importance: the ``quantize_row_*_ref`` reference (bit-exact with ``gguf.quants.quantize`` for
    Q8_0/Q4_0/Q4_1/Q5_0/Q5_1): codes from the *unrounded* d (``trunc(x/d + 8.5)`` etc., Q8_0 ``roundf``);
  - with importance: ``quantize_row_q4_0/q5_0_impl`` (``make_qx_quants(32, nmax, rmse_type=1, w)``) and
    ``quantize_row_q4_1/q5_1_impl`` (``make_qkx3_quants(32, nmax, w, -0.9, 0.05, 36)``), weights
    ``w = imp[col] * sqrt(sigma2 + x^2)`` with ``sigma2 = sum(x^2)/n_per_row`` over the whole row; Q8_0 ignores
    the importance (``quantize_q8_0``);
  - IQ4_NL: ``quantize_iq4_nl`` (what llama-quantize calls, with or without an imatrix): ``ntry = 7`` trial
    scales, weights ``imp * sqrt(sigma2 + x^2)`` with ``sigma2 = 2 sum(x^2)/32`` over the block, or ``x^2``;
    the codes are recomputed from the unrounded best scale with ties going to the upper table entry.
  Every float op follows C's order in float32: sums accumulate left to right (`_seq`), ``sqrtf`` is correctly
  rounded (`_sqrtf`), constants are float32. Measured against llama-quantize (the tiny test model, random
  imatrix): every block byte-identical, for all six types, with and without the imatrix.
* ``faithful=False`` (default) minimises the error ``sum w (x - x_hat)^2`` directly, with ``w`` the
  llama.cpp element weights above when an importance is given (`element_weights`, Q8_0 uses the Q4_0 form)
  and ``w = 1`` (plain squared error) otherwise: a grid of trial scales (for the ``_1`` types rounded from
  the min and from the max end; Q8_0 and IQ4_NL also map the max onto the positive table end), each scored by
  its least-squares d (and m); two rounds of nearest-codes / least-squares refinement; then the fp16 rounding
  (Q8_0: the fp16 neighbours of d too; the ``_1`` types: m refitted for the rounded d) is scored exactly
  against llama.cpp's own d (and m), so no block gets worse than faithful's choice. Codes are the nearest
  levels under the stored d/m. Measured default/faithful error: about 0.8-0.9 (Q4_0/Q5_0/IQ4_NL), 0.8
  (Q4_1/Q5_1), 0.6-0.8 (Q8_0) without an importance; 0.91-0.99 with one (Q8_0 0.4-0.6).

The default encoder runs natively when it can: `kernels/cpu/gguf_legacy.cpp` (loaded by `runtime/native.py`) is
the same search (the grids below are passed to it) over a whole tensor in one call, blocks as SIMD lanes (AVX2
or the baseline build), split over ``torch.get_num_threads()`` threads: about 3-15x faster than the torch code on
one thread (see bench/bench_encoders.py). Not bit-identical with the torch code: its sums round differently,
and trial scores equal to float32 rounding are ties it refines all of (the torch code keeps the first of the
noisy maximum, which can refine to a much worse d: Q8_0 blocks with one dominant weight), so no block comes out
measurably worse and some better (tests/formats/test_gguf_legacy_native.py). Its results do not depend on the
thread count or the ISA. Without a compiler (or with ``QTOOL_NATIVE=0``) the torch code below runs, the twin:
`native_reason()` says why. ``faithful=True`` always runs the torch code.
"""

from __future__ import annotations

import ctypes
import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from qtool.formats.base import QTensor
from qtool.formats.gguf_base import GGUFCodec, register, one_thread

QK = 32
KVALUES_IQ4NL = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
GROUP_MAX_EPS = 1e-15
LLOYD = 2  # nearest-codes / least-squares refinement rounds of the default encoders
CHUNK_BLOCKS = 1000  # blocks per chunk: (32, 1000) float32 temporaries (125 KiB) stay in cache and under glibc's
# mmap threshold (a fresh mmap per op costs page faults); below torch's 32768-element intra-op grain as well


def _f(v: float) -> torch.Tensor:
    """A float32 scalar tensor: every constant enters the float32 arithmetic as C's float would (cached: callers
    never write into it; keyed on the sign too, since -0.0 == 0.0 as a dict key)."""
    return _const(float(v), math.copysign(1.0, v) < 0)


@functools.lru_cache(maxsize=1024)
def _const(v: float, negative: bool) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32)


def _first_absmax(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(amax, max): the largest |x| per block and the signed element that first reaches it (C's ``ax > amax``).
    amax/amin decide the sign; only blocks holding both +a and -a need the first occurrence (argmax is slow)."""
    hi, lo = x.amax(dim=-1), x.amin(dim=-1)
    mx = torch.where(hi >= -lo, hi, lo)
    tie = (hi == -lo) & (hi > 0)
    if bool(tie.any()):
        xt = x[tie]
        mx[tie] = xt.gather(-1, xt.abs().argmax(dim=-1, keepdim=True)).squeeze(-1)
    return mx.abs(), mx


def _inv(d: torch.Tensor) -> torch.Tensor:
    """``d ? 1.0f/d : 0.0f``."""
    return torch.where(d != 0, _f(1.0) / torch.where(d != 0, d, _f(1.0)), _f(0.0))


def _roundf(x: torch.Tensor) -> torch.Tensor:
    """C ``roundf`` (half away from zero), exact for every float32 (no ``+0.5`` rounding error)."""
    a = x.abs()
    fl = torch.floor(a)
    return torch.copysign(fl + (a - fl >= 0.5).float(), x)


def _f16_steps(d: torch.Tensor, steps: tuple[int, ...]) -> torch.Tensor:
    """fp16(d) moved by `steps` ulps in magnitude (sign kept, finite): float16 (..., len(steps))."""
    bits = d.to(torch.float16).view(torch.int16).to(torch.int32)
    sign, mag = bits & 0x8000, bits & 0x7FFF
    mag = torch.minimum(mag, torch.full_like(mag, 0x7BFF))
    st = torch.tensor(steps, dtype=torch.int32)
    mag = (mag.unsqueeze(-1) + st).clamp(0, 0x7BFF)
    out = sign.unsqueeze(-1) | mag
    out = torch.where(out >= 0x8000, out - 0x10000, out)
    return out.to(torch.int16).view(torch.float16)


def _wsum(a: torch.Tensor) -> torch.Tensor:
    return a.sum(dim=-1)


def _sqrtf(a: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 sqrt (C ``sqrtf``): torch's vectorised float32 sqrt is off by an ulp at times;
    the float64 root rounded to float32 is exact."""
    return torch.sqrt(a.double()).float()


def _seq(a: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Sum over `dim`, left to right in float32 (llama.cpp's ``s += ...`` order). numpy reduces an axis that is
    not the innermost element by element in order (its pairwise summation is only for the inner loop); when
    everything after `dim` has length 1 the reduced axis would be the inner loop, so the sequential `cumsum`."""
    n = a.contiguous().numpy()
    if int(np.prod(n.shape[dim + 1:])) == 1:
        return torch.from_numpy(np.ascontiguousarray(np.cumsum(n, axis=dim).take(-1, axis=dim)))
    return torch.from_numpy(np.add.reduce(n, axis=dim))


def _ssum(a: torch.Tensor) -> torch.Tensor:
    """Sum over the last dim accumulated left to right in float32, as llama.cpp's ``s += ...`` loops do (the
    faithful paths: a different summation order flips near-ties between trial scales)."""
    return _seq(a.movedim(-1, 0))


# ------------------------------------------------------------------------------------------------ weights
def row_sigma2(w: torch.Tensor) -> torch.Tensor:
    """``sum(x^2)/n_per_row`` per row, accumulated left to right in float32 like llama.cpp."""
    with one_thread():
        return _ssum(w.float() * w.float()) / _f(float(w.shape[1]))


def element_weights(codec: "GGUFCodec", w: torch.Tensor, importance: torch.Tensor | None) -> torch.Tensor:
    """llama.cpp's per-element weights for `codec` given an importance vector (ones when None):
    ``imp[col] * sqrt(sigma2 + x^2)``, sigma2 over the row (legacy types, Q8_0 too) or ``2 sum(x^2)/32`` over
    the block (IQ4_NL). This is the error metric the default encoders minimise."""
    w = w.float()
    if importance is None:
        return torch.ones_like(w)
    imp = importance.float().reshape(1, -1)
    if codec.name == "iq4_nl":
        xb = w.reshape(w.shape[0], -1, QK)
        s2 = _ssum(xb * xb).unsqueeze(-1) * _f(2.0 / QK)
        return (imp.reshape(1, -1, QK) * _sqrtf(s2 + xb * xb)).reshape(w.shape)
    return imp * _sqrtf(row_sigma2(w).unsqueeze(1) + w * w)


# ------------------------------------------------------------------------------------------------ faithful
def _ref_sym(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_row_q4_0_ref / q5_0_ref: (unrounded d, codes)."""
    _, mx = _first_absmax(x)
    d = mx / _f(-float(nmax))
    idv = _inv(d)
    q = torch.trunc(x * idv.unsqueeze(-1) + _f(nmax + 0.5)).clamp(0, 2 * nmax - 1)
    return d, q.to(torch.uint8)


def _ref_asym(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """quantize_row_q4_1_ref / q5_1_ref: (unrounded d, min, codes)."""
    mn, mx = x.amin(dim=-1), x.amax(dim=-1)
    d = (mx - mn) / _f(float(nmax))
    idv = _inv(d)
    q = torch.trunc((x - mn.unsqueeze(-1)) * idv.unsqueeze(-1) + _f(0.5)).clamp(0, nmax)
    return d, mn, q.to(torch.uint8)


def _ref_q8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_row_q8_0_ref: (unrounded d, codes = q + 128)."""
    amax = x.abs().amax(dim=-1)
    d = amax / _f(127.0)
    q = _roundf(x * _inv(d).unsqueeze(-1))
    return d, (q + 128).to(torch.uint8)


# The faithful imatrix paths work element-major: x32 = x.T (32, B), so llama.cpp's left-to-right float32 sums
# (_seq) add contiguous rows, and all trial scales are summed in one sequence.
def _make_qx_quants(x: torch.Tensor, nmax: int, wt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """llama.cpp ``make_qx_quants(n, nmax, x, L, rmse_type=1, qw=wt)`` for every block: (scale, L in 0..2nmax-1)."""
    amax, mx = _first_absmax(x)
    zero = amax < GROUP_MAX_EPS
    safe = torch.where(zero, _f(1.0), mx)
    x32, w32 = x.t().contiguous(), wt.t().contiguous()
    fn = _f(float(nmax))
    tries = [0] + [i for i in range(-9, 10) if i != 0]  # the first rounding, then is = -9..9
    num = torch.stack([-(fn + _f(0.1) * _f(float(i))) if i else -fn for i in tries])
    iscale = num.unsqueeze(-1) / safe  # (T, B)
    lv = torch.round(iscale * x32.unsqueeze(1)).clamp_(-nmax, nmax - 1)  # (32, T, B)
    prod = torch.empty((2, *lv.shape))
    torch.mul((w32 * x32).unsqueeze(1), lv, out=prod[0])  # (w x) l
    torch.mul(w32.unsqueeze(1), lv, out=prod[1])
    prod[1].mul_(lv)  # (w l) l
    slx, sl2 = _seq(prod, 1)  # (T, B) each
    sc = slx / torch.where(sl2 != 0, sl2, _f(1.0))
    scale = torch.where(sl2[0] != 0, sc[0], _f(0.0))
    best = scale * slx[0]
    pick = torch.zeros_like(amax, dtype=torch.long)
    for t in range(1, len(tries)):
        better = (sl2[t] > 0) & (slx[t] * slx[t] > best * sl2[t])
        scale = torch.where(better, sc[t], scale)
        best = torch.where(better, sc[t] * slx[t], best)
        pick = torch.where(better, t, pick)
    L = lv.gather(1, pick.view(1, 1, -1).expand(lv.shape[0], 1, -1)).squeeze(1).t() + nmax  # (B, 32)
    scale = torch.where(zero, _f(0.0), scale)
    return scale, (L * (~zero).unsqueeze(-1)).to(torch.uint8)


def _make_qkx3_quants(x: torch.Tensor, nmax: int, wt: torch.Tensor, rmin: float = -0.9, rdelta: float = 0.05,
                      nstep: int = 36) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """llama.cpp ``make_qkx3_quants(n, nmax, x, w, ..., rmin, rdelta, nstep, use_mad=false)`` per block:
    (scale, min (= -the_min, <= 0), L in 0..nmax). Sequential over the steps (the min moves between steps)."""
    x32, w32 = x.t().contiguous(), wt.t().contiguous()
    mn = x.amin(dim=-1).clamp(max=0.0)
    mx = x.amax(dim=-1)
    buf = torch.empty((3, *x32.shape))
    buf[0] = w32
    torch.mul(w32, x32, out=buf[1])
    sum_w, sum_x = _seq(buf[:2], 1)
    degenerate = mx <= mn
    rng = torch.where(degenerate, _f(1.0), mx - mn)
    fmax, zero, one = _f(float(nmax)), _f(0.0), _f(1.0)
    iscale = fmax / rng
    scale = one / iscale
    L = torch.round(iscale * (x32 - mn)).clamp_(0, nmax)
    diff = scale * L + mn - x32
    best = _seq(w32 * (diff * diff))
    steps = [(_f(rmin) + _f(rdelta) * _f(float(i))) + fmax for i in range(nstep + 1)]  # C: rmin + rdelta*is + nmax
    for c in steps:
        iscale = c / rng
        # v > 0 ? rint(min(v, nmax)) : 0 (v = inf -> nmax, nan -> 0 when the fitted min reached max)
        la = (x32 - mn).mul_(iscale).clamp_(0.0, float(nmax)).round_().nan_to_num_(nan=0.0)
        wl = torch.mul(w32, la, out=buf[0])
        torch.mul(wl, la, out=buf[1])
        torch.mul(wl, x32, out=buf[2])
        sum_l, sum_l2, sum_xl = _seq(buf, 1)
        D = sum_w * sum_l2 - sum_l * sum_l
        ok = D > 0
        Ds = torch.where(ok, D, one)
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / Ds
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / Ds
        pos = this_min > 0
        this_min = torch.where(pos, zero, this_min)
        this_scale = torch.where(pos, sum_xl / torch.where(sum_l2 != 0, sum_l2, one), this_scale)
        diff = (this_scale * la).add_(this_min).sub_(x32)
        mad = _seq(diff.mul_(diff).mul_(w32))  # w * (diff * diff)
        better = ok & (mad < best) & ~degenerate
        L += better * (la - L)  # small integers: exact
        best = torch.where(better, mad, best)
        scale = torch.where(better, this_scale, scale)
        mn = torch.where(better, this_min, mn)
        rng = torch.where(degenerate, rng, mx - mn)
    scale = torch.where(degenerate, zero, scale)
    return scale, mn, (L * ~degenerate).t().to(torch.uint8)


_KV_SUMS = torch.tensor(KVALUES_IQ4NL[1:]) + torch.tensor(KVALUES_IQ4NL[:-1])  # integer 2 * midpoints
_KV_LUT = torch.bucketize(torch.arange(-256, 229), _KV_SUMS, right=True)  # floor(2t) + 256 -> index
_KV_VLUT = torch.tensor(KVALUES_IQ4NL, dtype=torch.float32)[_KV_LUT]  # floor(2t) + 256 -> value


def _lut(table: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
    return table.index_select(0, i.reshape(-1)).reshape(i.shape)  # (faster than table[i])


def _kv_slot(t: torch.Tensor) -> torch.Tensor:
    return torch.floor(t + t).clamp_(-256, 228).add_(256).to(torch.int32)


def _best_index(t: torch.Tensor) -> torch.Tensor:
    """ggml ``best_index_int8`` on kvalues_iq4nl: the entry nearest t, a tie going to the upper entry
    (``2t >= v[i-1] + v[i]``; the sums are integers, so ``floor(2t)`` decides: a table lookup)."""
    return _lut(_KV_LUT, _kv_slot(t))


def _best_value(t: torch.Tensor) -> torch.Tensor:
    """kvalues_iq4nl[_best_index(t)] as float32."""
    return _lut(_KV_VLUT, _kv_slot(t))


def _iq4nl_faithful(x: torch.Tensor, wt: torch.Tensor, ntry: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_row_iq4_nl_impl(32, 32, 16, ..., ntry=7) per block: (unrounded d, codes)."""
    v0 = _f(float(KVALUES_IQ4NL[0]))
    amax, mx = _first_absmax(x)
    zero = amax < GROUP_MAX_EPS
    safe = torch.where(zero, _f(1.0), mx)
    x32, w32 = x.t().contiguous(), wt.t().contiguous()
    # trial 0: id = 1/d with d = -max/values[0]; then id = (itry + values[0]) / max for itry = -ntry..ntry
    idv = torch.stack([_f(1.0) / ((-safe) / v0)] + [_f(float(i) + v0.item()) / safe for i in range(-ntry, ntry + 1)])
    # (2 id) x == 2 (id x) exactly: the doubled product decides the table slot directly
    q = _lut(_KV_VLUT, torch.mul(idv + idv, x32.unsqueeze(1)).floor_().clamp_(-256, 228).add_(256).to(torch.int32))
    wq = w32.unsqueeze(1) * q
    prod = torch.empty((2, *q.shape))
    torch.mul(wq, x32.unsqueeze(1), out=prod[0])  # (w q) x
    torch.mul(wq, q, out=prod[1])  # (w q) q
    sqx, sq2 = _seq(prod, 1)  # (T, B) each
    dn = sqx / torch.where(sq2 > 0, sq2, _f(1.0))
    d = torch.where(sq2[0] > 0, dn[0], _f(0.0))
    best = d * sqx[0]
    for t in range(1, idv.shape[0]):
        better = (sq2[t] > 0) & (sqx[t] * sqx[t] > best * sq2[t])
        d = torch.where(better, dn[t], d)
        best = torch.where(better, dn[t] * sqx[t], best)
    d = torch.where(zero, _f(0.0), d)
    codes = _best_index(x * _inv(d).unsqueeze(-1))
    return d, codes.to(torch.uint8)


# ------------------------------------------------------------------------------------------------ default
def _nearest_value(t: torch.Tensor, lv: torch.Tensor, uniform: bool) -> torch.Tensor:
    """The level nearest t: integer levels lo..hi, or kvalues_iq4nl (not uniform)."""
    if uniform:
        return torch.round(t).clamp_(lv[0].item(), lv[-1].item())
    return _best_value(t)


def _ls_scale(wx: torch.Tensor, wt: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares d for ``x ~ d q`` (weights wt, wx = wt*x): (d, score = error reduction), d = 0 if q = 0."""
    sqx = _wsum(wx * q)
    sq2 = _wsum(wt * q * q)
    ok = sq2 > 0
    d = torch.where(ok, sqx / torch.where(ok, sq2, _f(1.0)), _f(0.0))
    return d, torch.where(ok, d * sqx, _f(-1.0))


def _targets(lv: torch.Tensor, lo_fracs: tuple[float, ...], hi_fracs: tuple[float, ...]) -> list[float]:
    """Where `_sym_default`'s trial scales put the block's max element: ``frac * lv[0]``, then ``frac * lv[-1]``."""
    return [lv[0].item() * f for f in lo_fracs] + [lv[-1].item() * f for f in hi_fracs]


def _sym_default(x: torch.Tensor, wt: torch.Tensor, lv: torch.Tensor, d_ref: torch.Tensor,
                 lo_fracs: tuple[float, ...], hi_fracs: tuple[float, ...], steps: tuple[int, ...],
                 uniform: bool, lloyd: int = LLOYD) -> torch.Tensor:
    """Best fp16 d for ``x ~ d * lv[code]`` (codes nearest) under weights wt: the stored d (float16).

    Candidate scales put the block's max element at ``frac * lv[0]`` / ``frac * lv[-1]``; each candidate's codes
    get their least-squares d, the best (largest error reduction) is refined by `lloyd` nearest-codes / LS-d
    rounds; then the fp16 values `steps` ulps around it and llama.cpp's d are scored exactly."""
    amax, mx = _first_absmax(x)
    safe = torch.where(amax > 0, mx, _f(1.0))
    wx = wt * x
    bd = torch.zeros_like(amax)
    best = torch.full_like(amax, -2.0)
    for tgt in _targets(lv, lo_fracs, hi_fracs):
        q = _nearest_value((_f(tgt) / safe).unsqueeze(-1) * x, lv, uniform)
        d, score = _ls_scale(wx, wt, q)
        upd = score > best
        best = torch.where(upd, score, best)
        bd = torch.where(upd, d, bd)
    for _ in range(lloyd):
        q = _nearest_value(x * _inv(bd).unsqueeze(-1), lv, uniform)
        d, score = _ls_scale(wx, wt, q)
        bd = torch.where(score > 0, d, bd)
    cands = list(_f16_steps(bd, steps).float().unbind(-1)) + [d_ref.to(torch.float16).float()]
    out = err = None
    for dk in cands:
        q = _nearest_value(x * _inv(dk).unsqueeze(-1), lv, uniform)
        r = x - dk.unsqueeze(-1) * q
        e = torch.nan_to_num(_wsum(wt * (r * r)), nan=float("inf"))
        if out is None:
            out, err = dk, e
        else:
            upd = e < err
            out, err = torch.where(upd, dk, out), torch.where(upd, e, err)
    return out.to(torch.float16)


def _asym_fit(wt, sw, xm, wxc, L):
    """Weighted LS (d, m) for ``x ~ d L + m`` with fixed codes; score = the error reduction (-1 if L constant)."""
    wl = wt * L
    sl = _wsum(wl)
    lbar = sl / sw
    sxl = _wsum(wxc * L)
    sll = _wsum(wl * L) - sl * lbar
    ok = sll > 0
    d = torch.where(ok, sxl / torch.where(ok, sll, _f(1.0)), _f(0.0))
    return d, xm - d * lbar, torch.where(ok, sxl * d, _f(-1.0))


def _asym_default(x: torch.Tensor, wt: torch.Tensor, nmax: int, d_ref: torch.Tensor, m_ref: torch.Tensor,
                  offsets: tuple[float, ...], lloyd: int = LLOYD) -> tuple[torch.Tensor, torch.Tensor]:
    """Best fp16 (d, m) for ``x ~ d * code + m``, code in 0..nmax nearest, under weights wt.

    Candidates: ``iscale = (nmax + offset) / (max - min)`` rounded from the min and from the max end, each with
    its 2x2 least-squares (d, m) (m of any sign: the format allows it); the best is refined by `lloyd`
    nearest-codes / LS rounds, then fp16(d) with its refitted fp16(m), and llama.cpp's (d, m), are scored."""
    sw = _wsum(wt)
    sw = torch.where(sw > 0, sw, _f(1.0))
    xm = _wsum(wt * x) / sw  # weighted block mean: LS in centred form (no float32 cancellation)
    wxc = wt * (x - xm.unsqueeze(-1))
    mn, mx = x.amin(dim=-1), x.amax(dim=-1)
    rng = torch.where(mx > mn, mx - mn, _f(1.0))
    best = torch.full_like(sw, -2.0)
    bd, bm = torch.zeros_like(sw), xm.clone()
    for off in offsets:
        iscale = (_f(nmax + off) / rng).unsqueeze(-1)
        for L in (torch.round((x - mn.unsqueeze(-1)) * iscale).clamp_(0, nmax),
                  float(nmax) - torch.round((mx.unsqueeze(-1) - x) * iscale).clamp_(0, nmax)):
            d, m, score = _asym_fit(wt, sw, xm, wxc, L)
            upd = score > best
            best = torch.where(upd, score, best)
            bd, bm = torch.where(upd, d, bd), torch.where(upd, m, bm)
    for _ in range(lloyd):
        L = torch.round((x - bm.unsqueeze(-1)) * _inv(bd).unsqueeze(-1)).clamp_(0, nmax)
        d, m, score = _asym_fit(wt, sw, xm, wxc, L)
        upd = (bd > 0) & (score > 0)
        bd, bm = torch.where(upd, d, bd), torch.where(upd, m, bm)
    L = torch.round((x - bm.unsqueeze(-1)) * _inv(bd).unsqueeze(-1)).clamp_(0, nmax)
    d16 = bd.to(torch.float16).float()
    m16 = (_wsum(wt * (x - d16.unsqueeze(-1) * L)) / sw).to(torch.float16).float()  # m refitted for fp16 d
    out_d = out_m = err = None
    for dk, mk in ((d16, m16), (d_ref.to(torch.float16).float(), m_ref.to(torch.float16).float())):
        q = torch.round((x - mk.unsqueeze(-1)) * _inv(dk).unsqueeze(-1)).clamp_(0, nmax)
        r = x - (dk.unsqueeze(-1) * q + mk.unsqueeze(-1))
        e = torch.nan_to_num(_wsum(wt * (r * r)), nan=float("inf"))
        if err is None:
            out_d, out_m, err = dk, mk, e
        else:
            upd = e < err
            out_d, out_m, err = torch.where(upd, dk, out_d), torch.where(upd, mk, out_m), torch.where(upd, e, err)
    return out_d.to(torch.float16), out_m.to(torch.float16)


# ------------------------------------------------------------------------------------------------ native
_NATIVE_TYPES = {"q8_0": 0, "q4_0": 1, "q5_0": 2, "q4_1": 3, "q5_1": 4, "iq4_nl": 5}  # the kernel's type ids


def _native():
    """The native default encoder's entry point (`kernels/cpu/gguf_legacy.cpp`), or None: no compiler, a failed
    build or ``QTOOL_NATIVE=0`` (`native_reason` says which); the torch twin runs then."""
    from qtool.runtime import native

    lib = native.load("gguf_legacy")
    if lib is None:
        return None
    fn = lib.qtool_gguf_legacy_encode
    fn.restype = ctypes.c_int
    return fn


def native_reason() -> str:
    """'' when the default legacy encoders run natively, else why their torch twin runs (for a warning)."""
    from qtool.runtime import native

    return "" if _native() is not None else native.why("gguf_legacy")


# ------------------------------------------------------------------------------------------------ layouts
def _nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(..., 32) codes -> (..., 16) bytes: element j low nibble of byte j, element j+16 its high nibble."""
    c = codes.to(torch.uint8)
    return (c[..., :16] & 0x0F) | ((c[..., 16:] & 0x0F) << 4)


def _unnibble(qs: torch.Tensor) -> torch.Tensor:
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def _qh_pack(codes: torch.Tensor) -> torch.Tensor:
    """bit 4 of each of the 32 codes -> a little-endian u32 (4 bytes): bit e = bit 4 of element e."""
    bits = ((codes.to(torch.int32) >> 4) & 1).reshape(*codes.shape[:-1], 4, 8)
    sh = torch.arange(8, dtype=torch.int32)
    return (bits << sh).sum(-1).to(torch.uint8)


def _qh_unpack(qh: torch.Tensor) -> torch.Tensor:
    sh = torch.arange(8, dtype=torch.int32)
    return ((qh.to(torch.int32).unsqueeze(-1) >> sh) & 1).reshape(*qh.shape[:-1], 32).to(torch.uint8)


def _f16_bytes(h: torch.Tensor) -> torch.Tensor:
    return h.to(torch.float16).contiguous().view(torch.uint8).reshape(*h.shape, 2)


def _bytes_f16(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float16).squeeze(-1)


# ------------------------------------------------------------------------------------------------ codecs
@dataclass(frozen=True, eq=False)
class LegacyCodec(GGUFCodec):
    """Shared driver: chunking, params, encode; subclasses implement `_blocks` (one chunk of blocks)."""

    @property
    def asym(self) -> bool:
        return self.name in ("q4_1", "q5_1")

    @property
    def nbits(self) -> int:
        return {"q8_0": 8, "q4_0": 4, "q4_1": 4, "q5_0": 5, "q5_1": 5, "iq4_nl": 4}[self.name]

    def _blocks(self, x: torch.Tensor, imp: torch.Tensor | None, sigma2: torch.Tensor | None,
                faithful: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """x (B, 32) float32 blocks; imp (B, 32) importance or None; sigma2 (B,) row sigma2 or None.
        Returns (d float16 (B,), m float16 (B,) or None, codes uint8 (B, 32) or None = nearest)."""
        raise NotImplementedError

    def _fracs(self) -> tuple[tuple[float, ...], tuple[float, ...], tuple[int, ...]]:
        """The default search of the d-only types: target fractions of the negative / positive table end (where
        the block's max element lands), and the fp16 ulp steps around the refined d scored at the end."""
        raise NotImplementedError

    def _search(self) -> tuple[list[float], tuple[int, ...]]:
        """The default search's grid as the native kernel takes it: (trial targets, fp16 steps)."""
        lo, hi, steps = self._fracs()
        return _targets(self.levels_tensor, lo, hi), steps

    def _weights(self, x: torch.Tensor, imp: torch.Tensor | None, sigma2: torch.Tensor | None) -> torch.Tensor:
        if imp is None:
            return torch.ones_like(x)
        return imp * _sqrtf(sigma2.unsqueeze(-1) + x * x)

    def _run(self, w: torch.Tensor, importance: torch.Tensor | None, faithful: bool):
        w = w.float().contiguous()
        self.check_shape(tuple(w.shape))
        rows, cols = w.shape
        nb = cols // QK
        imp = None
        if importance is not None:
            imp = importance.float().reshape(-1).contiguous()
            if imp.numel() != cols:
                raise ValueError(f"importance has {imp.numel()} entries, the weight has {cols} columns")
        nblocks = rows * nb
        d = torch.empty(nblocks, dtype=torch.float16)
        m = torch.zeros(nblocks, dtype=torch.float16) if self.asym else None
        codes = torch.empty(nblocks, QK, dtype=torch.uint8)
        if not faithful and (fn := _native()) is not None:
            self._encode_native(fn, w, imp, d, m, codes)
        else:
            sigma2 = row_sigma2(w) if imp is not None else None
            with one_thread():
                self._loop(w.reshape(-1, QK), None if imp is None else imp.reshape(nb, QK), sigma2, nb, faithful,
                           d, m, codes)
        d, m = d.reshape(rows, nb), None if m is None else m.reshape(rows, nb)
        return self._params(d, m), codes.reshape(rows, cols)

    def _encode_native(self, fn, w: torch.Tensor, imp: torch.Tensor | None, d: torch.Tensor, m: torch.Tensor | None,
                       codes: torch.Tensor, isa: int = 0) -> int:
        """The default encoder over the whole tensor in the native kernel: fills d (m) and codes in place. `isa`:
        0 the widest the CPU has, 1 the baseline build, 2 AVX2 (tests: the same results); returns the one run."""
        grid, steps = self._search()
        g = torch.tensor(grid, dtype=torch.float32)
        st = torch.tensor(steps or (0,), dtype=torch.int32)
        ptr, i64, cint = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        rc = fn(cint(_NATIVE_TYPES[self.name]), ptr(w.data_ptr()), i64(w.shape[0]), i64(w.shape[1]),
                None if imp is None else ptr(imp.data_ptr()), ptr(g.data_ptr()), cint(len(grid)),
                ptr(st.data_ptr()), cint(len(steps)), cint(LLOYD), ptr(d.data_ptr()),
                None if m is None else ptr(m.data_ptr()), ptr(codes.data_ptr()), cint(torch.get_num_threads()),
                cint(isa))
        if rc < 0:
            raise RuntimeError(f"gguf_legacy kernel rejected its arguments (rc {rc})")
        return rc

    def _loop(self, xs, imp, sigma2, nb, faithful, d, m, codes):
        nblocks = xs.shape[0]
        for b0 in range(0, nblocks, CHUNK_BLOCKS):
            b1 = min(nblocks, b0 + CHUNK_BLOCKS)
            x = xs[b0:b1]
            ib = s2 = None
            if imp is not None:
                bi = torch.arange(b0, b1)
                ib, s2 = imp[bi % nb], sigma2[bi // nb]
            dc, mc, cc = self._blocks(x, ib, s2, faithful)
            d[b0:b1] = dc
            if m is not None:
                m[b0:b1] = mc
            if cc is None:  # nearest level under the stored d/m (the base rule)
                sc = dc.float().unsqueeze(-1)
                of = mc.float().unsqueeze(-1) if mc is not None else torch.zeros_like(sc)
                cc = self.quantize_columns(x, sc, of)
            codes[b0:b1] = cc

    def quantize_columns(self, x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """The base rule (nearest level of ``t = (x - offset) / scale``, ties to the lower level, scale 0 -> as 1)
        without `bucketize`: the doubled midpoints are integers, so ``ceil(2t) - 1`` (exact) decides."""
        safe = torch.where(scale == 0, torch.ones_like(scale), scale)
        t = (x - offset) / safe
        c = torch.ceil(t + t) - 1  # the largest integer below 2t
        n = len(self.levels)
        if self.name == "iq4_nl":
            return _lut(_KV_LUT, (c.clamp_(-256, 228) + 256).long()).to(torch.uint8)
        lo = self.levels[0]
        return (torch.floor((c - (2 * lo + 1)) / 2) + 1).clamp_(0, n - 1).to(torch.uint8)

    def _params(self, d: torch.Tensor, m: torch.Tensor | None) -> dict[str, torch.Tensor]:
        p = {"scale": d.float(), "offset": m.float() if m is not None else torch.zeros(d.shape), "d": d}
        if m is not None:
            p["m"] = m
        return p

    def fit(self, w: torch.Tensor, importance: torch.Tensor | None = None, *,
            faithful: bool = False) -> dict[str, torch.Tensor]:
        return self._run(w, importance, faithful)[0]

    def encode(self, w: torch.Tensor, importance: torch.Tensor | None = None, *, faithful: bool = False) -> QTensor:
        params, codes = self._run(w, importance, faithful)
        return QTensor(self, tuple(w.shape), codes, params)

    # ---- bytes
    def pack(self, q: QTensor) -> torch.Tensor:
        rows, cols = q.shape
        nb = cols // QK
        codes = q.codes.reshape(rows, nb, QK).to(torch.uint8)
        parts = [_f16_bytes(q.params["d"])]
        if self.asym:
            parts.append(_f16_bytes(q.params["m"]))
        if self.name == "q8_0":
            parts.append(codes ^ 0x80)  # int8 q = code - 128, two's complement byte
        else:
            if self.nbits == 5:
                parts.append(_qh_pack(codes))
            parts.append(_nibbles(codes))
        out = torch.cat(parts, dim=-1)
        assert out.shape[-1] == self.type_size
        return out.reshape(rows, nb * self.type_size)

    def unpack(self, data: torch.Tensor, shape: tuple[int, int]) -> QTensor:
        rows, cols = shape
        nb = cols // QK
        b = data.contiguous().view(torch.uint8).reshape(rows, nb, self.type_size)
        d = _bytes_f16(b[..., 0:2])
        off = 2
        m = None
        if self.asym:
            m = _bytes_f16(b[..., 2:4])
            off = 4
        if self.name == "q8_0":
            codes = b[..., off:] ^ 0x80
        else:
            qh = None
            if self.nbits == 5:
                qh, off = b[..., off:off + 4], off + 4
            codes = _unnibble(b[..., off:off + 16])
            if qh is not None:
                codes = codes | (_qh_unpack(qh) << 4)
        return QTensor(self, (rows, cols), codes.reshape(rows, cols).clone(), self._params(d.clone(),
                                                                                         None if m is None else m.clone()))


# default-encoder search grids (measured on Gaussian / Student-t blocks: where the best scales fall):
# where the block's max element lands, as a fraction of the negative / positive table end
_SYM_LO = tuple(0.82 + 0.03 * i for i in range(10))  # 0.82 .. 1.09
_Q8_LO, _Q8_HI = (0.9, 0.94, 0.97, 1.0), (0.95, 0.99, 1.0)
_IQ4_HI = (0.9, 0.95, 1.0, 1.05)
_ASYM_OFFSETS = tuple(-1.5 + 0.25 * i for i in range(8))  # iscale = (nmax + offset) / (max - min)


@dataclass(frozen=True, eq=False)
class SymCodec(LegacyCodec):
    """Q8_0, Q4_0, Q5_0: ``d * (code - 2^(bits-1))``."""

    def _blocks(self, x, imp, sigma2, faithful):
        nmax = 1 << (self.nbits - 1)
        wt = self._weights(x, imp, sigma2)
        if self.name == "q8_0":
            d_ref, codes = _ref_q8(x)  # quantize_q8_0 ignores the imatrix
        elif imp is None:
            d_ref, codes = _ref_sym(x, nmax)
        else:
            d_ref, codes = _make_qx_quants(x, nmax, wt)
        if faithful:
            return d_ref.to(torch.float16), None, codes
        return _sym_default(x, wt, self.levels_tensor, d_ref, *self._fracs(), uniform=True), None, None

    def _fracs(self):
        return (_Q8_LO, _Q8_HI, (-1, 0, 1)) if self.name == "q8_0" else (_SYM_LO, (), (0,))


@dataclass(frozen=True, eq=False)
class AsymCodec(LegacyCodec):
    """Q4_1, Q5_1: ``d * code + m``."""

    def _blocks(self, x, imp, sigma2, faithful):
        nmax = (1 << self.nbits) - 1
        wt = self._weights(x, imp, sigma2)
        if imp is None:
            d_ref, m_ref, codes = _ref_asym(x, nmax)
        else:
            d_ref, m_ref, codes = _make_qkx3_quants(x, nmax, wt)
        if faithful:
            return d_ref.to(torch.float16), m_ref.to(torch.float16), codes
        d, m = _asym_default(x, wt, nmax, d_ref, m_ref, _ASYM_OFFSETS)
        return d, m, None

    def _search(self):  # the grid of iscale numerators: nmax + offset
        nmax = (1 << self.nbits) - 1
        return [nmax + off for off in _ASYM_OFFSETS], ()


@dataclass(frozen=True, eq=False)
class IQ4NLCodec(LegacyCodec):
    """IQ4_NL: ``d * kvalues[code]``."""

    def _weights(self, x, imp, sigma2):
        if imp is None:
            return torch.ones_like(x)
        s2 = _ssum(x * x).unsqueeze(-1) * _f(2.0 / QK)
        return imp * _sqrtf(s2 + x * x)

    def _blocks(self, x, imp, sigma2, faithful):
        wt = self._weights(x, imp, sigma2)
        d_ref, codes = _iq4nl_faithful(x, x * x if imp is None else wt)  # llama.cpp searches with x^2 without one
        if faithful:
            return d_ref.to(torch.float16), None, codes
        return _sym_default(x, wt, self.levels_tensor, d_ref, *self._fracs(), uniform=False), None, None

    def _fracs(self):
        return _SYM_LO, _IQ4_HI, (0,)


def _make(cls, name: str, qtype: GGMLQuantizationType, levels: tuple) -> LegacyCodec:
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    return register(cls(name=name, ggml_type=int(qtype), block_size=block_size, type_size=type_size,
                        sub_block=QK, levels=levels))


Q8_0 = _make(SymCodec, "q8_0", GGMLQuantizationType.Q8_0, tuple(range(-128, 128)))
Q4_0 = _make(SymCodec, "q4_0", GGMLQuantizationType.Q4_0, tuple(range(-8, 8)))
Q4_1 = _make(AsymCodec, "q4_1", GGMLQuantizationType.Q4_1, tuple(range(16)))
Q5_0 = _make(SymCodec, "q5_0", GGMLQuantizationType.Q5_0, tuple(range(-16, 16)))
Q5_1 = _make(AsymCodec, "q5_1", GGMLQuantizationType.Q5_1, tuple(range(32)))
IQ4_NL = _make(IQ4NLCodec, "iq4_nl", GGMLQuantizationType.IQ4_NL, KVALUES_IQ4NL)

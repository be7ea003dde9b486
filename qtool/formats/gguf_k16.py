"""GGUF Q2_K, Q3_K and Q6_K: 256-element super-blocks of 16 sub-blocks of 16 elements (formats.md §2.2).

    Q2_K  value = d*(sc&15) * q - dmin*(sc>>4)      q in 0..3,   4-bit scale and min, fp16 d / dmin
    Q3_K  value = d*(l-32) * (q-4)                   q in 0..7,   6-bit signed scales (12-byte packing)
    Q6_K  value = d*sc * (q-32)                      q in 0..63,  int8 scales

Two encoders per type:

* ``faithful=True``: llama.cpp's ``quantize_row_qX_K_ref`` (no importance) and ``quantize_row_qX_K_impl``
  (with an imatrix), written here as batched torch over every (row, block, sub-block) at once: the
  sub-block searches (``make_qkx2/3_quants``, ``make_qx_quants``, ``make_q3_quants`` with its coordinate
  descent, ``make_qp_quants``), the quantization of the sub-scales, fp16 super-scales and the final
  requantization with the stored values. Sums run in torch's order, not C's sequential one, so a
  near-tie can rarely resolve the other way.
* the default: a better encoder of the metric ``sum_i w_i (x_i - x̂_i)^2`` with ``w_i = importance[col]``
  (``1`` without one; llama.cpp's search weights |x|, x², imp·sqrt(σ²+x²) are a heuristic for it).
  Per sub-block the ideal (unquantized) fit: for Q2_K the exact optimum of the 4-level affine fit with
  min <= 0 (every monotone partition of the sorted sub-block, closed-form weighted LS each); for Q3_K/Q6_K a
  wide scale grid (both signs) refined by rounding/LS alternation (measured within 1% of the exact 1-D optimum).
  Per super-block a joint search over the fp16 super-scale(s) and the integer sub-scales/mins (each sub-block
  picks the best integer pair next to its ideal one, judged by its true error under nearest codes),
  alternated with weighted least-squares re-solves of ``d`` (and ``dmin``) given the integer sub-scales and
  codes. The codes are the nearest levels under the final params, so ``quantize(w, fit(w))`` reproduces
  ``encode(w)`` (the seam GPTQ walks columns through).

Native path: the Q6_K/Q3_K default encoder runs in ``kernels/cpu/gguf_kquants.cpp`` (formats/kquant_native.py:
one call per tensor, super-blocks over ``torch.get_num_threads()`` threads, results independent of the count)
whenever `runtime.native` can build it; it follows `_sym_sub_search` + `_sym_super` operation for operation
(sums in torch's order), so it reproduces their output. That torch code stays as its twin and the fallback
(``QTOOL_NATIVE=0``, no compiler); ``faithful=True`` always runs in torch. Q2_K's default encoder
(`_affine_sub_exact` + `_affine_super`) has its native version there too, same rules.
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf
import torch

from qtool.formats import kquant_native
from qtool.formats.base import QTensor
from qtool.formats.gguf_base import GGUFCodec, fp16_round, register

QK_K = 256
NSUB = 16  # sub-blocks per super-block
SUB = 16  # elements per sub-block
GROUP_MAX_EPS = 1e-15
_CHUNK = 1 << 20  # elements per row chunk
_F16_MAX = 65504.0


def _rint(x: torch.Tensor) -> torch.Tensor:
    """ggml's nearest_int (round half to even), kept as float."""
    return torch.round(x)


def _f32(v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32)


def _safe(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x == 0, torch.ones_like(x), x)


def _signed_absmax(x: torch.Tensor) -> torch.Tensor:
    """The element with the largest |x| along the last dim (the first one on ties, as C's strict `>`)."""
    idx = x.abs().argmax(dim=-1, keepdim=True)
    return x.gather(-1, idx).squeeze(-1)


# ============================================================================ llama.cpp's helpers (batched)
def _make_qx_quants(x: torch.Tensor, nmax: int, qw: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """make_qx_quants(n, nmax, x, L, rmse_type=1, qw) over rows of `x` (N, n): (scale (N,), L (N, n) in 0..2nmax-1)."""
    amax = x.abs().amax(dim=-1)
    mx = _signed_absmax(x)
    zero = amax < GROUP_MAX_EPS
    mx = torch.where(zero, torch.ones_like(mx), mx)
    w = qw if qw is not None else x * x
    wx = w * x

    def cand(iscale):
        l = _rint(iscale[:, None] * x).clamp_(-nmax, nmax - 1)
        return l, (wx * l).sum(-1), (w * l * l).sum(-1)

    L, sumlx, suml2 = cand(-nmax / mx)
    scale = torch.where(suml2 != 0, sumlx / _safe(suml2), torch.zeros_like(sumlx))
    best = scale * sumlx
    for i in range(-9, 10):
        if i == 0:
            continue
        step = _f32(0.1) * i
        l, slx, sl2 = cand(-(nmax + step) / mx)
        better = (sl2 > 0) & (slx * slx > best * sl2)
        L = torch.where(better[:, None], l, L)
        scale = torch.where(better, slx / _safe(sl2), scale)
        best = torch.where(better, scale * slx, best)
    L = torch.where(zero[:, None], torch.zeros_like(L), L + nmax)
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    return scale, L


def _make_q3_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """make_q3_quants(n, nmax, x, L, do_rmse=true): x² weights, rounding then up to 5 coordinate-descent sweeps."""
    amax = x.abs().amax(dim=-1)
    mx = _signed_absmax(x)
    zero = amax < GROUP_MAX_EPS
    mx = torch.where(zero, torch.ones_like(mx), mx)
    L = _rint((-nmax / mx)[:, None] * x).clamp_(-nmax, nmax - 1)
    w = x * x
    wx = w * x
    sumlx = (wx * L).sum(-1)
    suml2 = (w * L * L).sum(-1)
    L = L.clone()
    for _ in range(5):
        changed = torch.zeros_like(zero)
        for i in range(x.shape[-1]):
            wi, xi, li, wxi = w[:, i], x[:, i], L[:, i], wx[:, i]
            slx = sumlx - wxi * li
            sl2 = suml2 - wi * li * li
            new = _rint(xi * sl2 / _safe(slx)).clamp_(-nmax, nmax - 1)
            slx_n = slx + wxi * new
            sl2_n = sl2 + wi * new * new
            acc = (slx > 0) & (new != li) & (sl2_n > 0) & (slx_n * slx_n * suml2 > sumlx * sumlx * sl2_n)
            L[:, i] = torch.where(acc, new, li)
            sumlx = torch.where(acc, slx_n, sumlx)
            suml2 = torch.where(acc, sl2_n, suml2)
            changed |= acc
        if not bool(changed.any()):
            break
    scale = torch.where(suml2 > 0, sumlx / _safe(suml2), torch.zeros_like(sumlx))
    L = torch.where(zero[:, None], torch.zeros_like(L), L + nmax)
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    return scale, L


def _make_qkx_quants(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int,
                     use_mad: bool, v3: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """make_qkx2_quants (v3=False) / make_qkx3_quants (v3=True) over rows of x (N, n):
    (scale, the_min (= -min >= 0), L in 0..nmax). The candidate grid follows the running best min, as in C."""
    mn = x.amin(dim=-1).clamp(max=0)
    mx = x.amax(dim=-1)
    sum_w = w.sum(-1)
    sum_x = (w * x).sum(-1)
    degenerate = (mx <= mn) if v3 else (mx == mn)
    rng = torch.where(degenerate, torch.ones_like(mx), mx - mn)

    def err(scale, mn_, l):
        diff = scale[:, None] * l + mn_[:, None] - x
        diff = diff.abs() if use_mad else diff * diff
        return (w * diff).sum(-1)

    iscale = nmax / rng
    scale = 1 / iscale
    L = _rint(iscale[:, None] * (x - mn[:, None])).clamp_(0, nmax)
    best = err(scale, mn, L)
    base = _f32(rmin)
    for i in range(nstep + 1):
        rng = torch.where(degenerate, torch.ones_like(mx), mx - mn)
        iscale = (base + _f32(rdelta) * i + nmax) / rng
        v = iscale[:, None] * (x - mn[:, None])
        if v3:
            l = torch.where(v > 0, _rint(v.clamp(max=nmax)), torch.zeros_like(v))
        else:
            l = _rint(v).clamp_(0, nmax)
        wl = w * l
        sum_l = wl.sum(-1)
        sum_l2 = (wl * l).sum(-1)
        sum_xl = (wl * x).sum(-1)
        D = sum_w * sum_l2 - sum_l * sum_l
        Ds = _safe(D)
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / Ds
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / Ds
        pos = this_min > 0
        this_min = torch.where(pos, torch.zeros_like(this_min), this_min)
        this_scale = torch.where(pos, sum_xl / _safe(sum_l2), this_scale)
        cur = err(this_scale, this_min, l)
        upd = (D > 0) & (cur < best) & ~degenerate
        L = torch.where(upd[:, None], l, L)
        best = torch.where(upd, cur, best)
        scale = torch.where(upd, this_scale, scale)
        mn = torch.where(upd, this_min, mn)
    L = torch.where(degenerate[:, None], torch.zeros_like(L), L)
    scale = torch.where(degenerate, torch.zeros_like(scale), scale)
    return scale, -mn, L


def _make_qp_quants(x: torch.Tensor, nmax: int, qw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """make_qp_quants(n, nmax, x, L, quant_weights) over rows of non-negative x (N, n): (scale, L)."""
    mx = x.amax(dim=-1).clamp(min=0)
    zero = mx < GROUP_MAX_EPS
    mx = torch.where(zero, torch.ones_like(mx), mx)
    iscale = nmax / mx
    L = _rint(iscale[:, None] * x)
    scale = 1 / iscale
    diff = x - scale[:, None] * L
    best = (qw * diff * diff).sum(-1)
    for i in range(-4, 5):
        if i == 0:
            continue
        isc = (_f32(0.1) * i + nmax) / mx
        sc = 1 / isc
        l = _rint(isc[:, None] * x).clamp_(max=nmax)
        diff = x - sc[:, None] * l
        mse = (qw * diff * diff).sum(-1)
        upd = mse < best
        best = torch.where(upd, mse, best)
        iscale = torch.where(upd, isc, iscale)
    L = _rint(iscale[:, None] * x).clamp_(max=nmax)
    wx = qw * x
    sumlx = (wx * L).sum(-1)
    suml2 = (qw * L * L).sum(-1)
    for _ in range(5):
        changed = torch.zeros_like(zero)
        for i in range(x.shape[-1]):
            wi, xi, li, wxi = qw[:, i], x[:, i], L[:, i], wx[:, i]
            slx = sumlx - wxi * li
            sl2 = suml2 - wi * li * li
            new = _rint(xi * sl2 / _safe(slx)).clamp_(max=nmax)
            slx_n = slx + wxi * new
            sl2_n = sl2 + wi * new * new
            acc = (slx > 0) & (sl2 > 0) & (new != li) & (slx_n * slx_n * suml2 > sumlx * sumlx * sl2_n)
            L[:, i] = torch.where(acc, new, li)
            sumlx = torch.where(acc, slx_n, sumlx)
            suml2 = torch.where(acc, sl2_n, suml2)
            changed |= acc
        if not bool(changed.any()):
            break
    scale = torch.where(suml2 > 0, sumlx / _safe(suml2), torch.zeros_like(sumlx))
    L = torch.where(zero[:, None], torch.zeros_like(L), L)
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    return scale, L


# ============================================================================ better encoders (shared pieces)
_SUB_REFINE = 2  # `_sym_sub_search`'s rounding / LS rounds after the grid


def _sym_grid(nq: int) -> list[float]:
    """`_sym_sub_search`'s starting scales (× 1/max): a wide grid of both signs (finer for few levels)."""
    if nq <= 8:
        return [-(nq + 0.1 * i) for i in range(-12, 21)] + [(nq - 1 + 0.1 * i) for i in range(-4, 11, 2)]
    return [-(nq + 0.25 * i) for i in range(-12, 13)]


def _sym_sub_search(x: torch.Tensor, w: torch.Tensor, nq: int) -> torch.Tensor:
    """Per row of x (N, n): the weighted-LS scale s minimizing sum w (x - s*l)^2, l = clamp(round(x/s), -nq, nq-1),
    over a wide grid of starting scales (both signs) refined by alternating rounding and LS."""
    mx = _signed_absmax(x)
    nz = mx.abs() > 0
    mx = torch.where(nz, mx, torch.ones_like(mx))
    wx = w * x
    best_sc = torch.full_like(mx, -1.0)
    best_s = torch.zeros_like(mx)

    def consider(l):
        nonlocal best_sc, best_s
        sxl = (wx * l).sum(-1)
        sll = (w * l * l).sum(-1)
        ok = sll > 0
        s = sxl / _safe(sll)
        score = torch.where(ok, sxl * s, torch.zeros_like(s))
        better = score > best_sc
        best_s = torch.where(better, s, best_s)
        best_sc = torch.where(better, score, best_sc)

    for g in _sym_grid(nq):
        consider(_rint((g / mx)[:, None] * x).clamp_(-nq, nq - 1))
    for _ in range(_SUB_REFINE):
        consider(_rint(x / _safe(best_s)[:, None]).clamp_(-nq, nq - 1))
    return torch.where(nz, best_s, torch.zeros_like(best_s))


def _sym_super(X: torch.Tensor, W: torch.Tensor, S: torch.Tensor, nq: int, sc_lo: int, sc_hi: int,
               d_grid: tuple[float, ...], refits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Joint choice of fp16 d (B,) and integer sub-scales sc (B, 16) in [sc_lo, sc_hi] for value = d*sc*lv,
    lv in [-nq, nq-1], given the ideal sub-block scales S (B, 16). X, W: (B, 16, 16)."""
    smax = _signed_absmax(S)

    def evaluate(d):
        dsafe = _safe(d)
        r = _rint(S / dsafe[:, None])
        best_e = best_sc = None
        for k in (-1, 0, 1):
            sc = (r + k).clamp_(sc_lo, sc_hi)
            t = d[:, None] * sc
            q = _rint(X / _safe(t)[..., None]).clamp_(-nq, nq - 1)
            e = (W * (X - t[..., None] * q).square()).sum(-1)
            if best_e is None:
                best_e, best_sc = e, sc
            else:
                b = e < best_e
                best_e = torch.where(b, e, best_e)
                best_sc = torch.where(b, sc, best_sc)
        return best_e.sum(-1), best_sc

    def f16(v):
        return fp16_round(v.clamp(-_F16_MAX, _F16_MAX))

    best_e = best_d = best_sc = None
    for g in d_grid:
        d = f16(smax / g)
        e, sc = evaluate(d)
        if best_e is None:
            best_e, best_d, best_sc = e, d, sc
        else:
            b = e < best_e
            best_e, best_d = torch.where(b, e, best_e), torch.where(b, d, best_d)
            best_sc = torch.where(b[:, None], sc, best_sc)
    for _ in range(refits):
        t = best_d[:, None] * best_sc
        q = _rint(X / _safe(t)[..., None]).clamp_(-nq, nq - 1)
        a = best_sc[..., None] * q
        wa = W * a
        num = (wa * X).sum((-1, -2), dtype=torch.float64)
        den = (wa * a).sum((-1, -2), dtype=torch.float64)
        d = f16(torch.where(den > 0, num / torch.where(den > 0, den, 1.0), best_d.double()).float())
        e, sc = evaluate(d)
        b = e < best_e
        best_e, best_d = torch.where(b, e, best_e), torch.where(b, d, best_d)
        best_sc = torch.where(b[:, None], sc, best_sc)
    return best_d, best_sc


def _tail_sums(v: torch.Tensor) -> torch.Tensor:
    """(N, n) -> (N, n+1): T[:, k] = sum of v[:, k:]."""
    t = v.flip(-1).cumsum(-1).flip(-1)
    return torch.cat([t, torch.zeros_like(t[:, :1])], dim=-1)


def _affine_cut_search(TW, TX, sw, swx, xbar, constrained: bool):
    """Best 4-level monotone partition of sorted elements, cut positions a <= b <= c (code = number of cuts at or
    below the position). TW/TX: tail sums of w and of w*(x - xbar) (N, n+1). Unconstrained: maximize the
    LS reduction of the centered problem, sw * Sxl^2 / (sw * Sll - Sl^2); constrained (min <= 0): the full
    reduction, with min clamped at 0 where the unconstrained one is positive. Returns (a, b, c), (N,) int64 each."""
    N, n1 = TW.shape
    best = torch.full((N,), -1.0)
    ba = torch.zeros(N, dtype=torch.long)
    bb = torch.zeros(N, dtype=torch.long)
    bc = torch.zeros(N, dtype=torch.long)
    swc = sw[:, None, None]
    eps = (swc * swc) * 1e-6 + 1e-30  # a candidate whose codes barely vary (Sl^2 ~ sw*Sll) scores ~0
    if constrained:
        isw = 1 / _safe(sw)[:, None, None]
        swxc, xb = swx[:, None, None], xbar[:, None, None]
    for b in range(n1):
        Aw, Ax = TW[:, :b + 1, None], TX[:, :b + 1, None]  # cut a in 0..b (the only (N, h, w)-sized terms)
        Bw, Bx = TW[:, b, None, None], TX[:, b, None, None]
        C1 = TW[:, None, b:] + Bw  # cut c in b..n, with the b term folded in
        C5 = 5 * TW[:, None, b:] + 3 * Bw
        Cx = TX[:, None, b:] + Bx
        sl = Aw + C1
        sxl = Ax + Cx  # centered
        if not constrained:
            den = (swc * Aw) + (swc * C5)  # sw * Sll
            den.sub_(sl.mul_(sl)).clamp_(min=eps)
            R = sxl.mul_(sxl).div_(den)
        else:
            sll = Aw + C5
            var = sll - sl * sl * isw
            R = sxl * sxl / torch.maximum(var, sll * 1e-6 + 1e-30)
            # unconstrained min = xbar - s * lbar with s = sxl / var; infeasible (> 0) -> min 0, s = Sxl / sll
            infeasible = (var <= 1e-6 * sll) | (xb * var > sxl * sl * isw)
            sxu = sxl + xb * sl
            R0 = sxu * sxu / (sll + 1e-30)
            R = torch.where(infeasible, R0, R + swxc * swxc * isw)
        v, i = R.reshape(N, -1).max(dim=-1)
        upd = v > best
        width = n1 - b
        best = torch.where(upd, v, best)
        ba = torch.where(upd, i // width, ba)
        bc = torch.where(upd, b + i % width, bc)
        bb = torch.where(upd, torch.full_like(bb, b), bb)
    return ba, bb, bc


def _affine_sub_exact(x: torch.Tensor, w: torch.Tensor):
    """Per row of x (N, n): the exact minimizer of sum w (x - s*l - mn)^2 over s >= 0, mn <= 0, l in 0..3
    (every monotone 4-level partition of the sorted elements, closed-form weighted LS for each).
    Returns (s, mn, weighted mean code)."""
    N, n = x.shape
    xs, idx = x.sort(dim=-1)
    ws = w.gather(-1, idx)
    sw = ws.sum(-1)
    swx = (ws * xs).sum(-1)
    xbar = swx / _safe(sw)
    TW = _tail_sums(ws)
    TX = _tail_sums(ws * (xs - xbar[:, None]))
    cuts = [_affine_cut_search(TW[i:i + 2048], TX[i:i + 2048], sw[i:i + 2048], swx[i:i + 2048], xbar[i:i + 2048],
                               constrained=False) for i in range(0, N, 2048)]
    a, b, c = (torch.cat(t) for t in zip(*cuts))

    def g(T, k):
        return T.gather(1, k[:, None]).squeeze(1)

    def solve(TW, TX, sw, swx, xbar, a, b, c):
        sl = g(TW, a) + g(TW, b) + g(TW, c)
        sll = g(TW, a) + 3 * g(TW, b) + 5 * g(TW, c)
        sxl = g(TX, a) + g(TX, b) + g(TX, c) + xbar * sl
        D = sw * sll - sl * sl
        ok = D > 1e-6 * sw * sll
        Ds = torch.where(ok, D, torch.ones_like(D))
        s = (sw * sxl - swx * sl) / Ds
        m = (sll * swx - sl * sxl) / Ds
        return s, m, ok, sl, sll, sxl

    s, m, ok, sl, sll, sxl = solve(TW, TX, sw, swx, xbar, a, b, c)
    redo = ~ok | (m > 0) | (s < 0)
    if bool(redo.any()):
        r = redo.nonzero().squeeze(1)
        a2, b2, c2 = _affine_cut_search(TW[r], TX[r], sw[r], swx[r], xbar[r], constrained=True)
        a, b, c = a.index_put((r,), a2), b.index_put((r,), b2), c.index_put((r,), c2)
        s, m, ok, sl, sll, sxl = solve(TW, TX, sw, swx, xbar, a, b, c)
        fix = ~ok | (m > 0) | (s < 0)
        m = torch.where(fix, torch.zeros_like(m), m)
        s = torch.where(fix, torch.where(sll > 0, sxl / _safe(sll), torch.zeros_like(sll)), s)
    s = s.clamp(min=0)
    # a (near) constant sub-block: s = 0 and the best constant min(mean, 0) may beat every partition's fit
    l = _rint((x - m[:, None]) / _safe(s)[:, None]).clamp_(0, 3)
    e = (w * (x - s[:, None] * l - m[:, None]).square()).sum(-1)
    mc = xbar.clamp(max=0)
    ec = (w * (x - mc[:, None]).square()).sum(-1)
    const = ec < e
    s = torch.where(const, torch.zeros_like(s), s)
    m = torch.where(const, mc, m)
    lbar = torch.where(const, torch.zeros_like(sl), sl / _safe(sw))
    return s, m, lbar


_Q2_STARTS = ((1.0, 1.0), (0.9, 1.0), (0.9, 0.9))  # (d, dmin) = max/(15·f): llama.cpp's max/15, a little finer
_Q2_REFITS = 3


def _affine_super(X, W, S, M, LB, qmax: int = 15, nmax: int = 3, refits: int = _Q2_REFITS):
    """Joint choice of fp16 (d, dmin) (B,) and 4-bit (sc, m) (B, 16) for value = d*sc*q - dmin*m.
    S (B,16) >= 0 ideal scales, M (B,16) >= 0 ideal mins to subtract, LB the weighted mean code of each fit."""

    def f16(v):
        return fp16_round(v.clamp(-_F16_MAX, _F16_MAX))

    def evaluate(d, dmin):
        rs = _rint(S / _safe(d)[:, None])
        dms = _safe(dmin)[:, None]
        best = None
        for k in (-1, 0, 1):
            sc = (rs + k).clamp_(0, qmax)
            t = d[:, None] * sc  # decoded scale
            # the min that goes with this scale: shift the ideal one by the change of scale at the mean code
            mt = (M + (t - S) * LB).clamp_(min=0) / dms
            fl = torch.floor(mt)
            for j in (0, 1):
                m = (fl + j).clamp_(0, qmax)
                off = -(dmin[:, None] * m)
                q = _rint((X - off[..., None]) / _safe(t)[..., None]).clamp_(0, nmax)
                e = (W * (X - (t[..., None] * q + off[..., None])).square()).sum(-1)
                if best is None:
                    best = [e, sc, m]
                else:
                    b = e < best[0]
                    best = [torch.where(b, e, best[0]), torch.where(b, sc, best[1]), torch.where(b, m, best[2])]
        return best[0].sum(-1), best[1], best[2]

    best_e = torch.full((S.shape[0],), float("inf"))
    best_d = best_dm = torch.zeros(S.shape[0])
    best_sc = best_m = torch.zeros_like(S)

    def keep(d, dm):
        nonlocal best_e, best_d, best_dm, best_sc, best_m
        e, sc, m = evaluate(d, dm)
        b = e < best_e
        best_e = torch.where(b, e, best_e)
        best_d, best_dm = torch.where(b, d, best_d), torch.where(b, dm, best_dm)
        best_sc = torch.where(b[:, None], sc, best_sc)
        best_m = torch.where(b[:, None], m, best_m)

    for fd, fm in _Q2_STARTS:
        keep(f16(S.amax(-1) / (qmax * fd)), f16(M.amax(-1) / (qmax * fm)))
    for _ in range(refits):
        t = best_d[:, None] * best_sc
        off = -(best_dm[:, None] * best_m)
        q = _rint((X - off[..., None]) / _safe(t)[..., None]).clamp_(0, nmax)
        a = (best_sc[..., None] * q).double()
        bm = best_m[..., None].double().expand_as(a)
        Wd, Xd = W.double(), X.double()
        Saa = (Wd * a * a).sum((-1, -2))
        Sab = (Wd * a * bm).sum((-1, -2))
        Sbb = (Wd * bm * bm).sum((-1, -2))
        Sax = (Wd * a * Xd).sum((-1, -2))
        Sbx = (Wd * bm * Xd).sum((-1, -2))
        det = Saa * Sbb - Sab * Sab
        good = det > 1e-12 * Saa * Sbb
        dets = torch.where(good, det, torch.ones_like(det))
        d2 = torch.where(good, (Sax * Sbb - Sab * Sbx) / dets, Sax / torch.where(Saa > 0, Saa, 1.0))
        dm2 = torch.where(good, (Sab * Sax - Saa * Sbx) / dets, best_dm.double())
        d2 = torch.where(Saa > 0, d2, best_d.double())
        keep(f16(d2.float()), f16(dm2.float()))
    return best_d, best_dm, best_sc, best_m


# ============================================================================ codecs
def _ggml(name: str) -> tuple[int, int, int]:
    t = gguf.GGMLQuantizationType[name]
    bs, ts = gguf.GGML_QUANT_SIZES[t]
    return int(t), bs, ts


@dataclass(frozen=True, eq=False)
class _K16Codec(GGUFCodec):
    """Shared driver: row chunks, importance broadcast, params assembly. Subclasses implement
    `_blocks(X, imp, faithful) -> (raw dict of (B, ...) tensors, codes (B, 256) or None)`, `_decode(raw)`,
    `_pack_blocks`, `_unpack_blocks`, and `_native(w, imp)` -> (raw dict of (rows, ...) tensors, codes) or None
    (the default encoder of the whole tensor in kernels/cpu/gguf_kquants.cpp; None: no kernel, run `_blocks`)."""

    def _native(self, w: torch.Tensor, imp: torch.Tensor | None):
        return None

    def fit(self, w: torch.Tensor, importance: torch.Tensor | None = None, *, faithful: bool = False
            ) -> dict[str, torch.Tensor]:
        return self._run(w, importance, faithful)[0]

    def encode(self, w: torch.Tensor, importance: torch.Tensor | None = None, *, faithful: bool = False) -> QTensor:
        w = w.float()
        self.check_shape(tuple(w.shape))
        params, codes = self._run(w, importance, faithful)
        if codes is None:
            codes = self.quantize(w, params)
        return QTensor(self, tuple(w.shape), codes, params)

    def _run(self, w: torch.Tensor, importance, faithful: bool):
        """(params, codes or None): computed on the CPU (natively, else in row chunks), on `w`'s device."""
        device = w.device
        w = w.detach().float().cpu()
        if w.dim() != 2:
            raise ValueError(f"{self.name}: expected a 2-D weight, got shape {tuple(w.shape)}")
        self.check_shape(tuple(w.shape))
        if not bool(torch.isfinite(w).all()):
            raise ValueError(f"{self.name}: the weight has NaN/Inf values (llama.cpp refuses them too)")
        rows, cols = w.shape
        nb = cols // QK_K
        imp = None
        if importance is not None:
            imp = torch.as_tensor(importance).detach().float().cpu().reshape(-1)
            if imp.numel() != cols:
                raise ValueError(f"{self.name}: importance has {imp.numel()} entries, the weight has {cols} columns")
            if not bool(torch.isfinite(imp).all()):
                raise ValueError(f"{self.name}: the importance has NaN/Inf values")
        if not faithful and (native_out := self._native(w, imp)) is not None:
            raw, codes = native_out  # the native twin of `_blocks` (kernels/cpu/gguf_kquants.cpp), whole tensor
            params = {k: v.to(device) for k, v in {**self._decode(raw), **raw}.items()}
            return params, codes.to(device)
        if imp is not None:
            imp = imp.reshape(nb, NSUB, SUB)
        step = max(1, _CHUNK // cols)
        raws, codes = [], []
        for r0 in range(0, rows, step):
            X = w[r0:r0 + step].reshape(-1, nb, NSUB, SUB)
            R = X.shape[0]
            I = None if imp is None else imp.expand(R, nb, NSUB, SUB).reshape(-1, NSUB, SUB)
            raw, c = self._blocks(X.reshape(-1, NSUB, SUB), I, faithful)
            raws.append({k: v.reshape(R, -1) for k, v in raw.items()})
            codes.append(None if c is None else c.reshape(R, cols))
        raw = {k: torch.cat([r[k] for r in raws]) for k in raws[0]}
        params = {k: v.to(device) for k, v in {**self._decode(raw), **raw}.items()}
        out_codes = None if not faithful else torch.cat(codes).to(device=device, dtype=torch.uint8)
        return params, out_codes

    # packing drivers
    def pack(self, q: QTensor) -> torch.Tensor:
        rows, cols = q.shape
        self.check_shape((rows, cols))
        nb = cols // QK_K
        codes = q.codes.cpu().reshape(rows * nb, QK_K).to(torch.int32)
        raw = {k: v.cpu().reshape(rows * nb, -1) for k, v in q.params.items() if k not in ("scale", "offset")}
        out = self._pack_blocks(codes, raw)
        assert out.shape[1] == self.type_size
        return out.reshape(rows, nb * self.type_size)

    def unpack(self, data: torch.Tensor, shape: tuple[int, int]) -> QTensor:
        rows, cols = shape
        self.check_shape((rows, cols))
        nb = cols // QK_K
        data = torch.as_tensor(data).reshape(rows * nb, self.type_size).to(torch.uint8)
        codes, raw = self._unpack_blocks(data)
        raw = {k: v.reshape(rows, -1) for k, v in raw.items()}
        params = {**self._decode(raw), **raw}
        return QTensor(self, (rows, cols), codes.reshape(rows, cols).to(torch.uint8), params)


def _f16_bytes(v: torch.Tensor) -> torch.Tensor:
    """(B,) fp16-valued -> (B, 2) little-endian bytes."""
    return v.to(torch.float16).contiguous().view(torch.uint8).reshape(-1, 2)


def _bytes_f16(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float16).reshape(-1)


def _pack2(c: torch.Tensor) -> torch.Tensor:
    """2-bit fields (B, 256) -> qs (B, 64): element 128n + 32j + l at bits 2j of byte 32n + l."""
    c = c.reshape(-1, 2, 4, 32)
    out = c[:, :, 0] | (c[:, :, 1] << 2) | (c[:, :, 2] << 4) | (c[:, :, 3] << 6)
    return out.reshape(-1, 64)


def _unpack2(qs: torch.Tensor) -> torch.Tensor:
    q = qs.to(torch.int32).reshape(-1, 2, 1, 32)
    sh = torch.tensor([0, 2, 4, 6], dtype=torch.int32).reshape(1, 1, 4, 1)
    return ((q >> sh) & 3).reshape(-1, QK_K)


@dataclass(frozen=True, eq=False)
class Q2KCodec(_K16Codec):
    """Q2_K: value = d*(sc&15)*q - dmin*(sc>>4), q in 0..3. Raw params: d, dmin (fp16 values, (rows, blocks)),
    sc, m (uint8 4-bit, (rows, cols/16))."""

    def _decode(self, raw):
        d = raw["d"].float().repeat_interleave(NSUB, dim=1)
        dmin = raw["dmin"].float().repeat_interleave(NSUB, dim=1)
        return {"scale": d * raw["sc"].float(), "offset": -(dmin * raw["m"].float())}

    def _blocks(self, X, I, faithful):
        if faithful:
            return self._faithful(X, I)
        return self._better(X, I), None

    def _faithful(self, X, I):
        B = X.shape[0]
        Xs = X.reshape(-1, SUB)
        if I is None:
            scales, mins, L = _make_qkx_quants(Xs, Xs.abs(), 3, -0.5, 0.1, 15, True, False)
            scales, mins = scales.reshape(B, NSUB), mins.reshape(B, NSUB)
            max_scale = scales.amax(-1).clamp(min=0)
            max_min = mins.amax(-1).clamp(min=0)
            ps, pm = max_scale > 0, max_min > 0
            ls = torch.where(ps[:, None], _rint((15 / _safe(max_scale))[:, None] * scales), torch.zeros_like(scales))
            lm = torch.where(pm[:, None], _rint((15 / _safe(max_min))[:, None] * mins), torch.zeros_like(mins))
            d = torch.where(ps, fp16_round(max_scale / 15), torch.zeros_like(max_scale))
            dmin = torch.where(pm, fp16_round(max_min / 15), torch.zeros_like(max_min))
        else:
            sigma2 = (X * X).sum((-1, -2)) / QK_K
            weight = I * torch.sqrt(sigma2[:, None, None] + X * X)
            sw = weight.sum(-1)
            scales, mins, L = _make_qkx_quants(Xs, weight.reshape(-1, SUB), 3, -0.9, 0.05, 36, False, True)
            dm, ls = _make_qp_quants(scales.reshape(B, NSUB), 15, sw)
            mm, lm = _make_qp_quants(mins.reshape(B, NSUB), 15, sw)
            d, dmin = fp16_round(dm), fp16_round(mm)
        byte = (ls.to(torch.int32) & 0xFF) | ((lm.to(torch.int32) << 4) & 0xFF)
        sc, m = byte & 15, byte >> 4
        # requantize with the stored values; sub-blocks with a zero scale keep the search's codes
        dl = (d[:, None] * sc.float())[..., None]
        ml = (dmin[:, None] * m.float())[..., None]
        q = _rint((X + ml) / _safe(dl)).clamp_(0, 3)
        codes = torch.where(dl != 0, q, L.reshape(B, NSUB, SUB))
        raw = {"d": d.to(torch.float16), "dmin": dmin.to(torch.float16),
               "sc": sc.to(torch.uint8), "m": m.to(torch.uint8)}
        return raw, codes.reshape(B, QK_K)

    def _better(self, X, I):
        B = X.shape[0]
        W = torch.ones_like(X) if I is None else I
        x, w = X.reshape(-1, SUB), W.reshape(-1, SUB)
        s, mn, lbar = _affine_sub_exact(x, w)
        S, M, LB = s.reshape(B, NSUB), (-mn).reshape(B, NSUB), lbar.reshape(B, NSUB)
        d, dmin, sc, m = _affine_super(X, W, S, M, LB)
        return {"d": d.to(torch.float16), "dmin": dmin.to(torch.float16),
                "sc": sc.to(torch.uint8), "m": m.to(torch.uint8)}

    def _native(self, w, imp):
        return kquant_native.encode_q2(w, imp, [(15 * fd, 15 * fm) for fd, fm in _Q2_STARTS], _Q2_REFITS)

    def _pack_blocks(self, codes, raw):
        scales = (raw["sc"].to(torch.int32) | (raw["m"].to(torch.int32) << 4)).to(torch.uint8)
        qs = _pack2(codes).to(torch.uint8)
        return torch.cat([scales, qs, _f16_bytes(raw["d"]), _f16_bytes(raw["dmin"])], dim=1)

    def _unpack_blocks(self, data):
        scales = data[:, :16].to(torch.int32)
        codes = _unpack2(data[:, 16:80])
        d, dmin = _bytes_f16(data[:, 80:82]), _bytes_f16(data[:, 82:84])
        return codes, {"d": d, "dmin": dmin, "sc": (scales & 15).to(torch.uint8), "m": (scales >> 4).to(torch.uint8)}


def _pack_q3_scales(l: torch.Tensor) -> torch.Tensor:
    """16 six-bit values (B, 16) -> 12 bytes (B, 12)."""
    l = l.to(torch.int32)
    low = l & 15
    first = low[:, :8] | (low[:, 8:] << 4)
    hi = (l >> 4) & 3  # (B, 16), s = 4g + t
    hi = hi.reshape(-1, 4, 4)  # [g, t]
    second = hi[:, 0] | (hi[:, 1] << 2) | (hi[:, 2] << 4) | (hi[:, 3] << 6)
    return torch.cat([first, second], dim=1).to(torch.uint8)


def _unpack_q3_scales(b: torch.Tensor) -> torch.Tensor:
    b = b.to(torch.int32)
    low = torch.cat([b[:, :8] & 15, b[:, :8] >> 4], dim=1)
    sh = torch.tensor([0, 2, 4, 6], dtype=torch.int32).reshape(1, 4, 1)
    hi = ((b[:, 8:12].reshape(-1, 1, 4) >> sh) & 3).reshape(-1, 16)
    return low | (hi << 4)


@dataclass(frozen=True, eq=False)
class Q3KCodec(_K16Codec):
    """Q3_K: value = d*(l-32)*(q-4), q in 0..7. Raw params: d (fp16 values, (rows, blocks)), l (uint8 0..63,
    (rows, cols/16), the stored 6-bit sub-scale: the multiplier is l - 32)."""

    _SUPER = (-32, 31, (-32.0, -31.5, -31.0, -30.0, -29.0, -33.0), 3)  # default encoder: sc range, d grid, refits

    def _decode(self, raw):
        d = raw["d"].float().repeat_interleave(NSUB, dim=1)
        scale = d * (raw["l"].float() - 32)
        return {"scale": scale, "offset": torch.zeros_like(scale)}

    def _blocks(self, X, I, faithful):
        if faithful:
            return self._faithful(X, I)
        W = torch.ones_like(X) if I is None else I
        s = _sym_sub_search(X.reshape(-1, SUB), W.reshape(-1, SUB), 4).reshape(-1, NSUB)
        d, sc = _sym_super(X, W, s, 4, *self._SUPER)
        return {"d": d.to(torch.float16), "l": (sc + 32).to(torch.uint8)}, None

    def _native(self, w, imp):
        out = kquant_native.encode_sym(w, imp, 4, _sym_grid(4), _SUB_REFINE, *self._SUPER)
        if out is None:
            return None
        d, sc, codes = out
        return {"d": d, "l": (sc.to(torch.int32) + 32).to(torch.uint8)}, codes

    def _faithful(self, X, I):
        B = X.shape[0]
        Xs = X.reshape(-1, SUB)
        if I is None:
            scales, L = _make_q3_quants(Xs, 4)
            scales = scales.reshape(B, NSUB)
            max_scale = _signed_absmax(scales)
            nz = max_scale != 0
            iscale = -32 / _safe(max_scale)
            l = (_rint(iscale[:, None] * scales).clamp_(-32, 31) + 32)
            l = torch.where(nz[:, None], l, torch.zeros_like(l))
            d = torch.where(nz, fp16_round(1 / iscale), torch.zeros_like(iscale))
        else:
            sigma2 = 2 * (X * X).sum((-1, -2)) / QK_K
            weight = I * torch.sqrt(sigma2[:, None, None] + X * X)
            sw = weight.sum(-1)
            scales, L = _make_qx_quants(Xs, 4, weight.reshape(-1, SUB))
            d_block, l = _make_qx_quants(scales.reshape(B, NSUB), 32, sw)
            d = fp16_round(d_block)
        dl = (d[:, None] * (l - 32))[..., None]
        q = _rint(X / _safe(dl)).clamp_(-4, 3) + 4
        codes = torch.where(dl != 0, q, L.reshape(B, NSUB, SUB))
        return {"d": d.to(torch.float16), "l": l.to(torch.uint8)}, codes.reshape(B, QK_K)

    def _pack_blocks(self, codes, raw):
        high = codes >> 2
        low = codes & 3
        h = high.reshape(-1, 8, 32)
        hmask = sum(h[:, k] << k for k in range(8))
        return torch.cat([hmask.to(torch.uint8), _pack2(low).to(torch.uint8), _pack_q3_scales(raw["l"]),
                          _f16_bytes(raw["d"])], dim=1)

    def _unpack_blocks(self, data):
        hm = data[:, :32].to(torch.int32).reshape(-1, 1, 32)
        high = ((hm >> torch.arange(8, dtype=torch.int32).reshape(1, 8, 1)) & 1).reshape(-1, QK_K)
        low = _unpack2(data[:, 32:96])
        l = _unpack_q3_scales(data[:, 96:108])
        d = _bytes_f16(data[:, 108:110])
        return low | (high << 2), {"d": d, "l": l.to(torch.uint8)}


@dataclass(frozen=True, eq=False)
class Q6KCodec(_K16Codec):
    """Q6_K: value = d*sc*(q-32), q in 0..63. Raw params: d (fp16 values, (rows, blocks)), sc (int8, (rows, cols/16))."""

    _SUPER = (-128, 127, (-128.0, -127.0, -126.0), 2)  # default encoder: sc range, d grid, refits

    def _decode(self, raw):
        d = raw["d"].float().repeat_interleave(NSUB, dim=1)
        scale = d * raw["sc"].float()
        return {"scale": scale, "offset": torch.zeros_like(scale)}

    def _blocks(self, X, I, faithful):
        if faithful:
            return self._faithful(X, I)
        W = torch.ones_like(X) if I is None else I
        s = _sym_sub_search(X.reshape(-1, SUB), W.reshape(-1, SUB), 32).reshape(-1, NSUB)
        d, sc = _sym_super(X, W, s, 32, *self._SUPER)
        return {"d": d.to(torch.float16), "sc": sc.to(torch.int8)}, None

    def _native(self, w, imp):
        out = kquant_native.encode_sym(w, imp, 32, _sym_grid(32), _SUB_REFINE, *self._SUPER)
        if out is None:
            return None
        d, sc, codes = out
        return {"d": d, "sc": sc}, codes

    def _faithful(self, X, I):
        B = X.shape[0]
        Xs = X.reshape(-1, SUB)
        scales, L = _make_qx_quants(Xs, 32, None if I is None else I.reshape(-1, SUB))
        scales = scales.reshape(B, NSUB)
        max_scale = _signed_absmax(scales)
        zero = max_scale.abs() < GROUP_MAX_EPS
        iscale = -128 / torch.where(zero, torch.ones_like(max_scale), max_scale)
        d = torch.where(zero, torch.zeros_like(iscale), fp16_round(1 / iscale))
        sc = _rint(iscale[:, None] * scales).clamp_(max=127)
        sc = torch.where(zero[:, None], torch.zeros_like(sc), sc)
        dl = (d[:, None] * sc)[..., None]
        q = _rint(X / _safe(dl)).clamp_(-32, 31) + 32
        codes = torch.where(dl != 0, q, L.reshape(B, NSUB, SUB))
        codes = torch.where(zero[:, None, None], torch.zeros_like(codes), codes)
        return {"d": d.to(torch.float16), "sc": sc.to(torch.int8)}, codes.reshape(B, QK_K)

    def _pack_blocks(self, codes, raw):
        c = codes.reshape(-1, 2, 4, 32)
        low, high = c & 15, c >> 4
        ql = torch.cat([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], dim=2)  # (B,2,64)
        qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)  # (B,2,32)
        scales = raw["sc"].to(torch.int8).contiguous().view(torch.uint8)
        return torch.cat([ql.reshape(-1, 128).to(torch.uint8), qh.reshape(-1, 64).to(torch.uint8), scales,
                          _f16_bytes(raw["d"])], dim=1)

    def _unpack_blocks(self, data):
        ql = data[:, :128].to(torch.int32).reshape(-1, 2, 2, 32)  # [n, half, l]
        qh = data[:, 128:192].to(torch.int32).reshape(-1, 2, 1, 32)
        # j = 0..3: ql half j&1, nibble j>>1
        low = torch.stack([ql[:, :, 0] & 15, ql[:, :, 1] & 15, ql[:, :, 0] >> 4, ql[:, :, 1] >> 4], dim=2)
        high = (qh >> torch.tensor([0, 2, 4, 6], dtype=torch.int32).reshape(1, 1, 4, 1)) & 3
        codes = (low | (high << 4)).reshape(-1, QK_K)
        sc = data[:, 192:208].contiguous().view(torch.int8)
        d = _bytes_f16(data[:, 208:210])
        return codes, {"d": d, "sc": sc}


def _make(cls, name: str, levels) -> GGUFCodec:
    gid, bs, ts = _ggml(name.upper())
    return register(cls(name=name, ggml_type=gid, block_size=bs, type_size=ts, sub_block=SUB, levels=tuple(levels)))


Q2_K = _make(Q2KCodec, "q2_k", range(4))
Q3_K = _make(Q3KCodec, "q3_k", range(-4, 4))
Q6_K = _make(Q6KCodec, "q6_k", range(-32, 32))

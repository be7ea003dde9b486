"""GPTQ: quantize column by column, pushing each column's rounding error onto the columns not yet
quantized through the inverse Hessian of the layer's inputs (Frantar et al., 2022).

Blocked "lazy batch" form: inside a block of columns the updates are applied one column at a time to the
block only; the block's accumulated error is pushed to the remaining columns with one matmul. The inverse
Hessian enters through the upper Cholesky factor of H⁻¹, after damping H by `damp` x mean(diag H).

Quantization goes through the codec it is given (the narrow seam of the reference code): the codec fits
the group parameters and rounds single columns, so the same loop serves every grid the codec implements.
Groups: without act-order, a group's parameters are fitted when the sweep reaches its first column, on the
already-updated weights (as the reference does). Act-order visits the columns by decreasing diag H
(``perm``) in one of two modes:

* ``act_order=True`` (static groups): groups keep their natural columns and are fitted on the original
  weights before the sweep, so the column -> group map stays the natural one and no g_idx is needed on disk.
* ``act_order="dynamic"`` (GPTQModel/AutoGPTQ ``desc_act=True, static_groups=False``): groups run along the
  *visiting* order: group k is columns ``perm[k*gw:(k+1)*gw]``, fitted when the sweep reaches its first
  column, on the already-updated weights, like the groups without act-order. The QTensor then carries
  ``g_idx`` (int32 [in]): ``g_idx[j] = (position of column j in perm) // gw``, the group of input column j
  (``scale[:, g_idx]`` is column j's scale). It is left out when it equals ``j // gw`` (one group, or a perm
  that keeps every group's columns together in order), so such results are written like natural ones.

Scale refit (on by default; qtool's addition to the reference algorithm). GPTQ fixes each group's scale
before it picks the codes, so once the codes are known the scales are no longer the best ones for them.
With the codes q and zero points z fixed, the layer's output error

    E(s) = tr((W − Ŵ) H (W − Ŵ)ᵀ),   Ŵ[r, group g] = s[r, g] · (q − z)[r, group g]

is quadratic in the scales of each row, so the best scales solve one small linear system per row
(n_groups × n_groups, blocks ``d_gᵀ H_gh d_h`` of H); a row keeps its old scales unless the new ones,
rounded to the stored dtype, are positive and strictly lower its error. It never increases E, costs about
``out · in²`` multiply-adds (a fraction of collecting H), and on SmolLM2 lowers the output error of every
layer (see bench/results). Codecs without affine ``scale``/``zero`` params skip it. With a g_idx the refit
runs on the columns in visiting order (where each group is contiguous), with H permuted alike: E is the same.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from qtool.formats.base import QTensor

NEEDS: tuple[str, ...] = ("hessian",)
SEQUENTIAL = True  # statistics are collected per linear group on the partly quantized block


@dataclass(frozen=True)
class GPTQParams:
    damp: float = 0.01  # fraction of mean(diag H) added to the diagonal
    block_size: int = 128  # columns per lazy batch (raised to a multiple of the group size)
    act_order: bool | str = False  # visit columns by decreasing diag(H): True with static groups, "dynamic"
    #                                  with groups along that order and a g_idx (see the module doc)
    static_groups: bool = False  # fit all group parameters on the original weights before the sweep
    refit_scales: bool = True  # after the sweep, re-solve each row's group scales for its codes (see module doc)

    def __post_init__(self):
        if not (isinstance(self.act_order, bool) or self.act_order == "dynamic"):
            raise ValueError(f"act_order must be False, True or 'dynamic', got {self.act_order!r}")
        if self.act_order == "dynamic" and self.static_groups:
            raise ValueError("act_order='dynamic' forms groups along the act-order: it contradicts static_groups")


@dataclass(frozen=True)
class GPTQReport:
    damp_used: float  # the damping that made H positive definite (raised from `damp` if needed)
    dead_columns: int  # input channels never active in calibration (zeroed)
    requested_damp: float = 0.0
    refit_gain: float = 1.0  # output error before / after the scale refit (1.0: no change)

    @property
    def note(self) -> str:
        parts = []
        if self.damp_used > self.requested_damp:
            parts.append(f"Hessian not positive definite: damping raised {self.requested_damp:g} -> {self.damp_used:g}")
        if self.dead_columns:
            parts.append(f"{self.dead_columns} input channels never active in calibration")
        return "; ".join(parts)


def params_of(spec) -> GPTQParams:
    """GPTQ parameters of a resolved plan rule (`plan.LayerSpec`)."""
    r = spec.rule
    return GPTQParams(damp=r.damp, act_order=r.act_order, static_groups=r.static_groups)


def inverse_hessian_factor(h: torch.Tensor, damp: float, tries: int = 6) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor U of (H + λI)⁻¹ (so H⁻¹ = Uᵀ U), λ = damp x mean(diag H).

    When H + λI is not positive definite the damping is multiplied by 10 and the factorisation retried;
    the damping that worked is returned. Raises ValueError after `tries` failures (never returns NaN).
    """
    h = h.double()
    mean_diag = h.diagonal().mean().clamp_min(1e-12)
    for _ in range(tries):  # one n x n float64 temporary at a time besides `h` (a 1536-wide H: 19 MB each)
        hd = h.clone()
        hd.diagonal().add_(damp * mean_diag)
        chol, info = torch.linalg.cholesky_ex(hd)
        del hd
        if info.item() == 0:
            hinv = torch.cholesky_inverse(chol)
            del chol
            u, info = torch.linalg.cholesky_ex(hinv, upper=True)
            del hinv
            if info.item() == 0 and torch.isfinite(u).all():
                return u.float(), damp
        damp *= 10
    raise ValueError(f"Hessian is not positive definite even with damping {damp / 10:g}")


def quantize(w: torch.Tensor, codec, hessian: torch.Tensor, params: GPTQParams = GPTQParams()
             ) -> tuple[QTensor, GPTQReport]:
    """GPTQ-quantize `w` (out, in) given the input Hessian `hessian` (in, in) ∝ XᵀX, through `codec`.

    `codec` must offer `fit`, `group_width(in)`, `column_params(params, in)`, `quantize_columns` and
    `dequantize_columns` (see `formats/affine.py`).
    """
    if codec.grid_kind == "block":  # a GGUF block type: the sweep through its grid (methods/gptq_blocks.py)
        if not codec.levels:  # F16/BF16/F32: nothing to round onto
            return codec.encode(w), GPTQReport(damp_used=params.damp, dead_columns=0, requested_damp=params.damp)
        from qtool.methods import gptq_blocks

        return gptq_blocks.quantize(w, codec, hessian, params)
    W = w.float().clone()
    n_out, n = W.shape
    H = hessian.to(torch.float64, copy=True)
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    gw = codec.group_width(n)
    static = params.static_groups or params.act_order is True or gw == n
    importance = H.diagonal().float()  # E[x_j²]: a codec that searches its ranges weights errors by it
    fitted = codec.fit(W, importance) if static else None  # dynamic groups fill these as the sweep goes
    scale = fitted["scale"].clone() if static else None
    zero = fitted["zero"].clone() if static else None

    perm = torch.argsort(H.diagonal(), descending=True, stable=True) if params.act_order else None
    if perm is not None:
        W, H = W[:, perm], H[perm]
        H = H[:, perm]
        if not static:  # dynamic groups are fitted on swept columns: weigh them by their own importance
            importance = importance[perm]
    U, damp_used = inverse_hessian_factor(H, params.damp)
    del H
    block = max(params.block_size, gw) if gw < n else params.block_size
    block = -(-block // gw) * gw if gw < n else block
    codes = torch.empty(n_out, n, dtype=torch.int8)
    # group of the col-th visited column: its natural group (static groups), else its position's group
    col_group = ((perm if perm is not None and static else torch.arange(n)) // gw).tolist()
    u_diag = U.diagonal().tolist()  # python floats equal to the float32 values: the same divisions, no indexing

    sweep = _native_sweep(codec)
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        W1 = W[:, i1:i2].clone()
        E1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        groups = col_group[i1:i2]
        # column ranges of the batch with fixed group parameters: the whole batch (static groups), else each
        # group, fitted on the updated weights when the sweep reaches its first column
        for c0 in (range(0, i2 - i1, gw) if not static else (0,)):
            c1 = min(c0 + gw, i2 - i1) if not static else i2 - i1
            col = i1 + c0
            if not static:
                g_params = codec.fit(W1[:, c0:c0 + gw], importance[col:col + gw])
                if scale is None:
                    scale = torch.empty(n_out, n // gw, dtype=g_params["scale"].dtype)
                    zero = torch.empty(n_out, n // gw, dtype=g_params["zero"].dtype)
                scale[:, col // gw], zero[:, col // gw] = g_params["scale"][:, 0], g_params["zero"][:, 0]
            if sweep is not None:
                sweep(W1, U1, c0, c1, groups, scale, zero, E1, codes[:, i1:i2])
            else:
                _sweep_torch(W1, U1, c0, c1, groups, scale, zero, E1, codes[:, i1:i2], u_diag[i1:i2], codec)
        W[:, i2:] -= E1 @ U[i1:i2, i2:]

    g_idx = None
    if perm is not None:
        inv = torch.argsort(perm)
        swept, codes = codes, codes[:, inv]
        if not static:
            g_idx = (inv // gw).to(torch.int32)
            if torch.equal(g_idx, (torch.arange(n) // gw).to(torch.int32)):
                g_idx = None  # every group's columns are its natural ones: nothing to map
    gain = 1.0
    if params.refit_scales and getattr(codec, "float_zero", True) is False:
        w0 = w.float().masked_fill(dead[None, :], 0.0)
        if g_idx is None:
            scale, gain = refit_scales(w0, codes, scale, zero, hessian, gw, codec.dequantize_columns)
        else:  # groups are contiguous in visiting order: refit there (E is invariant under the permutation)
            scale, gain = refit_scales(w0[:, perm], swept, scale, zero, hessian[perm][:, perm], gw,
                                       codec.dequantize_columns)
    qparams = {"scale": scale, "zero": zero} | ({"g_idx": g_idx} if g_idx is not None else {})
    qt = QTensor(codec=codec, shape=(n_out, n), codes=codes, params=qparams)
    return qt, GPTQReport(damp_used=damp_used, dead_columns=int(dead.sum()), requested_damp=params.damp,
                          refit_gain=gain)


def _sweep_torch(W1, U1, c0, c1, groups, scale, zero, E1, codes, u_diag, codec) -> None:
    """GPTQ's error feedback over columns c0..c1 of one lazy batch, in place (the native kernel's twin).

    W1 [out, b] the batch's (updated) weights, U1 [b, b] its block of U, `groups[i]` the group of batch
    column i, E1 [out, b] receives the scaled errors and `codes` [out, b] the codes of columns c0..c1."""
    for i in range(c0, c1):
        g = groups[i]
        sc, zc = scale[:, g:g + 1], zero[:, g:g + 1]
        x = W1[:, i:i + 1]
        q = codec.quantize_columns(x, sc, zc)
        err = (x - codec.dequantize_columns(q, sc, zc)).div_(u_diag[i])
        W1[:, i:].sub_(err * U1[i:i + 1, i:])  # rank-1 update: the same products as err @ U1[i, i:], ~4x faster
        E1[:, i:i + 1] = err
        codes[:, i:i + 1] = q


_SDT = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _grid(codec):
    """The codec's integer column grid (`AffineCodec.column_grid`), None when it has none."""
    if codec.grid_kind == "block":  # GGUF block types sweep in torch (methods/gptq_blocks.py)
        return None
    return getattr(codec, "column_grid", lambda: None)()


def _native_sweep(codec):
    """The native sweep (`kernels/cpu/gptq_sweep.cpp`) for `codec`'s grid, or None: the codec has no integer
    column grid (`column_grid`), or the kernel cannot be built (`runtime/native.py`). Same results bit for bit."""
    grid = _grid(codec)
    if grid is None or grid[2] not in _SDT:
        return None
    from qtool.runtime import native

    lib = native.load("gptq_sweep")
    if lib is None:
        return None
    qmin, qmax, sdt = grid
    fn = lib.qtool_gptq_sweep
    fn.restype = ctypes.c_int
    threads = torch.get_num_threads()
    p = ctypes.c_void_p
    i64 = ctypes.c_int64

    def sweep(W1, U1, c0, c1, groups, scale, zero, E1, codes) -> None:
        idx = torch.tensor(groups[c0:c1])
        s = torch.zeros(W1.shape, dtype=torch.float32)
        z = torch.zeros(W1.shape, dtype=torch.float32)
        s[:, c0:c1], z[:, c0:c1] = scale[:, idx].float(), zero[:, idx].float()
        U1 = U1.contiguous()  # cholesky's factor may be column-major
        ud = U1.diagonal().contiguous()
        for t in (W1, E1, s, z):
            assert t.is_contiguous() and t.dtype == torch.float32
        assert codes.stride(1) == 1 and codes.dtype == torch.int8
        rc = fn(p(W1.data_ptr()), i64(W1.stride(0)), p(U1.data_ptr()), i64(U1.stride(0)), p(s.data_ptr()),
                p(z.data_ptr()), i64(s.stride(0)), p(ud.data_ptr()), p(E1.data_ptr()), i64(E1.stride(0)),
                p(codes.data_ptr()), i64(codes.stride(0)), i64(W1.shape[0]), i64(W1.shape[1]), i64(c0), i64(c1),
                ctypes.c_int(qmin), ctypes.c_int(qmax), ctypes.c_int(_SDT[sdt]), ctypes.c_int(threads))
        if rc != 0:
            raise RuntimeError(f"gptq_sweep kernel rejected its arguments (rc {rc})")

    return sweep


def native_unavailable(codec) -> str:
    """The manifest warning when GPTQ with `codec` runs the torch twin although the codec has an integer grid
    ('' otherwise)."""
    if _grid(codec) is None or _native_sweep(codec) is not None:
        return ""
    from qtool.runtime import native

    return f"native GPTQ sweep unavailable ({native.why('gptq_sweep')}): its torch twin ran (same results, slower)"


def refit_scales(w: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                 h: torch.Tensor, gw: int, dequantize_columns) -> tuple[torch.Tensor, float]:
    """Best group scales for fixed codes under E(s) = tr((W − Ŵ) H (W − Ŵ)ᵀ) (module doc), per row.

    Returns (scales in `scale.dtype`, E(old) / E(new) summed over rows). `dequantize_columns(q, s, z)` is
    the codec's decoder, used to evaluate both candidates exactly as a loader reconstructs them.
    """
    n_out, n = w.shape
    G = n // gw
    H = h.double()
    d = (codes.double() - zero.double().repeat_interleave(gw, dim=1))  # Ŵ = s ⊙ d (per group)
    dg = d.view(n_out, G, gw)
    A = torch.empty(n_out, G, G, dtype=torch.float64)
    for g in range(G):  # A[r, g, :] = d_g H_g,: then summed per group h against d_h
        t = dg[:, g, :] @ H[g * gw:(g + 1) * gw, :]
        A[:, g, :] = (t.view(n_out, G, gw) * dg).sum(-1)
    b = ((w.double() @ H).view(n_out, G, gw) * dg).sum(-1)
    s_old = scale.double()
    ridge = 1e-9 * A.diagonal(dim1=1, dim2=2).mean(-1).clamp_min(1e-30)[:, None, None]
    eye = torch.eye(G, dtype=torch.float64)
    s_new = torch.linalg.solve(A + ridge * eye, (b + ridge[:, :, 0] * s_old).unsqueeze(-1)).squeeze(-1)
    s_new = s_new.to(scale.dtype)

    def err(s):  # E per row, from the decoded weights (what a loader computes)
        wq = dequantize_columns(codes, s.repeat_interleave(gw, dim=1), zero.repeat_interleave(gw, dim=1))
        e = (w - wq).double()
        return ((e @ H) * e).sum(-1)

    ok = torch.isfinite(s_new).all(-1) & (s_new > 0).all(-1)
    s_new = torch.where(ok[:, None], s_new, scale)
    e_old, e_new = err(scale), err(s_new)
    better = e_new < e_old
    out = torch.where(better[:, None], s_new, scale)
    e_final = torch.where(better, e_new, e_old)
    return out, float(e_old.sum() / e_final.sum().clamp_min(1e-300))

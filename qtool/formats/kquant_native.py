"""ctypes binding of the native k-quant default encoders (`kernels/cpu/gguf_kquants.cpp`).

The default (``faithful=False``) encoders of Q4_K / Q5_K (formats/gguf_k4.py) and Q6_K / Q3_K / Q2_K
(formats/gguf_k16.py) run there when `runtime.native` can build the kernel: the same algorithms as their
torch twins (which stay as the fallback), one call per tensor, super-blocks split over
``torch.get_num_threads()`` threads (results do not depend on the count). The search grids are passed in from
the codec modules, so they have one definition. `native_unavailable` says why the twin ran (for the engine's
warnings); `why()` is the loader's reason ('' when the kernel loaded).
"""

from __future__ import annotations

import ctypes

import torch

from qtool.runtime import native

NAME = "gguf_kquants"
QK_K = 256

_p = ctypes.c_void_p
_i64 = ctypes.c_int64
_int = ctypes.c_int


def _lib() -> ctypes.CDLL | None:
    lib = native.load(NAME)
    if lib is None:
        return None
    if not getattr(lib, "_qtool_typed", False):
        lib.qtool_k4_encode.restype = _int
        lib.qtool_k4_encode.argtypes = [_p, _i64, _i64, _p, _int, _p, _int, _int, _p, _int, _p, _int, _p, _int,
                                        _int, _p, _p, _p, _p, _p]
        lib.qtool_q2_encode.restype = _int
        lib.qtool_q2_encode.argtypes = [_p, _i64, _i64, _p, _p, _int, _int, _int, _p, _p, _p, _p, _p]
        lib.qtool_sym_encode.restype = _int
        lib.qtool_sym_encode.argtypes = [_p, _i64, _i64, _p, _int, _p, _int, _int, _int, _int, _p, _int, _int,
                                         _int, _p, _p, _p]
        lib._qtool_typed = True
    return lib


def available() -> bool:
    return _lib() is not None


def why() -> str:
    """`native.why` of the kernel after trying to load it: '' when it loaded (the loader keeps an old reason)."""
    return "" if _lib() is not None else native.why(NAME)


def native_unavailable() -> str:
    """The warning when the k-quant encoders run their torch twins ('' when the native kernel is used)."""
    reason = why()
    if not reason:
        return ""
    return f"native k-quant encoders unavailable ({reason}): their torch twins ran (same quality, much slower)"


def _ptr(t: torch.Tensor | None):
    return None if t is None else _p(t.data_ptr())


def _prep(w: torch.Tensor, importance: torch.Tensor | None):
    """float32 contiguous CPU copies, or None when the importance holds NaN/Inf (the twin then decides; the
    kernels check the weight themselves)."""
    w = w.detach().float().cpu().contiguous()
    if w.dim() != 2 or w.shape[1] % QK_K:
        return None
    imp = None
    if importance is not None:
        imp = importance.detach().float().cpu().reshape(-1).contiguous()
        if imp.numel() != w.shape[1] or not bool(torch.isfinite(imp).all()):
            return None
    return w, imp


def _f32(vals) -> torch.Tensor:
    return torch.tensor([float(v) for v in vals], dtype=torch.float32)


def encode_k4(w: torch.Tensor, importance: torch.Tensor | None, nmax: int, ks, refine: int, shifts, schedule,
              pairs, threads: int | None = None) -> dict[str, torch.Tensor] | None:
    """Q4_K (nmax 15) / Q5_K (31) default-encoder fields of a (rows, cols) weight: d, dmin (float16,
    (rows, cols/256)), sc, m (uint8, (rows, cols/32)), codes (uint8, (rows, cols)); None without the kernel."""
    lib = _lib()
    prep = None if lib is None else _prep(w, importance)
    if prep is None:
        return None
    w, imp = prep
    rows, cols = w.shape
    nb = cols // QK_K
    n = rows * nb
    kf = _f32([nmax + k for k in ks])  # float(nmax + k) rounded to float32, as the twin's scalar product
    sh = _f32(shifts)
    sched = torch.tensor(list(schedule), dtype=torch.int32)
    pr = torch.tensor([list(p) for p in pairs], dtype=torch.int32).reshape(-1).contiguous()
    d = torch.empty(n, dtype=torch.int16)
    dmin = torch.empty(n, dtype=torch.int16)
    sc = torch.empty(n * 8, dtype=torch.uint8)
    m = torch.empty(n * 8, dtype=torch.uint8)
    codes = torch.empty(rows, cols, dtype=torch.uint8)
    threads = torch.get_num_threads() if threads is None else threads
    rc = lib.qtool_k4_encode(_ptr(w), n, nb, _ptr(imp), nmax, _ptr(kf), len(kf), refine, _ptr(sh), len(sh),
                             _ptr(sched), len(sched), _ptr(pr), len(pairs), threads, _ptr(d), _ptr(dmin), _ptr(sc),
                             _ptr(m), _ptr(codes))
    if rc == 3:  # NaN/Inf in the weight: the twin's behaviour is the reference
        return None
    if rc != 0:
        raise RuntimeError(f"{NAME}: qtool_k4_encode rejected its arguments (rc {rc})")
    return {"d": d.view(torch.float16).reshape(rows, nb), "dmin": dmin.view(torch.float16).reshape(rows, nb),
            "sc": sc.reshape(rows, nb * 8), "m": m.reshape(rows, nb * 8), "codes": codes}


def encode_sym(w: torch.Tensor, importance: torch.Tensor | None, nq: int, grid, sub_refine: int, sc_lo: int,
               sc_hi: int, d_grid, refits: int, threads: int | None = None):
    """Q6_K / Q3_K default-encoder fields of a finite (rows, cols) weight (the codec checks): (d float16
    (rows, cols/256), signed integer sub-scales int8 (rows, cols/16), codes uint8 (rows, cols) = level + nq);
    None without the kernel."""
    lib = _lib()
    prep = None if lib is None else _prep(w, importance)
    if prep is None:
        return None
    w, imp = prep
    rows, cols = w.shape
    nb = cols // QK_K
    n = rows * nb
    g = _f32(grid)
    dg = _f32(d_grid)
    d = torch.empty(n, dtype=torch.int16)
    sc = torch.empty(n * 16, dtype=torch.int8)
    codes = torch.empty(rows, cols, dtype=torch.uint8)
    threads = torch.get_num_threads() if threads is None else threads
    rc = lib.qtool_sym_encode(_ptr(w), n, nb, _ptr(imp), nq, _ptr(g), len(g), sub_refine, sc_lo, sc_hi, _ptr(dg),
                              len(dg), refits, threads, _ptr(d), _ptr(sc), _ptr(codes))
    if rc != 0:
        raise RuntimeError(f"{NAME}: qtool_sym_encode rejected its arguments (rc {rc})")
    return d.view(torch.float16).reshape(rows, nb), sc.reshape(rows, nb * 16), codes


def encode_q2(w: torch.Tensor, importance: torch.Tensor | None, starts, refits: int, threads: int | None = None):
    """Q2_K default-encoder fields of a finite (rows, cols) weight (the codec checks): d, dmin (float16,
    (rows, cols/256)), sc, m (uint8 0..15, (rows, cols/16)), codes (uint8 (rows, cols)); None without the kernel.
    `starts`: the (d, dmin) divisors of max S / max M tried first (`_affine_super`), `refits` its LS rounds."""
    lib = _lib()
    prep = None if lib is None else _prep(w, importance)
    if prep is None:
        return None
    w, imp = prep
    rows, cols = w.shape
    nb = cols // QK_K
    n = rows * nb
    init = _f32([v for pair in starts for v in pair])
    d = torch.empty(n, dtype=torch.int16)
    dmin = torch.empty(n, dtype=torch.int16)
    sc = torch.empty(n * 16, dtype=torch.uint8)
    m = torch.empty(n * 16, dtype=torch.uint8)
    codes = torch.empty(rows, cols, dtype=torch.uint8)
    threads = torch.get_num_threads() if threads is None else threads
    rc = lib.qtool_q2_encode(_ptr(w), n, nb, _ptr(imp), _ptr(init), len(starts), refits, threads, _ptr(d),
                             _ptr(dmin), _ptr(sc), _ptr(m), _ptr(codes))
    if rc != 0:
        raise RuntimeError(f"{NAME}: qtool_q2_encode rejected its arguments (rc {rc})")
    return {"d": d.view(torch.float16).reshape(rows, nb), "dmin": dmin.view(torch.float16).reshape(rows, nb),
            "sc": sc.reshape(rows, nb * 16), "m": m.reshape(rows, nb * 16)}, codes

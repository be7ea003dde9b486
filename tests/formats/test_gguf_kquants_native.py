"""The native k-quant default encoders (kernels/cpu/gguf_kquants.cpp) against their torch twins.

The kernel runs the twins' algorithms with the same float32 operations and torch's summation order, so on this
machine it mostly reproduces them bit for bit; where it cannot (torch's own sqrt is not always correctly
rounded, which moves Q4_K/Q5_K's importance weights by an ulp now and then) a near-tie may resolve the other
way. What is required: per super-block objective no worse than the twin's (1e-4 relative slack) on >= 99.5% of
super-blocks, totals within 0.1%, codes = nearest levels under `fit`'s params, the bytes decode as gguf-py
decodes them, and results independent of the thread count and of the run.
"""

from __future__ import annotations

import ctypes

import gguf
import numpy as np
import pytest
import torch

from qtool.formats import gguf_k4, gguf_k16, kquant_native
from qtool.formats.gguf_base import gguf_codec
from qtool.runtime import native

NATIVE = ("q4_k", "q5_k", "q6_k", "q3_k", "q2_k")
GGML = {n: gguf.GGMLQuantizationType[n.upper()] for n in NATIVE}


@pytest.fixture(scope="module")
def lib():
    lib = native.load(kquant_native.NAME)
    if lib is None:
        pytest.skip(f"native {kquant_native.NAME} unavailable: {native.why(kquant_native.NAME)}")
    return lib


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def twin(monkeypatch, fn):
    """`fn()` with the native kernel disabled (the torch twins run)."""
    with monkeypatch.context() as m:
        m.setenv("QTOOL_NATIVE", "0")
        native.load.cache_clear()
        try:
            return fn()
        finally:
            native.load.cache_clear()


def student_t(shape, df: int, g: torch.Generator) -> torch.Tensor:
    z = torch.randn(shape, generator=g)
    chi2 = (torch.randn((df, *shape), generator=g) ** 2).sum(0)
    return z / torch.sqrt(chi2 / df)


def degenerate(seed: int = 0) -> torch.Tensor:
    """8 x 1024: one odd super-block per row next to normal ones."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(8, 1024, generator=g) * 0.05
    w[0, :256] = 0  # all zero
    w[0, 256:512] = 0.02  # constant, both signs
    w[0, 512:768] = -0.03
    w[1, 5] = 40.0  # a single outlier
    w[1, 300] = -40.0
    w[2, :256] = torch.randn(256, generator=g) * 1e-8  # tiny: fp16 d underflows
    w[2, 256:512] = 1e-8
    w[3, :256] = torch.randn(256, generator=g).clamp(-1, 1) * 65000.0  # near fp16 max
    w[3, 256:512] = 65504.0
    w[3, 512:768] = torch.randn(256, generator=g) * 1e9  # far beyond: d saturates
    w[4, :32] = 0  # zero / constant sub-blocks inside normal blocks
    w[4, 256:288] = 0.5
    w[5, :256] = -w[5, :256].abs()  # one-signed blocks
    w[5, 256:512] = w[5, 256:512].abs()
    w[6, -256:] = 0
    w[6, -256::37] = torch.randn(7, generator=g)  # sparse
    w[7] = student_t((1024,), 2, g) * 0.02
    return w


def data(kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    if kind == "gauss16x256":
        return torch.randn(16, 256, generator=g) * 0.02
    if kind == "gauss8x1024":
        return torch.randn(8, 1024, generator=g) * 0.02
    if kind == "student8x1024":
        return student_t((8, 1024), 3, g) * 0.02
    if kind == "mixed128x1024":
        w = torch.randn(128, 1024, generator=g) * 0.02
        w[::2] = student_t((64, 1024), 4, g) * 0.02
        return w
    return degenerate()


def importance(cols: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    imp = torch.exp(torch.randn(cols, generator=g) * 1.5) * 1e-2
    imp[3:40:7] = 0  # columns no token ever activated
    return imp


def objective(name: str, w: torch.Tensor, q, imp: torch.Tensor | None) -> torch.Tensor:
    """Per super-block objective of the file's default encoder (float64): gguf_k4's ω·err² (`weighted_error`
    split per super-block), gguf_k16's importance[col]·err²."""
    c = gguf_codec(name)
    rows, cols = w.shape
    r = (w.float() - c.dequantize(q)).double()
    if name in ("q4_k", "q5_k"):
        x = w.float().reshape(-1, 8, 32)
        if imp is None:
            om = torch.ones_like(x, dtype=torch.float64)
        else:
            om = gguf_k4._imatrix_weights(x, imp.float().reshape(1, -1).expand(rows, cols).reshape(-1, 8, 32)).double()
        return (om.reshape(-1, 256) * r.reshape(-1, 256) ** 2).sum(1)
    W = torch.ones(cols) if imp is None else imp
    return (W.double().reshape(1, -1) * r * r).reshape(-1, 256).sum(1)


def check_valid(c, w: torch.Tensor, imp, q) -> None:
    """codes = nearest levels under fit's params; bytes decode (gguf-py) to exactly `dequantize`."""
    params = c.fit(w, imp)
    for k, v in q.params.items():
        assert torch.equal(params[k], v), k
    assert torch.equal(c.quantize(w, params), q.codes)
    packed = c.pack(q)
    ref = gguf.quants.dequantize(packed.numpy(), GGML[c.name])
    deq = c.dequantize(q)
    assert np.array_equal(ref, deq.numpy())
    assert torch.isfinite(deq).all()


KINDS = ("gauss16x256", "gauss8x1024", "student8x1024", "mixed128x1024", "degenerate")


@pytest.mark.parametrize("name", NATIVE)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("with_imp", [False, True])
def test_native_matches_twin(lib, monkeypatch, name, kind, with_imp):
    c = gguf_codec(name)
    w = data(kind)
    imp = importance(w.shape[1]) if with_imp else None
    qn = c.encode(w, imp)
    qt = twin(monkeypatch, lambda: c.encode(w, imp))
    check_valid(c, w, imp, qn)
    en, et = objective(name, w, qn, imp), objective(name, w, qt, imp)
    ok = en <= et * (1 + 1e-4) + 1e-12
    assert float(ok.double().mean()) >= 0.995, (int((~ok).sum()), ok.numel(), float((en / et).max()))
    assert float(en.sum()) <= float(et.sum()) * 1.001 + 1e-12
    assert float(en.sum()) >= float(et.sum()) * 0.999 - 1e-12


def _encode(name, w, imp, threads):
    """The kernel's raw outputs for `w` (fields and codes), with `threads` workers."""
    if name in ("q4_k", "q5_k"):
        nmax, ks, sh, sched = ((15, gguf_k4._KS_Q4, gguf_k4._SHIFTS_Q4, gguf_k4._SCHEDULE_Q4) if name == "q4_k" else
                               (31, gguf_k4._KS_Q5, gguf_k4._SHIFTS_Q5, gguf_k4._SCHEDULE_Q5))
        f = kquant_native.encode_k4(w, imp, nmax, ks, gguf_k4._REFINE, sh, sched, gguf_k4._PAIRS, threads=threads)
        return [f[k] for k in ("d", "dmin", "sc", "m", "codes")]
    if name == "q2_k":
        starts = [(15 * fd, 15 * fm) for fd, fm in gguf_k16._Q2_STARTS]
        f, codes = kquant_native.encode_q2(w, imp, starts, gguf_k16._Q2_REFITS, threads=threads)
        return [f[k] for k in ("d", "dmin", "sc", "m")] + [codes]
    nq = 32 if name == "q6_k" else 4
    sup = (gguf_k16.Q6KCodec if name == "q6_k" else gguf_k16.Q3KCodec)._SUPER
    return list(kquant_native.encode_sym(w, imp, nq, gguf_k16._sym_grid(nq), gguf_k16._SUB_REFINE, *sup,
                                         threads=threads))


@pytest.mark.parametrize("name", NATIVE)
@pytest.mark.parametrize("with_imp", [False, True])
def test_bit_identical_across_threads_and_runs(lib, name, with_imp):
    w = data("mixed128x1024")[:40]  # 160 super-blocks: uneven split over the workers
    w[3] = degenerate()[3]
    imp = importance(w.shape[1]) if with_imp else None
    ref = _encode(name, w, imp, 1)
    for threads in (2, 3, 1, 2):
        out = _encode(name, w, imp, threads)
        for a, b in zip(ref, out):
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    # and through the codec with torch's thread count
    c = gguf_codec(name)
    torch.set_num_threads(2)
    q2 = c.encode(w, imp)
    torch.set_num_threads(1)
    q1 = c.encode(w, imp)
    assert torch.equal(q1.codes, q2.codes)
    for k in q1.params:
        assert torch.equal(q1.params[k].contiguous().view(torch.uint8), q2.params[k].contiguous().view(torch.uint8)), k


def test_nonfinite_weight_runs_the_twin(lib, monkeypatch):
    """Q4_K/Q5_K accept NaN/Inf weights (the k16 types refuse them): the kernel hands those to the twin."""
    w = data("gauss8x1024")
    w[2, 7] = float("nan")
    w[5, 300] = float("inf")
    for name in ("q4_k", "q5_k"):
        c = gguf_codec(name)
        qn = c.encode(w)
        qt = twin(monkeypatch, lambda: c.encode(w))
        assert torch.equal(qn.codes, qt.codes)
        for k in qt.params:
            assert torch.equal(qn.params[k].view(torch.uint8), qt.params[k].view(torch.uint8)), k


@pytest.mark.parametrize("name", NATIVE)
def test_fallback_without_native(monkeypatch, name):
    c = gguf_codec(name)
    w = degenerate(3)
    imp = importance(w.shape[1])
    with monkeypatch.context() as m:
        m.setenv("QTOOL_NATIVE", "0")
        native.load.cache_clear()
        try:
            assert not kquant_native.available()
            assert "QTOOL_NATIVE=0" in kquant_native.why()
            assert "QTOOL_NATIVE=0" in kquant_native.native_unavailable()
            for i in (None, imp):
                check_valid(c, w, i, c.encode(w, i))
        finally:
            native.load.cache_clear()


def test_native_unavailable_empty_when_loaded(lib):
    assert kquant_native.available() and kquant_native.why() == "" and kquant_native.native_unavailable() == ""


def test_fp16_conversion_edge_cases(lib):
    special = [0.0, -0.0, 1.0, -1.0, 65504.0, -65504.0, 65519.0, 65519.996, 65520.0, -65520.0, 1e6, -1e30,
               float("inf"), float("-inf"), 2.0 ** -14, 2.0 ** -24, 2.0 ** -25, 3 * 2.0 ** -26, 2.0 ** -26,
               2.0 ** -25 + 2.0 ** -40, 1 + 2.0 ** -11, 1 + 3 * 2.0 ** -11, 2049.0, 2051.0, 6.1e-5, 5.96e-8,
               1e-8, -1e-8, 1e-45, 3.4e38]
    g = torch.Generator().manual_seed(0)
    bits = torch.randint(-2 ** 31, 2 ** 31 - 1, (20000,), generator=g, dtype=torch.int64).to(torch.int32)
    rand = bits.view(torch.float32)
    rand = rand[torch.isfinite(rand)]
    scaled = torch.randn(20000, generator=g) * torch.exp2(torch.randint(-30, 20, (20000,), generator=g).float())
    x = torch.cat([torch.tensor(special, dtype=torch.float32), rand, scaled]).contiguous()
    out = torch.empty(x.numel(), dtype=torch.int16)
    p = ctypes.c_void_p
    for sat in (0, 1):
        lib.qtool_kquant_to_f16(p(x.data_ptr()), ctypes.c_int64(x.numel()), ctypes.c_int(sat), p(out.data_ptr()))
        ref = gguf_k4._fp16_sat(x) if sat else x.to(torch.float16)
        got = out.view(torch.float16)
        same = (got.view(torch.int16) == ref.view(torch.int16)) | (torch.isnan(got) & torch.isnan(ref))
        assert bool(same.all()), x[~same][:8]
    h = torch.arange(-2 ** 15, 2 ** 15, dtype=torch.int32).to(torch.int16).contiguous()
    f = torch.empty(h.numel(), dtype=torch.float32)
    lib.qtool_kquant_from_f16(p(h.data_ptr()), ctypes.c_int64(h.numel()), p(f.data_ptr()))
    ref = h.view(torch.float16).float()
    assert bool(((f.view(torch.int32) == ref.view(torch.int32)) | (torch.isnan(f) & torch.isnan(ref))).all())

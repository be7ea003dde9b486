"""The native default encoder of the GGUF legacy types (kernels/cpu/gguf_legacy.cpp) against its torch twin.

The two are the same search but not bit-identical (the kernel's sums round differently, and it refines every
trial tied with the best within float32 rounding where the twin takes the first of the noisy maximum), so the
checks are: no block measurably worse than the twin's (all but a few in a thousand at most 1e-4 worse, the total no
more than 0.1% worse), valid output (codes the nearest levels under the stored d/m, bytes that gguf-py decodes
to the codec's values), the same bytes for every thread count, run and ISA build, the fp16 rounding exactly
torch's, and the torch twin still running (and valid) without the kernel.
"""

from __future__ import annotations

import ctypes
import math
from contextlib import contextmanager

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType

from qtool.formats import gguf_legacy
from qtool.formats.gguf_legacy import IQ4_NL, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, element_weights
from qtool.runtime import native

CODECS = {c.name: c for c in (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, IQ4_NL)}
TYPES = list(CODECS)


@pytest.fixture(autouse=True)
def _fresh_loader():
    """Every test starts and ends with the loader's cache empty (the fallback test flips QTOOL_NATIVE)."""
    native.load.cache_clear()
    yield
    native.load.cache_clear()


def lib():
    handle = native.load("gguf_legacy")
    if handle is None:
        pytest.skip(f"native gguf_legacy kernel unavailable: {native.why('gguf_legacy')}")
    return handle


@contextmanager
def twin(monkeypatch):
    """The torch twin: the kernel disabled for the duration."""
    with monkeypatch.context() as mp:
        mp.setenv("QTOOL_NATIVE", "0")
        native.load.cache_clear()
        yield
    native.load.cache_clear()


def student_t(df: float, shape, seed: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).standard_t(df, shape).astype(np.float32))


def degenerate(cols: int = 256, seed: int = 0) -> torch.Tensor:
    """Rows of the blocks that break encoders: zeros, constants, a huge outlier, tiny values, near fp16 max."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(12, cols, generator=g) * 0.05
    w[0] = 0.0                                                # all zeros (a whole row: sigma2 = 0 too)
    w[1, :32] = 0.37
    w[1, 32:64] = -2.5                                        # constant blocks, both signs
    w[2, 40] = 1e4                                            # one huge outlier
    w[3, :32] = 1e-8
    w[3, 32:64] = 1e-8 * torch.randn(32, generator=g)         # tiny values
    w[4] = 6e4 * torch.rand(cols, generator=g).sub(0.5) * 2   # near the fp16 max (65504)
    w[5, :32] = 65504.0
    w[5, 32:64] = -65000.0
    w[6, :32] = torch.linspace(-1, 1, 32)
    w[6, 7], w[6, 20] = -3.0, 3.0                             # +a and -a both the absmax
    w[7, :32] = (torch.arange(32) - 16) * 0.25                # exact half steps
    w[8, :64] = -w[8, :64].abs()                              # one-signed blocks
    w[9, :64] = w[9, :64].abs() + 3.0
    w[10] = student_t(1.0, (cols,), seed) * 0.01              # Cauchy tails
    w[11, 3] = 1e-30                                          # a tiny element among zeros
    w[11, 4:32] = 0.0
    return w


def importance(cols: int, seed: int = 1, spread: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.exp(spread * torch.randn(cols, generator=g)).float()


DATA = {
    "gauss": lambda: torch.randn(64, 256, generator=torch.Generator().manual_seed(0)) * 0.05,
    "t3": lambda: student_t(3.0, (37, 96), 1) * 0.02,
    "degenerate": degenerate,
}


def block_errors(codec, w: torch.Tensor, q, imp) -> torch.Tensor:
    """sum w (x - x_hat)^2 per block, in float64 (the llama.cpp weights the default encoders minimise)."""
    wt = element_weights(codec, w, imp).double()
    return (wt * (q.dequantize().double() - w.double()) ** 2).reshape(-1, 32).sum(-1)


def encode_raw(codec, w: torch.Tensor, imp: torch.Tensor | None, isa: int = 0):
    """The kernel's raw output (d bits, m bits, codes) and the ISA build it ran."""
    fn = lib().qtool_gguf_legacy_encode
    fn.restype = ctypes.c_int
    nblocks = w.numel() // 32
    d = torch.empty(nblocks, dtype=torch.float16)
    m = torch.empty(nblocks, dtype=torch.float16) if codec.asym else None
    codes = torch.empty(nblocks, 32, dtype=torch.uint8)
    used = codec._encode_native(fn, w.float().contiguous(), None if imp is None else imp.float().contiguous(),
                                d, m, codes, isa=isa)
    return d.view(torch.int16), None if m is None else m.view(torch.int16), codes, used


def same_raw(a, b) -> bool:
    return all((x is None and y is None) or torch.equal(x, y) for x, y in zip(a[:3], b[:3]))


# ------------------------------------------------------------------------------------------------ fp16
def _f16(values: np.ndarray, st: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    fn = lib().qtool_gguf_legacy_f16
    x = np.ascontiguousarray(values, dtype=np.float32)
    bits = np.empty(x.shape, dtype=np.uint16)
    back = np.empty(x.shape, dtype=np.float32)
    steps = np.empty(x.shape, dtype=np.float32)
    ptr = ctypes.c_void_p
    fn(x.ctypes.data_as(ptr), bits.ctypes.data_as(ptr), back.ctypes.data_as(ptr), steps.ctypes.data_as(ptr),
       ctypes.c_int(st), ctypes.c_int64(x.size))
    return bits, back, steps


def test_fp16_rounding_is_torchs():
    """The kernel's fp16 conversions (the scalar one writing d/m, the lanes' round trip, the ulp steps) are
    torch's `.to(torch.float16)` / the twin's `_f16_steps` on every float: ties, subnormals, overflow, NaN."""
    ulp = 2.0 ** -24  # the fp16 subnormal step
    edge = [0.0, -0.0, ulp, -ulp, ulp / 2, ulp * 0.5000001, ulp * 1.5, ulp * 2.5, ulp * 3.5, 2.0 ** -25 * 0.99,
            2.0 ** -14, -2.0 ** -14, 2.0 ** -14 * (1 - 2.0 ** -12), 2.0 ** -14 - ulp / 2, 2.0 ** -14 - ulp, 2.0 ** -13,
            1.0, 1 + 2.0 ** -11, 1 + 3 * 2.0 ** -11, 1 + 2.0 ** -11 + 2.0 ** -20, 2.0, 2047.5, 2048 + 1, 2048 + 3,
            65504.0, 65519.99, 65520.0, 65536.0, 1e10, -65520.0, math.inf, -math.inf, math.nan, 1e-40, -1e-45,
            3.4e38, 0.1, -0.3333]
    g = torch.Generator().manual_seed(0)
    rand_bits = torch.randint(-2 ** 31, 2 ** 31 - 1, (200_000,), generator=g, dtype=torch.int64).to(torch.int32)
    x = torch.cat([torch.tensor(edge, dtype=torch.float32), rand_bits.view(torch.float32),
                   torch.randn(50_000, generator=g) * 1e-5, torch.randn(50_000, generator=g) * 3e4,
                   torch.randn(1000, generator=g).half().float()])  # exact fp16 values
    nan = torch.isnan(x)
    ref = x.to(torch.float16)
    for st in (0, -1, 1, 2):
        bits, back, steps = _f16(x.numpy(), st)
        ours = torch.from_numpy(bits.view(np.int16))
        assert torch.equal(ours[~nan], ref.view(torch.int16)[~nan])
        assert (ours[nan] & 0x7FFF == 0x7E00).all()
        assert torch.equal(torch.from_numpy(back)[~nan], ref.float()[~nan]) and np.isnan(back[nan.numpy()]).all()
        twin_steps = gguf_legacy._f16_steps(x, (st,)).squeeze(-1).float()
        assert torch.equal(torch.from_numpy(steps)[~nan], twin_steps[~nan])
        assert torch.equal(torch.from_numpy(steps)[nan].abs(), twin_steps[nan].abs())  # NaN: +-65504


# ------------------------------------------------------------------------------------------------ vs the twin
@pytest.mark.parametrize("kind", list(DATA))
@pytest.mark.parametrize("with_imp", [False, True])
@pytest.mark.parametrize("name", TYPES)
def test_native_no_worse_than_twin(monkeypatch, name, with_imp, kind):
    lib()
    c = CODECS[name]
    w = DATA[kind]()
    imp = importance(w.shape[1]) if with_imp else None
    qn = c.encode(w, imp)
    with twin(monkeypatch):
        qt = c.encode(w, imp)
    en, et = block_errors(c, w, qn, imp), block_errors(c, w, qt, imp)
    assert torch.isfinite(en).all()
    ok = en <= et * (1 + 1e-4) + 1e-12
    assert ok.double().mean() >= 0.995, (ok.double().mean(), (en / et.clamp_min(1e-30)).max())
    assert en.sum() <= et.sum() * 1.001, en.sum() / et.sum()
    # codes: the nearest levels under the stored d/m (the GPTQ seam agrees)
    assert torch.equal(c.quantize(w, qn.params), qn.codes)
    # bytes: gguf-py decodes them to the codec's values
    packed = c.pack(qn)
    ref = gguf.quants.dequantize(packed.numpy(), GGMLQuantizationType[name.upper()])
    assert np.array_equal(ref, c.dequantize(qn).numpy())
    assert qn.params["d"].dtype == torch.float16 and torch.isfinite(qn.params["d"].float()).all()


@pytest.mark.parametrize("name", TYPES)
def test_native_no_worse_than_faithful(name):
    """llama.cpp's own d (and m) is one of the candidates: no block worse than faithful's."""
    lib()
    c = CODECS[name]
    w = student_t(3.0, (48, 256), 5) * 0.02
    for imp in (None, importance(256, seed=3)):
        ed = block_errors(c, w, c.encode(w, imp), imp)
        ef = block_errors(c, w, c.encode(w, imp, faithful=True), imp)
        assert bool((ed <= ef * (1 + 1e-5) + 1e-12).all())


# ------------------------------------------------------------------------------------------------ determinism
@pytest.mark.parametrize("with_imp", [False, True])
@pytest.mark.parametrize("name", TYPES)
def test_bit_identical_across_threads_runs_and_isas(name, with_imp):
    c = CODECS[name]
    w = torch.cat([student_t(3.0, (40, 256), 2) * 0.02, degenerate(256)])  # 832 blocks: two threads' worth
    imp = importance(256) if with_imp else None
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = encode_raw(c, w, imp)
        again = encode_raw(c, w, imp)
        torch.set_num_threads(2)
        two = encode_raw(c, w, imp)
        base = encode_raw(c, w, imp, isa=1)  # the baseline build (SSE2 on x86-64); the default: the widest
    finally:
        torch.set_num_threads(n)
    assert base[3] == 1
    assert same_raw(one, again) and same_raw(one, two) and same_raw(one, base)
    # the codec path writes the same
    q = c.encode(w, imp)
    assert torch.equal(q.params["d"].reshape(-1).view(torch.int16), one[0]) and torch.equal(q.codes.reshape(-1, 32),
                                                                                            one[2])


def test_rejects_bad_arguments():
    fn = lib().qtool_gguf_legacy_encode
    fn.restype = ctypes.c_int
    w = torch.zeros(2, 48)
    with pytest.raises(RuntimeError, match="rejected"):
        Q4_0._encode_native(fn, w, None, torch.empty(3, dtype=torch.float16), None,
                            torch.empty(3, 32, dtype=torch.uint8))


# ------------------------------------------------------------------------------------------------ fallback
@pytest.mark.parametrize("name", TYPES)
def test_torch_twin_without_the_kernel(monkeypatch, name):
    c = CODECS[name]
    w = DATA["t3"]()
    imp = importance(w.shape[1])
    with twin(monkeypatch):
        assert "QTOOL_NATIVE=0" in gguf_legacy.native_reason()
        q = c.encode(w, imp)
        qf = c.encode(w, imp, faithful=True)
    assert torch.equal(c.quantize(w, q.params), q.codes)
    packed = c.pack(q)
    ref = gguf.quants.dequantize(packed.numpy(), GGMLQuantizationType[name.upper()])
    assert np.array_equal(ref, c.dequantize(q).numpy())
    assert bool((block_errors(c, w, q, imp) <= block_errors(c, w, qf, imp) * (1 + 1e-5) + 1e-12).all())
    if native.load("gguf_legacy") is not None:
        assert gguf_legacy.native_reason() == ""

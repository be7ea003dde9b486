"""GPTQ through the GGUF block grids: on correlated inputs its output error tr(ΔW H ΔWᵀ) is far below
importance-weighted RTN's on every block family, its codes lie on the codec's grid (the file decodes to them),
and dead input channels / singular Hessians are handled."""

from __future__ import annotations

import gguf
import pytest
import torch

from qtool.formats.gguf_base import gguf_codec
from qtool.methods import gptq


def _inputs(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4096, 24, generator=g) @ torch.randn(24, n, generator=g) + 0.3 * torch.randn(4096, n, generator=g)
    return x * (0.2 + 3 * torch.rand(n, generator=g))


def _err(w, q, h):
    d = w - q.dequantize()
    return float(torch.trace(d @ h @ d.T))


@pytest.mark.parametrize("name", ["q4_k", "q5_k", "q3_k", "q2_k", "q6_k", "iq4_xs", "q4_0", "q5_1", "iq4_nl", "q8_0"])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_weighted_rtn_and_decodes(name, act_order):
    codec = gguf_codec(name)
    n = 512
    x = _inputs(n)
    h = x.T @ x / x.shape[0]
    w = torch.randn(64, n, generator=torch.Generator().manual_seed(1)) * 0.05
    rtn = codec.encode(w, torch.diagonal(h))
    q, rep = gptq.quantize(w, codec, h, gptq.GPTQParams(act_order=act_order))
    assert _err(w, q, h) < 0.5 * _err(w, rtn, h)
    data = codec.pack(q).numpy()
    assert torch.equal(torch.from_numpy(gguf.quants.dequantize(data, codec.ggml_type).astype("float32")), q.dequantize())
    assert rep.dead_columns == 0


def test_dead_channels_and_float_types():
    codec = gguf_codec("q4_k")
    x = _inputs(256)
    x[:, 7] = 0
    h = x.T @ x / x.shape[0]
    w = torch.randn(16, 256) * 0.05
    q, rep = gptq.quantize(w, codec, h)
    assert rep.dead_columns == 1 and torch.isfinite(q.dequantize()).all()
    f, _ = gptq.quantize(w, gguf_codec("f16"), h)  # nothing to round: the float codec's own encode
    assert torch.equal(f.dequantize(), w.half().float())

"""GPTQ against its defining properties: equals RTN when inputs are uncorrelated, beats RTN on output
error when they are correlated, survives dead channels and indefinite Hessians, and writes valid codes."""

import pytest
import torch

from qtool.formats.affine import AffineCodec
from qtool.formats.base import QTensor
from qtool.methods import gptq, rtn


def _data(out=64, n=256, samples=2048, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, n, generator=g) * 0.05
    # correlated inputs as in real layers: a low-rank signal plus small noise, with uneven channel scales
    x = torch.randn(samples, 32, generator=g) @ torch.randn(32, n, generator=g)
    x = (x + 0.3 * torch.randn(samples, n, generator=g)) * torch.linspace(0.2, 3.0, n)
    return w, x, x.T @ x / samples


def _out_err(w, wq, x):
    return ((x @ (w - wq).T).norm() / (x @ w.T).norm()).item()


def test_identity_hessian_gives_exactly_rtn():
    w, _, _ = _data()
    codec = AffineCodec(4, 64, False)
    q, rep = gptq.quantize(w, codec, torch.eye(256), gptq.GPTQParams(damp=0.0, refit_scales=False))
    r = rtn.quantize(w, codec)
    assert torch.equal(q.codes, r.codes) and torch.equal(q.params["scale"], r.params["scale"])
    assert rep.damp_used == 0.0 and rep.dead_columns == 0


@pytest.mark.parametrize("bits, gs, sym, act_order", [(4, 64, True, False), (4, 64, False, False),
                                                      (3, 32, False, False), (4, 0, True, False),
                                                      (4, 64, True, True), (2, 64, False, True)])
def test_gptq_beats_rtn_on_output_error(bits, gs, sym, act_order):
    w, x, h = _data()
    codec = AffineCodec(bits, gs, sym)
    q, _ = gptq.quantize(w, codec, h, gptq.GPTQParams(act_order=act_order))
    e_gptq, e_rtn = _out_err(w, q.dequantize(), x), _out_err(w, rtn.quantize(w, codec).dequantize(), x)
    assert e_gptq < 0.6 * e_rtn, (e_gptq, e_rtn)
    qmin, qmax = codec.qmin, codec.qmax
    assert q.codes.dtype == torch.int8 and qmin <= q.codes.min() and q.codes.max() <= qmax
    # the QTensor is self-consistent: decoding its codes through the codec gives what GPTQ measured
    assert torch.equal(codec.dequantize(q), q.dequantize())


def test_static_groups_match_rtn_params():
    w, _, h = _data()
    codec = AffineCodec(4, 64, True)
    q, _ = gptq.quantize(w, codec, h, gptq.GPTQParams(act_order=True, refit_scales=False))
    assert torch.equal(q.params["scale"], codec.fit(w)["scale"])


@pytest.mark.parametrize("sym, dtype", [(True, torch.float32), (False, torch.float32), (True, torch.float16)])
def test_scale_refit_lowers_output_error_and_is_optimal(sym, dtype):
    w, x, h = _data()
    codec = AffineCodec(4, 64, sym, scale_dtype=dtype)
    plain, _ = gptq.quantize(w, codec, h, gptq.GPTQParams(act_order=True, refit_scales=False))
    q, rep = gptq.quantize(w, codec, h, gptq.GPTQParams(act_order=True))
    assert torch.equal(q.codes, plain.codes)  # same codes, new scales
    assert q.params["scale"].dtype == dtype and (q.params["scale"] > 0).all()
    e_plain, e_refit = _out_err(w, plain.dequantize(), x), _out_err(w, q.dequantize(), x)
    assert e_refit < 0.97 * e_plain, (e_refit, e_plain)
    assert rep.refit_gain > 1.0
    if dtype == torch.float32:  # the refit scales are the least-squares optimum: E rises in every direction
        def energy(scale):
            d = w - QTensor(codec, q.shape, q.codes, {"scale": scale, "zero": q.params["zero"]}).dequantize()
            return torch.einsum("ri,ij,rj->", d.double(), h.double(), d.double()).item()
        base = energy(q.params["scale"])
        for k in range(3):
            bump = torch.zeros_like(q.params["scale"])
            bump[k, k] = 1e-3 * q.params["scale"][k, k]
            assert energy(q.params["scale"] + bump) > base and energy(q.params["scale"] - bump) > base


def test_dead_channels_are_zeroed_not_nan():
    w, x, h = _data()
    h[:, 5] = 0
    h[5, :] = 0
    q, rep = gptq.quantize(w, AffineCodec(4, 64, True), h)
    assert rep.dead_columns == 1
    assert torch.isfinite(q.dequantize()).all() and (q.dequantize()[:, 5] == 0).all()


def test_indefinite_hessian_retries_with_more_damping():
    w, _, h = _data()
    h = h - 1.05 * torch.linalg.eigvalsh(h).max() * 0 - torch.eye(256) * h.diagonal().mean() * 0.05
    q, rep = gptq.quantize(w, AffineCodec(4, 64, True), h, gptq.GPTQParams(damp=0.01))
    assert rep.damp_used > 0.01
    assert torch.isfinite(q.dequantize()).all()


# ---- act-order with dynamic groups (g_idx) ----------------------------------------------------------------------
def _perm(h):
    return torch.argsort(h.diagonal(), descending=True, stable=True)


def _reference_dequant(q):
    """(codes - zero) * scale column by column from an explicit column -> group loop (independent of the codec)."""
    s, z, g = q.params["scale"], q.params["zero"], q.params["g_idx"].tolist()
    out = torch.empty(q.shape)
    for j in range(q.shape[1]):
        out[:, j] = (q.codes[:, j].float() - z[:, g[j]].float()) * s[:, g[j]]
    return out


@pytest.mark.parametrize("bits, gs, sym", [(4, 64, True), (4, 64, False), (3, 32, False), (2, 64, False)])
def test_dynamic_groups_follow_the_act_order_and_beat_rtn(bits, gs, sym):
    w, x, h = _data()
    codec = AffineCodec(bits, gs, sym)
    q, _ = gptq.quantize(w, codec, h, gptq.GPTQParams(act_order="dynamic"))
    g_idx, perm = q.params["g_idx"], _perm(h)
    # group k holds exactly the columns visited k-th: perm[k*gs:(k+1)*gs], gs of them
    assert g_idx.dtype == torch.int32 and g_idx.shape == (256,)
    assert torch.bincount(g_idx.long(), minlength=256 // gs).tolist() == [gs] * (256 // gs)
    for k in range(256 // gs):
        assert set((g_idx == k).nonzero().flatten().tolist()) == set(perm[k * gs:(k + 1) * gs].tolist()), k
    assert not torch.equal(g_idx, (torch.arange(256) // gs).to(torch.int32))  # not the natural map
    # the decoded weight is (codes - zero[g_idx]) * scale[g_idx]; without the map it is a different weight
    assert torch.equal(q.dequantize(), _reference_dequant(q))
    natural = QTensor(codec, q.shape, q.codes, {"scale": q.params["scale"], "zero": q.params["zero"]})
    e_dyn, e_rtn = _out_err(w, q.dequantize(), x), _out_err(w, rtn.quantize(w, codec).dequantize(), x)
    assert e_dyn < 0.6 * e_rtn, (e_dyn, e_rtn)
    assert _out_err(w, natural.dequantize(), x) > 3 * e_dyn
    assert q.codes.dtype == torch.int8 and codec.qmin <= q.codes.min() and q.codes.max() <= codec.qmax
    # codec.quantize under the fitted params reproduces the codes' grid (column_params honour g_idx)
    assert torch.equal(codec.quantize(q.dequantize(), q.params), q.codes)


def test_dynamic_groups_are_fitted_on_the_updated_weights():
    """Group 0 is fitted before any update: the codec's fit of the original columns perm[:gs]. Later groups see
    the error pushed onto them, so their fit differs from the original columns' (what static groups use)."""
    w, _, h = _data()
    codec = AffineCodec(4, 64, False)
    q, _ = gptq.quantize(w, codec, h, gptq.GPTQParams(act_order="dynamic", refit_scales=False))
    perm = _perm(h)
    for k in range(4):
        fit = codec.fit(w[:, perm[k * 64:(k + 1) * 64]])
        same = torch.equal(q.params["scale"][:, k], fit["scale"][:, 0]) and torch.equal(q.params["zero"][:, k],
                                                                                        fit["zero"][:, 0])
        assert same == (k == 0), k


def test_dynamic_groups_refit_lowers_error_keeps_codes_and_map():
    w, x, h = _data()
    codec = AffineCodec(4, 64, False)
    plain, _ = gptq.quantize(w, codec, h, gptq.GPTQParams(act_order="dynamic", refit_scales=False))
    q, rep = gptq.quantize(w, codec, h, gptq.GPTQParams(act_order="dynamic"))
    assert torch.equal(q.codes, plain.codes) and torch.equal(q.params["g_idx"], plain.params["g_idx"])
    assert rep.refit_gain > 1.0 and _out_err(w, q.dequantize(), x) < _out_err(w, plain.dequantize(), x)


def test_dynamic_groups_are_deterministic():
    w, _, h = _data()
    codec = AffineCodec(4, 64, False)
    a, _ = gptq.quantize(w, codec, h, gptq.GPTQParams(act_order="dynamic"))
    b, _ = gptq.quantize(w.clone(), codec, h.clone(), gptq.GPTQParams(act_order="dynamic"))
    assert a.params.keys() == b.params.keys() == {"scale", "zero", "g_idx"}
    assert torch.equal(a.codes, b.codes) and all(torch.equal(a.params[k], b.params[k]) for k in a.params)


def test_dynamic_groups_in_natural_order_are_plain_gptq():
    """A Hessian whose diagonal already descends visits columns in order: no g_idx, and exactly the result
    without act-order. One group per channel has nothing to map either."""
    w, _, h = _data()
    d = torch.linspace(2.0, 1.0, 256)
    h = h / h.diagonal().sqrt()[:, None] / h.diagonal().sqrt()[None, :] * d.sqrt()[:, None] * d.sqrt()[None, :]
    codec = AffineCodec(4, 64, False)
    q, _ = gptq.quantize(w, codec, h, gptq.GPTQParams(act_order="dynamic"))
    plain, _ = gptq.quantize(w, codec, h, gptq.GPTQParams())
    assert "g_idx" not in q.params and torch.equal(q.codes, plain.codes)
    assert torch.equal(q.params["scale"], plain.params["scale"])
    q, _ = gptq.quantize(w, AffineCodec(4, 0, True), _data()[2], gptq.GPTQParams(act_order="dynamic"))
    assert "g_idx" not in q.params


def test_act_order_values_are_checked():
    with pytest.raises(ValueError, match="static_groups"):
        gptq.GPTQParams(act_order="dynamic", static_groups=True)
    with pytest.raises(ValueError, match="act_order"):
        gptq.GPTQParams(act_order="group")
    w, _, h = _data()
    q, _ = gptq.quantize(w, AffineCodec(4, 64, True), h, gptq.GPTQParams(act_order=True))
    assert "g_idx" not in q.params  # static groups keep the natural map

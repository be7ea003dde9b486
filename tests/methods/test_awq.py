"""AWQ's pure core: the output-error loss, the scale search and the clip search, checked on tensors."""

import torch

from qtool.formats.affine import AffineCodec
from qtool.methods import awq


def _inputs(n=256, tokens=2048, salient=(3, 70, 141), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n, generator=g)
    x[:, list(salient)] *= 25.0  # a few activation channels dominate, as in real LLMs
    return x


def test_output_error_is_the_mean_squared_output_difference():
    g = torch.Generator().manual_seed(1)
    x, d = torch.randn(500, 64, generator=g), torch.randn(32, 64, generator=g)
    h = x.T @ x / x.shape[0]
    direct = (x @ d.T).square().sum() / x.shape[0]
    assert torch.allclose(awq.output_error(d, h), direct, rtol=1e-4)


def test_scale_search_protects_salient_channels():
    x = _inputs()
    h, x_abs = x.T @ x / x.shape[0], x.abs().mean(0)
    g = torch.Generator().manual_seed(2)
    ws = [torch.randn(128, 256, generator=g) * 0.05 for _ in range(2)]
    codec = AffineCodec(bits=3, group_size=64, symmetric=False)
    res = awq.search_scale(ws, [codec, codec], h, x_abs)
    assert res.alpha is not None and res.gain > 1.2, res
    assert res.scales.shape == (256,) and torch.isfinite(res.scales).all() and (res.scales > 0).all()
    # salient input channels are scaled up (their weights get a finer grid)
    assert res.scales[[3, 70, 141]].min() > res.scales.median() * 2
    # the loss it reports is the loss of the scales it returns
    wq = [codec.encode(w * res.scales).dequantize() / res.scales for w in ws]
    loss = sum(awq.output_error(w - q, h).item() for w, q in zip(ws, wq))
    assert abs(loss - res.loss) <= 1e-4 * loss


def test_scale_search_keeps_identity_when_nothing_helps():
    # isotropic inputs and weights: every candidate is the identity up to noise; the result never loses
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4096, 128, generator=g)
    h, x_abs = x.T @ x / x.shape[0], x.abs().mean(0)
    w = torch.randn(64, 128, generator=g)
    res = awq.search_scale([w], [AffineCodec(bits=4, group_size=64, symmetric=False)], h, x_abs)
    assert res.loss <= res.loss_identity and res.gain >= 1.0


def test_clip_search_is_never_worse_and_helps_heavy_tails():
    x = _inputs(n=128, tokens=1024, salient=(3, 70))
    h = x.T @ x / x.shape[0]
    torch.manual_seed(4)
    w = torch.distributions.StudentT(2.0).sample((96, 128)) * 0.02
    codec = AffineCodec(bits=3, group_size=32, symmetric=False)
    plain = codec.encode(w).dequantize()
    qt, _ = awq.quantize(w, codec, h)
    clipped = qt.dequantize()
    assert qt.codes.dtype == torch.int8 and qt.codes.min() >= -4 and qt.codes.max() <= 3
    e_plain, e_clip = awq.output_error(w - plain, h).item(), awq.output_error(w - clipped, h).item()
    assert e_clip < 0.9 * e_plain, (e_clip, e_plain)
    # per (row, group) the chosen factor is never worse than the plain fit
    d_plain, d_clip = (w - plain).reshape(96, 4, 32), (w - clipped).reshape(96, 4, 32)
    hb = awq._group_blocks(h, 32)
    per_plain = torch.einsum("ogi,gij,ogj->og", d_plain, hb, d_plain)
    per_clip = torch.einsum("ogi,gij,ogj->og", d_clip, hb, d_clip)
    assert (per_clip <= per_plain * (1 + 1e-5) + 1e-9).all()


def test_weight_magnitude_is_group_normalised():
    w = torch.zeros(2, 8)
    w[0, :4] = torch.tensor([1.0, 2.0, 4.0, 4.0])
    w[1, 4:] = torch.tensor([10.0, 0.0, 0.0, 5.0])
    m = awq.weight_magnitude([w], group_width=4)
    assert torch.allclose(m, torch.tensor([0.125, 0.25, 0.5, 0.5, 0.5, 0.0, 0.0, 0.25]))


def test_scale_search_through_gguf_grids_weighs_by_the_scaled_importance():
    """On a GGUF block type the search never loses (the identity is a candidate), and the loss it reports is that of
    the codec fitted with the importance of the *scaled* inputs, diag(H)/s². (Gains are small here: the weighted
    fit already protects these salient channels; measured 1.01 for q4_k.)"""
    from qtool.formats.gguf_base import gguf_codec

    x = _inputs()
    h, x_abs = x.T @ x / x.shape[0], x.abs().mean(0)
    g = torch.Generator().manual_seed(2)
    ws = [torch.randn(128, 256, generator=g) * 0.05 for _ in range(2)]
    for name in ("q4_k", "q3_k", "q5_0"):
        codec = gguf_codec(name)
        res = awq.search_scale(ws, [codec, codec], h, x_abs)
        assert res.loss <= res.loss_identity and res.alpha is not None, (name, res)
        imp = torch.diagonal(h) / res.scales.square()
        wq = [codec.encode(w * res.scales, imp).dequantize() / res.scales for w in ws]
        loss = sum(awq.output_error(w - q, h).item() for w, q in zip(ws, wq))
        assert abs(loss - res.loss) <= 1e-4 * loss
        # the weight step on a GGUF type is the codec's importance-weighted fit (no int clip search)
        qt, _ = awq.quantize(ws[0], codec, h)
        assert torch.equal(qt.codes, codec.encode(ws[0], torch.diagonal(h)).codes)

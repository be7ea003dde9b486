"""SmoothQuant's pure core: the migration scales, checked on tensors."""

import pytest
import torch

from qtool.methods import smoothquant


def test_scales_follow_the_formula_and_balance_ranges():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 64, generator=g)
    x[:, [5, 40]] *= 60.0  # outlier channels
    ws = [torch.randn(32, 64, generator=g) * 0.02, torch.randn(48, 64, generator=g) * 0.05]
    xmax = x.abs().amax(0)
    s = smoothquant.smooth_scales(xmax, ws, alpha=0.5)
    wmax = torch.maximum(ws[0].abs().amax(0), ws[1].abs().amax(0))
    assert torch.allclose(s, xmax.sqrt() / wmax.sqrt(), rtol=1e-6)
    # with alpha = 0.5 the smoothed activation range equals the scaled weight range per channel
    assert torch.allclose(xmax / s, wmax * s, rtol=1e-5)
    # outlier channels are divided the most: the activation spread shrinks
    spread = lambda m: (m.max() / m.mean()).item()  # noqa: E731
    assert spread(xmax / s) < spread(xmax) / 3
    assert s[[5, 40]].min() > s.median() * 4


def test_alpha_extremes_and_dead_channels():
    xmax = torch.tensor([4.0, 0.0, 9.0, 1.0])
    w = [torch.tensor([[2.0, 1.0, 0.0, 0.5]])]
    s1 = smoothquant.smooth_scales(xmax, w, alpha=1.0)
    assert s1.tolist() == [4.0, 1.0, 1.0, 1.0]  # alpha 1: s = max|x| (dead channel and zero weight keep 1)
    s0 = smoothquant.smooth_scales(xmax, w, alpha=0.0)
    assert torch.allclose(s0, torch.tensor([0.5, 1.0, 1.0, 2.0]))  # alpha 0: s = 1 / max|w|
    with pytest.raises(ValueError, match="alpha"):
        smoothquant.smooth_scales(xmax, w, alpha=1.5)
    with pytest.raises(ValueError, match="channels"):
        smoothquant.smooth_scales(xmax[:3], w)

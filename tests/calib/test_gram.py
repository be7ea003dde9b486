"""The panel Gram product behind every Hessian: XᵀX from the upper block triangle only."""

import pytest
import torch

from qtool.calib.hessian import gram_upper_, symmetric_


@pytest.mark.parametrize("n", [64, 300, 576, 1100])
def test_gram_equals_full_product_and_is_exactly_symmetric(n):
    g = torch.Generator().manual_seed(n)
    xs = [torch.randn(257, n, generator=g) for _ in range(3)]
    h = None
    for x in xs:
        h = gram_upper_(h, x)
    h = symmetric_(h)
    x = torch.cat(xs)
    ref = x.double().T @ x.double()
    assert torch.equal(h, h.T)
    assert torch.allclose(h.double(), ref, rtol=1e-5, atol=1e-3)

"""RTN quantizes through the codec it is given: same bytes as the codec's own encode, any codec."""

import pytest
import torch

from qtool.formats.affine import AffineCodec
from qtool.formats.nf4 import NF4Codec
from qtool.methods import METHODS, rtn


@pytest.mark.parametrize("codec", [AffineCodec(4, 64, False), AffineCodec(8, 0, True), NF4Codec("nf4", 64, True),
                                   AffineCodec(3, 32, False, clip_search=True)], ids=lambda c: c.name)
def test_rtn_is_the_codec_encode(codec):
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0)) * 0.05
    q = rtn.quantize(w, codec)
    ref = codec.encode(w)
    assert q.codec == codec and q.shape == (64, 256)
    assert torch.equal(q.codes, ref.codes)
    assert torch.equal(q.dequantize(), ref.dequantize())
    rel = ((q.dequantize() - w).norm() / w.norm()).item()
    assert rel < {8: 0.01, 4: 0.13, 3: 0.25}[codec.bits]


def test_rtn_accepts_half_precision_weights():
    w = (torch.randn(32, 128) * 0.05).to(torch.bfloat16)
    q = rtn.quantize(w, AffineCodec(4, 64, True))
    assert q.dequantize().dtype == torch.float32


def test_registry_names_match_files():
    from pathlib import Path

    import qtool.methods as pkg

    files = {p.stem for p in Path(pkg.__file__).parent.glob("*.py") if p.stem != "__init__"}
    assert set(METHODS) | set(pkg.TRANSFORM_ONLY) | set(pkg.PARTS) == files  # registry key = file name, one method per file
    assert all(part.startswith(m + "_") and m in METHODS for part, m in pkg.PARTS.items())
    assert METHODS["rtn"].NEEDS == ()

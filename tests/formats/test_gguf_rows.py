"""Row independence of every GGUF codec: the engine encodes vocabulary-sized tensors a row chunk at a time,
decodes token lookups from a few rows, and packs a chunk at a time; each must equal the whole-tensor result."""

import pytest
import torch

from qtool.formats.base import QTensor
from qtool.formats.gguf_base import all_gguf_codecs, row_chunks

CODECS = sorted(all_gguf_codecs())


@pytest.mark.parametrize("name", CODECS)
def test_chunked_encode_pack_and_lookup_equal_the_whole_tensor(name):
    codec = all_gguf_codecs()[name]
    g = torch.Generator().manual_seed(7)
    w = torch.randn(23, 512, generator=g) * torch.rand(23, 1, generator=g)
    imp = torch.rand(512, generator=g) + 0.1
    whole = codec.encode(w, imp)
    parts = QTensor.cat_rows([codec.encode(w[r], imp) for r in row_chunks(23, 512, elems=5 * 512)])
    assert torch.equal(parts.codes, whole.codes)
    assert whole.params.keys() == parts.params.keys()
    for k in whole.params:
        assert torch.equal(parts.params[k], whole.params[k]), k
    packed = torch.cat([codec.pack(whole.take_rows(r)) for r in row_chunks(23, 512, elems=3 * 512)])
    assert torch.equal(packed, codec.pack(whole))
    ids = torch.tensor([[5, 0, 5], [22, 7, 0]])
    assert torch.equal(whole.take_rows(ids.reshape(-1).unique()).dequantize(),
                       whole.dequantize()[ids.reshape(-1).unique()])


def test_row_chunks_cover_every_row_once():
    chunks = row_chunks(10, 7, elems=21)
    assert [(c.start, c.stop) for c in chunks] == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert row_chunks(4, 10_000, elems=10) == [slice(0, 1), slice(1, 2), slice(2, 3), slice(3, 4)]

"""The GGUF writer's size prediction (`file_size`, `GGUFFileWriter.predicted_size`): exactly the bytes written,
for metadata of every value kind and tensors whose sizes are and are not multiples of the alignment."""

from __future__ import annotations

import torch

from qtool.formats.gguf_base import gguf_codec
from qtool.io.gguf_writer import GGUFFileWriter


def test_predicted_size_is_the_written_size(tmp_path):
    out = tmp_path / "m.gguf"
    w = GGUFFileWriter(out, arch_name="llama", names=lambda n: n.replace("model.", "").removesuffix(".weight"))
    m = w.meta
    m.add_uint32("llama.block_count", 2)
    m.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    m.add_string("general.name", "tiny ünïcode")
    m.add_token_list(["<s>", "a", "bb", "ccc" * 7])
    m.add_token_scores([0.0, -1.5, -2.0, -3.25])
    m.add_token_types([3, 1, 1, 1])
    m.add_bool("tokenizer.ggml.add_bos_token", True)
    g = torch.Generator().manual_seed(0)
    w.add("model.norm.weight", torch.randn(7, generator=g))  # 28 bytes: padded
    w.add("model.embed.weight", torch.randn(5, 64, generator=g), float_type="f16")
    w.add("model.q.weight", gguf_codec("q4_k").encode(torch.randn(3, 256, generator=g)))  # 3 x 144 bytes
    planned = [("model.v.weight", [3, 22], int(gguf_codec("q5_0").ggml_type), 66)]  # 66 bytes: padded to 96
    with_plan = w.predicted_size(planned)
    w.add("model.v.weight", gguf_codec("q5_0").encode(torch.randn(3, 32, generator=g)))
    predicted = w.predicted_size()
    assert predicted == with_plan
    w.finish()
    assert out.stat().st_size == predicted


def test_planned_tensors_count_like_added_ones(tmp_path):
    """A plan's size is predicted before any tensor is quantized: planned entries give the added ones' size."""
    def make(name):
        w = GGUFFileWriter(tmp_path / name, arch_name="llama", names=lambda n: n)
        w.meta.add_string("general.name", "x")
        return w

    a = make("a.gguf")
    a.add("w", gguf_codec("q6_k").encode(torch.randn(4, 256)))
    b = make("b.gguf")
    predicted = b.predicted_size([("w", [4, 210], int(gguf_codec("q6_k").ggml_type), 4 * 210)])
    b.abort()
    a.finish()
    assert (tmp_path / "a.gguf").stat().st_size == predicted

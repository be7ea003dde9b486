"""qtool.calib.imatrix without llama.cpp: name mapping, round trips, exact byte layouts, and refusals of bad files.

Layouts are checked against docs/formats.md 3.3 independently of the writer: the legacy `.dat` against a
hand-built struct.pack, the GGUF imatrix against the header bytes and gguf-py's reader.
"""

from __future__ import annotations

import struct

import gguf
import numpy as np
import pytest
import torch
from gguf_tiny import imatrix_kv, write_raw_gguf

from qtool.calib.imatrix import (
    Imatrix,
    gguf_to_hf_name,
    hf_to_gguf_name,
    read_imatrix,
    write_imatrix_dat,
    write_imatrix_gguf,
)
from qtool.errors import ModelError

T = gguf.GGUFValueType
HF_TO_GGUF = {  # formats.md 1.4, written out by hand
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def entries(seed=0) -> dict[str, tuple[torch.Tensor, int]]:
    g = torch.Generator().manual_seed(seed)
    return {"blk.1.ffn_down.weight": (torch.rand(512, generator=g) * 50, 700),
            "blk.0.attn_q.weight": (torch.rand(256, generator=g) * 9, 1024),
            "output.weight": (torch.rand(256, generator=g), 3)}


def gguf_file(tmp_path, name="im.gguf", **kw):
    path = tmp_path / name
    write_imatrix_gguf(path, entries(), **{"datasets": ["a.txt", "b.txt"], "chunk_count": 4, "chunk_size": 512, **kw})
    return path


# ---------------------------------------------------------------- names


@pytest.mark.parametrize("layer", [0, 3])
@pytest.mark.parametrize("hf", sorted(HF_TO_GGUF))
def test_hf_linear_names_map_both_ways(hf, layer):
    module = f"model.layers.{layer}.{hf}"
    want = f"blk.{layer}.{HF_TO_GGUF[hf]}.weight"
    assert hf_to_gguf_name(module, 4) == want
    assert hf_to_gguf_name(module + ".weight", 4) == want
    assert gguf_to_hf_name(want, 4) == module
    assert gguf_to_hf_name(want.removesuffix(".weight"), 4) == module


def test_top_level_names():
    assert hf_to_gguf_name("lm_head", 2) == "output.weight"
    assert hf_to_gguf_name("model.embed_tokens", 2) == "token_embd.weight"
    assert gguf_to_hf_name("output.weight", 2) == "lm_head"
    assert gguf_to_hf_name("token_embd.weight", 2) == "model.embed_tokens"


@pytest.mark.parametrize("module", ["model.layers.2.mlp.down_proj", "model.layers.0.mlp.nonsense", "visual.proj", ""])
def test_unknown_or_out_of_range_module_refused(module):
    with pytest.raises(ModelError, match="no llama.cpp tensor name"):
        hf_to_gguf_name(module, 2)


@pytest.mark.parametrize("name", ["blk.2.ffn_down.weight", "blk.0.attn_norm.weight", "blk.0.ffn_down.in_sum2", "x"])
def test_unknown_gguf_name_refused(name):
    with pytest.raises(ModelError, match="no Hugging Face Llama module"):
        gguf_to_hf_name(name, 2)


# ---------------------------------------------------------------- GGUF imatrix


def test_gguf_round_trip(tmp_path):
    im = read_imatrix(gguf_file(tmp_path))
    assert isinstance(im, Imatrix) and not im.legacy
    assert (im.datasets, im.chunk_count, im.chunk_size) == (("a.txt", "b.txt"), 4, 512)
    assert list(im.means) == sorted(entries())
    for name, (sums, count) in entries().items():
        assert im.counts[name] == count
        assert torch.equal(im.sums[name], sums)
        assert torch.equal(im.means[name], sums / count)  # float32 / float32, as llama-quantize divides
        assert im.means[name].dtype == torch.float32 and im.means[name].shape == sums.shape


def test_gguf_deterministic_and_atomic(tmp_path):
    a = gguf_file(tmp_path, "a.gguf")
    b = tmp_path / "b.gguf"
    reordered = dict(reversed(list(entries().items())))
    write_imatrix_gguf(b, reordered, datasets=["a.txt", "b.txt"], chunk_count=4, chunk_size=512)
    assert a.read_bytes() == b.read_bytes()
    c = tmp_path / "c.gguf"  # rewriting what was read gives the same bytes
    im = read_imatrix(a)
    write_imatrix_gguf(c, im.entries(), datasets=list(im.datasets), chunk_count=im.chunk_count, chunk_size=im.chunk_size)
    assert c.read_bytes() == a.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gguf", "b.gguf", "c.gguf"]  # no temporary files left


def test_gguf_layout(tmp_path):
    path = gguf_file(tmp_path)
    raw = path.read_bytes()
    assert raw[:4] == b"GGUF"
    assert struct.unpack_from("<IQQ", raw, 4) == (3, 6, 4)  # version 3, 2 tensors per entry, 4 keys
    r = gguf.GGUFReader(path)
    kv = {k: ([t.name for t in f.types], f.contents()) for k, f in r.fields.items() if not k.startswith("GGUF.")}
    assert kv == {"general.type": (["STRING"], "imatrix"),  # no general.architecture, like llama-imatrix
                  "imatrix.datasets": (["ARRAY", "STRING"], ["a.txt", "b.txt"]),
                  "imatrix.chunk_count": (["UINT32"], 4), "imatrix.chunk_size": (["UINT32"], 512)}
    got = [(t.name, [int(d) for d in t.shape], t.tensor_type.name) for t in r.tensors]
    assert got == [("blk.0.attn_q.weight.in_sum2", [256], "F32"), ("blk.0.attn_q.weight.counts", [1], "F32"),
                   ("blk.1.ffn_down.weight.in_sum2", [512], "F32"), ("blk.1.ffn_down.weight.counts", [1], "F32"),
                   ("output.weight.in_sum2", [256], "F32"), ("output.weight.counts", [1], "F32")]
    assert np.array_equal(r.tensors[2].data, entries()["blk.1.ffn_down.weight"][0].numpy())  # raw sums, not means
    assert r.tensors[3].data.tolist() == [700.0]
    assert len(raw) % 32 == 0  # the last tensor is padded too


def test_read_zero_count_gives_ones_like_llama(tmp_path):
    sums = np.arange(8, dtype=np.float32)
    path = write_raw_gguf(tmp_path / "z.gguf", imatrix_kv(),
                          {"w.weight.in_sum2": sums, "w.weight.counts": np.zeros(1, np.float32)})
    im = read_imatrix(path)
    assert im.counts == {"w.weight": 0} and torch.equal(im.means["w.weight"], torch.ones(8))


BAD_GGUF = {  # name -> (kv, tensors, error pattern)
    "no datasets": (imatrix_kv(datasets=None), None, "lacks the 'imatrix.datasets'"),
    "no chunk_count": (imatrix_kv(chunk_count=None), None, "lacks the 'imatrix.chunk_count'"),
    "no chunk_size": (imatrix_kv(chunk_size=None), None, "lacks the 'imatrix.chunk_size'"),
    "u64 chunk_size": ({**imatrix_kv(), "imatrix.chunk_size": (512, T.UINT64)}, None, "has type UINT64, expected UINT32"),
    "a model": ({**imatrix_kv(), "general.type": ("model", T.STRING)}, None, "is not an imatrix"),
    "no counts": (imatrix_kv(), {"w.weight.in_sum2": np.ones(8, np.float32)}, "has .in_sum2 but no .counts"),
    "no sums": (imatrix_kv(), {"w.weight.counts": np.ones(1, np.float32)}, "has no matching .in_sum2"),
    "f16 sums": (imatrix_kv(), {"w.weight.in_sum2": np.ones(8, np.float16), "w.weight.counts": np.ones(1, np.float32)},
                 "imatrix tensors must be F32"),
    "nan": (imatrix_kv(), {"w.weight.in_sum2": np.array([1, np.nan], np.float32), "w.weight.counts": np.ones(1, np.float32)},
            "NaN, infinite or negative"),
    "negative sum": (imatrix_kv(), {"w.weight.in_sum2": -np.ones(2, np.float32), "w.weight.counts": np.ones(1, np.float32)},
                     "NaN, infinite or negative"),
    "negative count": (imatrix_kv(), {"w.weight.in_sum2": np.ones(2, np.float32), "w.weight.counts": -np.ones(1, np.float32)},
                       "invalid count"),
    "count mismatch": (imatrix_kv(), {"w.weight.in_sum2": np.ones((2, 8), np.float32), "w.weight.counts": np.ones(1, np.float32)},
                       "does not match 1 count"),
    "moe": (imatrix_kv(), {"w.weight.in_sum2": np.ones((2, 8), np.float32), "w.weight.counts": np.ones((2, 1), np.float32)},
            "per-expert"),
    "no entries": (imatrix_kv(), {"other": np.ones(1, np.float32)}, "has no entries"),
}


@pytest.mark.parametrize("case", sorted(BAD_GGUF))
def test_bad_gguf_refused(tmp_path, case):
    kv, tensors, pattern = BAD_GGUF[case]
    tensors = tensors or {"w.weight.in_sum2": np.ones(8, np.float32), "w.weight.counts": np.ones(1, np.float32)}
    path = write_raw_gguf(tmp_path / "bad.gguf", kv, tensors)
    with pytest.raises(ModelError, match="bad.gguf: .*" + pattern):
        read_imatrix(path)


def test_truncated_gguf_refused_at_every_cut(tmp_path):
    raw = gguf_file(tmp_path).read_bytes()
    cut = tmp_path / "cut.gguf"
    for n in range(4, len(raw), 3):  # header, key values, tensor infos, data, and the final padding
        cut.write_bytes(raw[:n])
        with pytest.raises(ModelError, match=r"cut\.gguf: (truncated|corrupt)"):
            read_imatrix(cut)


# ---------------------------------------------------------------- legacy .dat


def hand_dat(items, trailer=b"") -> bytes:
    out = struct.pack("<i", len(items))
    for name, ncall, values in items:
        out += struct.pack("<i", len(name)) + name.encode() + struct.pack("<ii", ncall, len(values))
        out += struct.pack(f"<{len(values)}f", *values)
    return out + trailer


def test_dat_bytes_match_hand_built_layout(tmp_path):
    e = {"blk.0.ffn_up.weight": (torch.tensor([2.0, 4.0, 6.0]), 2), "a.weight": (torch.tensor([1.0]), 4)}
    path = tmp_path / "im.dat"
    write_imatrix_dat(path, e, chunk_count=7, dataset="wiki.txt")
    want = hand_dat([("a.weight", 1, [0.25]), ("blk.0.ffn_up.weight", 1, [1.0, 2.0, 3.0])],
                    struct.pack("<ii", 7, 8) + b"wiki.txt")
    assert path.read_bytes() == want


def test_dat_round_trip_matches_gguf_means(tmp_path):
    write_imatrix_dat(tmp_path / "im.dat", entries(), chunk_count=4, dataset="a.txt")
    dat, ref = read_imatrix(tmp_path / "im.dat"), read_imatrix(gguf_file(tmp_path))
    assert dat.legacy and (dat.datasets, dat.chunk_count, dat.chunk_size) == (("a.txt",), 4, 0)
    assert dat.counts == dict.fromkeys(entries(), 1)  # legacy counts are ncall
    for name in entries():
        assert torch.equal(dat.means[name], ref.means[name])


def test_dat_ncall_divides_and_trailer_is_optional(tmp_path):
    path = tmp_path / "x.dat"
    body = hand_dat([("w.weight", 3, [3.0, 6.0]), ("v.weight", 0, [5.0])])
    for trailer, meta in ((b"", (0, ())), (struct.pack("<i", 9), (9, ())), (struct.pack("<ii", 9, 0), (9, ())),
                          (struct.pack("<ii", 9, 2) + b"ds", (9, ("ds",)))):
        path.write_bytes(body + trailer)
        im = read_imatrix(path)
        assert (im.chunk_count, im.datasets) == meta
        assert im.means["w.weight"].tolist() == [1.0, 2.0] and im.counts["w.weight"] == 3
        assert im.means["v.weight"].tolist() == [5.0]  # ncall 0: used as stored, as llama-quantize does


def test_truncated_dat_refused_at_every_cut(tmp_path):
    body = hand_dat([("w.weight", 1, [1.0, 2.0]), ("v.weight", 1, [5.0])])
    raw = body + struct.pack("<ii", 9, 2) + b"ds"
    valid = {len(body), len(body) + 4, len(body) + 8 + 2}  # the trailer and its dataset name are optional
    path = tmp_path / "cut.dat"
    for n in range(len(raw)):
        path.write_bytes(raw[:n])
        if n in valid:
            read_imatrix(path)
        else:
            with pytest.raises(ModelError, match=r"cut\.dat: "):
                read_imatrix(path)


@pytest.mark.parametrize("data, pattern", [
    (struct.pack("<i", 0), "implausible legacy entry count 0"),
    (struct.pack("<i", 1 << 30) + bytes(8), "implausible legacy entry count"),
    (hand_dat([("w", 1, [1.0])]) + struct.pack("<ii", 1, 0) + b"junk", "4 unexpected bytes"),
    (hand_dat([("w", 1, [float("nan")])]), "NaN, infinite or negative"),
    (hand_dat([("w", 1, [1.0]), ("w", 1, [2.0])]), "names 'w' twice"),
    (hand_dat([("w", -1, [1.0])]), "ncall=-1"),
    (hand_dat([("w", 1, [])]), "nval=0"),
    (struct.pack("<ii", 1, -5) + bytes(16), "name length -5"),
    (struct.pack("<ii", 1, 2) + b"\xff\xfe" + struct.pack("<iif", 1, 1, 1.0), "not UTF-8"),
])
def test_bad_dat_refused(tmp_path, data, pattern):
    path = tmp_path / "bad.dat"
    path.write_bytes(data)
    with pytest.raises(ModelError, match=r"bad\.dat: .*" + pattern):
        read_imatrix(path)


def test_missing_file_refused(tmp_path):
    with pytest.raises(ModelError, match=r"absent\.gguf: cannot read imatrix file"):
        read_imatrix(tmp_path / "absent.gguf")


# ---------------------------------------------------------------- writer contract


@pytest.mark.parametrize("bad, kw, error", [
    ({}, {}, "at least one entry"),
    ({"blk.0.attn_q": (torch.ones(4), 1)}, {}, "GGUF weight names"),
    ({"w.weight": (torch.ones(2, 4), 1)}, {}, "1-D"),
    ({"w.weight": (torch.ones(4), 0)}, {}, "token count"),
    ({"w.weight": (torch.ones(4), 1.5)}, {}, "token count"),
    ({"w.weight": (-torch.ones(4), 1)}, {}, "negative"),
    ({"x" * 50 + ".weight": (torch.ones(4), 1)}, {}, "too long"),
    ({"w.weight": (torch.ones(4), 1)}, {"datasets": []}, "non-empty list"),  # gguf-py would silently drop it
    ({"w.weight": (torch.ones(4), 1)}, {"chunk_size": -1}, "chunk_size"),
])
def test_writer_refuses_bad_input_and_keeps_old_file(tmp_path, bad, kw, error):
    path = gguf_file(tmp_path)
    before = path.read_bytes()
    with pytest.raises(ValueError, match=error):
        write_imatrix_gguf(path, bad, **{"datasets": ["a"], "chunk_count": 1, "chunk_size": 1, **kw})
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["im.gguf"]


def test_writer_refuses_non_finite_as_model_error(tmp_path):
    for bad in (float("nan"), float("inf"), 1e39):  # 1e39 overflows float32
        with pytest.raises(ModelError, match="non-finite"):
            write_imatrix_dat(tmp_path / "x.dat", {"w.weight": (torch.tensor([1.0, bad], dtype=torch.float64), 1)},
                              chunk_count=1, dataset="d")
    assert not list(tmp_path.iterdir())

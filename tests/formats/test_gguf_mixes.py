"""llama.cpp's named mixes: qtool's per-tensor types equal what llama-quantize itself writes, for every mix, on
models with 256-aligned rows and with rows that force its shape fallbacks; plus the rules in formats.md §3."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import gguf
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "calib"))
from conftest import make_tiny_llama  # noqa: E402
from gguf_tiny import BUILD_HINT, hf_to_gguf, llama_tool  # noqa: E402

from qtool.formats.gguf_mixes import FALLBACK_CANDIDATES, MIXES, file_size, mix_types, type_bpw, use_more_bits

QUANTIZE = llama_tool("llama-quantize")
NAMED = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0", "Q4_0")


def test_use_more_bits_matches_formats_md():
    assert [i for i in range(32) if use_more_bits(i, 32)] == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    assert [i for i in range(16) if use_more_bits(i, 16)] == [0, 1, 4, 7, 10, 13, 14, 15]


def _shapes(n_layer: int, hidden: int, ff: int, kv: int, vocab: int = 384, tied: bool = False) -> dict:
    s = {"token_embd.weight": (vocab, hidden)}
    if not tied:
        s["output.weight"] = (vocab, hidden)
    for i in range(n_layer):
        s |= {f"blk.{i}.attn_q.weight": (hidden, hidden), f"blk.{i}.attn_k.weight": (kv, hidden),
              f"blk.{i}.attn_v.weight": (kv, hidden), f"blk.{i}.attn_output.weight": (hidden, hidden),
              f"blk.{i}.ffn_gate.weight": (ff, hidden), f"blk.{i}.ffn_up.weight": (ff, hidden),
              f"blk.{i}.ffn_down.weight": (hidden, ff), f"blk.{i}.attn_norm.weight": (hidden,)}
    return s


def test_q4_k_m_rules_and_fallbacks():
    t = mix_types("Q4_K_M", _shapes(16, 576, 1536, 192), n_layer=16, n_head=9, n_head_kv=3)
    assert "blk.0.attn_norm.weight" not in t  # norms stay F32
    assert t["output.weight"].type == "q8_0"  # 576 rows do not fit Q4_K's 256-block: Q8_0 head
    assert t["blk.0.attn_q.weight"].type == "q5_0" and t["blk.0.attn_q.weight"].wanted == "q4_k"
    assert t["blk.0.ffn_down.weight"].type == "q6_k"  # 1536-wide rows fit; layer 0 gets more bits
    assert t["blk.2.ffn_down.weight"].type == "q4_k"
    assert t["blk.4.attn_v.weight"].type == "q8_0" and t["blk.4.attn_v.weight"].wanted == "q6_k"
    tied = mix_types("Q4_K_M", _shapes(16, 512, 1024, 128, tied=True), n_layer=16, n_head=8, n_head_kv=2)
    assert tied["token_embd.weight"].type == "q6_k"  # tied embeddings follow the output rule


def test_fallback_candidates_never_exceed_llama_cpp():
    for fb, cands in FALLBACK_CANDIDATES.items():
        assert fb in cands and all(type_bpw(c) <= type_bpw(fb) for c in cands)
    assert set(FALLBACK_CANDIDATES["q4_0"]) == {"q4_0", "iq4_nl"}
    assert file_size({"a": "q4_k"}, {"a": (2, 512)}) == 2 * 2 * 144


def test_unknown_mix_lists_the_known():
    with pytest.raises(KeyError, match="Q4_K_M"):
        mix_types("Q4_K_X", {}, n_layer=1, n_head=1, n_head_kv=1)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Tiny F32 GGUFs: 8 layers with 256-aligned rows, and 320-wide rows (llama.cpp's fallbacks), GQA 4."""
    d = tmp_path_factory.mktemp("mixes")
    out = {}
    for name, kw in {"aligned": dict(num_hidden_layers=8),
                     "fallback": dict(num_hidden_layers=8, hidden_size=320, intermediate_size=640,
                                      num_attention_heads=5, num_key_value_heads=1, head_dim=64)}.items():
        hf = make_tiny_llama(d / name, **kw)
        out[name] = hf_to_gguf(hf, d / f"{name}.gguf")
    return out


@pytest.mark.skipif(QUANTIZE is None, reason=f"llama-quantize not found: {BUILD_HINT}")
@pytest.mark.parametrize("mix", NAMED)
@pytest.mark.parametrize("model", ["aligned", "fallback"])
def test_types_equal_llama_quantize(models, tmp_path, mix, model):
    src = models[model]
    out = tmp_path / "q.gguf"
    p = subprocess.run([str(QUANTIZE), str(src), str(out), mix, "1"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    theirs = {t.name: t.tensor_type.name.lower() for t in gguf.GGUFReader(out).tensors}
    r = gguf.GGUFReader(src)
    shapes = {t.name: tuple(int(x) for x in reversed(t.shape)) for t in r.tensors}
    f = r.fields
    n_head = int(f["llama.attention.head_count"].contents())
    n_kv = int(f["llama.attention.head_count_kv"].contents())
    ours = mix_types(mix, shapes, n_layer=int(f["llama.block_count"].contents()), n_head=n_head, n_head_kv=n_kv)
    assert {n: c.type for n, c in ours.items()} == {n: t for n, t in theirs.items() if n in ours}
    assert all(theirs[n] == "f32" for n in theirs if n not in ours)  # norms stay F32
    assert MIXES[mix][0] == int(gguf.GGUFReader(out).fields["general.file_type"].contents())

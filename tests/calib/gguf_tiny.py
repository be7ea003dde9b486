"""Test helpers: a tiny HF Llama directory (conftest.make_tiny_llama) written as an F32 GGUF llama.cpp loads,
and a way to find llama.cpp's tools built by tests/tools/build_llama_quantize.sh.

The GGUF follows docs/formats.md 1.3-1.6: UINT32/FLOAT32 arch keys, q/k rows permuted for the NORM rope
(k with n_head_kv groups), a gpt2 byte-level BPE vocabulary with merges, every tensor F32.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import gguf
import numpy as np
from safetensors.numpy import load_file

from qtool.eval.llamacpp import tool

BUILD_HINT = "run tests/tools/build_llama_quantize.sh (make llama-tools / make install-test do), or set " \
             "QTOOL_LLAMA_CPP_BIN (a directory of llama.cpp tools) or QTOOL_LLAMA_QUANTIZE"


def llama_tool(name: str) -> Path | None:
    """`llama-quantize` from $QTOOL_LLAMA_QUANTIZE (its sibling for other tools), else qtool.eval.llamacpp.tool:
    $QTOOL_LLAMA_CPP_BIN, the build cache for this CPU's ISA tag, PATH."""
    explicit = os.environ.get("QTOOL_LLAMA_QUANTIZE")
    if explicit:
        path = Path(explicit) if name == "llama-quantize" else Path(explicit).with_name(name)
        return path if path.is_file() else None
    return tool(name)


def permute_qk(w: np.ndarray, n_groups: int) -> np.ndarray:
    """HF rotate-half rows -> ggml NORM rope rows: per head, view rows as [2, hd/2], transpose, flatten."""
    rows, cols = w.shape
    hd = rows // n_groups
    return w.reshape(n_groups, 2, hd // 2, cols).swapaxes(1, 2).reshape(rows, cols)


_BLOCK = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
          "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
          "mlp.down_proj": "ffn_down"}


def _gguf_name(hf: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if hf in top:
        return top[hf]
    _, _, i, rest = hf.split(".", 3)
    return f"blk.{i}.{_BLOCK[rest.removesuffix('.weight')]}.weight"


def _add_vocab(w: gguf.GGUFWriter, model_dir: Path, cfg: dict) -> None:
    tj = json.loads((model_dir / "tokenizer.json").read_text())
    vocab: dict[str, int] = dict(tj["model"]["vocab"])
    special = {t["content"]: t["id"] for t in tj.get("added_tokens", [])}
    vocab.update(special)
    tokens = [tok for tok, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    assert [vocab[t] for t in tokens] == list(range(len(tokens))) == list(range(cfg["vocab_size"])), "ids must be 0..n-1"
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    w.add_add_bos_token(False)


def hf_to_gguf(model_dir: Path, out: Path) -> Path:
    """Write the HF Llama directory `model_dir` as an all-F32 GGUF at `out`."""
    cfg = json.loads((model_dir / "config.json").read_text())
    n_head, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    tensors = load_file(model_dir / "model.safetensors")
    w = gguf.GGUFWriter(out, "llama")
    w.add_name("qtool-tiny-llama")
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(float(cfg.get("rope_theta") or cfg.get("rope_parameters", {}).get("rope_theta", 10000.0)))
    w.add_rope_dimension_count(cfg["hidden_size"] // n_head)
    w.add_vocab_size(cfg["vocab_size"])
    _add_vocab(w, model_dir, cfg)
    for hf in sorted(tensors):
        t = np.ascontiguousarray(tensors[hf], dtype=np.float32)
        if hf.endswith("q_proj.weight"):
            t = permute_qk(t, n_head)
        elif hf.endswith("k_proj.weight"):
            t = permute_qk(t, n_kv)
        w.add_tensor(_gguf_name(hf), t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def write_raw_gguf(path: Path, kv: dict[str, tuple[object, gguf.GGUFValueType]], tensors: dict[str, np.ndarray]) -> Path:
    """A GGUF with exactly these keys (value, type) and tensors, in this order: for hand-made (malformed) imatrices."""
    w = gguf.GGUFWriter(path, "unused")
    del w.kv_data[0][gguf.Keys.General.ARCHITECTURE]
    for key, (value, vtype) in kv.items():
        w.add_key_value(key, value, vtype, sub_type=gguf.GGUFValueType.STRING if vtype == gguf.GGUFValueType.ARRAY else None)
    for name, t in tensors.items():
        w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def imatrix_kv(datasets=("calib.txt",), chunk_count=2, chunk_size=512) -> dict:
    """The four keys of a valid GGUF imatrix; pass e.g. chunk_size=None to leave one out."""
    t = gguf.GGUFValueType
    kv = {"general.type": ("imatrix", t.STRING), "imatrix.datasets": (list(datasets) if datasets else None, t.ARRAY),
          "imatrix.chunk_count": (chunk_count, t.UINT32), "imatrix.chunk_size": (chunk_size, t.UINT32)}
    return {k: v for k, v in kv.items() if v[0] is not None}

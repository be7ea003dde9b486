"""What a GGUF file says about its model: tensor names, hyperparameters, tokenizer, provenance.

Everything here is read from the transformers config, the architecture row (`io/arch.py`) and the source's
tokenizer, and written through gguf-py's typed `add_*` helpers (llama.cpp type-checks every key exactly:
formats.md §1.3). Unsupported model features are refused with a clear error before any work starts.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Callable

import gguf

from qtool.errors import ModelError
from qtool.io.arch import ARCHS, Arch


def supported_gguf_archs() -> str:
    return ", ".join(sorted({f"{name} ({a.gguf_arch})" for name, a in ARCHS.items()}))


@lru_cache(maxsize=32)
def _name_map(gguf_arch: str, n_layers: int) -> gguf.TensorNameMap:
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == gguf_arch)
    return gguf.TensorNameMap(arch_id, n_layers)


def tensor_namer(arch: Arch, n_layers: int) -> Callable[[str], str]:
    """HF parameter name -> GGUF tensor name (`model.layers.3.mlp.down_proj.weight` -> `blk.3.ffn_down.weight`)."""
    names = _name_map(arch.gguf_arch, n_layers)

    def name(hf: str) -> str:
        stem, _, suffix = hf.rpartition(".")
        g = names.get_name(stem)
        if g is None:
            raise ModelError(f"tensor {hf} has no llama.cpp name in architecture {arch.gguf_arch!r}")
        return f"{g}.{suffix}"

    return name


def permuted(arch: Arch, cfg) -> dict[str, int]:
    """HF name suffix -> rope groups of the q/k row permutation (llama only; k with the KV head count)."""
    if not arch.permute_qk:
        return {}
    n_head = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_head
    return {"self_attn.q_proj.weight": n_head, "self_attn.k_proj.weight": n_kv,
            "self_attn.q_proj.bias": n_head, "self_attn.k_proj.bias": n_kv}


def _rope_theta(cfg) -> float:
    theta = getattr(cfg, "rope_theta", None)
    params = getattr(cfg, "rope_parameters", None) or {}
    if theta is None and isinstance(params, dict):
        theta = params.get("rope_theta")
    return float(theta or 10000.0)


def check_supported(cfg, arch: Arch) -> None:
    """Refuse model features this writer does not express (before any work)."""
    scaling = getattr(cfg, "rope_scaling", None)
    params = getattr(cfg, "rope_parameters", None)
    kind = None
    for d in (scaling, params):
        if isinstance(d, dict):
            kind = d.get("rope_type") or d.get("type") or kind
    if kind not in (None, "default"):
        raise ModelError(f"rope scaling {kind!r} is not written to GGUF by this version of qtool "
                         "(plain rope only)")


def write_hparams(meta: gguf.GGUFWriter, cfg, arch: Arch, name: str) -> None:
    """The `{arch}.*` keys llama.cpp's loader reads (UINT32 counts, FLOAT32 floats); `check_supported` first."""
    n_head = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_head
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    meta.add_name(name)
    meta.add_context_length(int(cfg.max_position_embeddings))
    meta.add_embedding_length(int(cfg.hidden_size))
    meta.add_block_count(int(cfg.num_hidden_layers))
    meta.add_feed_forward_length(int(cfg.intermediate_size))
    meta.add_head_count(int(n_head))
    meta.add_head_count_kv(int(n_kv))
    meta.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    meta.add_rope_freq_base(_rope_theta(cfg))
    meta.add_rope_dimension_count(int(head_dim))
    if head_dim != cfg.hidden_size // n_head or arch.gguf_arch == "qwen3":  # qwen3 readers default head_dim to 128
        meta.add_key_length(int(head_dim))
        meta.add_value_length(int(head_dim))
    meta.add_vocab_size(int(cfg.vocab_size))


_TOKENIZER_PREFIX = "tokenizer."


def copy_tokenizer(meta: gguf.GGUFWriter, src: Path) -> int:
    """Copy every `tokenizer.*` key of the GGUF `src` unchanged (its llama.cpp vocabulary is already right)."""
    reader = gguf.GGUFReader(src)
    n = 0
    for key, field in reader.fields.items():
        if not key.startswith(_TOKENIZER_PREFIX):
            continue
        vtype = gguf.GGUFValueType(field.types[0])
        sub = gguf.GGUFValueType(field.types[1]) if vtype == gguf.GGUFValueType.ARRAY else None
        meta.add_key_value(key, field.contents(), vtype, sub_type=sub)
        n += 1
    if n == 0:
        raise ModelError(f"{src}: the GGUF source has no tokenizer.* keys to copy")
    return n


def write_tokenizer(meta: gguf.GGUFWriter, source, vocab_size: int) -> None:
    """The source's tokenizer as llama.cpp's `tokenizer.ggml.*` keys: copied from a GGUF source, converted from
    an HF tokenizer directory otherwise (`io/gguf_vocab.py`; an unknown pre-tokenizer is an error)."""
    if source.path.is_file() and source.path.suffix == ".gguf":
        copy_tokenizer(meta, source.path)
        return
    from qtool.io.gguf_vocab import vocab_from_hf

    vocab_from_hf(source.path, vocab_size).write(meta)

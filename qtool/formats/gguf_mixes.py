"""llama.cpp's named GGUF mixes (Q4_K_M, ...): which ggml type each tensor of a dense decoder gets.

The rules are llama.cpp's `llama_tensor_get_type_impl` and `tensor_type_fallback` (src/llama-quant.cpp, read
from the llama-cpp-python 0.3.36 sdist; formats.md §3.1-3.2) for dense llama/qwen2/qwen3 models: a default
type per mix, attn_v / ffn_down / attn_output bumps by layer, the output head (and tied token embeddings) at
Q6_K (Q8_0 when its rows do not fit the mix's block, or for the Q8_0 mix), and the fixed shape fallbacks
(Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, Q2_K/Q3_K -> Q4_0, IQ4_XS -> IQ4_NL, then F16).

`mix_types` returns, per GGUF tensor name, the type llama.cpp would write and, when that type is a shape
fallback, the type it replaced: qtool may then choose another type no larger than llama.cpp's fallback
(`FALLBACK_CANDIDATES`, chosen by least importance-weighted error in the engine), so its file never exceeds
llama.cpp's size for the same mix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# mix name -> (LlamaFileType id written as general.file_type, default ggml type)
MIXES: dict[str, tuple[int, str]] = {
    "Q4_0": (2, "q4_0"), "Q4_1": (3, "q4_1"), "Q5_0": (8, "q5_0"), "Q5_1": (9, "q5_1"), "Q8_0": (7, "q8_0"),
    "Q2_K": (10, "q2_k"), "Q3_K_S": (11, "q3_k"), "Q3_K_M": (12, "q3_k"), "Q3_K_L": (13, "q3_k"),
    "Q4_K_S": (14, "q4_k"), "Q4_K_M": (15, "q4_k"), "Q5_K_S": (16, "q5_k"), "Q5_K_M": (17, "q5_k"),
    "Q6_K": (18, "q6_k"), "IQ4_NL": (25, "iq4_nl"), "IQ4_XS": (30, "iq4_xs"),
    "F16": (1, "f16"), "BF16": (32, "bf16"), "F32": (0, "f32"),
}
# every type qtool writes, with (elements per block, bytes per block) as ggml defines them
TYPE_SIZES: dict[str, tuple[int, int]] = {
    "f32": (1, 4), "f16": (1, 2), "bf16": (1, 2), "q8_0": (32, 34), "q4_0": (32, 18), "q4_1": (32, 20),
    "q5_0": (32, 22), "q5_1": (32, 24), "iq4_nl": (32, 18), "q2_k": (256, 84), "q3_k": (256, 110),
    "q4_k": (256, 144), "q5_k": (256, 176), "q6_k": (256, 210), "iq4_xs": (256, 136),
}
_SHAPE_FALLBACK = {"q2_k": "q4_0", "q3_k": "q4_0", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0", "iq4_xs": "iq4_nl"}
_BLOCK32 = ("q4_0", "iq4_nl", "q4_1", "q5_0", "q5_1", "q8_0")


def type_bpw(t: str) -> float:
    block, size = TYPE_SIZES[t]
    return 8 * size / block


# the 32-block types qtool may pick instead of llama.cpp's shape fallback: those no larger than it
FALLBACK_CANDIDATES: dict[str, tuple[str, ...]] = {
    fb: tuple(t for t in _BLOCK32 if type_bpw(t) <= type_bpw(fb)) for fb in set(_SHAPE_FALLBACK.values())
}


@dataclass(frozen=True)
class TypeChoice:
    type: str  # what llama.cpp's llama-quantize writes for this tensor
    wanted: str | None = None  # the type the mix asked for when `type` is a shape fallback, else None
    reason: str = ""


def use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


_CATEGORY = re.compile(r"^blk\.(\d+)\.(attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down)\.weight$")


def quantizable(name: str, ndim: int) -> bool:
    """llama.cpp quantizes 2-D `*.weight` tensors except norms (`tensor_allows_quantization`)."""
    return ndim >= 2 and name.endswith(".weight") and "_norm" not in name


def _block_size(t: str) -> int:
    return TYPE_SIZES[t][0]


def fallback(t: str, cols: int) -> TypeChoice:
    if cols % _block_size(t) == 0:
        return TypeChoice(t)
    fb = _SHAPE_FALLBACK.get(t, t)
    if cols % _block_size(fb):
        fb = "f16"
    return TypeChoice(fb, wanted=t, reason=f"rows of {cols} are not whole {t.upper()} blocks "
                                           f"({_block_size(t)}): llama.cpp falls back to {fb.upper()}")


def mix_types(mix: str, shapes: dict[str, tuple[int, ...]], *, n_layer: int, n_head: int, n_head_kv: int,
              has_imatrix: bool = False) -> dict[str, TypeChoice]:
    """The type of every quantizable tensor (GGUF names -> PyTorch-order shapes) under llama.cpp's `mix`.

    Tied embeddings are recognised by the absence of ``output.weight``. Tensors that stay float (norms,
    biases) are not in the result."""
    if mix not in MIXES:
        raise KeyError(f"unknown GGUF mix {mix!r}; known: {', '.join(MIXES)}")
    ftype_default = MIXES[mix][1]
    tied = "output.weight" not in shapes
    n_gqa = n_head // max(n_head_kv, 1)
    out: dict[str, TypeChoice] = {}
    if ftype_default in ("f32", "f16", "bf16"):
        return {n: TypeChoice(ftype_default) for n, s in shapes.items() if quantizable(n, len(s))}
    for name in sorted(shapes, key=_order):
        shape = shapes[name]
        if not quantizable(name, len(shape)):
            continue
        cols = shape[-1]
        t = ftype_default
        if name == "output.weight" or (tied and name == "token_embd.weight"):
            if cols % _block_size(ftype_default):
                t = "q8_0"
            elif ftype_default != "q8_0":
                t = "q6_k"
            out[name] = fallback(t, cols)
            continue
        if name == "token_embd.weight":
            out[name] = fallback(t, cols)
            continue
        m = _CATEGORY.match(name)
        if m is None:
            out[name] = fallback(t, cols)
            continue
        i, kind = int(m.group(1)), m.group(2)
        if kind == "attn_v":  # one attn_v per layer: llama.cpp's i_attention_wv counter is the layer index
            if mix == "Q2_K":
                t = "q4_k" if n_gqa >= 4 else "q3_k"
            elif mix == "Q3_K_M":
                t = "q5_k" if i < 2 else "q4_k"
            elif mix == "Q3_K_L":
                t = "q5_k"
            elif mix in ("IQ4_NL", "IQ4_XS") and n_gqa >= 4:
                t = "q5_k"
            elif mix in ("Q4_K_M", "Q5_K_M") and use_more_bits(i, n_layer):
                t = "q6_k"
            elif mix == "Q4_K_S" and i < 4:
                t = "q5_k"
        elif kind == "ffn_down":
            if mix == "Q2_K":
                t = "q3_k"
            elif mix == "Q3_K_M":
                t = "q5_k" if i < n_layer // 16 else "q4_k"
            elif mix == "Q3_K_L":
                t = "q5_k"
            elif mix == "Q4_K_M":
                if use_more_bits(i, n_layer):
                    t = "q6_k"
            elif i < n_layer // 8 and mix in ("IQ4_NL", "IQ4_XS") and not has_imatrix:
                t = "q5_k"
            elif mix == "Q5_K_M" and use_more_bits(i, n_layer):
                t = "q6_k"
            elif mix == "Q4_K_S" and i < n_layer // 8:
                t = "q5_k"
            elif mix in ("Q4_0", "Q5_0") and has_imatrix and i < n_layer // 8:
                t = "q4_1" if mix == "Q4_0" else "q5_1"
        elif kind == "attn_output":
            t = {"Q2_K": "q3_k", "Q3_K_M": "q4_k", "Q3_K_L": "q5_k"}.get(mix, t)
        out[name] = fallback(t, cols)
    return out


def _order(name: str):
    """llama.cpp's processing order: non-block tensors first, then by layer, then by name."""
    m = re.match(r"^blk\.(\d+)\.", name)
    return (0, 0, name) if m is None else (1, int(m.group(1)), name)


def file_size(types: dict[str, str], shapes: dict[str, tuple[int, ...]]) -> int:
    """Bytes of the tensor data of the given types (no padding, no metadata)."""
    total = 0
    for name, t in types.items():
        block, size = TYPE_SIZES[t]
        shape = shapes[name]
        rows = 1
        for n in shape[:-1]:
            rows *= n
        total += rows * shape[-1] // block * size
    return total

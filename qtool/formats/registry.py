"""Codecs by name: one spelling for every codec qtool has, so commands can take lists of them
(`qtool sensitivity --candidates int4_g64_asym,int8_ch_sym` or `q4_k,q6_k`).

    GGUF block types   q8_0, q4_k, iq4_nl, ...            (`formats/gguf_*.py`, `gguf_base.gguf_codec`)
    affine integers    int{2,3,4,8}_{g32..g256|ch}_{sym|asym}   (`formats/affine.py`; ch = per output channel)
    bitsandbytes       nf4_b64[_dq], fp4_b64[_dq]               (`formats/nf4.py`)

`codec(name)` gives the codec object (the names are what each codec's `.name` says); `rule_fields(name)` the
plan-rule fields that name it (`codec: int, bits: 4, group_size: 64, symmetric: false`), so a plan written from
names reads back as the same codec.
"""

from __future__ import annotations

import re

import torch

from qtool.errors import UsageError

_INT = re.compile(r"int([2348])_(g(32|64|128|256)|ch)_(sym|asym)")
_NF = re.compile(r"(nf4|fp4)_b(32|64|128|256|512|1024|2048|4096)(_dq)?")


def rule_fields(name: str) -> dict:
    """The plan-rule fields of codec `name` (UsageError listing the spellings when it is not one)."""
    from qtool.plan import GGUF_TYPES

    n = name.strip().lower()
    if n in GGUF_TYPES:
        return {"codec": n}
    if m := _INT.fullmatch(n):
        return {"codec": "int", "bits": int(m.group(1)), "group_size": int(m.group(3) or 0),
                "symmetric": m.group(4) == "sym"}
    if m := _NF.fullmatch(n):
        return {"codec": m.group(1), "block_size": int(m.group(2)), "double_quant": bool(m.group(3))}
    raise UsageError(f"unknown codec {name!r}; codecs are named like q4_k, iq4_nl (GGUF types: "
                     f"{', '.join(GGUF_TYPES)}), int4_g64_asym, int8_ch_sym (affine: bits 2/3/4/8, groups g32-g256 or "
                     "ch, sym/asym), nf4_b64_dq, fp4_b64")


def codec(name: str, scale_dtype: torch.dtype = torch.float32):
    """The codec object `name` spells (int scales stored in `scale_dtype`)."""
    from qtool.plan import Rule, make_codec

    f = rule_fields(name)
    if f["codec"] not in ("int", "nf4", "fp4"):
        from qtool.formats.gguf_base import gguf_codec

        return gguf_codec(f["codec"])
    return make_codec(Rule(match=".*", **f), scale_dtype)


def family(name: str) -> str:
    """'gguf', 'int' or 'bnb': which output formats can hold the codec (`outputs/`)."""
    c = rule_fields(name)["codec"]
    return "int" if c == "int" else "bnb" if c in ("nf4", "fp4") else "gguf"

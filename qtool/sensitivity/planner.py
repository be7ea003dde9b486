"""From per-tensor options to a plan file: budgets in bytes, the solve, and the plan text with its exact size.

A GGUF plan's file size is exactly ``fixed + Σ bytes(picked type)`` (`engine.sinks.predict_gguf_bytes`): the
fixed part holds the header, the metadata (tokenizer, hyperparameters, and the plan text itself) and the float
tensors. The plan text depends on the picks only through the type names in its rules, so the solve runs
against the fixed part of a plan whose every rule names its longest option (an upper bound), and the written
plan's exact size is computed afterwards: it never exceeds the budget.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from qtool.errors import UsageError
from qtool.sensitivity.costs import Option

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text: str) -> int:
    """'90MB', '1.5GiB', '123456' -> bytes (decimal kB/MB/GB, binary KiB/MiB/GiB)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgG]i?[bB]|[bB])?\s*", text)
    if not m:
        raise UsageError(f"--target-size {text!r}: expected a size like 90MB, 1.5GiB or 94371840")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])


@dataclass(frozen=True)
class Budget:
    kind: str  # "size" (whole file bytes) | "bpw" (tensor data bits per weight, every weight in the file)
    value: float
    data_bytes: int  # the budget for the sum of picked tensors' bytes

    def describe(self) -> str:
        return (f"file size <= {self.value:,.0f} bytes" if self.kind == "size"
                else f"{self.value:g} bits per weight over every weight in the file (embeddings and head included)")


def mix_name(picks: dict[str, str], options: dict[str, list[Option]]) -> str:
    """The llama.cpp mix whose default type holds most of the picked bytes (GGUF's `general.file_type`)."""
    from qtool.formats.gguf_mixes import MIXES

    by_type: dict[str, int] = {}
    for name, t in picks.items():
        by_type[t] = by_type.get(t, 0) + next(o.bytes for o in options[name] if o.codec == t)
    for t, _ in sorted(by_type.items(), key=lambda kv: (-kv[1], kv[0])):
        mix = next((m for m, (_, default) in MIXES.items() if default == t), None)
        if mix is not None:
            return mix
    return "Q4_K_M"


def plan_text(picks: dict[str, str], options: dict[str, list[Option]], *, method: str, output: dict,
              calibration: dict | None, header: list[str]) -> str:
    """One rule per tensor (exact-name regex), commented with its predicted cost and bytes."""
    from qtool.formats.registry import rule_fields

    lines = [f"# {h}" for h in header]
    lines.append("rules:")
    for name in sorted(picks):
        o = next(o for o in options[name] if o.codec == picks[name])
        m = method if name not in ("model.embed_tokens", "lm_head") else "rtn"
        fields = {"method": m, **rule_fields(picks[name])}
        if fields.get("group_size") == 0:
            fields["group_size"] = "channel"
        if m == "gptq":
            fields["act_order"] = True
        body = ", ".join(f"{k}: {str(v).lower() if isinstance(v, bool) else v}" for k, v in fields.items())
        lines.append(f"  - {{match: '^{re.escape(name)}$', {body}}}  # cost {o.cost:.4e}, {o.bytes} bytes")
    lines.append("output: {" + ", ".join(f"{k}: {v}" for k, v in output.items()) + "}")
    if calibration:
        body = ", ".join(f"{k}: {v}" for k, v in calibration.items())
        lines.append(f"calibration: {{{body}}}")
    return "\n".join(lines) + "\n"


def frontier(items: dict, lo: int, hi: int, n: int = 8) -> list[tuple[int, float]]:
    """(tensor bytes, predicted cost) of the solver's mixes at `n` budgets spread over [lo, hi]."""
    from qtool.sensitivity.solve import solve

    pts = []
    for k in range(n):
        sol = solve(items, lo + (hi - lo) * k // max(n - 1, 1))
        pts.append((sol.bytes, sol.cost))
    return sorted(set(pts))


def named_mixes(cfg, arch, options: dict[str, list[Option]], shapes: dict[str, tuple[int, int]],
                mixes=("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0")) -> dict:
    """{mix: (tensor bytes, predicted cost)} of llama.cpp's named mixes (its per-tensor rules and fixed shape
    fallbacks) priced by the same costs; mixes that use a type outside the options are left out."""
    from qtool.formats.gguf_mixes import mix_types
    from qtool.io.gguf_model import tensor_namer

    namer = tensor_namer(arch, cfg.num_hidden_layers)
    gnames = {namer(n + ".weight"): n for n in options}
    n_head = cfg.num_attention_heads
    out = {}
    for mix in mixes:
        types = mix_types(mix, {g: shapes[n] for g, n in gnames.items()}, n_layer=cfg.num_hidden_layers, n_head=n_head,
                          n_head_kv=getattr(cfg, "num_key_value_heads", None) or n_head, has_imatrix=True)
        total_b, total_c, ok = 0, 0.0, True
        for g, name in gnames.items():
            choice = types.get(g)
            o = next((o for o in options[name] if choice is not None and o.codec == choice.type), None)
            if o is None:
                ok = False
                break
            total_b, total_c = total_b + o.bytes, total_c + o.cost
        if ok:
            out[mix] = (total_b, total_c)
    return out

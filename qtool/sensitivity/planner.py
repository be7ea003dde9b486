"""From per-tensor options to a plan file: candidates checked against the format, budgets in bytes, the solve,
and the plan text with its exact size (`write_plan`; the CLI only parses flags and prints).

A GGUF plan's file size is exactly ``fixed + Σ bytes(picked type)`` (`engine.sinks.predict_gguf_bytes`): the
fixed part holds the header, the metadata (tokenizer, hyperparameters, and the plan text itself) and the float
tensors. The plan text depends on the picks only through the type names in its rules, so the solve runs
against the fixed part of a plan whose every rule names its longest option (an upper bound), and the written
plan's exact size is computed afterwards: it never exceeds the budget.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import NamedTuple

from qtool.errors import UsageError
from qtool.sensitivity.costs import Option

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text: str) -> int:
    """'90MB', '1.5GiB', '123456' -> bytes (decimal kB/MB/GB, binary KiB/MiB/GiB)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgG]i?[bB]|[bB])?\s*", text)
    if not m:
        raise UsageError(f"--target-size {text!r}: expected a size like 90MB, 1.5GiB or 94371840")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])


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
        fields = {"method": "[awq, gptq]" if m == "awq-gptq" else m, **rule_fields(picks[name])}
        if fields.get("group_size") == 0:
            fields["group_size"] = "channel"
        if m in ("gptq", "awq-gptq"):
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


def check_candidates(cands: list[str], fmt_name: str | None, method: str):
    """The output format the candidates are planned for; refuses unknown names, mixed families, and candidates
    the format cannot hold (naming them and why)."""
    from qtool.errors import UsageError
    from qtool.formats.registry import family, rule_fields
    from qtool.outputs import OUTPUT_FORMATS, output_format
    from qtool.plan import Rule

    if not cands:
        raise UsageError("--candidates: give at least one codec")
    fields = {c: rule_fields(c) for c in cands}  # unknown names: UsageError listing the spellings
    families = {family(c) for c in cands}
    if len(families) > 1:
        raise UsageError(f"--candidates mix GGUF types and HF codecs ({', '.join(cands)}); one plan writes one format")
    fam = families.pop()
    name = fmt_name or {"gguf": "gguf", "int": "compressed-tensors", "bnb": "bnb"}[fam]
    if name not in OUTPUT_FORMATS:
        raise UsageError(f"--format {name}: unknown; allowed: {', '.join(OUTPUT_FORMATS)}")
    fmt = output_format(name)
    for c in cands:
        why = fmt.refuse(Rule(match=".*", method="gptq" if method == "awq-gptq" else method, **fields[c]))
        if why is not None:
            raise UsageError(f"--candidates {c}: --format {name} cannot hold it: {why[1]}")
    return fmt


def scale_dtype(source, fmt):
    """What int codecs store their scales in for this format (what the plan's resolution will use)."""
    import torch

    return torch.float16 if fmt.fp16_scales else source.dtype


def write_plan(source, fmt, options, cands, method, cal, size_budget, target_bpw, out: Path, memory=None,
                     report: Path | None = None, mode: str = "proxy") -> dict:
    """Budget -> solve -> plan text (exact size computed on the final plan) -> atomic write; the JSON report."""
    import os

    from qtool.engine.sinks import predict_gguf_bytes
    from qtool.errors import UsageError
    from qtool.io.arch import arch_of
    from qtool.io.gguf_writer import GGUF_FLOAT, _pad
    from qtool.plan import parse_plan
    from qtool.sensitivity.solve import Choice, feasible_range, solve

    arch = arch_of(source.config)
    shapes = {n: tuple(source.shape(n + ".weight")) for n in options}
    gguf = fmt.name == "gguf"

    def output(mix: str) -> dict:
        return {"format": "gguf", "type": mix} if gguf else {"format": fmt.name}

    def layout(picks: dict[str, str], mix: str):
        if not gguf:  # HF: the tensor data (safetensors headers and config.json are a few kB, not counted)
            fl = _hf_float_bytes(source, arch, set(options))
            return _Layout(fl, fl)
        text = plan_text(picks, options, method=method, output=output(mix), calibration=cal, header=[])
        return predict_gguf_bytes(source, arch, parse_plan(text, where=str(out)), shapes,
                                  GGUF_FLOAT[getattr(source, "float_dtype", source.dtype)])

    # an upper bound of the fixed part: every rule names its longest option, the mix name is 6 characters (the
    # longest llama.cpp mix names are); the written plan differs only in those names
    longest = {n: max((o.codec for o in opts), key=lambda c: (len(c), c)) for n, opts in options.items()}
    ub = layout(longest, "Q4_K_M")
    n_weights = sum(math.prod(source.shape(n)) for n in source.names())
    pad = _pad if gguf else (lambda n: n)  # GGUF aligns every tensor's data to 32 bytes
    items = {n: [Choice(o.codec, pad(o.bytes), o.cost) for o in opts] for n, opts in options.items()}
    lo, hi = feasible_range(items)
    if size_budget is not None:  # the whole file
        offset = ub.fixed
        describe = f"{size_budget:,} bytes ({'whole file' if gguf else 'tensor data'})"
        if memory is not None:
            describe = (f"memory {size_budget + memory.overhead:,} bytes = file <= {size_budget:,} bytes + "
                        f"{memory.terms}")
        budget = size_budget - offset
    else:  # tensor data only: floats + quantized, per weight of the file
        offset, describe = ub.float_data, f"{target_bpw:g} bits/weight over {n_weights:,} weights"
        budget = int(target_bpw * n_weights / 8) - offset
    if budget < lo:
        raise UsageError(f"budget {describe} is below the smallest mix of these candidates: it needs at least "
                         f"{lo + offset:,} bytes ({(lo + offset) / 1e6:.3f} MB"
                         f"{'' if size_budget is not None else ' of tensor data'}); feasible: "
                         f"{(lo + offset) / 1e6:.3f} MB - {(hi + offset) / 1e6:.3f} MB")
    sol = solve(items, budget)
    warnings = []
    if budget > hi:
        warnings.append(f"the budget is above the largest useful mix ({(hi + offset) / 1e6:.3f} MB): every tensor "
                        "takes its least-cost type")
    mix = mix_name(sol.picks, options) if gguf else ""
    final = layout(sol.picks, mix)
    q_data = sum(pad(next(o.bytes for o in options[n] if o.codec == t)) for n, t in sol.picks.items())
    predicted = final.fixed + q_data
    header = [f"qtool sensitivity ({method} costs, {mode} mode): one {'GGUF type' if gguf else 'codec'} per tensor, "
              "least predicted cost",
              f"budget: {describe}; predicted {'file size' if gguf else 'tensor data'} {predicted:,} bytes; predicted cost {sol.cost:.6g}"
              f"{' (optimal)' if sol.optimal else f' (LP lower bound {sol.lower_bound:.6g})'}"]
    text = plan_text(sol.picks, options, method=method, output=output(mix), calibration=cal, header=header)
    parse_plan(text, where=str(out))  # the plan qtool itself will read
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, out)
    plots = {}
    if report is not None:
        from qtool.sensitivity import report as rp

        report.mkdir(parents=True, exist_ok=True)
        fixed = ub.fixed  # the plot shows whole-file sizes (within the plan text's few bytes)
        pts = [(b + fixed, c) for b, c in frontier(items, lo, hi)]
        named = ({m: (b + fixed, c) for m, (b, c) in named_mixes(source.config, arch, options, shapes).items()}
                 if gguf else {})
        rp.frontier_plot(report / "frontier.png", pts, (predicted, sol.cost), named)
        rp.cost_heatmap(report / "costs.png", options, sol.picks, source.config.num_hidden_layers, cands)
        plots = {"frontier": str(report / "frontier.png"), "costs": str(report / "costs.png"),
                 "frontier_points": pts, "named_mixes": named}
    return {"out": str(out), "budget": describe, "budget_bytes": size_budget, "target_bpw": target_bpw,
            "predicted_bytes": predicted,
            **({"memory": {"predicted_bytes": predicted + memory.overhead, "kv_cache_bytes": memory.kv_bytes,
                           "compute_bytes": memory.compute_bytes, "kv_share": round(memory.kv_bytes / (
                               predicted + memory.overhead), 4), "arithmetic": memory.terms}} if memory else {}),
            "tensor_data_bytes": final.float_data + q_data, "weights": n_weights,
            "bits_per_weight": round(8 * (final.float_data + q_data) / n_weights, 4), "cost": sol.cost, "optimal": sol.optimal, "lower_bound": sol.lower_bound,
            "gap": (sol.cost - sol.lower_bound) / sol.cost if sol.cost > 0 else 0.0, "mix_name": mix,
            "picks": dict(sorted(sol.picks.items())), "warnings": warnings, "report": plots,
            "options": {n: [{"codec": o.codec, "bytes": o.bytes, "cost": o.cost} for o in opts]
                        for n, opts in sorted(options.items())}}


class _Layout(NamedTuple):
    fixed: int  # bytes besides the quantized tensors
    float_data: int  # of which float tensors' data


def _hf_float_bytes(source, arch, quantized: set[str]) -> int:
    """Bytes of the float tensors an HF artifact holds (embeddings, norms, biases, an untied head), in the
    artifact's dtype (the source's)."""
    size = source.dtype.itemsize
    skip = {n + ".weight" for n in quantized} | ({arch.lm_head} if source.config.tie_word_embeddings else set())
    return sum(math.prod(source.shape(n)) * size for n in source.names() if n not in skip)

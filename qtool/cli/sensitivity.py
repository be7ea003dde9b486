"""`qtool sensitivity`: price every tensor at every candidate type, solve for the best mix under a budget, write
the plan (flags -> statistics -> costs -> solve -> plan file; the work is in `qtool/sensitivity/`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, NamedTuple, Optional

import typer
from rich.markup import escape

from qtool.cli.common import check_json_dest, err, human_bytes, progress_bar, user_errors, warn, write_json
from qtool.cli.common import out as stdout

EXAMPLE = """
[bold]Examples[/]:

  qtool sensitivity smollm2-135m --candidates q3_k,q4_k,q5_k,q6_k,q8_0 --target-size 95MB \\
      --calib ../shared/data/calibration-mixed.txt --out mix.yaml
  qtool convert-gguf smollm2-135m --plan mix.yaml --out mix.gguf          # exactly the predicted bytes
  qtool sensitivity smollm2-135m --stats build/smollm2-stats --target-bpw 4.5 --out mix.yaml

[bold]Costs[/] (--mode proxy): the output error each tensor causes alone at each candidate, through the method
the plan uses (--method rtn|gptq): tr(ΔW·H·ΔWᵀ) with H = XᵀX/N of its inputs (the head: of the final norm's
output; the token embeddings: mean squared row error). Candidates whose blocks do not fit a tensor's rows
(SmolLM2: 576) are replaced there by the 32-element types llama.cpp falls back to.

[bold]Budgets[/]: --target-size counts the whole GGUF file (metadata, tokenizer, float tensors, padding), and the
written file has exactly the predicted size (HF formats: the tensor data, float tensors included). --target-bpw counts the bytes of every tensor (embeddings, head and
norms included) per weight of the file. The plan names one type per tensor with its predicted cost.

[bold]Exit status[/]: 0 ok, 2 usage error (e.g. a budget outside the feasible range, which is stated), 3
unreadable model or statistics.
"""


def sensitivity(
    model: Annotated[str, typer.Argument(help="HF model directory, .gguf file, or the alias smollm2-135m.")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Plan YAML to write (atomically).")] = None,
    candidates: Annotated[str, typer.Option("--candidates", "-c", help="Codecs to choose from, comma-separated: GGUF "
                                            "types (q4_k, ...) or codecs one HF format holds together (int4_g64_asym, "
                                            "int8_ch_sym, ...).")] = "q2_k,q3_k,q4_k,q5_k,q6_k,q8_0",
    fmt_name: Annotated[Optional[str], typer.Option("--format", help="Output format of the plan (default: gguf for "
                                                    "GGUF types, compressed-tensors for int codecs, bnb for nf4/fp4).")]
    = None,
    target_size: Annotated[Optional[str], typer.Option("--target-size", help="Whole-file budget, e.g. 95MB, 1.5GiB.")]
    = None,
    target_bpw: Annotated[Optional[float], typer.Option("--target-bpw", min=0.5, max=32.0, help="Bits per weight over "
                                                        "every weight in the file (embeddings and head included).")]
    = None,
    target_memory: Annotated[Optional[str], typer.Option("--target-memory", help="llama.cpp memory budget at --ctx: "
                                                         "file + KV cache + compute buffers, e.g. 2GiB.")] = None,
    ctx: Annotated[int, typer.Option("--ctx", min=1, help="Context length the memory budget is for.")] = 8192,
    batch: Annotated[int, typer.Option("--batch", min=1, help="Sequences in parallel (KV cache per sequence).")] = 1,
    kv_type: Annotated[str, typer.Option("--kv-type", help="KV cache type: f16 or q8_0.")] = "f16",
    method: Annotated[str, typer.Option("--method", "-m", help="rtn or gptq: the method the plan uses (and its costs).")]
    = "rtn",
    mode: Annotated[str, typer.Option("--mode", help="proxy (each tensor's own output error) or measured (its block's "
                                      "output error x the block's downstream KL sensitivity: KL units).")] = "proxy",
    measure_tokens: Annotated[int, typer.Option("--measure-tokens", min=64, help="Token budget of --mode measured "
                                                "(sequences of --seq-len from the calibration text).")] = 2048,
    calib: Annotated[Optional[Path], typer.Option("--calib", help="Calibration text/JSONL file.")] = None,
    stats: Annotated[Optional[Path], typer.Option("--stats", help="Statistics directory from `qtool calibrate`.")] = None,
    samples: Annotated[int, typer.Option("--samples", min=1, help="Calibration sequences.")] = 128,
    seq_len: Annotated[int, typer.Option("--seq-len", min=8, help="Tokens per sequence.")] = 512,
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it exists.")] = False,
    report: Annotated[Optional[Path], typer.Option("--report", help="Directory for PNG plots: per-tensor cost heatmaps "
                                                   "and the size-vs-cost frontier with llama.cpp's named mixes.")] = None,
    cache_dir: Annotated[Path, typer.Option("--cache", help="Where measured costs are kept for the next budget.")]
    = Path.home() / ".cache" / "qtool" / "sensitivity",
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Measure again; store nothing.")] = False,
    json_out: Annotated[Optional[str], typer.Option("--json", help="Write the report as JSON ('-' = stdout).")] = None,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help="Allow model code from the checkpoint.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show tracebacks.")] = False,
) -> None:
    with user_errors(verbose):
        import time

        from qtool.errors import UsageError
        from qtool.io.source import open_model

        t0 = time.perf_counter()
        check_json_dest(json_out)
        if out is None:
            raise UsageError("--out PLAN.yaml is required")
        if out.exists() and not force:
            raise UsageError(f"--out {out} exists; pass --force to replace it")
        if sum(x is not None for x in (target_size, target_bpw, target_memory)) != 1:
            raise UsageError("give one budget: --target-size (e.g. 95MB), --target-bpw (e.g. 4.5) or --target-memory "
                             "(e.g. 2GiB, with --ctx)")
        if mode not in ("proxy", "measured"):
            raise UsageError(f"--mode {mode}: allowed proxy, measured")
        if method not in ("rtn", "gptq"):
            raise UsageError(f"--method {method}: allowed rtn, gptq")
        cands = [c.strip().lower() for c in candidates.split(",") if c.strip()]
        fmt = _check_candidates(cands, fmt_name, method)
        if calib is not None and stats is not None:
            raise UsageError("--calib and --stats both give statistics; pass one of them")
        if calib is not None and not calib.is_file():
            raise UsageError(f"--calib {calib}: file not found")
        from qtool.sensitivity.planner import parse_size

        size_budget = parse_size(target_size) if target_size is not None else None
        with err.status(f"reading {escape(model)}"):
            source = open_model(model, trust_remote_code=trust_remote_code)
            source.config
        memory = None
        if target_memory is not None and fmt.name != "gguf":
            raise UsageError("--target-memory plans for llama.cpp (GGUF candidates); HF formats take --target-size or "
                             "--target-bpw")
        if target_memory is not None:  # the file budget is what the KV cache and the buffers leave
            from qtool.sensitivity.memory import memory_model

            memory = memory_model(source.config, ctx, batch, kv_type)
            size_budget = parse_size(target_memory) - memory.overhead
            if size_budget <= 0:
                raise UsageError(f"--target-memory {target_memory}: the KV cache and compute buffers alone take "
                                 f"{memory.overhead:,} bytes at --ctx {ctx} ({memory.terms})")
        console = err if json_out == "-" else stdout
        with progress_bar(json_out != "-") as progress:
            from qtool.calib import stats as st
            from qtool.plan import Calibration

            if stats is not None:
                s = st.load(stats)
                s.check(source.digest(), None, where=f"--stats {stats}")
                cal = {k: s.calibration[k] for k in ("source", "samples", "seq_len", "seed") if k in s.calibration}
            else:
                spec = Calibration(source=str(calib) if calib is not None else "generated", samples=samples,
                                   seq_len=seq_len)
                s = st.collect(source, spec, progress=progress)
                cal = {"source": spec.source, "samples": spec.samples, "seq_len": spec.seq_len, "seed": spec.seed}
            from qtool.sensitivity import cache as costs_cache

            ck = costs_cache.key(model=source.digest(), tokens=s.tokens_digest, calibration=cal, candidates=cands,
                                 method=method, mode=mode, measure_tokens=measure_tokens if mode == "measured" else 0,
                                 format=fmt.name, scale_dtype=str(_scale_dtype(source, fmt)))
            hit = None if no_cache else costs_cache.load(cache_dir, ck)
            details = None
            if hit is not None:
                options, details = hit
                console.print(f"[cyan]costs[/]: reused from {escape(str(cache_dir))} (same model, statistics, "
                              "candidates, method and mode)", highlight=False)
            elif mode == "proxy":
                from qtool.sensitivity.costs import measure

                options = measure(source, s, cands, method=method, fmt=fmt, scale_dtype=_scale_dtype(source, fmt),
                                  progress=progress)
            else:
                from dataclasses import replace

                from qtool.calib.data import calibration_tokens
                from qtool.sensitivity import measured

                spec = Calibration(**{k: v for k, v in cal.items() if k in ("source", "seq_len", "seed")})
                spec = replace(spec, samples=max(1, measure_tokens // spec.seq_len))
                ids = calibration_tokens(source, spec, source.load_tokenizer())
                options, details = measured.measure(source, s, cands, ids, method=method, fmt=fmt,
                                                    scale_dtype=_scale_dtype(source, fmt), progress=progress)
            if hit is None and not no_cache:
                costs_cache.save(cache_dir, ck, options, details)
        result = _solve_and_write(source, fmt, options, cands, method, cal, size_budget, target_bpw, out, memory,
                                  report, mode)
        result["seconds"] = round(time.perf_counter() - t0, 1)
        result["mode"] = mode
        if details is not None:
            result["measured"] = details
        console.print(f"[green]plan[/] {escape(str(out))}: {len(result['picks'])} tensors, predicted "
                      f"{human_bytes(result['predicted_bytes'])} ({result['predicted_bytes']:,} bytes; budget "
                      f"{result['budget']}), predicted cost {result['cost']:.4g}"
                      f" ({'optimal' if result['optimal'] else 'gap to the LP bound ' + format(result['gap'], '.2%')})",
                      highlight=False, soft_wrap=True)
        counts: dict[str, int] = {}
        for t in result["picks"].values():
            counts[t] = counts.get(t, 0) + 1
        console.print("types: " + ", ".join(f"{t.upper()} x{n}" for t, n in sorted(counts.items())), highlight=False)
        for w in result["warnings"]:
            warn(w)
        write_json(json_out, result)


def _check_candidates(cands: list[str], fmt_name: str | None, method: str):
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
        why = fmt.refuse(Rule(match=".*", method=method, **fields[c]))
        if why is not None:
            raise UsageError(f"--candidates {c}: --format {name} cannot hold it: {why[1]}")
    return fmt


def _scale_dtype(source, fmt):
    """What int codecs store their scales in for this format (what the plan's resolution will use)."""
    import torch

    return torch.float16 if fmt.fp16_scales else source.dtype


def _solve_and_write(source, fmt, options, cands, method, cal, size_budget, target_bpw, out: Path, memory=None,
                     report: Path | None = None, mode: str = "proxy") -> dict:
    """Budget -> solve -> plan text (exact size computed on the final plan) -> atomic write; the JSON report."""
    import os

    from qtool.engine.sinks import predict_gguf_bytes
    from qtool.errors import UsageError
    from qtool.io.arch import arch_of
    from qtool.io.gguf_writer import GGUF_FLOAT, _pad
    from qtool.plan import parse_plan
    from qtool.sensitivity.planner import mix_name, plan_text
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
        n_weights = sum(_numel(source.shape(n)) for n in source.names())
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
    n_weights = sum(_numel(source.shape(n)) for n in source.names())
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
        from qtool.sensitivity.planner import frontier, named_mixes

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
    return sum(_numel(source.shape(n)) * size for n in source.names() if n not in skip)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


sensitivity.__doc__ = ("Measure every tensor's cost at each candidate type and write the least-cost plan under a "
                       "size budget.\n" + EXAMPLE)

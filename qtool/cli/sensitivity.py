"""`qtool sensitivity`: price every tensor at every candidate type, solve for the best mix under a budget, write
the plan (flags -> statistics -> costs -> solve -> plan file; the work is in `qtool/sensitivity/`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

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
    method: Annotated[str, typer.Option("--method", "-m", help="rtn, gptq or awq-gptq: the method the plan uses (costs: "
                                        "through rtn / gptq; awq-gptq is priced as gptq).")]
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
        if method not in ("rtn", "gptq", "awq-gptq"):
            raise UsageError(f"--method {method}: allowed rtn, gptq, awq-gptq")
        cost_method = "gptq" if method == "awq-gptq" else method  # AWQ's scales are searched when the plan runs
        cands = [c.strip().lower() for c in candidates.split(",") if c.strip()]
        from qtool.sensitivity.planner import check_candidates, scale_dtype, write_plan

        fmt = check_candidates(cands, fmt_name, method)
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
                                 format=fmt.name, scale_dtype=str(scale_dtype(source, fmt)))
            hit = None if no_cache else costs_cache.load(cache_dir, ck)
            details = None
            if hit is not None:
                options, details = hit
                console.print(f"[cyan]costs[/]: reused from {escape(str(cache_dir))} (same model, statistics, "
                              "candidates, method and mode)", highlight=False)
            elif mode == "proxy":
                from qtool.sensitivity.costs import measure

                options = measure(source, s, cands, method=cost_method, fmt=fmt, scale_dtype=scale_dtype(source, fmt),
                                  progress=progress)
            else:
                from dataclasses import replace

                from qtool.calib.data import calibration_tokens
                from qtool.sensitivity import measured

                spec = Calibration(**{k: v for k, v in cal.items() if k in ("source", "seq_len", "seed")})
                spec = replace(spec, samples=max(1, measure_tokens // spec.seq_len))
                ids = calibration_tokens(source, spec, source.load_tokenizer())
                options, details = measured.measure(source, s, cands, ids, method=cost_method, fmt=fmt,
                                                    scale_dtype=scale_dtype(source, fmt), progress=progress)
            if hit is None and not no_cache:
                costs_cache.save(cache_dir, ck, options, details)
        result = write_plan(source, fmt, options, cands, method, cal, size_budget, target_bpw, out, memory,
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


sensitivity.__doc__ = ("Measure every tensor's cost at each candidate type and write the least-cost plan under a "
                       "size budget.\n" + EXAMPLE)

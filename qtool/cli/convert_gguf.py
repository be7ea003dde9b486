"""`qtool convert-gguf`: a model -> one GGUF file llama.cpp runs (flags -> GGUF plan -> one engine call)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from qtool.cli.common import check_json_dest, check_precision, err, max_kld_option, min_same_top_option
from qtool.cli.common import out as stdout
from qtool.cli.common import progress_bar, user_errors, warn, write_json

EXAMPLE = """
[bold]Examples[/] (MODEL: an HF directory, a .gguf file, or smollm2-135m):

  qtool convert-gguf smollm2-135m --type Q4_K_M --out smollm2-q4km.gguf
  qtool convert-gguf smollm2-135m --type Q4_K_M --calib text.txt --out q.gguf      # imatrix-weighted RTN
  qtool convert-gguf smollm2-135m --type Q3_K_M --imatrix imatrix.gguf --out q.gguf
  qtool convert-gguf smollm2-135m --type Q4_K_M --method gptq --calib text.txt --out q.gguf
  qtool convert-gguf smollm2-135m --type Q3_K_M --method awq-gptq --calib text.txt --out q.gguf
  qtool convert-gguf smollm2-135m --plan my-gguf-plan.yaml --out q.gguf

[bold]--type[/]: llama.cpp's named mixes, with its per-tensor rules (attn_v / ffn_down bumps, a Q6_K
output head): Q2_K, Q3_K_S, Q3_K_M, Q3_K_L, Q4_K_S, Q4_K_M, Q5_K_S, Q5_K_M, Q6_K, Q8_0, Q4_0, Q4_1,
Q5_0, Q5_1, IQ4_NL, IQ4_XS, F16, BF16, F32. Rows that do not fit a 256-block (SmolLM2: 576) take,
instead of llama.cpp's fixed fallback, the type with the least error among those no larger than it.
Plan rules may name ggml types per tensor (`codec: q6_k`) and target `model.embed_tokens` / `lm_head`.

[bold]Importance[/] (llama.cpp's imatrix): --calib runs the text through the model and weights every
codec's search by its inputs' mean x^2; --imatrix takes an existing file (qtool calibrate --imatrix, or
llama-imatrix); --stats a `qtool calibrate` directory. Without any, plain (unweighted) search.

[bold]Exit status[/]: 0 ok, 2 usage or plan error, 3 unreadable model, 4 quality gate failed.
"""


def convert_gguf(
    model: Annotated[str, typer.Argument(help="HF model directory, .gguf file, or the alias smollm2-135m.")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output .gguf file (written atomically).")] = None,
    gguf_type: Annotated[str, typer.Option("--type", "-t", help="llama.cpp mix, e.g. Q4_K_M (see below).")] = "Q4_K_M",
    method: Annotated[Optional[str], typer.Option("--method", "-m", help="rtn (default), gptq (GPTQ through the "
                                                  "GGUF grids), awq (AWQ scales) or awq-gptq; all but rtn calibrate.")] = None,
    plan: Annotated[Optional[Path], typer.Option("--plan", "-p", help="YAML plan (output.format gguf).")] = None,
    calib: Annotated[Optional[Path], typer.Option("--calib", help="Calibration text/JSONL: importance (and GPTQ's "
                                                  "Hessians).", rich_help_panel="Calibration")] = None,
    imatrix: Annotated[Optional[Path], typer.Option("--imatrix", help="Importance matrix file (GGUF or .dat).",
                                                    rich_help_panel="Calibration")] = None,
    stats: Annotated[Optional[Path], typer.Option("--stats", help="Statistics from `qtool calibrate`.",
                                                  rich_help_panel="Calibration")] = None,
    samples: Annotated[Optional[int], typer.Option("--samples", min=1, help="Calibration sequences (default 128).",
                                                   rich_help_panel="Calibration")] = None,
    seq_len: Annotated[Optional[int], typer.Option("--seq-len", min=8, help="Tokens per sequence (default 512).",
                                                   rich_help_panel="Calibration")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", min=0, help="Calibration seed (default 0).",
                                                rich_help_panel="Calibration")] = None,
    precision: Annotated[Optional[str], typer.Option("--precision", help="Calibration matmuls: bf16 or fp32.",
                                                     rich_help_panel="Calibration")] = None,
    print_plan: Annotated[bool, typer.Option("--print-plan", help="Print the resulting plan as YAML and exit.")] = False,
    max_kld: Annotated[Optional[float], max_kld_option("the self-check")] = None,
    min_same_top: Annotated[Optional[float], min_same_top_option("the self-check")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it exists.")] = False,
    no_check: Annotated[bool, typer.Option("--no-check", help="Skip the built-in quality self-check.")] = False,
    json_out: Annotated[Optional[str], typer.Option("--json", help="Write results as JSON to a file ('-' = stdout).")] = None,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help="Allow model code from the checkpoint.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show details and tracebacks.")] = False,
) -> None:
    with user_errors(verbose):
        from qtool.cli.quantize import _summary
        from qtool.engine.run import run
        from qtool.errors import QualityError, UsageError
        from qtool.eval.gate import Gate
        from qtool.flags import Flags, gguf_plan_from_flags
        from qtool.io.source import open_model
        from qtool.plan import load_plan

        if out is None and not print_plan:
            raise UsageError("--out FILE.gguf is required (or --print-plan to only print the plan)")
        if out is not None and out.suffix != ".gguf":
            raise UsageError(f"--out {out}: a GGUF file name ends in .gguf")
        given = [n for n, v in (("--calib", calib), ("--imatrix", imatrix), ("--stats", stats)) if v is not None]
        if len(given) > 1:
            raise UsageError(f"{' and '.join(given)} all give importance data; pass one of them")
        if calib is not None and not calib.is_file() and not str(calib).startswith("hf:"):
            raise UsageError(f"--calib {calib}: file not found")
        if imatrix is not None and not imatrix.is_file():
            raise UsageError(f"--imatrix {imatrix}: file not found")
        if imatrix is not None and method not in (None, "rtn"):
            raise UsageError(f"--imatrix with --method {method}: it needs the inputs' full XᵀX, which an importance "
                             "matrix does not hold; use --calib or --stats")
        gate = Gate(max_kld, min_same_top)
        if gate.active and no_check:
            raise UsageError("--max-kld/--min-same-top gate on the self-check; they cannot be used with --no-check")
        check_json_dest(json_out)
        check_precision(precision)
        base = load_plan(plan) if plan is not None else None
        flags = Flags(method, None, None, None, (), "gguf", None if calib is None else str(calib), samples, seq_len,
                      seed, precision)
        fp = gguf_plan_from_flags(base.gguf_type if base is not None and gguf_type == "Q4_K_M" else gguf_type,
                                  method, flags, base=base, importance=calib is not None or stats is not None)
        if print_plan:
            stdout.print(fp.plan.to_yaml(), end="", markup=False, highlight=False, soft_wrap=True)
            return
        with err.status(f"reading {escape(model)}"):
            source = open_model(model, trust_remote_code=trust_remote_code)
            source.config
        stats_obj = None
        if stats is not None:
            from qtool.calib.stats import load as load_stats

            stats_obj = load_stats(stats)
            stats_obj.check(source.digest(), None, where=f"--stats {stats}")
        console = err if json_out == "-" else stdout
        for n in fp.notes:
            if n.startswith("no calibration text"):
                warn(n)
            else:
                console.print(f"[cyan]plan[/]: {escape(n)}", highlight=False, soft_wrap=True)
        with progress_bar(json_out != "-") as progress:
            manifest = run(source, fp.plan, out, force=force, check=not no_check, progress=progress, stats=stats_obj,
                           imatrix=imatrix)
        _summary(manifest, verbose, console)
        payload = manifest.to_json()
        payload["plan_notes"] = fp.notes
        if gate.active and manifest.check:
            payload["gate"] = gate.to_json(manifest.check.kld, manifest.check.same_top_pct)
        write_json(json_out, payload)
        for w in manifest.warnings:
            warn(w)
        if gate.active and manifest.check:
            fails = gate.failures(manifest.check.kld, manifest.check.same_top_pct)
            if fails:
                raise QualityError(f"quality gate failed: {'; '.join(fails)} (artifact kept at {out})")


convert_gguf.__doc__ = "Convert a model to one GGUF file llama.cpp runs, at any llama.cpp mix or per-tensor plan.\n" + EXAMPLE

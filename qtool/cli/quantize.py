"""`qtool quantize`: flags -> Plan -> one engine call -> a summary."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from qtool.cli.common import (
    check_json_dest,
    check_precision,
    err,
    human_bytes,
    max_kld_option,
    min_same_top_option,
    progress_bar,
    user_errors,
    warn,
    write_json,
)
from qtool.cli.common import out as stdout

EXAMPLE = """
[bold]Examples[/] (MODEL: an HF directory, a .gguf file, or smollm2-135m):

  qtool quantize smollm2-135m --method awq --out build/awq
  qtool quantize smollm2-135m --method gptq --bits 3 --calib a.txt --out b/q3
  qtool quantize smollm2-135m --plan configs/mixed-example.yaml --out b/mix
  qtool quantize smollm2-135m --method awq --print-plan > plan.yaml
  qtool quantize smollm2-135m --method rtn --out b/q --max-kld 0.5

[bold]--method defaults[/] (flags override them):

  rtn       int4, group 128, asymmetric; no data
  int8      int8 per output channel, symmetric; no data
  nf4, fp4  bitsandbytes 4-bit, block 64, double quant; no data
  hqq       int4, group 64, float zero point; no data
  gptq      int4, group 128, asym, act-order, damp 0.01; calibrated
  awq       int4, group 128, asym, scale + clip search; calibrated
  awq-gptq  AWQ scales, then GPTQ (as gptq); calibrated
  smoothquant  W8A8: SmoothQuant alpha 0.5, int8 weights per channel,
            int8 activations per token at run time; calibrated
  llm-int8  W8A8 with input columns |x| > 6.0 in float (bitsandbytes); no data

  Group 128 drops to 64 (or 32) for the whole model when it does not
  divide a layer width (SmolLM2: 576). Without --calib, calibrated methods
  sample their text from the model itself (seeded, offline).

[bold]Exit status[/]: 0 ok, 1 internal error, 2 usage or plan error,
3 unreadable model input, 4 quality gate failed (artifact kept),
130 interrupted.
"""

METHOD_HELP = "Method preset: " + ", ".join(("rtn", "int8", "nf4", "fp4", "gptq", "awq", "awq-gptq", "hqq",
                                            "smoothquant", "llm-int8")) + "."


def quantize(
    model: Annotated[str, typer.Argument(help="HF model directory, .gguf file, or the alias smollm2-135m.")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output directory (written atomically).")] = None,
    plan: Annotated[
        Optional[Path], typer.Option("--plan", "-p", help="YAML quant plan (see configs/); flags override it.")
    ] = None,
    method: Annotated[Optional[str], typer.Option("--method", "-m", help=METHOD_HELP, rich_help_panel="Plan flags")] = None,
    bits: Annotated[Optional[int], typer.Option("--bits", help="Code bits: 2, 3, 4, 8.", rich_help_panel="Plan flags")] = None,
    group_size: Annotated[
        Optional[str], typer.Option("--group-size", help="32, 64, 128, 256 or channel.", rich_help_panel="Plan flags")
    ] = None,
    sym: Annotated[
        Optional[bool],
        typer.Option(
            "--sym/--asym",
            help="Symmetric codes (no zero point) or asymmetric.",
            show_default=False,
            rich_help_panel="Plan flags",
        ),
    ] = None,
    ignore: Annotated[
        Optional[list[str]],
        typer.Option("--ignore", help="Regex of modules to keep in float (repeatable).", rich_help_panel="Plan flags"),
    ] = None,
    fmt: Annotated[
        Optional[str],
        typer.Option(
            "--format", help="compressed-tensors, gptq, gptq_v2, awq, bnb (as the method allows).", rich_help_panel="Plan flags"
        ),
    ] = None,
    calib: Annotated[
        Optional[Path],
        typer.Option(
            "--calib", help="Calibration text/JSONL file, or hf:NAME[:CONFIG[:SPLIT]] (default: generated from the model).",
            rich_help_panel="Calibration",
        ),
    ] = None,
    samples: Annotated[
        Optional[int],
        typer.Option("--samples", min=1, help="Calibration sequences (default 128).", rich_help_panel="Calibration"),
    ] = None,
    seq_len: Annotated[
        Optional[int],
        typer.Option("--seq-len", min=8, help="Tokens per calibration sequence (default 512).", rich_help_panel="Calibration"),
    ] = None,
    seed: Annotated[
        Optional[int], typer.Option("--seed", min=0, help="Calibration seed (default 0).", rich_help_panel="Calibration")
    ] = None,
    precision: Annotated[
        Optional[str],
        typer.Option("--precision", help="Calibration pass matmuls: bf16 (default; float32 tensors, bf16 GEMM inputs, "
                     "~2.3x faster on AMX/AVX512-BF16 CPUs) or fp32 (IEEE, bit-exact to a float forward).",
                     rich_help_panel="Calibration"),
    ] = None,
    stats: Annotated[
        Optional[Path],
        typer.Option(
            "--stats", help="Statistics from `qtool calibrate` (replace the calibration pass).", rich_help_panel="Calibration"
        ),
    ] = None,
    device: Annotated[
        str, typer.Option("--device", help="cpu (auto = cpu; the engine runs on the CPU in this version).")
    ] = "auto",
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
        from qtool.engine.run import run
        from qtool.errors import QualityError, UsageError
        from qtool.eval.gate import Gate
        from qtool.flags import METHOD_NAMES, Flags, plan_from_flags
        from qtool.outputs import OUTPUT_FORMATS
        from qtool.io.source import open_model
        from qtool.plan import load_plan

        if method is not None and method not in METHOD_NAMES:
            raise UsageError(f"--method {method}: unknown; allowed: {', '.join(METHOD_NAMES)}")
        if fmt is not None and fmt not in OUTPUT_FORMATS:
            raise UsageError(f"--format {fmt}: unknown; allowed: {', '.join(OUTPUT_FORMATS)}")
        if device not in ("auto", "cpu"):
            raise UsageError(f"--device {device}: qtool's engine runs on the CPU in this version; allowed: auto, cpu")
        if out is None and not print_plan:
            raise UsageError("--out DIR is required (or --print-plan to only print the plan)")
        gate = Gate(max_kld, min_same_top)
        if gate.active and no_check:
            raise UsageError("--max-kld/--min-same-top gate on the self-check; they cannot be used with --no-check")
        check_json_dest(json_out)
        if calib is not None and not calib.is_file() and not str(calib).startswith("hf:"):
            raise UsageError(f"--calib {calib}: file not found (a Hugging Face dataset: hf:NAME[:CONFIG[:SPLIT]])")
        if stats is not None and calib is not None:
            raise UsageError("--stats and --calib both give calibration data; pass one of them")
        if stats is not None and precision is not None:
            raise UsageError("--precision sets the calibration pass, which --stats replaces; drop one of them "
                             "(`qtool calibrate --precision` sets it for the statistics)")
        check_precision(precision)
        flags = Flags(
            method, bits, group_size, sym, tuple(ignore or ()), fmt, None if calib is None else str(calib), samples, seq_len,
            seed, precision
        )
        base = load_plan(plan) if plan is not None else None
        if base is None and method is None:
            raise UsageError("give --method (e.g. --method awq) or --plan FILE; see --help for the presets")
        with err.status(f"reading {escape(model)}"):
            source = open_model(model, trust_remote_code=trust_remote_code)
            source.config  # GGUF metadata is parsed here (seconds for a large vocabulary)
        notes: list[str] = []
        the_plan = base
        if fmt == "gguf":  # the GGUF plan of convert-gguf: llama.cpp's mix (the plan's, else Q4_K_M) for every tensor
            from qtool.flags import gguf_plan_from_flags

            if bits is not None or group_size is not None or sym is not None:
                raise UsageError("--bits/--group-size/--sym do not apply to --format gguf (ggml types fix them); "
                                 "use `qtool convert-gguf --type`")
            fp = gguf_plan_from_flags(base.gguf_type if base is not None else "Q4_K_M",
                                      method if method in (None, "rtn", "gptq") else method, flags, base=base,
                                      importance=calib is not None)
            the_plan, notes = fp.plan, fp.notes
        elif flags.given() or base is None:
            fp = plan_from_flags(flags, widths=_input_widths(source), base=base)
            the_plan, notes = fp.plan, fp.notes
            if base is not None:
                import dataclasses

                the_plan = dataclasses.replace(the_plan, source=base.source)
        if print_plan:
            stdout.print(the_plan.to_yaml(), end="", markup=False, highlight=False, soft_wrap=True)
            return
        stats_obj = None
        if stats is not None:
            from qtool.calib.stats import load as load_stats
            from qtool.plan import Calibration

            stats_obj = load_stats(stats)
            stated = the_plan.calibration if the_plan.calibration != Calibration() else None
            stats_obj.check(source.digest(), stated, where=f"--stats {stats}")
            notes = [n for n in notes if not n.startswith("no calibration text given")]
        console = err if json_out == "-" else stdout
        for n in notes:
            if n.startswith("no calibration text given"):
                warn(n)  # a visible warning naming the flag that changes it
            else:
                console.print(f"[cyan]plan[/]: {escape(n)}", highlight=False, soft_wrap=True)
        with progress_bar(json_out != "-") as progress:
            manifest = run(source, the_plan, out, force=force, check=not no_check, progress=progress, stats=stats_obj)
        _summary(manifest, verbose, console)
        payload = manifest.to_json()
        payload["plan_notes"] = notes
        if gate.active and manifest.check:
            payload["gate"] = gate.to_json(manifest.check.kld, manifest.check.same_top_pct)
        write_json(json_out, payload)
        for w in manifest.warnings:
            warn(w)
        if manifest.check and not manifest.check.ok:
            warn(
                f"self-check KL divergence {manifest.check.kld:.4f} is above {manifest.check.warn_kld}: "
                "this artifact may produce poor or garbled output"
            )
        if gate.active and manifest.check:
            fails = gate.failures(manifest.check.kld, manifest.check.same_top_pct)
            if fails:
                raise QualityError(f"quality gate failed: {'; '.join(fails)} (artifact kept at {out})")


quantize.__doc__ = "Quantize a model, from flags (--method ...) or a YAML plan, into an artifact real runtimes load.\n" + EXAMPLE


def _input_widths(source) -> list[int]:
    """Input widths of the decoder linears (for the default group size of flag plans)."""
    from qtool.io.arch import arch_of

    arch = arch_of(source.config)
    widths = set()
    for i in range(source.config.num_hidden_layers):
        for lin in arch.linears:
            try:
                widths.add(source.shape(arch.block_prefix(i) + lin + ".weight")[1])
            except KeyError:
                pass
    return sorted(widths)


def _summary(m, verbose: bool, console) -> None:
    t = Table(title=escape(f"qtool quantize -> {m.out}"), show_header=False)
    t.add_row("format", m.output_format)
    t.add_row("quantized params", f"{m.quantized_params:,}")
    t.add_row("quantized bytes", f"{human_bytes(m.quantized_bytes)} ({m.bits_per_weight:.3f} bits/weight)")
    t.add_row("artifact tensors", human_bytes(m.total_bytes))
    t.add_row("time", f"{m.seconds:.1f} s")
    if m.check:
        t.add_row("self-check KLD", f"{m.check.kld:.5f}  ({m.check.sequences}x{m.check.seq_len} tokens)")
        t.add_row("self-check same-top", f"{m.check.same_top_pct:.1f} %")
    console.print(t)
    notes = [r for r in m.layers if r.note]
    if notes:
        console.print(f"[yellow]{len(notes)} layers fell back:[/] {notes[0].name}: {notes[0].note}")
    w = Table(title="worst layers", show_header=True)
    for col in ("layer", "codec", "output rel err" if m.check else "weight rel err"):
        w.add_column(col)
    for r in m.worst_layers(len(m.layers) if verbose else 5):
        err = r.output_rel_err if m.check and r.output_rel_err is not None else r.weight_rel_err
        w.add_row(r.name, r.codec, f"{err:.4f}")
    console.print(w)

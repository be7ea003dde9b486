"""`qtool quantize`: flags -> Plan -> one engine call -> a summary."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from qtool.cli.common import check_json_dest, err, human_bytes, progress_bar, user_errors, warn, write_json
from qtool.cli.common import out as stdout

EXAMPLE = """
[bold]Example[/]: quantize SmolLM2-135M (the built-in default model) to int4, group 64, asymmetric:

  qtool quantize smollm2-135m --plan configs/w4a16-g64.yaml --out build/smollm2-w4g64
  qtool eval build/smollm2-w4g64 --base smollm2-135m --text wikitext2-test.txt --chunks 20

MODEL is a Hugging Face directory (config.json + safetensors + tokenizer), a .gguf file, or smollm2-135m.
"""


def quantize(
    model: Annotated[str, typer.Argument(help="HF model directory, .gguf file, or the alias smollm2-135m.")],
    plan: Annotated[Path, typer.Option("--plan", "-p", help="YAML quant plan (see configs/).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory (written atomically).")],
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it exists.")] = False,
    calib: Annotated[Optional[Path], typer.Option("--calib", help="Calibration text file (overrides the plan's source).")] = None,
    stats: Annotated[Optional[Path], typer.Option("--stats", help="Statistics from `qtool calibrate` (replace the calibration pass; must match this model).")] = None,
    no_check: Annotated[bool, typer.Option("--no-check", help="Skip the built-in quality self-check.")] = False,
    json_out: Annotated[Optional[str], typer.Option("--json", help="Write results as JSON to a file ('-' = stdout).")] = None,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help="Allow model code from the checkpoint.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show details and tracebacks.")] = False,
) -> None:
    with user_errors(verbose):
        import dataclasses

        from qtool.engine.run import run
        from qtool.errors import UsageError
        from qtool.io.source import open_model
        from qtool.plan import load_plan

        check_json_dest(json_out)
        the_plan = load_plan(plan)
        if calib is not None:
            if not calib.is_file():
                raise UsageError(f"--calib {calib}: file not found")
            the_plan = dataclasses.replace(
                the_plan, calibration=dataclasses.replace(the_plan.calibration, source=str(calib)))
        if stats is not None and calib is not None:
            raise UsageError("--stats and --calib both give calibration data; pass one of them")
        stats_obj = None
        if stats is not None:
            from qtool.calib.stats import load as load_stats

            stats_obj = load_stats(stats)
        with err.status(f"reading {escape(model)}"):
            source = open_model(model, trust_remote_code=trust_remote_code)
            source.config  # GGUF metadata is parsed here (seconds for a large vocabulary)
        if stats_obj is not None:
            from qtool.plan import Calibration

            stated = the_plan.calibration if the_plan.calibration != Calibration() else None
            stats_obj.check(source.digest(), stated, where=f"--stats {stats}")
        with progress_bar(json_out != "-") as progress:
            manifest = run(source, the_plan, out, force=force, check=not no_check, progress=progress, stats=stats_obj)
        _summary(manifest, verbose, err if json_out == "-" else stdout)
        write_json(json_out, manifest.to_json())
        for w in manifest.warnings:
            warn(w)
        if manifest.check and not manifest.check.ok:
            warn(f"self-check KL divergence {manifest.check.kld:.4f} is above {manifest.check.warn_kld}: "
                 "this artifact may produce poor or garbled output")


quantize.__doc__ = "Quantize a model with a YAML plan into a safetensors artifact transformers loads.\n" + EXAMPLE


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
        w.add_row(r.name, r.codec, f"{(r.output_rel_err if m.check else r.weight_rel_err):.4f}")
    console.print(w)

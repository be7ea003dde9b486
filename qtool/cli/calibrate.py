"""`qtool calibrate`: run calibration data through the float model once, store every linear input's statistics."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from qtool.cli.common import (check_json_dest, check_precision, err, human_bytes, progress_bar, user_errors,
                              write_json)
from qtool.cli.common import out as stdout

EXAMPLE = """
[bold]Example[/]: statistics of SmolLM2-135M on a text file, then two plans quantized from them (no second
calibration pass):

  qtool calibrate smollm2-135m --data ../shared/data/calibration-mixed.txt --out build/smollm2-stats
  qtool quantize smollm2-135m --plan configs/gptq-w4g64.yaml --stats build/smollm2-stats --out build/gptq
  qtool quantize smollm2-135m --plan configs/awq-w4g64.yaml --stats build/smollm2-stats --out build/awq

STATS is a directory: stats.safetensors (XᵀX/N, mean |x|, mean x², max |x| per linear input) and
manifest.json (model and data digests). `--imatrix FILE` also writes llama.cpp's importance matrix
(GGUF imatrix format; `.dat` for the legacy one).
"""


def calibrate(
    model: Annotated[str, typer.Argument(help="HF model directory, .gguf file, or the alias smollm2-135m.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Statistics directory to write (atomically).")],
    data: Annotated[str, typer.Option("--data", "-d", help="Text or JSONL file (`text` field), a Hugging Face "
                                      "dataset hf:NAME[:CONFIG[:SPLIT]] (needs the network or the datasets cache), or "
                                      "`generated` (sampled from the model, seeded; works offline).")] = "generated",
    samples: Annotated[int, typer.Option("--samples", min=1, max=100_000, help="Sequences to run.")] = 128,
    seq_len: Annotated[int, typer.Option("--seq-len", min=8, max=32768, help="Tokens per sequence.")] = 512,
    seed: Annotated[int, typer.Option("--seed", min=0, help="Seed of the window offsets (and of generated text).")] = 0,
    precision: Annotated[str, typer.Option("--precision", help="Matmuls of the pass: bf16 (float32 tensors, bf16 GEMM "
                                           "inputs; ~2.3x faster on AMX/AVX512-BF16 CPUs) or fp32 (IEEE).")] = "bf16",
    imatrix: Annotated[Optional[Path], typer.Option("--imatrix", help="Also write a llama.cpp importance matrix "
                                                    "(.gguf, or .dat for the legacy format).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it exists.")] = False,
    json_out: Annotated[Optional[str], typer.Option("--json", help="Write a summary as JSON ('-' = stdout).")] = None,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help="Allow model code from the checkpoint.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show tracebacks.")] = False,
) -> None:
    with user_errors(verbose):
        import time

        from qtool.calib import stats as st
        from qtool.calib.data import source_digest
        from qtool.errors import UsageError
        from qtool.io.source import open_model
        from qtool.plan import Calibration

        check_json_dest(json_out)
        if out.exists() and not force:
            raise UsageError(f"--out {out} exists; pass --force to replace it")
        if imatrix is not None and imatrix.suffix not in (".gguf", ".dat"):
            raise UsageError(f"--imatrix {imatrix}: name it *.gguf (GGUF imatrix) or *.dat (legacy format)")
        check_precision(precision)
        spec = Calibration(source=data, samples=samples, seq_len=seq_len, seed=seed, precision=precision)
        source_digest(spec)  # a missing data file fails here, before the model is read
        t0 = time.perf_counter()
        with err.status(f"reading {escape(model)}"):
            source = open_model(model, trust_remote_code=trust_remote_code)
            source.config
        if source.path.resolve() == out.resolve() or source.path.resolve() in out.resolve().parents:
            raise UsageError(f"--out {out} is inside the model {source.path}; choose another directory")
        with progress_bar(json_out != "-") as progress:
            stats = st.collect(source, spec, progress=progress)
        st.save(stats, out, force=force)
        if imatrix is not None:
            st.write_imatrix(stats, imatrix, source.config.num_hidden_layers, dataset=data)
        seconds = round(time.perf_counter() - t0, 2)
        size = sum(f.stat().st_size for f in out.iterdir())
        summary = {"out": str(out), "tokens": stats.tokens, "inputs": len(stats.tensors), "linears": len(stats.inputs),
                   "bytes": size, "seconds": seconds, "model_digest": stats.model_digest,
                   "calibration": stats.calibration, "imatrix": str(imatrix) if imatrix else None}
        (err if json_out == "-" else stdout).print(
            f"wrote {escape(str(out))}: {stats.tokens:,} tokens, {len(stats.tensors)} inputs of "
            f"{len(stats.inputs)} linears, {human_bytes(size)}, {seconds:.1f} s"
            + (f"; imatrix {escape(str(imatrix))}" if imatrix else ""))
        write_json(json_out, summary)


calibrate.__doc__ = "Collect calibration statistics (Hessians, activation means, maxima) for quantize --stats.\n" + EXAMPLE

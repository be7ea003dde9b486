"""Calibration precision benchmark: fp32 vs bf16 math mode on SmolLM2-135M's calibration shapes.

For each product the calibration stream runs per batch of 8 x 512 tokens (q/k/v/o, gate/up, down linears;
the Hessians XᵀX of widths 576 and 1536; attention as bf16 tensors, and in the math mode qtool does not use), the time at `fp32` and at `bf16`
(`qtool/calib/precision.py`), their ratio, and each one's relative error against a float64 reference,
all measured in this run on seeded random data scaled like activations (per-channel spread). Then one
whole GPTQ block walk of the real model (block 3, `--samples` x 512 calibration tokens from
../shared/data/calibration-mixed.txt when present) at both precisions, interleaved `--repeat` times.

    .venv/bin/python bench/precision.py [--samples 32] [--repeat 3] [--out bench/results]

Writes OUT/precision.json and prints a markdown table. Timings are medians (CI machines are noisy: the
ratio of two medians taken in the same run is the number to read).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from qtool.calib.hessian import gram_upper_, symmetric_
from qtool.calib.precision import bf16_stream, effective, matmul_precision

ROOT = Path(__file__).resolve().parent.parent
ROWS, HIDDEN, INTER, KV = 8 * 512, 576, 1536, 192


def _median_time(f, n: int) -> float:
    f()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref).norm() / ref.norm())


def products(n: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    rows = []

    def act(k):
        return torch.randn(ROWS, k, generator=g) * (0.2 + 3 * torch.rand(k, generator=g))

    for name, k, m in (("q/o linear 576->576", HIDDEN, HIDDEN), ("k/v linear 576->192", HIDDEN, KV),
                       ("gate/up linear 576->1536", HIDDEN, INTER), ("down linear 1536->576", INTER, HIDDEN)):
        x, w = act(k), torch.randn(m, k, generator=g) * 0.05
        lin = torch.nn.Linear(k, m, bias=False)
        with torch.no_grad():
            lin.weight.copy_(w)
        ref = F.linear(x.double(), w.double())
        row = {"product": name}
        for p in ("fp32", "bf16"):
            with bf16_stream(lin, p), torch.inference_mode():
                row[f"{p}_ms"] = _median_time(lambda: lin(x), n) * 1e3
                row[f"{p}_rel_err"] = _rel(lin(x), ref)
        rows.append(row)
    for k in (HIDDEN, INTER):
        x = act(k)
        ref = x.double().T @ x.double()
        row = {"product": f"Hessian XᵀX {k}"}
        for p in ("fp32", "bf16"):
            with matmul_precision(p):
                row[f"{p}_ms"] = _median_time(lambda: gram_upper_(None, x), n) * 1e3
                row[f"{p}_rel_err"] = _rel(symmetric_(gram_upper_(None, x)), ref)
        rows.append(row)
    q, k_, v = (torch.randn(8, 9, 512, 64, generator=g) for _ in range(3))
    ref = F.scaled_dot_product_attention(q.double(), k_.double(), v.double(), is_causal=True)

    def attention(p):  # what the stream runs (`calib/precision.py`): bf16 casts q/k/v to bfloat16 tensors
        if p == "fp32":
            return F.scaled_dot_product_attention(q, k_, v, is_causal=True)
        return F.scaled_dot_product_attention(q.bfloat16(), k_.bfloat16(), v.bfloat16(), is_causal=True).float()

    row = {"product": "attention (sdpa), bf16 tensors incl. casts"}
    for p in ("fp32", "bf16"):
        row[f"{p}_ms"] = _median_time(lambda: attention(p), n) * 1e3
        row[f"{p}_rel_err"] = _rel(attention(p), ref)
    rows.append(row)
    row = {"product": "attention (sdpa) in oneDNN's bf16 math mode, not used"}
    for p in ("fp32", "bf16"):  # float32 tensors in the math mode: slower, why the casts are used instead
        with matmul_precision(p):
            row[f"{p}_ms"] = _median_time(lambda: F.scaled_dot_product_attention(q, k_, v, is_causal=True), n) * 1e3
            row[f"{p}_rel_err"] = _rel(F.scaled_dot_product_attention(q, k_, v, is_causal=True), ref)
    rows.append(row)
    for r in rows:
        r["speedup"] = r["fp32_ms"] / r["bf16_ms"]
    return rows


def block_walk(samples: int, repeat: int, data: Path) -> dict:
    """Seconds of one GPTQ block's calibration walk (4 Hessians + the output) at each precision."""
    from qtool.engine.blocks import BlockRunner, materialize, skeleton
    from qtool.engine.staged import StagedBlock
    from qtool.io.arch import arch_of
    from qtool.io.source import open_model

    src = open_model("smollm2-135m")
    cfg, arch = src.config, arch_of(src.config)
    emb = src.get(arch.embed)
    calib = data / "calibration-mixed.txt"
    if calib.is_file():
        from qtool.calib.data import calibration_tokens
        from qtool.plan import Calibration

        ids = calibration_tokens(src, Calibration(str(calib), samples, 512, 0), src.load_tokenizer())
    else:
        ids = torch.randint(0, emb.shape[0], (samples, 512), generator=torch.Generator().manual_seed(0))
    x = emb[ids].float()
    skel = skeleton(cfg)
    prefix = arch.block_prefix(3)
    runner = BlockRunner(skel, cfg, 512)
    times = {"fp32": [], "bf16": []}
    outs = {}
    for _ in range(repeat):
        for p in ("fp32", "bf16"):
            block = materialize(skel.get_submodule(prefix.rstrip(".")), prefix, src)
            t = time.perf_counter()
            st = StagedBlock(block, arch, runner, x.clone(), precision=p)
            for gi, group in enumerate(arch.linear_groups):
                st.hessian(gi, prefix + group[0])
            outs[p] = st.output().clone()
            times[p].append(time.perf_counter() - t)
    med = {p: statistics.median(v) for p, v in times.items()}
    return {"samples": samples, "repeat": repeat, "fp32_s": med["fp32"], "bf16_s": med["bf16"],
            "speedup": med["fp32"] / med["bf16"], "output_rel_diff": _rel(outs["bf16"], outs["fp32"].double())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=32, help="calibration sequences of 512 tokens for the block walk")
    ap.add_argument("--repeat", type=int, default=3, help="interleaved repetitions of the block walk")
    ap.add_argument("--n", type=int, default=7, help="timed calls per product")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()
    if effective("bf16") != "bf16":
        raise SystemExit("this CPU has no oneDNN bf16 GEMMs: bf16 runs as fp32 here, nothing to compare")
    rows = products(args.n)
    walk = block_walk(args.samples, args.repeat, args.data)
    lines = [f"Calibration products per batch of {ROWS} tokens (torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads), median of {args.n}:", "",
             "| product | fp32 ms | bf16 ms | speedup | fp32 rel err | bf16 rel err |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['product']} | {r['fp32_ms']:.1f} | {r['bf16_ms']:.1f} | {r['speedup']:.2f}x | "
              f"{r['fp32_rel_err']:.1e} | {r['bf16_rel_err']:.1e} |" for r in rows]
    lines += ["", f"GPTQ block walk (SmolLM2 block 3, {walk['samples']} x 512 tokens, median of {walk['repeat']}): "
              f"fp32 {walk['fp32_s']:.2f} s, bf16 {walk['bf16_s']:.2f} s, speedup {walk['speedup']:.2f}x; "
              f"block output bf16 vs fp32 rel diff {walk['output_rel_diff']:.1e}"]
    print("\n".join(lines))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "precision.json").write_text(json.dumps({"products": rows, "block_walk": walk}, indent=2) + "\n")


if __name__ == "__main__":
    main()

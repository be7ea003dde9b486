"""GPTQ on SmolLM2-135M's linear shapes: the native column sweep (kernels/cpu/gptq_sweep.cpp) vs its torch
twin, measured in the same run, plus a bit-identity check of the two. Random weights and a Hessian from
random activations with per-channel scales (the sweep's cost does not depend on the values).

    .venv/bin/python bench/gptq_sweep.py [--repeat 3] [--json bench/results/gptq_sweep.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from qtool.formats.affine import AffineCodec
from qtool.methods import gptq
from qtool.runtime import native

SHAPES = {"q_proj": (576, 576), "k_proj": (192, 576), "v_proj": (192, 576), "o_proj": (576, 576),
          "gate_proj": (1536, 576), "up_proj": (1536, 576), "down_proj": (576, 1536)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if native.load("gptq_sweep") is None:
        raise SystemExit(f"native kernel unavailable: {native.why('gptq_sweep')}")
    codec = AffineCodec(4, 64, True, scale_dtype=torch.bfloat16, clip_search=True)
    params = gptq.GPTQParams(act_order=True, damp=0.01)
    g = torch.Generator().manual_seed(0)
    rows, tot = [], {"native": 0.0, "torch": 0.0}
    twin = gptq._native_sweep
    for name, (out, n) in SHAPES.items():
        w = torch.randn(out, n, generator=g) * 0.02
        x = torch.randn(4096, n, generator=g) * (torch.rand(n, generator=g) + 0.1)
        h = x.T @ x / x.shape[0]
        best, res = {}, {}
        for path in ("native", "torch"):
            gptq._native_sweep = twin if path == "native" else (lambda codec: None)
            ts = []
            for _ in range(args.repeat):
                t = time.perf_counter()
                res[path], _ = gptq.quantize(w, codec, h, params)
                ts.append(time.perf_counter() - t)
            best[path] = min(ts)
            tot[path] += best[path]
        gptq._native_sweep = twin
        same = torch.equal(res["native"].codes, res["torch"].codes) and torch.equal(
            res["native"].params["scale"], res["torch"].params["scale"])
        rows.append({"linear": name, "shape": [out, n], "native_s": round(best["native"], 4),
                     "torch_s": round(best["torch"], 4), "speedup": round(best["torch"] / best["native"], 2),
                     "bit_identical": same})
        print(f"{name:10s} {out:5d}x{n:<5d} native {best['native']*1e3:8.1f} ms  torch {best['torch']*1e3:8.1f} ms"
              f"  {best['torch']/best['native']:5.2f}x  identical={same}", flush=True)
    print(f"one block's 7 linears: native {tot['native']:.2f} s, torch twin {tot['torch']:.2f} s, "
          f"{tot['torch']/tot['native']:.2f}x (whole gptq.quantize incl. Cholesky, fit and scale refit)")
    if args.json:
        args.json.write_text(json.dumps({"threads": torch.get_num_threads(), "rows": rows,
                                         "block_native_s": round(tot["native"], 3),
                                         "block_torch_s": round(tot["torch"], 3)}, indent=2) + "\n")


if __name__ == "__main__":
    main()

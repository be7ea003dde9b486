"""The GGUF legacy types' default encoder: native kernel (kernels/cpu/gguf_legacy.cpp, 1 and 2 threads) vs its
torch twin, plus the error ratios native/twin and default/faithful (weighted by llama.cpp's element weights).

For each of Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, IQ4_NL, without and with an importance vector: a random 1536x576 and
4096x4096 tensor (Gaussian, t(3) tails in a tenth of the rows), and, when present, SmolLM2-135M's layer-0
linears from build/bench-gguf/off-grid/f32.gguf with the importance of imatrix.gguf there (the "real" row sums
the seven tensors). Seconds are the best of --repeat runs (the twin and faithful: one run).

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_encoders.py [--repeat 2] [--no-big] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from qtool.formats.gguf_legacy import IQ4_NL, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, element_weights
from qtool.runtime import native

CODECS = (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, IQ4_NL)
REAL = Path(__file__).resolve().parents[1] / "build" / "bench-gguf" / "off-grid"
LAYER0 = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def random_tensor(rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    t = torch.from_numpy(np.random.default_rng(seed).standard_t(3.0, (rows // 10, cols)).astype(np.float32))
    w[: rows // 10] = t * 0.02
    return w


def real_tensors() -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """(weight, importance) of SmolLM2's layer-0 linears, None without the files."""
    if not (REAL / "f32.gguf").is_file() or not (REAL / "imatrix.gguf").is_file():
        return None
    import gguf

    from qtool.calib.imatrix import read_imatrix

    means = read_imatrix(REAL / "imatrix.gguf").means
    out = []
    for t in gguf.GGUFReader(REAL / "f32.gguf").tensors:
        if t.name in {f"blk.0.{n}.weight" for n in LAYER0} and t.name in means:
            w = torch.from_numpy(np.array(t.data).reshape(int(t.shape[1]), int(t.shape[0])).copy()).float()
            out.append((w, means[t.name].float()))
    return out or None


def use_native(on: bool) -> None:
    os.environ["QTOOL_NATIVE"] = "1" if on else "0"
    native.load.cache_clear()


def timed(fn, repeat: int):
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def error(codec, w, q, imp) -> float:
    return float((element_weights(codec, w, imp).double() * (q.dequantize().double() - w.double()) ** 2).sum())


def run(codec, tensors, with_imp: bool, repeat: int) -> dict:
    """Seconds and errors summed over `tensors` [(w, imp)] for one codec."""
    sec = {"twin": 0.0, "native1": 0.0, "native2": 0.0, "faithful": 0.0}
    err = {"twin": 0.0, "native": 0.0, "faithful": 0.0}
    threads = torch.get_num_threads()
    for w, imp in tensors:
        imp = imp if with_imp else None
        use_native(False)
        s, q = timed(lambda: codec.encode(w, imp), 1)
        sec["twin"] += s
        err["twin"] += error(codec, w, q, imp)
        s, q = timed(lambda: codec.encode(w, imp, faithful=True), 1)
        sec["faithful"] += s
        err["faithful"] += error(codec, w, q, imp)
        use_native(True)
        for n in (1, 2):
            torch.set_num_threads(n)
            s, q = timed(lambda: codec.encode(w, imp), repeat)
            sec[f"native{n}"] += s
        torch.set_num_threads(threads)
        err["native"] += error(codec, w, q, imp)
    return {"seconds": {k: round(v, 4) for k, v in sec.items()},
            "speedup_1t": round(sec["twin"] / sec["native1"], 1), "speedup_2t": round(sec["twin"] / sec["native2"], 1),
            "err_native_over_twin": round(err["native"] / err["twin"], 6) if err["twin"] else 1.0,
            "err_default_over_faithful": round(err["native"] / err["faithful"], 4) if err["faithful"] else 1.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--no-big", action="store_true", help="skip the 4096x4096 tensor")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    use_native(True)
    if native.load("gguf_legacy") is None:
        raise SystemExit(f"native kernel unavailable: {native.why('gguf_legacy')}")
    sets = {"1536x576": [(random_tensor(1536, 576, 0), torch.exp(2 * torch.randn(576, generator=torch.Generator()
                                                                                     .manual_seed(1))))]}
    if not args.no_big:
        sets["4096x4096"] = [(random_tensor(4096, 4096, 2), torch.exp(2 * torch.randn(
            4096, generator=torch.Generator().manual_seed(3))))]
    if (real := real_tensors()) is not None:
        sets["smollm2-blk0"] = real
    else:
        print(f"(no real tensors: {REAL}/f32.gguf or imatrix.gguf missing)")
    print(f"{'set':13s} {'type':7s} {'imp':3s} {'twin s':>8s} {'nat 1t':>8s} {'nat 2t':>8s} {'x1t':>6s} {'x2t':>6s}"
          f" {'nat/twin':>9s} {'def/faith':>9s}", flush=True)
    rows = []
    for set_name, tensors in sets.items():
        for codec in CODECS:
            for with_imp in (False, True):
                r = run(codec, tensors, with_imp, args.repeat)
                s = r["seconds"]
                print(f"{set_name:13s} {codec.name:7s} {'yes' if with_imp else 'no':3s} {s['twin']:8.3f} "
                      f"{s['native1']:8.3f} {s['native2']:8.3f} {r['speedup_1t']:6.1f} {r['speedup_2t']:6.1f} "
                      f"{r['err_native_over_twin']:9.5f} {r['err_default_over_faithful']:9.4f}", flush=True)
                rows.append({"set": set_name, "type": codec.name, "importance": with_imp, **r})
    if args.json:
        args.json.write_text(json.dumps({"rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()

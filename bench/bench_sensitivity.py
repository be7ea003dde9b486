"""`make bench-sensitivity`: qtool's planned GGUF mixes at the file sizes of llama.cpp's named mixes (SmolLM2-135M,
both bases), judged by llama.cpp's `llama-perplexity` like `make bench-gguf`, whose work directory it reuses
(build/bench-gguf/<base>: the F32 GGUF, the base log-probs, and llama.cpp's rows in bench/results/gguf.json).

Per base:
  1. `qtool calibrate` on calibration-mixed.txt (128 x 512 tokens), once;
  2. per mix size (llama.cpp's Q4_K_M, Q3_K_M, Q2_K files with imatrix) and cost mode (measured, proxy):
     `qtool sensitivity --target-size <that size> --method M --mode MODE` -> a plan (costs measured once per
     base and mode, then reused from the cache), `qtool convert-gguf --plan --stats` -> the file (its size must equal the
     prediction and stay <= llama.cpp's), scored by `llama-perplexity --kl-divergence` (100 chunks of 512);
Results: bench/results/sensitivity.json and SENSITIVITY.md (KLD ratio against llama.cpp's file of that size).
Resumable (rows already measured are kept). Run alone: two torch processes at once ruin both timings on 2 cores.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from bench_gguf import MIXES, base_parser, timed  # noqa: E402

CANDIDATES = "q2_k,q3_k,q4_k,q5_k,q6_k,q8_0"


def main() -> None:
    ap = base_parser(__doc__)
    ap.add_argument("--methods", default="rtn")
    ap.add_argument("--modes", default="measured")  # add proxy to compare the modes (6 more runs)
    args = ap.parse_args()
    from qtool.eval import llamacpp

    qtool = [str(Path(sys.executable).with_name("qtool"))]
    calib = args.data / "calibration-mixed.txt"
    ref = {(r["base"], r["mix"]): r for r in json.loads((args.out / "gguf.json").read_text())["rows"]
           if r["tool"] == "llama"}
    results_path = args.out / "sensitivity.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {"rows": []}
    done = {(r["base"], r["mix"], r["method"], r.get("mode", "proxy")) for r in results["rows"]}
    for base in args.bases.split(","):
        work = args.work / base
        f32, base_kld = work / "f32.gguf", work / "base.kld"
        if not (f32.is_file() and base_kld.is_file()):
            raise SystemExit(f"{work}: run `make bench-gguf` first (it makes the F32 GGUF and the base log-probs)")
        stats = work / "stats"
        if not (stats / "manifest.json").is_file():
            t = timed(qtool + ["calibrate", f32, "--data", calib, "--out", stats, "--force"], work / "calibrate.log")
            (work / "calibrate.time.json").write_text(json.dumps(t))
        for mix in args.mixes.split(","):
            llama = ref.get((base, mix))
            if llama is None:
                raise SystemExit(f"no llama.cpp row for {base} {mix} in gguf.json: run make bench-gguf first")
            for method, mode in ((m, md) for m in args.methods.split(",") for md in args.modes.split(",")):
                if (base, mix, method, mode) in done:
                    continue
                tag = f"sens-{method}-{mode}-{mix}"
                plan, out, rep = work / f"{tag}.yaml", work / f"{tag}.gguf", work / f"{tag}.json"
                ts = timed(qtool + ["sensitivity", f32, "--stats", stats, "--candidates", CANDIDATES, "--method", method,
                                    "--mode", mode, "--target-size", str(llama["bytes"]), "--out", plan, "--force",
                                    "--json", rep, "--report", work / f"{tag}-report"], work / f"{tag}.log")
                report = json.loads(rep.read_text())
                tc = timed(qtool + ["convert-gguf", f32, "--plan", plan, "--stats", stats, "--out", out, "--force"],
                           work / f"{tag}-convert.log")
                size = out.stat().st_size
                k = llamacpp.perplexity_kld(out, base_kld, threads=2)
                row = {"base": base, "mix": mix, "method": method, "mode": mode, "bytes": size,
                       "predicted_bytes": report["predicted_bytes"], "llama_bytes": llama["bytes"],
                       "predicted_cost": report["cost"], "optimal": report["optimal"],
                       "sensitivity_seconds": ts["seconds"], "sensitivity_rss_mb": ts["rss_mb"],
                       "convert_seconds": tc["seconds"], "kld": k.kld_mean, "kld_stderr": k.kld_stderr, "ppl": k.ppl,
                       "same_top_pct": k.same_top_pct, "llama_kld": llama["kld"], "ratio": k.kld_mean / llama["kld"],
                       "types": {t: list(report["picks"].values()).count(t) for t in sorted(set(report["picks"].values()))}}
                print(json.dumps(row), flush=True)
                results["rows"].append(row)
                results_path.write_text(json.dumps(results, indent=1) + "\n")
                out.unlink()
    (args.out / "SENSITIVITY.md").write_text(markdown(results["rows"]))
    print(markdown(results["rows"]))


def markdown(rows: list[dict]) -> str:
    lines = ["| base | size of | method, mode | MB (predicted = written) | llama.cpp MB | KLD | llama.cpp KLD | ratio | same-top % "
             "| plan s | convert s | types |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["base"], MIXES.index(r["mix"]) if r["mix"] in MIXES else 9, r["method"],
                                         r.get("mode", "proxy"))):
        same = "yes" if r["bytes"] == r["predicted_bytes"] else f"NO ({r['predicted_bytes']})"
        types = ", ".join(f"{t.upper()} {n}" for t, n in r["types"].items())
        lines.append(f"| {r['base']} | {r['mix']} | {r['method']}, {r.get('mode', 'proxy')} | {r['bytes'] / 1e6:.2f} ({same}) | "
                     f"{r['llama_bytes'] / 1e6:.2f} | {r['kld']:.4f} | {r['llama_kld']:.4f} | {r['ratio']:.3f} | "
                     f"{r['same_top_pct']:.2f} | {r['sensitivity_seconds']:.0f} | {r['convert_seconds']:.0f} | {types} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

"""`make bench-gguf`: qtool's GGUF files beside llama.cpp's own, judged by llama.cpp (SmolLM2-135M, both bases).

For each base (the shipped Q4_1-grid GGUF, and the off-grid copy of bench/real.py) in one run:
  1. one F32 GGUF of the base (`qtool convert-gguf --type F32`), fed to every tool;
  2. llama.cpp's `llama-imatrix` on the calibration text (128 chunks of 512 tokens; timed apart);
  3. base logits: `llama-perplexity --kl-divergence-base` on the first CHUNKS chunks of 512 tokens of WikiText-2;
  4. per mix (Q4_K_M, Q3_K_M, Q2_K):
       llama.cpp   `llama-quantize --imatrix` (its per-tensor rules and fixed fallbacks),
       qtool rtn   `convert-gguf --imatrix` (the same importance matrix: encoders like for like),
       qtool gptq  `convert-gguf --method gptq --calib` (GPTQ through the grids, least-error fallbacks),
       qtool awq / awq-gptq (AWQ scales searched on the GGUF grids, then their fit or GPTQ), when asked (--tools),
       autoround   AutoRound 0.16.1's own GGUF export (`--iters 0`, its importance from the same text; its own
                   venv: bench/autoround_gguf.py), when asked (--tools);
     each file scored by `llama-perplexity --kl-divergence` (KLD, PPL, same-top %), timed with /usr/bin/time
     (wall seconds, peak RSS).
Outputs are reused when present in --work (a rerun after a crash continues); results go to
bench/results/gguf.json and GGUF.md. Run alone: two torch processes at once ruin both timings on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
MIXES = ("Q4_K_M", "Q3_K_M", "Q2_K")


def timed(cmd: list, log: Path) -> dict:
    p = subprocess.run(["/usr/bin/time", "-v", *map(str, cmd)], capture_output=True, text=True, cwd=ROOT)
    log.write_text(p.stdout + "\n---- stderr ----\n" + p.stderr)
    if p.returncode != 0:
        raise SystemExit(f"failed ({p.returncode}): {' '.join(map(str, cmd))}\n{p.stderr[-3000:]}")
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", p.stderr).group(1)
    secs = sum(float(v) * 60 ** i for i, v in enumerate(reversed(wall.split(":"))))
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1)) / 1024
    return {"seconds": round(secs, 2), "rss_mb": round(rss, 1)}


def base_parser(doc: str) -> argparse.ArgumentParser:
    """The options the GGUF benchmarks share (data, results, the work directory, bases, mixes)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--work", type=Path, default=ROOT / "build" / "bench-gguf")
    ap.add_argument("--bases", default="shipped,off-grid")
    ap.add_argument("--mixes", default=",".join(MIXES))
    return ap


def main() -> None:
    ap = base_parser(__doc__)
    ap.add_argument("--tools", default="llama,qtool-rtn,qtool-gptq")
    ap.add_argument("--chunks", type=int, default=100)
    ap.add_argument("--calib-chunks", type=int, default=128)
    args = ap.parse_args()
    from qtool.eval import llamacpp

    qtool = [str(Path(sys.executable).with_name("qtool"))]
    text, calib = args.data / "wikitext2-test.txt", args.data / "calibration-mixed.txt"
    results_path = args.out / "gguf.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {"rows": []}
    done = {(r["base"], r["mix"], r["tool"]) for r in results["rows"]}
    for base in args.bases.split(","):
        work = args.work / base
        work.mkdir(parents=True, exist_ok=True)
        f32 = work / "f32.gguf"
        if not f32.is_file():
            if base == "shipped":
                src = "smollm2-135m"
            else:
                from real import off_grid_copy

                src = str(off_grid_copy(work / "hf"))
            timed(qtool + ["convert-gguf", src, "--type", "F32", "--out", f32, "--no-check", "--force"], work / "f32.log")
        imatrix = work / "imatrix.gguf"
        if not imatrix.is_file():
            t = timed([llamacpp.require("llama-imatrix"), "-m", f32, "-f", calib, "-c", 512, "--chunks", args.calib_chunks,
                       "-o", imatrix, "-t", 2, "--no-ppl"], work / "imatrix.log")
            (work / "imatrix.time.json").write_text(json.dumps(t))
        base_kld = work / "base.kld"
        if not base_kld.is_file():
            timed([llamacpp.require("llama-perplexity"), "-m", f32, "-f", text, "-c", 512, "--chunks", args.chunks,
                   "--kl-divergence-base", base_kld, "-t", 2], work / "base.log")
        for mix in args.mixes.split(","):
            for tool in args.tools.split(","):
                if (base, mix, tool) in done:
                    continue
                out = work / f"{tool}-{mix}.gguf"
                log = work / f"{tool}-{mix}.log"
                if tool == "llama":
                    cmd = [llamacpp.require("llama-quantize"), "--imatrix", imatrix, f32, out, mix, 2]
                elif tool == "qtool-rtn":
                    cmd = qtool + ["convert-gguf", f32, "--type", mix, "--imatrix", imatrix, "--out", out, "--force",
                                   "--no-check"]
                elif tool in ("qtool-gptq", "qtool-awq", "qtool-awq-gptq"):
                    cmd = qtool + ["convert-gguf", f32, "--type", mix, "--method", tool.removeprefix("qtool-"), "--calib",
                                   calib, "--out", out, "--force", "--no-check"]
                elif tool == "autoround":  # its own venv and HF source (bench/autoround_gguf.py)
                    hf = work / "hf"
                    if not (hf / "config.json").is_file():
                        from peers import float_copy

                        float_copy(hf)
                    cmd = [sys.executable, ROOT / "bench" / "autoround_gguf.py", "--model", hf, "--mix", mix, "--calib",
                           calib, "--out", out, "--nsamples", args.calib_chunks]
                else:
                    raise SystemExit(f"unknown tool {tool}")
                t = timed(cmd, log)
                k = llamacpp.perplexity_kld(out, base_kld, threads=2)
                row = {"base": base, "mix": mix, "tool": tool, "bytes": out.stat().st_size, **t,
                       "kld": k.kld_mean, "kld_stderr": k.kld_stderr, "ppl": k.ppl, "base_ppl": k.base_ppl,
                       "same_top_pct": k.same_top_pct, "chunks": k.n_chunks}
                print(json.dumps(row), flush=True)
                results["rows"].append(row)
                args.out.mkdir(parents=True, exist_ok=True)
                results_path.write_text(json.dumps(results, indent=1) + "\n")
                out.unlink()  # keep the work dir small; the row holds what was measured
    (args.out / "GGUF.md").write_text(markdown(results["rows"]))
    print(markdown(results["rows"]))


def markdown(rows: list[dict]) -> str:
    lines = ["| base | mix | tool | MB | KLD | ratio vs llama.cpp | PPL | same-top % | s | RSS MB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    ref = {(r["base"], r["mix"]): r for r in rows if r["tool"] == "llama"}
    for r in sorted(rows, key=lambda r: (r["base"], MIXES.index(r["mix"]) if r["mix"] in MIXES else 9, r["tool"])):
        lr = ref.get((r["base"], r["mix"]))
        ratio = f"{r['kld'] / lr['kld']:.3f} (size {r['bytes'] / lr['bytes']:.3f})" if lr else "-"
        lines.append(f"| {r['base']} | {r['mix']} | {r['tool']} | {r['bytes'] / 1e6:.1f} | {r['kld']:.4f} | {ratio} | "
                     f"{r['ppl']:.3f} | {r['same_top_pct']:.2f} | {r['seconds']:.1f} | {r['rss_mb']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

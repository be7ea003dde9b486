"""`make bench-real`: SmolLM2-135M, WikiText-2 test, first 100 chunks of 512 tokens (llama-perplexity style).

Every row runs on the shipped base (a Q4_1 GGUF, whose weights lie on a Q4_1 grid) AND on an off-grid copy
(recipe below), quantize and eval as a user runs them (the real `qtool` CLI in a subprocess, timed with
/usr/bin/time for peak RSS). Writes bench/results/results-<base>.json and bench/results/RESULTS.md.

Off-grid recipe: for every decoder linear, each Q4_1 block of 32 weights (along the input dimension) gets
seeded uniform noise of +-half its Q4_1 step, step = (max - min) / 15 of that block (torch seed 0); the
copy is written as a float32 Hugging Face directory. Embeddings and norms are unchanged.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
QTOOL = [sys.executable, "-m", "qtool"]

GPTQ_PLAN = (ROOT / "configs" / "gptq-w4g64.yaml").read_text()
ROWS = [  # (row name, plan yaml text)
    ("int8 per-channel", "rules:\n  - {match: '.*', bits: 8, group_size: channel, symmetric: true}\n"),
    ("int4-g64 asym", "rules:\n  - {match: '.*', bits: 4, group_size: 64, symmetric: false}\n"),
    ("int4-g64 sym", "rules:\n  - {match: '.*', bits: 4, group_size: 64, symmetric: true}\n"),
    ("int4-g64 asym +clip", "rules:\n  - {match: '.*', bits: 4, group_size: 64, symmetric: false, clip_search: true}\n"),
    ("int4-g64 sym +clip", "rules:\n  - {match: '.*', bits: 4, group_size: 64, symmetric: true, clip_search: true}\n"),
    ("int3-g64 asym", "rules:\n  - {match: '.*', bits: 3, group_size: 64, symmetric: false}\n"),
    ("int3-g64 asym +clip", "rules:\n  - {match: '.*', bits: 3, group_size: 64, symmetric: false, clip_search: true}\n"),
    ("nf4-b64", "rules:\n  - {match: '.*', codec: nf4, block_size: 64}\n"),
    ("nf4-b64 +dq", "rules:\n  - {match: '.*', codec: nf4, block_size: 64, double_quant: true}\n"),
    # calibrated rows: calibration-mixed.txt, 128 x 512 tokens, seed 0 (see --calib below)
    # configs/gptq-w4g64.yaml clips its static groups (clip_search: true); the "no clip" rows drop that line
    ("gptq int4-g64 sym act-order +clip", GPTQ_PLAN),
    ("gptq int4-g64 sym act-order (no clip)", GPTQ_PLAN.replace("    clip_search: true\n", "")),
    ("gptq int4-g64 asym act-order +clip", GPTQ_PLAN.replace("symmetric: true", "symmetric: false")),
    ("gptq int4-g64 asym act-order (no clip)", GPTQ_PLAN.replace("symmetric: true", "symmetric: false").replace(
        "    clip_search: true\n", "")),
    ("gptq int3-g64 asym act-order", (ROOT / "configs" / "gptq-w3g64.yaml").read_text()),
    ("w8a8 int8 (no smoothing)", (ROOT / "configs" / "smoothquant-w8a8.yaml").read_text().replace(
        "method: [smoothquant, rtn]", "method: rtn").replace("    alpha: 0.5\n", "").replace(
        "calibration: {source: generated, samples: 128, seq_len: 512, seed: 0}\n", "")),
    ("smoothquant w8a8", (ROOT / "configs" / "smoothquant-w8a8.yaml").read_text()),
    ("llm.int8 (threshold 6)", (ROOT / "configs" / "llm-int8.yaml").read_text()),
    ("hqq int4-g64", "rules:\n  - {match: '.*', method: hqq, bits: 4, group_size: 64}\n"),
    ("awq int4-g64 asym", (ROOT / "configs" / "awq-w4g64.yaml").read_text()),
    ("awq+gptq int4-g64 asym act-order", (ROOT / "configs" / "awq-gptq-w4g64.yaml").read_text()),
    ("awq int3-g64 asym", (ROOT / "configs" / "awq-w4g64.yaml").read_text().replace("bits: 4", "bits: 3")),
]


def off_grid_copy(dst: Path, seed: int = 0) -> Path:
    """The SmolLM2 base with seeded noise of +-half a Q4_1 step on every decoder linear (see module doc)."""
    import torch
    from safetensors.torch import save_file

    from qtool.io.source import open_model

    src = open_model("smollm2-135m")
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name in src.names():
        t = src.get(name)
        if name.startswith("model.layers.") and name.endswith("proj.weight"):
            blocks = t.view(t.shape[0], -1, 32)
            step = (blocks.amax(-1, keepdim=True) - blocks.amin(-1, keepdim=True)) / 15
            noise = (torch.rand(blocks.shape, generator=gen) - 0.5) * step
            t = (blocks + noise).view_as(t)
        sd[name] = t.contiguous()
    dst.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    src.config.save_pretrained(dst)
    src.save_tokenizer(dst)
    return dst


def timed(cmd: list[str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in MB, stdout) of a command run under /usr/bin/time -v."""
    p = subprocess.run(["/usr/bin/time", "-v"] + cmd, capture_output=True, text=True, cwd=ROOT)
    if p.returncode not in (0, 4):
        raise SystemExit(f"failed: {' '.join(cmd)}\n{p.stderr[-3000:]}")
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", p.stderr).group(1)
    parts = [float(x) for x in wall.split(":")]
    secs = sum(v * 60 ** i for i, v in enumerate(reversed(parts)))
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1)) / 1024
    return secs, rss, p.stdout


def bench(base_name: str, base: str, text: Path, chunks: int, work: Path, rows, calib: Path) -> list[dict]:
    results = []
    for row, plan_text in rows:
        plan = work / "plan.yaml"
        plan.write_text(plan_text)
        art = work / "artifact"
        extra = ["--calib", str(calib)] if "calibration:" in plan_text else []
        secs, rss, out = timed(QTOOL + ["quantize", base, "--plan", str(plan), "--out", str(art), "--force",
                                        "--json", "-", *extra])
        man = json.loads(out)
        _, _, out = timed(QTOOL + ["eval", str(art), "--base", base, "--text", str(text), "--chunks", str(chunks),
                                   "--json", "-"])
        ev = json.loads(out)
        if not results:
            results.append({"base": base_name, "row": "base (float)", "ppl": ev["base_ppl"]})
        size = sum(f.stat().st_size for f in art.glob("*.safetensors"))
        r = {"base": base_name, "row": row, "file_mb": round(size / 1e6, 2),
             "linear_mb": round(man["quantized_bytes"] / 1e6, 2), "bits_per_weight": man["bits_per_weight"],
             "ppl": ev["ppl"], "kld": ev["kld_mean"], "same_top_pct": ev["same_top_pct"],
             "quantize_s": round(secs, 1), "peak_rss_mb": round(rss), "self_check_kld": man["check"]["kld"]}
        results.append(r)
        print(json.dumps(r), flush=True)
    return results


def markdown(results: list[dict], chunks: int) -> str:
    lines = [f"SmolLM2-135M, WikiText-2 test, first {chunks} chunks of 512 tokens (llama-perplexity convention).",
             "Sizes: `file` = all safetensors bytes (embeddings kept in float32 as in the GGUF-dequantized base);",
             "`bits/w` = bytes of the 210 quantized decoder linears (codes + scales + zeros) x 8 / their weights.", ""]
    for base in dict.fromkeys(r["base"] for r in results):
        rows = [r for r in results if r["base"] == base]
        lines += [f"### {base} (base PPL {rows[0]['ppl']:.3f})", "",
                  "| method | file MB | bits/w | PPL | KLD | same-top % | quantize s | peak RSS MB |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in rows[1:]:
            lines.append(f"| {r['row']} | {r['file_mb']} | {r['bits_per_weight']:.3f} | {r['ppl']:.3f} | "
                         f"{r['kld']:.4f} | {r['same_top_pct']:.1f} | {r['quantize_s']} | {r['peak_rss_mb']} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--chunks", type=int, default=100)
    ap.add_argument("--rows", default="", help="regex selecting rows (default: all)")
    ap.add_argument("--bases", default="shipped,off-grid")
    ap.add_argument("--tag", default="", help="suffix of the result files (results-TAG.json, RESULTS-TAG.md)")
    args = ap.parse_args()
    text = args.data / "wikitext2-test.txt"
    if not text.is_file():
        raise SystemExit(f"{text}: not found (pass --data)")
    rows = [r for r in ROWS if re.search(args.rows, r[0])]
    suffix = f"-{args.tag}" if args.tag else ""
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="qtool-bench-") as tmp:
        work = Path(tmp)
        for base_name in args.bases.split(","):
            base = "smollm2-135m" if base_name == "shipped" else str(off_grid_copy(work / "off-grid"))
            results += bench(base_name, base, text, args.chunks, work, rows, args.data / "calibration-mixed.txt")
            (args.out / f"results{suffix}.json").write_text(json.dumps(results, indent=2) + "\n")
        shutil.rmtree(work / "artifact", ignore_errors=True)
    (args.out / f"RESULTS{suffix}.md").write_text(markdown(results, args.chunks))
    print(markdown(results, args.chunks))


if __name__ == "__main__":
    main()

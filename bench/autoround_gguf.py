"""AutoRound's own GGUF export, as a peer in the GGUF benchmark (bench/bench_gguf.py).

Runs `auto_round` (auto-round 0.16.1, in its own venv: build/autoround-venv, see --python) on CPU in RTN mode
(--iters 0) with its optimized-RTN path on, so it collects its own importance matrix (mean squared input of
every linear layer) from the calibration text and uses it in its k-quant search, then exports one GGUF:

    python bench/autoround_gguf.py --model HF_DIR --mix Q4_K_M --calib calibration-mixed.txt --out OUT.gguf

HF_DIR must be a local Hugging Face directory (config, safetensors, tokenizer): auto-round cannot read a GGUF
as its source. No network: HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE / HF_DATASETS_OFFLINE are set.

Calibration: the text is cut, deterministically, into pieces of about SEQLEN*5 characters (more than SEQLEN
tokens each), written as a JSON list of strings and passed as `--dataset FILE.json`: auto-round tokenizes the
pieces, keeps those of at least SEQLEN tokens, cuts each to SEQLEN, shuffles them with its seed and keeps NSAMPLES
(its `:concat=true` packing fails on a JSON list in 0.16.1: 'list' object has no attribute 'shape'). So it sees
the same file as the benchmark's llama-imatrix run (128 chunks of 512 tokens), but not the same 128 chunks.

Mixes: auto-round's names (`auto_round list format`); Q2_K has no exact counterpart there and maps to Q2_K_S.
This script only shells out: it imports neither torch nor auto_round.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MIXES = {"q2_k": "q2_k_s", "q2_k_s": "q2_k_s", "q3_k_s": "q3_k_s", "q3_k_m": "q3_k_m", "q3_k_l": "q3_k_l",
         "q4_k_s": "q4_k_s", "q4_k_m": "q4_k_m", "q5_k_s": "q5_k_s", "q5_k_m": "q5_k_m", "q6_k": "q6_k",
         "q4_0": "q4_0", "q4_1": "q4_1", "q5_0": "q5_0", "q5_1": "q5_1", "q8_0": "q8_0"}


def text_pieces(text: str, size: int) -> list[str]:
    """Consecutive pieces of about `size` characters, each cut at the last whitespace before the limit."""
    pieces, start = [], 0
    while start < len(text):
        end = min(start + size, len(text))
        if end < len(text):
            cut = max(text.rfind(" ", start, end), text.rfind("\n", start, end))
            end = cut if cut > start + size // 2 else end
        piece = text[start:end].strip()
        if piece:
            pieces.append(piece)
        start = end
    return pieces


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="local Hugging Face model directory")
    ap.add_argument("--mix", required=True, help="GGUF mix, e.g. Q4_K_M, Q3_K_M, Q2_K (-> Q2_K_S)")
    ap.add_argument("--calib", type=Path, required=True, help="calibration text file")
    ap.add_argument("--out", type=Path, required=True, help="the .gguf to write")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--python", default=str(ROOT / "build" / "autoround-venv" / "bin" / "python"),
                    help="python of the venv that has auto-round")
    ap.add_argument("--work", type=Path, help="scratch folder (default: beside --out)")
    ap.add_argument("--dry-run", action="store_true", help="write the JSON dataset, print the command, stop")
    args = ap.parse_args()

    mix = MIXES.get(args.mix.lower())
    if mix is None:
        return fail(f"unknown mix {args.mix!r}; known: {', '.join(sorted(MIXES))}")
    if mix != args.mix.lower():
        print(f"autoround_gguf: auto-round has no {args.mix}; using gguf:{mix}", file=sys.stderr)
    if not (args.model / "config.json").is_file():
        return fail(f"{args.model} is not a Hugging Face model directory (no config.json)")
    if not args.calib.is_file():
        return fail(f"no calibration text at {args.calib}")

    out = args.out.resolve()
    work = (args.work or out.parent / f".{out.stem}.autoround").resolve()
    work.mkdir(parents=True, exist_ok=True)
    dataset = work / "calib.json"
    pieces = text_pieces(args.calib.read_text(encoding="utf-8"), args.seqlen * 5)
    dataset.write_text(json.dumps(pieces, ensure_ascii=False), encoding="utf-8")
    export = work / "export"

    cmd = [args.python, "-m", "auto_round", "--model", str(args.model.resolve()), "--format", f"gguf:{mix}",
           "--iters", "0", "--enable_opt_rtn", "--dataset", str(dataset),
           "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--seed", str(args.seed),
           "--device_map", "cpu", "--disable_torch_compile", "--output_dir", str(export)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    print(f"autoround_gguf: {len(pieces)} calibration pieces -> {dataset}")
    print("autoround_gguf: HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 " + " ".join(cmd),
          flush=True)
    if args.dry_run:
        return 0
    if not Path(args.python).is_file():
        return fail(f"no auto-round python at {args.python} (see bench/autoround_gguf.py docstring)")

    shutil.rmtree(export, ignore_errors=True)
    rc = subprocess.run(cmd, env=env, cwd=work).returncode
    if rc != 0:
        return fail(f"auto-round exited with status {rc}")
    found = [p for p in export.rglob("*.gguf") if not p.name.startswith("mmproj")]
    if len(found) != 1:
        return fail(f"expected one .gguf under {export}, found {[str(p) for p in found]}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    shutil.move(found[0], tmp)  # a rename when --work is on out's file system (the default), else a copy
    os.replace(tmp, out)  # atomic: --out is either the old file or the whole new one
    shutil.rmtree(export, ignore_errors=True)
    print(f"autoround_gguf: wrote {out} ({out.stat().st_size} bytes)")
    return 0


def fail(msg: str) -> int:
    print(f"autoround_gguf: error: {msg}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())

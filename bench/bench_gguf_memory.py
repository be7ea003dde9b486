"""Peak memory of `qtool convert-gguf` on a model far larger than one block: a synthetic 1.2B-parameter Llama
(TinyLlama's shapes, every width a multiple of 256, random bf16 weights on disk, SmolLM2's tokenizer), converted
to Q4_K_M by qtool (RTN, streaming one block at a time) and, from an F16 GGUF of the same weights, by
llama-quantize; wall time and peak RSS of each whole process (/usr/bin/time -v). qtool's peak should be about
one block + the embeddings + the process, not the model (the bf16 model alone is 2.3 GB; in float32 4.7 GB).

    python bench/bench_gguf_memory.py            # results: bench/results/gguf_memory.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from bench_gguf import timed  # noqa: E402,F401  (the F16 conversion keeps /usr/bin/time's numbers)

SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
             num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False)


def sampled(cmd: list, log: Path) -> dict:
    """`timed`, plus the peaks of the process's anonymous and file-backed resident memory (/proc/PID/status,
    every 0.2 s): a memory-mapped input counts in RSS as file pages the kernel can drop, not as the tool's own."""
    import subprocess
    import threading
    import time

    t0 = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.Popen([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
        peak = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0}

        def poll():
            while p.poll() is None:
                try:
                    for line in Path(f"/proc/{p.pid}/status").read_text().splitlines():
                        k, _, v = line.partition(":")
                        if k in peak:
                            peak[k] = max(peak[k], int(v.split()[0]))
                except OSError:
                    pass
                time.sleep(0.2)

        th = threading.Thread(target=poll)
        th.start()
        p.wait()
        th.join()
    if p.returncode:
        raise SystemExit(f"failed ({p.returncode}): {cmd} (see {log})")
    return {"seconds": round(time.perf_counter() - t0, 2), "rss_mb": round(peak["VmRSS"] / 1024, 1),
            "anon_mb": round(peak["RssAnon"] / 1024, 1), "file_mb": round(peak["RssFile"] / 1024, 1)}


def make_model(dst: Path, tokenizer_dir: Path) -> int:
    """Write the synthetic model (seeded) to `dst`; returns its parameter count."""
    import shutil

    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    tok = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    vocab = len(tok["model"]["vocab"]) + len(tok.get("added_tokens", []))
    cfg = LlamaConfig(vocab_size=49152 if vocab <= 49152 else vocab, bos_token_id=1, eos_token_id=2, **SHAPE)
    cfg.architectures = ["LlamaForCausalLM"]
    dst.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    h, f, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, h), "lm_head.weight": (cfg.vocab_size, h),
              "model.norm.weight": (h,)}
    for i in range(L):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                       p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                       p + "mlp.down_proj.weight": (h, f), p + "input_layernorm.weight": (h,),
                       p + "post_attention_layernorm.weight": (h,)})
    sd = {}
    for name, shape in shapes.items():
        if len(shape) == 1:
            sd[name] = torch.ones(shape, dtype=torch.bfloat16)
        else:
            sd[name] = (torch.randn(shape, generator=g) * (0.5 / shape[1] ** 0.5)).to(torch.bfloat16)
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg.save_pretrained(dst)
    (dst / "config.json").write_text((dst / "config.json").read_text().replace('"float32"', '"bfloat16"'))
    for fname in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / fname, dst / fname)
    return sum(t.numel() for t in sd.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=ROOT / "build" / "bench-gguf-memory")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--tokenizer", type=Path, default=ROOT / "build" / "bench-gguf" / "off-grid" / "hf")
    args = ap.parse_args()
    from qtool.eval import llamacpp

    qtool = [str(Path(sys.executable).with_name("qtool"))]
    work = args.work
    hf = work / "hf"
    if not (hf / "model.safetensors").is_file():
        n = make_model(hf, args.tokenizer)
    else:
        from safetensors import safe_open

        with safe_open(str(hf / "model.safetensors"), "pt") as f:
            n = 0
            for k in f.keys():
                shape = f.get_slice(k).get_shape()
                n += shape[0] * (shape[1] if len(shape) > 1 else 1)
    rows = {}
    rows["qtool-rtn"] = sampled(qtool + ["convert-gguf", hf, "--type", "Q4_K_M", "--out", work / "qtool-q4km.gguf",
                                       "--force", "--no-check"], work / "qtool.log")
    f16 = work / "f16.gguf"
    if not f16.is_file():
        rows["qtool-f16"] = timed(qtool + ["convert-gguf", hf, "--type", "F16", "--out", f16, "--force", "--no-check"],
                                  work / "f16.log")
    rows["llama-quantize"] = sampled([llamacpp.require("llama-quantize"), f16, work / "llama-q4km.gguf", "Q4_K_M", 2],
                                   work / "llama.log")
    for k, f in (("qtool-rtn", "qtool-q4km.gguf"), ("llama-quantize", "llama-q4km.gguf")):
        rows[k]["bytes"] = (work / f).stat().st_size
    res = {"model": {**SHAPE, "params": n, "bf16_bytes": (hf / "model.safetensors").stat().st_size}, "rows": rows}
    (args.out / "gguf_memory.json").write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()

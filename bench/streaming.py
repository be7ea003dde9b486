"""Streaming proof: peak RSS of `qtool quantize` grows with one block, not with the model.

Writes random Llama checkpoints (hidden 1024, MLP 4096, GQA 16/4, float32, one safetensors shard per
layer, generated tensor by tensor so the generator streams too) at two depths, quantizes each to int4 g64
with `--no-check`, and reports peak RSS (/usr/bin/time -v) beside the checkpoint size. If the engine held
the model, doubling the depth would add the size of the extra layers to the peak; streaming adds only the
extra quantized output that waits in the current output shard.

    python bench/streaming.py --layers 12,24 [--work /tmp/qtool-stream]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
H, FF, HEADS, KV, VOCAB = 1024, 4096, 16, 4, 32000


def write_model(out: Path, layers: int) -> int:
    from transformers import LlamaConfig

    out.mkdir(parents=True, exist_ok=True)
    cfg = LlamaConfig(hidden_size=H, intermediate_size=FF, num_hidden_layers=layers, num_attention_heads=HEADS,
                      num_key_value_heads=KV, vocab_size=VOCAB, tie_word_embeddings=False,
                      architectures=["LlamaForCausalLM"])
    cfg.save_pretrained(out)
    g = torch.Generator().manual_seed(0)
    kv = H * KV // HEADS
    shapes = {"self_attn.q_proj": (H, H), "self_attn.k_proj": (kv, H), "self_attn.v_proj": (kv, H),
              "self_attn.o_proj": (H, H), "mlp.gate_proj": (FF, H), "mlp.up_proj": (FF, H), "mlp.down_proj": (H, FF)}
    weight_map = {}

    def shard(name: str, tensors: dict) -> None:
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})

    shard("embed.safetensors", {"model.embed_tokens.weight": torch.randn(VOCAB, H, generator=g) * 0.02,
                                "lm_head.weight": torch.randn(VOCAB, H, generator=g) * 0.02,
                                "model.norm.weight": torch.ones(H)})
    for i in range(layers):
        p = f"model.layers.{i}."
        t = {p + k + ".weight": torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}
        t[p + "input_layernorm.weight"] = torch.ones(H)
        t[p + "post_attention_layernorm.weight"] = torch.ones(H)
        shard(f"layer-{i:03d}.safetensors", t)
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return sum(f.stat().st_size for f in out.glob("*.safetensors"))


def peak_rss_mb(cmd: list[str]) -> tuple[float, float]:
    p = subprocess.run(["/usr/bin/time", "-v"] + cmd, capture_output=True, text=True, cwd=ROOT)
    if p.returncode:
        raise SystemExit(p.stderr[-2000:])
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1)) / 1024
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", p.stderr).group(1)
    secs = sum(float(v) * 60 ** i for i, v in enumerate(reversed(wall.split(":"))))
    return rss, secs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", default="12,24")
    ap.add_argument("--work", type=Path, default=Path("/tmp/qtool-stream"))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "streaming.json")
    args = ap.parse_args()
    plan = args.work / "int4.yaml"
    args.work.mkdir(parents=True, exist_ok=True)
    plan.write_text("rules:\n  - {match: '.*', bits: 4, group_size: 64, symmetric: true}\n")
    rows = []
    for n in map(int, args.layers.split(",")):
        model = args.work / f"llama-{n}"
        size = write_model(model, n)
        rss, secs = peak_rss_mb([sys.executable, "-m", "qtool", "quantize", str(model), "--plan", str(plan),
                                 "--out", str(args.work / f"q-{n}"), "--force", "--no-check"])
        rows.append({"layers": n, "checkpoint_mb": round(size / 2**20), "peak_rss_mb": round(rss),
                     "quantize_s": round(secs, 1)})
        print(json.dumps(rows[-1]), flush=True)
        shutil.rmtree(model)
        shutil.rmtree(args.work / f"q-{n}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()

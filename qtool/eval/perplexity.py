"""Perplexity, KL divergence and top-1 agreement, following llama.cpp's `llama-perplexity`.

Convention (tools/perplexity/perplexity.cpp): the whole text is tokenized once; it is cut into
`n_chunks = min(requested, len(tokens) // ctx)` chunks of `ctx` tokens; each chunk is one forward pass;
only the second half is scored: for i in [ctx//2, ctx-2], the log-prob of token[i+1] under logits[i]
(`ctx - 1 - ctx//2` positions per chunk, 255 at ctx 512), so every scored token has >= ctx/2 context.
PPL = exp(mean NLL); its stderr is llama.cpp's: ppl * sqrt((E[nll^2] - E[nll]^2) / (count - 1)).

BOS: we tokenize WITHOUT special tokens. If the tokenizer adds a BOS by default (llama.cpp's `add_bos`,
see `bos_token_for`), pass `bos_token_id`: the first token of each chunk is overwritten by BOS (it is
never a target, since targets start at ctx//2 + 1). llama.cpp does the same overwrite but tokenizes with
the BOS prepended, which shifts its chunk boundaries by one token; without add_bos (e.g. SmolLM2, whose
GGUF says add_bos_token = false) the token streams and chunks are identical.

KL divergence per scored position is sum_v p_base(v) (log p_base(v) - log p_model(v)), in float64 from
log_softmax; the base side comes from a `BaseLogits` cache (one base forward per text, ever).
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from qtool.errors import QtoolError, UsageError

Progress = Callable[[int], None] | None
CACHE_FORMAT = 1
HEADER = 6  # uint16 columns before the codes in each cached row: scale f32, offset f32, base argmax u32
LOGP_RANGE = 32.0  # nats below a row's max log-prob that the uint16 codes span; lower values are clamped


@dataclass(frozen=True)
class EvalResult:
    ppl: float
    ppl_stderr: float | None
    n_tokens_scored: int
    n_chunks: int
    ctx: int
    base_ppl: float | None = None
    kld_mean: float | None = None
    kld_stderr: float | None = None
    kld_p99: float | None = None
    same_top_pct: float | None = None  # % of scored positions where the model's argmax is the base's

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def tokenize_text(tokenizer, text: str) -> torch.LongTensor:
    """The whole text as one 1-D LongTensor of ids, without BOS/EOS or any other special token."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def bos_token_for(tokenizer) -> int | None:
    """The BOS id if this tokenizer adds one by default (llama.cpp: add_bos), else None."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos if ids and ids[0] == bos else None


def resolve_chunks(n_tokens: int, ctx: int, n_chunks: int | None = None) -> int:
    """How many chunks will be scored; UsageError when there is not even one."""
    if ctx < 3:
        raise UsageError(f"ctx must be at least 3 tokens (got {ctx})")
    if n_chunks is not None and n_chunks < 1:
        raise UsageError(f"the number of chunks must be at least 1 (got {n_chunks})")
    avail = n_tokens // ctx
    if avail < 1:
        raise UsageError(f"the evaluation text has {n_tokens} tokens, fewer than one chunk of ctx={ctx}: "
                         f"give a longer text or a smaller ctx")
    return avail if n_chunks is None else min(n_chunks, avail)


def tokens_sha256(tokens: torch.Tensor) -> str:
    return hashlib.sha256(tokens.to(torch.int64).numpy().astype("<i8").tobytes()).hexdigest()


def _accepts(model, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError, AttributeError):
        return False


def _scored_logits(model, tokens, ctx, n, bos, batch_size):
    """Yield (chunk index, float32 logits [n_pos, V] of the scored positions, targets [n_pos])."""
    first, n_pos = ctx // 2, ctx - 1 - ctx // 2
    kw = {}
    if _accepts(model, "logits_to_keep"):  # skip the lm_head on the unscored first half
        kw["logits_to_keep"] = n_pos + 1
    if _accepts(model, "use_cache"):
        kw["use_cache"] = False
    dev = getattr(model, "device", None)
    with torch.inference_mode():
        for s in range(0, n, batch_size):
            b = min(batch_size, n - s)
            x = tokens[s * ctx:(s + b) * ctx].view(b, ctx).clone()
            if bos is not None:
                x[:, 0] = bos
            logits = model(input_ids=x.to(dev), **kw).logits[:, -(n_pos + 1):-1]
            for j in range(b):
                c = (s + j) * ctx
                yield s + j, logits[j].float().cpu(), tokens[c + first + 1:c + ctx]


class _Stats:
    """Running NLL sums, llama.cpp style."""

    def __init__(self):
        self.nll, self.nll2, self.count = 0.0, 0.0, 0

    def add(self, nll: torch.Tensor):
        nll = nll.double()
        self.nll += nll.sum().item()
        self.nll2 += (nll * nll).sum().item()
        self.count += nll.numel()

    def ppl(self) -> tuple[float, float | None]:
        mean = self.nll / self.count
        ppl = math.exp(mean)
        var = self.nll2 / self.count - mean * mean
        return ppl, (ppl * math.sqrt(var / (self.count - 1)) if var > 0 and self.count > 1 else None)


def evaluate(model, tokens: torch.Tensor, ctx: int = 512, n_chunks: int | None = None,
             base: BaseLogits | None = None, progress: Progress = None, *,
             bos_token_id: int | None = None, batch_size: int = 1) -> EvalResult:
    """Score `model` (any HF causal LM) on `tokens`; with `base`, also KLD and same-top % against it.

    `progress(k)` is called after each k chunks. `batch_size` chunks go through one forward pass
    (1 is fastest on a 2-core CPU; results agree with unbatched within float tolerance).
    """
    tokens = tokens.reshape(-1).to(torch.long)
    n = resolve_chunks(tokens.numel(), ctx, n_chunks)
    if base is not None:
        base.check(tokens, ctx, n, bos_token_id)
    st, klds, same = _Stats(), [], 0
    for i, logits, targets in _scored_logits(model, tokens, ctx, n, bos_token_id, max(1, batch_size)):
        lq = torch.log_softmax(logits.double(), dim=-1)
        st.add(-lq.gather(-1, targets[:, None]).squeeze(-1))
        if base is not None:
            lp, top = base.chunk(i)
            if lp.shape[-1] != lq.shape[-1]:
                raise ValueError(f"vocabulary mismatch: base {lp.shape[-1]}, model {lq.shape[-1]}")
            klds.append((lp.exp() * (lp - lq)).sum(-1))
            same += int((logits.argmax(-1) == top).sum())
        if progress:
            progress(1)
    ppl, ppl_err = st.ppl()
    res = {"ppl": ppl, "ppl_stderr": ppl_err, "n_tokens_scored": st.count, "n_chunks": n, "ctx": ctx}
    if base is not None:
        k = torch.cat(klds).numpy()
        res.update(base_ppl=base.ppl, kld_mean=float(k.mean()),
                   kld_stderr=float(k.std(ddof=1) / math.sqrt(k.size)) if k.size > 1 else None,
                   kld_p99=float(np.quantile(k, 0.99)), same_top_pct=100.0 * same / st.count)
    return EvalResult(**res)


def default_cache_dir() -> Path:
    """$QTOOL_CACHE_DIR/eval, else ~/.cache/qtool/eval ($XDG_CACHE_HOME respected): see `qtool.cache`."""
    from qtool.cache import cache_root

    return cache_root() / "eval"


def _encode_rows(lp: torch.Tensor, top: torch.Tensor) -> np.ndarray:
    """float64 log-probs [rows, V] -> uint16 [rows, HEADER + V]: per-row affine uint16 codes.

    Codes span [max - LOGP_RANGE, max] (step <= 4.9e-4 nats); values below are clamped (each has
    p < 1.3e-14). Scale and offset are rounded to float32 *before* encoding, so decoding is consistent.
    """
    hi = lp.max(-1).values
    lo = torch.maximum(lp.min(-1).values, hi - LOGP_RANGE)
    scale = ((hi - lo) / 65535).float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    lo = lo.float()
    codes = ((lp - lo.double()[:, None]) / scale.double()[:, None]).round().clamp(0, 65535)
    out = np.empty((lp.shape[0], HEADER + lp.shape[1]), dtype=np.uint16)
    out[:, 0:2] = scale.numpy().view(np.uint16).reshape(-1, 2)
    out[:, 2:4] = lo.numpy().view(np.uint16).reshape(-1, 2)
    out[:, 4:6] = top.to(torch.int32).numpy().astype(np.uint32).view(np.uint16).reshape(-1, 2)
    out[:, HEADER:] = codes.to(torch.int32).numpy().astype(np.uint16)
    return out


def _decode_rows(rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """uint16 [rows, HEADER + V] -> (renormalized float64 log-probs [rows, V], base argmax int64 [rows])."""
    rows = np.ascontiguousarray(rows)
    scale = torch.from_numpy(rows[:, 0:2].copy().view(np.float32)).double()
    lo = torch.from_numpy(rows[:, 2:4].copy().view(np.float32)).double()
    top = torch.from_numpy(rows[:, 4:6].copy().view(np.uint32).astype(np.int64)).reshape(-1)
    lp = torch.from_numpy(rows[:, HEADER:].astype(np.float64)) * scale + lo
    # renormalizing makes the rounding error second order in KL(base || base) (measured ~1e-8)
    return torch.log_softmax(lp, dim=-1), top


class BaseLogits:
    """The base model's log-probs at the scored positions, cached on disk, one .npy per key.

    Key = sha256(format, base digest (caller's identity of the base checkpoint), sha256 of the token
    ids, ctx, n_chunks, BOS id). Files under `cache_dir`: `<key>.npy`, uint16 of shape
    [n_chunks, n_pos, 6 + V] (per row: float32 scale, float32 offset, uint32 exact base argmax, then V
    affine codes of log p_base, see `_encode_rows`), opened with mmap on reuse; and `<key>.json` (shape,
    base PPL and its stderr), written last: a key without its .json is not a cache entry.
    Both are written to temporary files first and moved in place with os.replace.

    Use `get_or_build` (loads, or runs the base once); `model` may be a zero-argument loader, only
    called on a miss.
    """

    def __init__(self, npy: Path, meta: dict):
        self.path, self.meta = npy, meta
        self.key, self.ctx, self.n_chunks = meta["key"], meta["ctx"], meta["n_chunks"]
        self.n_vocab, self.ppl, self.ppl_stderr = meta["n_vocab"], meta["ppl"], meta["ppl_stderr"]
        self.data = np.load(npy, mmap_mode="r")
        want = (self.n_chunks, self.ctx - 1 - self.ctx // 2, HEADER + self.n_vocab)
        if self.data.dtype != np.uint16 or self.data.shape != want:
            raise ValueError(f"{npy}: shape {self.data.shape} {self.data.dtype}, expected {want} uint16")

    @property
    def nbytes(self) -> int:
        return self.path.stat().st_size

    @staticmethod
    def make_key(digest: str, tokens: torch.Tensor, ctx: int, n_chunks: int, bos_token_id: int | None = None):
        body = f"qtool-base-logits-v{CACHE_FORMAT}|{digest}|{tokens_sha256(tokens.reshape(-1))}|" \
               f"ctx={ctx}|n_chunks={n_chunks}|bos={bos_token_id}"
        return hashlib.sha256(body.encode()).hexdigest()[:40]

    @classmethod
    def load(cls, key: str, cache_dir: Path | str | None = None) -> BaseLogits | None:
        """The cache entry `key`, or None if absent or unreadable."""
        d = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        npy, meta = d / f"{key}.npy", d / f"{key}.json"
        if not (npy.is_file() and meta.is_file()):
            return None
        try:
            return cls(npy, json.loads(meta.read_text()))
        except (ValueError, KeyError, OSError):
            return None

    @classmethod
    def build(cls, model, tokens: torch.Tensor, *, digest: str, ctx: int = 512, n_chunks: int | None = None,
              cache_dir: Path | str | None = None, bos_token_id: int | None = None,
              progress: Progress = None, batch_size: int = 1) -> BaseLogits:
        """Run the base over the chunks and write the cache entry (replacing any old one)."""
        tokens = tokens.reshape(-1).to(torch.long)
        n = resolve_chunks(tokens.numel(), ctx, n_chunks)
        key = cls.make_key(digest, tokens, ctx, n, bos_token_id)
        d = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        d.mkdir(parents=True, exist_ok=True)
        n_pos = ctx - 1 - ctx // 2
        st, arr, tmp = _Stats(), None, None
        try:
            for i, logits, targets in _scored_logits(model, tokens, ctx, n, bos_token_id, max(1, batch_size)):
                lp = torch.log_softmax(logits.double(), dim=-1)
                st.add(-lp.gather(-1, targets[:, None]).squeeze(-1))
                if arr is None:
                    shape = (n, n_pos, HEADER + lp.shape[-1])
                    need, free = 2 * math.prod(shape) + 4096, shutil.disk_usage(d).free
                    if need > free:
                        raise QtoolError(f"base logits cache needs {need / 1e9:.2f} GB in {d}, only "
                                         f"{free / 1e9:.2f} GB free: set QTOOL_CACHE_DIR or use fewer chunks")
                    fd, tmp = tempfile.mkstemp(dir=d, prefix=f"{key}.", suffix=".npy.tmp")
                    os.close(fd)
                    arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint16, shape=shape)
                arr[i] = _encode_rows(lp, logits.argmax(-1))
                if progress:
                    progress(1)
            arr.flush()
            del arr
            os.replace(tmp, d / f"{key}.npy")
            tmp = None
        finally:
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)
        ppl, ppl_err = st.ppl()
        meta = {"format": CACHE_FORMAT, "key": key, "digest": digest, "tokens_sha256": tokens_sha256(tokens),
                "ctx": ctx, "n_chunks": n, "n_pos": n_pos, "n_vocab": shape[-1] - HEADER,
                "bos_token_id": bos_token_id, "ppl": ppl, "ppl_stderr": ppl_err, "n_tokens_scored": st.count,
                "logp_range": LOGP_RANGE}
        tmp = d / f"{key}.{os.getpid()}.json.tmp"
        tmp.write_text(json.dumps(meta, indent=1))
        os.replace(tmp, d / f"{key}.json")
        return cls(d / f"{key}.npy", meta)

    @classmethod
    def get_or_build(cls, model, tokens: torch.Tensor, *, digest: str, ctx: int = 512,
                     n_chunks: int | None = None, cache_dir: Path | str | None = None,
                     bos_token_id: int | None = None, progress: Progress = None,
                     batch_size: int = 1) -> BaseLogits:
        """Load the entry for (digest, tokens, ctx, chunks actually scored, BOS) or build it.

        `model` is a model or a zero-argument callable returning one (called only on a miss).
        """
        tokens = tokens.reshape(-1).to(torch.long)
        n = resolve_chunks(tokens.numel(), ctx, n_chunks)
        hit = cls.load(cls.make_key(digest, tokens, ctx, n, bos_token_id), cache_dir)
        if hit is not None:
            if progress:
                progress(n)
            return hit
        if not isinstance(model, torch.nn.Module) and callable(model):
            model = model()
        return cls.build(model, tokens, digest=digest, ctx=ctx, n_chunks=n, cache_dir=cache_dir,
                         bos_token_id=bos_token_id, progress=progress, batch_size=batch_size)

    def check(self, tokens: torch.Tensor, ctx: int, n_chunks: int, bos_token_id: int | None):
        """ValueError unless this entry was built for exactly these tokens / ctx / chunks / BOS."""
        m = self.meta
        got = (m["tokens_sha256"], m["ctx"], m["n_chunks"], m["bos_token_id"])
        if got != (tokens_sha256(tokens), ctx, n_chunks, bos_token_id):
            raise ValueError(f"base logits {self.key} were built for (tokens, ctx, n_chunks, bos) = {got}, "
                             f"not ctx={ctx}, n_chunks={n_chunks}, bos={bos_token_id}")

    def chunk(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(base log-probs float64 [n_pos, V], exact base argmax int64 [n_pos]) of chunk i."""
        return _decode_rows(self.data[i])


def generate_text(model, tokenizer, n_tokens: int, seed: int = 0, *, seq_len: int = 512,
                  batch_size: int = 4, temperature: float = 1.0, top_k: int | None = None) -> str:
    """Held-out text sampled from `model` itself, for when the user gives no evaluation text.

    ceil(n_tokens / seq_len) sequences of seq_len tokens (the last one trimmed to the total), each
    started from BOS (EOS if none), `batch_size` sampled in parallel with a KV cache; plain ancestral
    sampling at `temperature` (optionally top-k) from a seeded torch.Generator, so the text is the same
    for the same seed on the same machine. Special tokens are never sampled, so no sequence ends early
    and the text decodes cleanly. Sequences are joined with a blank line. Re-tokenizing the text gives
    about, not exactly, n_tokens tokens.
    """
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    seq_len = min(seq_len, limit - 1) if limit else seq_len
    banned = set(tokenizer.all_special_ids)
    banned |= {i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special}
    gen = torch.Generator().manual_seed(seed)
    cache_kw = "cache" if _accepts(model, "cache") else "past_key_values"
    lengths = [min(seq_len, n_tokens - k) for k in range(0, n_tokens, seq_len)]
    dev = getattr(model, "device", None)
    texts = []
    with torch.inference_mode():
        for b0 in range(0, len(lengths), batch_size):
            lens = lengths[b0:b0 + batch_size]
            first = torch.full((len(lens), 1), start, dtype=torch.long, device=dev)
            out = model(input_ids=first, use_cache=True)
            steps = []
            for t in range(max(lens)):
                logits = out.logits[:, -1].float().cpu() / temperature
                vocab = logits.shape[-1]
                logits[:, [i for i in banned if i < vocab]] = float("-inf")
                if top_k:
                    kth = logits.topk(top_k, dim=-1).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=gen)
                steps.append(nxt)
                if t + 1 < max(lens):
                    past = out.cache if hasattr(out, "cache") else out.past_key_values
                    out = model(input_ids=nxt.to(dev), use_cache=True, **{cache_kw: past})
            ids = torch.cat(steps, dim=1)
            texts += [tokenizer.decode(ids[j, :k].tolist(), skip_special_tokens=True)
                      for j, k in enumerate(lens)]
    return "\n\n".join(texts)

"""Calibration data: token windows from a text/JSONL file, a Hugging Face dataset (`hf:NAME[:CONFIG[:SPLIT]]`,
through the `datasets` library: needs the network or its local cache), or text sampled from the model
itself (`generated`, offline)."""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import torch

from qtool.errors import UsageError


def token_windows(ids: torch.Tensor, samples: int, seq_len: int, seed: int, where: str) -> torch.Tensor:
    """`samples` windows of `seq_len` tokens at seeded random offsets of `ids` -> LongTensor [samples, seq_len].

    A text holding fewer than `samples` non-overlapping windows still gives `samples` windows (they overlap)
    with a warning; a text shorter than one window is an error.
    """
    n = ids.numel()
    if n < seq_len:
        raise UsageError(f"{where}: calibration text has {n} tokens, fewer than one sample of --seq-len {seq_len}")
    if n < samples * seq_len:
        warnings.warn(f"{where}: {n} tokens hold only {n // seq_len} distinct samples of {seq_len}; "
                      f"the {samples} windows overlap", stacklevel=2)
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, n - seq_len + 1, (samples,), generator=g)
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()])


HF_PREFIX = "hf:"
HF_MAX_CHARS = 20_000_000  # rows are read until this much text: a calibration set, not the whole corpus


@functools.lru_cache(maxsize=2)
def read_hf_dataset(source: str) -> str:
    """`hf:NAME[:CONFIG[:SPLIT]]` (split default `train`): the rows' `text` field (else the first string
    column), joined by blank lines, read in order until `HF_MAX_CHARS`. NAME is a Hub id or a local dataset
    directory; `datasets` resolves it (offline: from its cache, with HF_DATASETS_OFFLINE=1). Kept for the
    process: the digest and the token windows of one run read the dataset once."""
    parts = source[len(HF_PREFIX):].split(":")
    if not parts[0] or len(parts) > 3:
        raise UsageError(f"calibration source {source!r}: expected hf:NAME[:CONFIG[:SPLIT]], "
                         "e.g. hf:wikitext:wikitext-2-raw-v1:train")
    name, config, split = parts[0], (parts[1] if len(parts) > 1 and parts[1] else None), (
        parts[2] if len(parts) > 2 and parts[2] else "train")
    try:
        import datasets
    except ImportError:
        raise UsageError(f"calibration source {source!r} needs the `datasets` package (pip install datasets); "
                         "or save the text to a file") from None
    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as e:  # noqa: BLE001 - offline, unknown name, bad config/split: all the user's to fix
        raise UsageError(f"calibration source {source!r}: datasets cannot load it: {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''} (offline? save the text to a file, or use "
                         "`generated`)") from None
    texts, total, column = [], 0, None
    for row in ds:
        if column is None:
            column = "text" if isinstance(row.get("text"), str) else next(
                (k for k, v in row.items() if isinstance(v, str)), None)
            if column is None:
                raise UsageError(f"calibration source {source!r}: its rows have no string column "
                                 f"(columns: {', '.join(row)})")
        t = row.get(column)
        if isinstance(t, str) and t.strip():
            texts.append(t)
            total += len(t) + 2
            if total >= HF_MAX_CHARS:
                break
    if not texts:
        raise UsageError(f"calibration source {source!r}: split {split!r} holds no text")
    return "\n\n".join(texts)


def read_text_source(path: str | Path) -> str:
    """A calibration text: a plain text file, JSONL whose records carry a `text` field (joined by blank
    lines), or a Hugging Face dataset `hf:NAME[:CONFIG[:SPLIT]]` (`read_hf_dataset`)."""
    import json

    if str(path).startswith(HF_PREFIX):
        return read_hf_dataset(str(path))
    p = Path(path)
    if not p.is_file():
        hint = (" (a Hugging Face dataset is named hf:NAME[:CONFIG[:SPLIT]], e.g. hf:wikitext:wikitext-2-raw-v1)"
                if "/" in str(path) and not p.parent.exists() else "")
        raise UsageError(f"calibration source {p}: file not found{hint}")
    raw = p.read_text(encoding="utf-8", errors="replace")
    if p.suffix != ".jsonl":
        return raw
    texts = []
    for i, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError as e:
            raise UsageError(f"{p}:{i}: not valid JSON ({e})") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
            raise UsageError(f"{p}:{i}: a JSONL calibration record needs a string field `text`")
        texts.append(rec["text"])
    return "\n\n".join(texts)


def source_digest(spec) -> str:
    """What identifies the calibration data: `generated`, or the sha256 of the source file's bytes."""
    import hashlib

    if spec.source == "generated":
        return "generated"
    if spec.source.startswith(HF_PREFIX):  # the text as read (a Hub dataset may change under its name)
        return hashlib.sha256(read_hf_dataset(spec.source).encode()).hexdigest()
    p = Path(spec.source)
    if not p.is_file():
        raise UsageError(f"calibration source {p}: file not found")
    return hashlib.sha256(p.read_bytes()).hexdigest()


def calibration_tokens(source, spec, tokenizer) -> torch.Tensor:
    """Token windows [samples, seq_len] for a plan's calibration spec (text/JSONL path or `generated`)."""
    if spec.source == "generated":
        text, where = generated_text(source, spec.samples * spec.seq_len, spec.seed), "generated text"
    else:
        text, where = read_text_source(spec.source), str(spec.source)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    return token_windows(ids, spec.samples, spec.seq_len, spec.seed, where)


def generated_text(source, n_tokens: int, seed: int, seq_len: int = 512, purpose: str = "calib") -> str:
    """Text sampled from the model itself (seeded), cached per (model digest, tokens, seed, seq_len, purpose).

    Loads the whole float model once (sampling needs it); later calls read the cache.
    """
    import hashlib

    from qtool.eval.perplexity import default_cache_dir, generate_text
    from qtool.runtime.load import load_model

    key = hashlib.sha256(f"{purpose}:{source.digest()}:{n_tokens}:{seed}:{seq_len}".encode()).hexdigest()[:24]
    path = default_cache_dir() / f"{purpose}-{key}.txt"
    if path.is_file():
        return path.read_text()
    model, tok, _ = load_model(source.path)
    text = generate_text(model, tok, n_tokens, seed=seed, seq_len=seq_len)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return text
